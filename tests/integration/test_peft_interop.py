"""PEFT interop: adapter files that edgetune writes load in Hugging Face PEFT, and PEFT's files load in edgetune,
with the same outputs (float32, tight tolerance).

Both directions on tiny models (linear, conv2d, grouped conv2d, embedding; per-layer ranks and alphas; rsLoRA;
DoRA), on tiny random Hugging Face models (a BERT inside edgetune's classifier wrapper, a Llama causal LM: the
module-path mapping), and on the two offline pretrained networks: MiniLM (BERT) and SmolLM2-135M-Instruct
(Llama; ``slow``: its GGUF is dequantized once into a temporary ``$EDGETUNE_CACHE``). Every adapter tensor is
random (B non-zero), and each test checks that the adapter changes the output, so a wrong mapping fails.
Skipped when peft or transformers is missing, and the pretrained tests when their network is not installed.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from edgetune.adapters import (
    AdapterConfig,
    adapter_configs,
    adapter_layers,
    add_adapter_,
    remove_adapters_,
)
from edgetune.adapters.io import load_adapter_, save_adapter
from edgetune.models.pretrained import load_pretrained
from edgetune.models.pretrained.catalog import is_installed
from edgetune.models.pretrained.hf import FeatureClassifier, float32_kwargs, offline_hf

# transformers 5 deprecates the attribute that PEFT 0.21's PeftModel.__init__ reads; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

HAS_DORA = importlib.util.find_spec("edgetune.adapters.dora") is not None
if HAS_DORA:
    importlib.import_module("edgetune.adapters.dora")  # registers the method
METHODS = ["lora", pytest.param("dora", marks=pytest.mark.xfail(not HAS_DORA, run=False,
                                                                  reason="edgetune.adapters.dora is not written yet"))]


def _gguf_ready() -> bool:
    return importlib.util.find_spec("gguf") is not None


needs_minilm = pytest.mark.skipif(not is_installed("minilm"), reason="run `make models` (minilm)")
needs_smollm2 = pytest.mark.skipif(not (is_installed("smollm2-135m") and _gguf_ready()), reason="run `make models`")


def _randomize_edgetune(model: nn.Module, std: float = 0.3) -> None:
    """Every adapter tensor moved by noise (B non-zero; DoRA's magnitude off the weight norm)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, lay in adapter_layers(model):
            for p in lay.adapters.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


def _randomize_peft(model: nn.Module, std: float = 0.3) -> None:
    """PEFT's tensors: B (zero at PEFT's init) and A get noise, DoRA's magnitude is scaled."""
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _close(got: Tensor, want: Tensor, base: Tensor, tol: float = 1e-5) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter does not change the output: the test could not fail"
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --- tiny plain modules ----------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.block = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, ids: Tensor, img: Tensor) -> Tensor:
        return self.block(self.emb(ids)).sum(1) + self.gconv(self.conv(img)).mean((2, 3))  # (B, 4)


@pytest.fixture
def tiny() -> Callable[[], Tiny]:
    torch.manual_seed(0)
    state = Tiny().state_dict()

    def make() -> Tiny:
        m = Tiny()
        m.load_state_dict(state)
        return m.eval()

    return make


def _tiny_inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 10, (2, 5), generator=g), torch.randn(2, 3, 8, 8, generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_edgetune_to_peft(method: str, tiny: Callable[[], Tiny], tmp_path: Path) -> None:
    model = tiny()
    cfg = AdapterConfig.model_validate({"method": method, "rank": 2, "alpha": 3, "targets": ["emb", "block.*", "conv"],
                                        "kinds": ["linear", "conv2d", "embedding"], "rank_pattern": {"block.2": 3},
                                        "alpha_pattern": {"conv": 1.5}})
    add_adapter_(model, cfg)
    _randomize_edgetune(model)
    x = _tiny_inputs()
    with torch.no_grad():
        want, base = model.eval()(*x), tiny()(*x)
    save_adapter(model, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "ad"))
    with torch.no_grad():
        _close(pm(*x), want, base)


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1:UserWarning")  # PEFT: no merge
def test_tiny_grouped_conv_both_ways(tiny: Callable[[], Tiny], tmp_path: Path) -> None:
    model = tiny()
    add_adapter_(model, AdapterConfig.model_validate({"rank": 2, "alpha": 4, "targets": ["gconv"],
                                                      "kinds": ["conv2d"]}))
    _randomize_edgetune(model)
    x = _tiny_inputs()
    with torch.no_grad():
        want, base = model.eval()(*x), tiny()(*x)
    save_adapter(model, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "ad"))
    pm.save_pretrained(str(tmp_path / "back"))  # PEFT's own file of the same adapter, read back by edgetune
    back = load_adapter_(tiny(), tmp_path / "back")
    with torch.no_grad():
        _close(pm(*x), want, base)
        _close(back.eval()(*x), want, base)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rslora", [False, True])
def test_tiny_peft_to_edgetune(method: str, rslora: bool, tiny: Callable[[], Tiny], tmp_path: Path) -> None:
    conf = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["emb", "0", "2", "conv"], use_rslora=rslora,
                           rank_pattern={"block.2": 3}, alpha_pattern={"^block.0": 7}, use_dora=method == "dora")
    pm = peft.get_peft_model(tiny(), conf)
    _randomize_peft(pm)
    x = _tiny_inputs()
    with torch.no_grad():
        want, base = pm.eval()(*x), tiny()(*x)
    pm.save_pretrained(str(tmp_path / "peft"))
    model = load_adapter_(tiny(), tmp_path / "peft")
    with torch.no_grad():
        _close(model.eval()(*x), want, base)
    cfg = adapter_configs(model)["default"]
    assert cfg.method == method and cfg.rslora == rslora and cfg.rank_pattern == {"block.2": 3}


# --- tiny random Hugging Face models: the module-path mapping -----------------------------------------------------


def _tiny_bert() -> Any:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16)
    torch.manual_seed(3)
    return transformers.BertModel(cfg).eval()


def _tiny_llama() -> Any:
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(4)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_tiny_bert_inside_a_classifier_maps_to_the_plain_bert(tmp_path: Path) -> None:
    """edgetune's FeatureClassifier(BertModel) adapter -> PEFT on the bare BertModel, and PEFT's file back."""
    bert = _tiny_bert()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(5))
    model = FeatureClassifier(copy.deepcopy(bert), nn.Linear(32, 3)).eval()
    add_adapter_(model, AdapterConfig.model_validate({"rank": 4, "alpha": 8, "targets": ["query", "value",
                                                                                          "word_embeddings"],
                                                      "kinds": ["linear", "embedding"]}))
    _randomize_edgetune(model, 0.1)
    with torch.no_grad():
        want, base = model.features.encoder(input_ids=ids).last_hidden_state, bert(input_ids=ids).last_hidden_state
    save_adapter(model, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(bert), str(tmp_path / "ad"))
    with torch.no_grad():
        _close(pm(input_ids=ids).last_hidden_state, want, base)
    pm.save_pretrained(str(tmp_path / "back"))
    back = load_adapter_(FeatureClassifier(copy.deepcopy(bert), nn.Linear(32, 3)), tmp_path / "back")
    with torch.no_grad():
        _close(back.features.encoder(input_ids=ids).last_hidden_state, want, base)


def test_tiny_bert_adapter_on_the_head_keeps_whole_model_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    """An adapter reaching outside the HF model (the wrapper's head) is written with the whole model's paths."""
    bert = _tiny_bert()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(8)
    head = nn.Linear(32, 3)
    model = FeatureClassifier(copy.deepcopy(bert), copy.deepcopy(head)).eval()
    add_adapter_(model, AdapterConfig.model_validate({"rank": 2, "alpha": 2, "targets": ["query", "head"]}))
    _randomize_edgetune(model, 0.1)
    with torch.no_grad():
        want, base = model(input_ids=ids), FeatureClassifier(copy.deepcopy(bert), copy.deepcopy(head))(input_ids=ids)
    save_adapter(model, tmp_path / "ad")
    assert "outside the Hugging Face model" in caplog.text
    back = load_adapter_(FeatureClassifier(copy.deepcopy(bert), copy.deepcopy(head)), tmp_path / "ad")
    assert "head" in adapter_configs(back)["default"].targets
    with torch.no_grad():
        _close(back.eval()(input_ids=ids), want, base)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_llama_both_ways(method: str, tmp_path: Path) -> None:
    llama = _tiny_llama()
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = llama(input_ids=ids).logits
    model = copy.deepcopy(llama)
    add_adapter_(model, AdapterConfig.model_validate({"method": method, "rank": 4, "alpha": 8,
                                                      "targets": ["q_proj", "v_proj", "down_proj"]}))
    _randomize_edgetune(model, 0.1)
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
    save_adapter(model, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "ad"))
    assert pm.peft_config["default"].task_type == "CAUSAL_LM"
    with torch.no_grad():
        _close(pm(input_ids=ids).logits, want, base)
    # PEFT -> edgetune with PEFT's own selection of layers (layers_to_transform)
    conf = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "up_proj"], layers_to_transform=[1],
                           task_type="CAUSAL_LM", use_dora=method == "dora")
    pm2 = peft.get_peft_model(copy.deepcopy(llama), conf)
    _randomize_peft(pm2, 0.1)
    with torch.no_grad():
        want2 = pm2.eval()(input_ids=ids).logits
    pm2.save_pretrained(str(tmp_path / "peft"))
    back = load_adapter_(copy.deepcopy(llama), tmp_path / "peft")
    assert sorted(adapter_configs(back)["default"].targets) == ["model.layers.1.mlp.up_proj",
                                                                "model.layers.1.self_attn.k_proj"]
    with torch.no_grad():
        _close(back.eval()(input_ids=ids).logits, want2, base)


# --- MiniLM (BERT) ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Any:
    return load_pretrained("minilm", num_classes=3)


def _plain_hf(auto: Any, folder: str) -> Any:
    with offline_hf():
        return auto.from_pretrained(folder, local_files_only=True, **float32_kwargs()).eval()


@needs_minilm
@pytest.mark.parametrize("method", METHODS)
def test_minilm_both_ways(method: str, minilm: Any, tmp_path: Path) -> None:
    """edgetune's MiniLM classifier (BERT under ``features.encoder``) <-> PEFT on ``AutoModel`` of the same files."""
    folder = minilm.info["hf_folder"]
    enc = dict(minilm.tokenizer(["a tiny test", "the adapter moves these hidden states"], padding=True,
                                return_tensors="pt"))
    plain = _plain_hf(transformers.AutoModel, folder)
    with torch.no_grad():
        base = plain(**enc).last_hidden_state
    # (1) edgetune -> PEFT
    model = copy.deepcopy(minilm.model).eval()
    add_adapter_(model, AdapterConfig.model_validate({"method": method, "rank": 4, "alpha": 8,
                                                      "targets": ["query", "value", "word_embeddings"],
                                                      "kinds": ["linear", "embedding"]}))
    _randomize_edgetune(model, 0.05)
    with torch.no_grad():
        want = model.eval().features.encoder(**enc).last_hidden_state
    save_adapter(model, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(plain, str(tmp_path / "ad"))
    with torch.no_grad():
        _close(pm(**enc).last_hidden_state, want, base)
    # (2) PEFT -> edgetune
    conf = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["key", "dense"], layers_to_transform=[0, 5],
                           use_dora=method == "dora")
    pm2 = peft.get_peft_model(_plain_hf(transformers.AutoModel, folder), conf)
    _randomize_peft(pm2, 0.05)
    with torch.no_grad():
        want2 = pm2.eval()(**enc).last_hidden_state
    pm2.save_pretrained(str(tmp_path / "peft"))
    back = load_adapter_(copy.deepcopy(minilm.model), tmp_path / "peft")
    assert all(t.startswith("features.encoder.encoder.layer.") for t in adapter_configs(back)["default"].targets)
    with torch.no_grad():
        _close(back.eval().features.encoder(**enc).last_hidden_state, want2, base)


# --- SmolLM2-135M-Instruct (Llama) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """SmolLM2 dequantized once into a temporary cache (as in tests/unit/models/test_pretrained_networks.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_CACHE", str(tmp_path_factory.mktemp("edgetune-cache")))
        yield load_pretrained("smollm2-135m")


SMOL_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.29.mlp.down_proj"]


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("method", METHODS)
def test_smollm2_both_ways(method: str, smollm2: Any, tmp_path: Path) -> None:
    folder = smollm2.info["hf_folder"]
    # DoRA's norms are summed in another order than PEFT's; through 30 blocks, logits of size ~15 move by ~4e-5
    tol = 1e-5 if method == "lora" else 1e-4
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"][:, :8]
    plain = _plain_hf(transformers.AutoModelForCausalLM, folder)
    with torch.no_grad():
        base = plain(input_ids=ids).logits
    # (1) edgetune -> PEFT
    model = smollm2.model
    add_adapter_(model, AdapterConfig.model_validate({"method": method, "rank": 4, "alpha": 8,
                                                      "targets": SMOL_LAYERS}))
    try:
        _randomize_edgetune(model, 0.05)
        with torch.no_grad():
            want = model.eval()(input_ids=ids).logits
        save_adapter(model, tmp_path / "ad")
    finally:
        remove_adapters_(model)  # the module-scoped model is shared by the parametrized tests
    pm = peft.PeftModel.from_pretrained(plain, str(tmp_path / "ad"))
    with torch.no_grad():
        _close(pm(input_ids=ids).logits, want, base, tol)
    # (2) PEFT -> edgetune
    del pm, plain
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj"],
                           layers_to_transform=[1, 28], task_type="CAUSAL_LM", use_dora=method == "dora")
    pm2 = peft.get_peft_model(_plain_hf(transformers.AutoModelForCausalLM, folder), conf)
    _randomize_peft(pm2, 0.05)
    with torch.no_grad():
        want2 = pm2.eval()(input_ids=ids).logits
    pm2.save_pretrained(str(tmp_path / "peft"))
    del pm2
    try:
        load_adapter_(model, tmp_path / "peft")
        assert len(adapter_configs(model)["default"].targets) == 6
        with torch.no_grad():
            _close(model.eval()(input_ids=ids).logits, want2, base, tol)
    finally:
        remove_adapters_(model)
