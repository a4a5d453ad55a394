"""The three offline pretrained networks (each skipped when its package is not installed), MobileNetV2's
architecture and the image transform (always run)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgetune.core.errors import ShapeError
from edgetune.models.pretrained import PRETRAINED, ImageTransform, MobileNetV2, load_pretrained
from edgetune.models.pretrained.catalog import is_installed, locate
from edgetune.models.pretrained.image_transform import IMAGENET_MEAN, IMAGENET_STD
from edgetune.models.pretrained.weights import load_weight_file


def _hf_ready() -> bool:
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_mobilenet = pytest.mark.skipif(
    not is_installed("mobilenet-v2"), reason="run `make models` (mobilenet-v2)"
)
needs_minilm = pytest.mark.skipif(
    not (is_installed("minilm") and _hf_ready()), reason="run `make models` (minilm)"
)
needs_smollm2 = pytest.mark.skipif(
    not (is_installed("smollm2-135m") and _hf_ready()), reason="run `make models`"
)


# --- image transform ----------------------------------------------------------------------------------------


def test_transform_uint8_grey_to_normalized_rgb() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    y = torch.tensor([3, 7])
    out, y_out = ImageTransform(channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)([x, y])
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32 and y_out is y
    for c in range(3):
        assert torch.allclose(out[0, c], torch.tensor(-IMAGENET_MEAN[c] / IMAGENET_STD[c]))
        assert torch.allclose(out[1, c], torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_transform_float_is_not_rescaled_and_resizes() -> None:
    x = torch.rand(3, 3, 28, 20)
    out = ImageTransform(size=32)([x, torch.zeros(3)])[0]
    assert out.shape == (3, 3, 32, 32)
    assert out.mean().item() == pytest.approx(x.mean().item(), abs=0.02)  # [0, 1] kept, not divided by 255
    smooth = ImageTransform(size=8)([torch.ones(1, 1, 64, 64), torch.zeros(1)])[0]
    assert torch.allclose(smooth, torch.ones(1, 1, 8, 8))


def test_transform_rgb_to_grey_and_dict_batches() -> None:
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[:, 1] = 255  # pure green
    batch = {"pixel_values": x, "labels": torch.tensor([1])}
    out = ImageTransform(channels=1)(batch)
    assert out["labels"] is batch["labels"]
    assert torch.allclose(out["pixel_values"], torch.full((1, 1, 2, 2), 0.587))
    grey = ImageTransform(channels=3)([torch.rand(2, 5, 5), torch.zeros(2)])[0]  # (B, H, W)
    assert grey.shape == (2, 3, 5, 5) and torch.equal(grey[:, 0], grey[:, 2])


def test_transform_rejects_bad_shapes() -> None:
    with pytest.raises(ShapeError, match=r"\(B, C, H, W\).*permute"):
        ImageTransform()([torch.zeros(2, 8, 8, 3), torch.zeros(2)])
    with pytest.raises(ShapeError, match="both mean and std"):
        ImageTransform(mean=IMAGENET_MEAN)


# --- MobileNetV2 architecture ------------------------------------------------------------------------------


def test_mobilenet_architecture() -> None:
    model = MobileNetV2().eval()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2 count
    assert isinstance(model.get_submodule("classifier.1"), nn.Linear)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 1000)
        assert model.forward_features(torch.randn(1, 3, 64, 80)).shape == (1, 1280)
    assert len(model.features) == 19


@needs_mobilenet
def test_mobilenet_state_dict_names_match_exactly() -> None:
    state = load_weight_file(locate(PRETRAINED.get("mobilenet-v2")))  # type: ignore[arg-type]
    own = MobileNetV2().state_dict()
    assert list(state) == list(own)
    assert all(state[k].shape == own[k].shape for k in own)


@needs_mobilenet
def test_mobilenet_new_head_is_seeded_and_backbone_kept() -> None:
    torch.manual_seed(1)
    a = load_pretrained("mobilenet-v2", num_classes=10, image_size=96)
    torch.manual_seed(1)
    b = load_pretrained("mobilenet-v2", num_classes=10)
    imagenet = load_pretrained("mobilenet-v2")
    assert a.head == "classifier.1" and a.task == "classification"
    head = a.model.get_submodule("classifier.1")
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (1280, 10)
    assert torch.equal(head.weight, b.model.get_submodule("classifier.1").weight)
    assert imagenet.model.get_submodule("classifier.1").out_features == 1000
    assert torch.equal(a.model.features[5].conv[1][0].weight, imagenet.model.features[5].conv[1][0].weight)
    assert "b03531047ffa" in a.source and a.info["sha256"] == PRETRAINED.get("mobilenet-v2").sha256
    x, _ = a.transform([torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), torch.zeros(4)])
    assert x.shape == (4, 3, 96, 96)
    assert a.model.eval()(x).shape == (4, 10)


# ImageNet-1k indices seen in the top-5 of scikit-learn's two sample photos (224 px, bilinear antialias).
# china.jpg (a Chinese temple): 663 monastery, 698 palace, 483 castle, 442 bell cote, 832 stupa.
# flower.jpg (a pompom dahlia; ImageNet has no dahlia): 599 honeycomb (its cell-like petals), then fungi:
# 994 stinkhorn, 996 hen-of-the-woods, 947 mushroom, 991 coral fungus.
CHINA_TOP5 = {663, 698, 483, 442, 832}
FLOWER_TOP5 = {599, 994, 996, 947, 991}


@needs_mobilenet
def test_mobilenet_predicts_sample_photos() -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    names = [Path(f).name for f in photos.filenames]
    x = torch.from_numpy(np.stack(photos.images)).permute(0, 3, 1, 2).contiguous()  # (2, 3, 427, 640) uint8
    loaded = load_pretrained("mobilenet-v2", image_size=224)
    x, _ = loaded.transform([x, torch.zeros(2)])
    with torch.no_grad():
        probs = loaded.model.eval()(x).softmax(-1)
    top = {n: probs[i].topk(5) for i, n in enumerate(names)}
    china, flower = top["china.jpg"], top["flower.jpg"]
    assert int(china.indices[0]) in {663, 698}  # monastery or palace first
    assert len(set(china.indices.tolist()) & CHINA_TOP5) >= 4
    assert int(flower.indices[0]) == 599 and float(flower.values[0]) > 0.4
    assert len(set(flower.indices.tolist()) & FLOWER_TOP5) >= 4


# --- MiniLM --------------------------------------------------------------------------------------------------


@needs_minilm
def test_minilm_similar_sentences_are_closer() -> None:
    loaded = load_pretrained("minilm")
    assert loaded.task == "features" and loaded.tokenizer is not None
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply today.",
    ]
    enc = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert emb.shape == (3, 384)
    emb = nn.functional.normalize(emb, dim=-1)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.7 and unrelated < 0.1  # sentence-transformers gives 0.755 and 0.004


@needs_minilm
def test_minilm_classifier_head() -> None:
    loaded = load_pretrained("minilm", num_classes=5)
    assert loaded.task == "classification" and loaded.head == "head"
    enc = loaded.tokenizer(["spam spam spam", "hello"], padding=True, return_tensors="pt")
    logits = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert logits.shape == (2, 5)


# --- SmolLM2 ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("edgetune-cache")
        mp.setenv("EDGETUNE_CACHE", str(cache))
        yield cache


@needs_smollm2
def test_smollm2_answers_paris(smollm2_cache: Path) -> None:
    t0 = time.perf_counter()
    loaded = load_pretrained("smollm2-135m")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = load_pretrained("smollm2-135m")
    cached = time.perf_counter() - t0
    assert loaded.task == "lm" and sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    assert str(smollm2_cache) in again.info["hf_folder"]
    assert cached < cold / 5, (cold, cached)  # the float32 copy is reused, not converted again
    tok = again.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = again.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
