"""moment_pool against a naive per-example loop, masks, layouts and bad input."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental import moment_pool


def _naive(tokens: torch.Tensor, orders: tuple[int, ...], standardize: bool = True) -> torch.Tensor:
    """tokens (L, D) of one example -> (len(orders) * D,), one order at a time with plain loops."""
    out = []
    mu = tokens.mean(0)
    sd = ((tokens - mu) ** 2).mean(0).sqrt()
    for k in orders:
        if k == 1:
            out.append(mu)
        elif k == 2:
            out.append(sd)
        else:
            z = (tokens - mu) / sd if standardize else tokens - mu
            out.append(torch.stack([(z[:, j] ** k).mean() for j in range(tokens.shape[1])]))
    return torch.cat(out)


@pytest.mark.parametrize("orders", [(1,), (1, 2), (1, 2, 3), (2, 4, 1)])
@pytest.mark.parametrize("standardize", [True, False])
def test_tokens_with_mask_match_naive(orders: tuple[int, ...], standardize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    lengths = [7, 3, 5, 2]
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    got = moment_pool(h, 1, orders, mask, standardize=standardize)
    assert got.shape == (4, len(orders) * 5)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(got[i], _naive(h[i, :n], orders, standardize))


def test_feature_map_positions_equal_token_layout() -> None:
    f = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    as_tokens = f.flatten(2).transpose(1, 2)  # (B, H*W, C)
    torch.testing.assert_close(moment_pool(f, (2, 3), (1, 2, 3)), moment_pool(as_tokens, 1, (1, 2, 3)))
    region = torch.zeros(3, 4, 5)
    region[:, 1:3, 2:] = 1
    torch.testing.assert_close(moment_pool(f, (2, 3), (1, 2), region),
                               moment_pool(f[:, :, 1:3, 2:], (2, 3), (1, 2)))


def test_hand_computed_case_and_block_norm() -> None:
    h = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])  # two tokens: mean (2, 0), std (1, 0)
    torch.testing.assert_close(moment_pool(h, 1, (1, 2)), torch.tensor([[2.0, 0.0, 1.0, 0.0]]))
    # constant channel: sigma 0 -> standardized skewness 0, not NaN
    assert torch.isfinite(moment_pool(h, 1, (3,))).all()
    normed = moment_pool(h, 1, (1, 2), block_norm=True)
    torch.testing.assert_close(normed, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))


def test_constant_channel_has_finite_gradients() -> None:
    h = torch.randn(2, 5, 3)
    h[:, :, 1] = 0.7  # a channel constant over the tokens (MiniLM's last LayerNorm has such channels)
    h.requires_grad_(True)
    moment_pool(h, 1, (1, 2, 3)).sum().backward()
    assert torch.isfinite(h.grad).all()


def test_bf16_input_is_pooled_in_float32() -> None:
    h = torch.randn(2, 9, 3)
    got = moment_pool(h.bfloat16(), 1, (1, 2, 3))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), moment_pool(h.bfloat16().float(), 1, (1, 2, 3)), atol=0.02, rtol=0.02)


def test_bad_input_is_named() -> None:
    h = torch.randn(2, 3, 4)
    with pytest.raises(ConfigError, match="at least one order"):
        moment_pool(h, 1, ())
    with pytest.raises(ConfigError, match=">= 1"):
        moment_pool(h, 1, (0, 1))
    with pytest.raises(ConfigError, match="repeat"):
        moment_pool(h, 1, (1, 1))
    with pytest.raises(ShapeError, match="batch dimension"):
        moment_pool(h, 0)
    with pytest.raises(ShapeError, match="no position"):
        moment_pool(h, 1, mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ShapeError, match="does not fit"):
        moment_pool(h, 1, mask=torch.ones(2, 5))
