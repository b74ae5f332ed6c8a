"""Triton fused MoE (expert-sorted grouped GEMMs) against the per-expert torch loop, and the
expert alignment it runs on."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from kernels.fused_moe import (
    MoELaunchConfig,
    align_by_expert,
    fused_moe,
    fused_moe_ref,
    launch_fused_moe,
)

Poisoned = Callable[[], AbstractContextManager[None]]

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
SMALL = MoELaunchConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)


def _problem(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int,
    dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    gen = torch.Generator().manual_seed(num_tokens * 131 + num_experts)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device, dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(
        device, dtype
    )
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(device, dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(device)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return x, w13, w2, weights, ids


# (tokens, experts, top_k, hidden, intermediate): a decode row; tokens spread over more
# blocks than one; sizes that are not tile multiples; more experts than tokens.
SHAPES = [(1, 8, 2, 32, 48), (37, 4, 2, 48, 40), (5, 16, 4, 32, 16)]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter"), SHAPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_moe_matches_reference(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int, activation: str,
    dtype: torch.dtype, device: torch.device, poisoned: Poisoned,
) -> None:  # fmt: skip
    x, w13, w2, weights, ids = _problem(tokens, experts, top_k, hidden, inter, dtype, device)
    with poisoned():
        out = launch_fused_moe(x, w13, w2, weights, ids, activation, SMALL)
    expected = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, activation)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_experts_of_other_ranks_contribute_nothing(
    dtype: torch.dtype, device: torch.device
) -> None:
    # Expert parallelism: this rank holds experts 0-1 of 4; ids 2-3 (and -1) are elsewhere.
    x, w13, w2, weights, ids = _problem(9, 4, 2, 32, 16, dtype, device)
    ids[0] = torch.tensor([1, 0])  # a token routed only to the other rank's experts
    local_ids = ids - 2  # as a rank holding experts 2 and 3 sees them
    out = launch_fused_moe(x, w13[2:], w2[2:], weights, local_ids, "silu", SMALL)
    expected = fused_moe_ref(x.float(), w13[2:].float(), w2[2:].float(), weights, local_ids)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    untouched = ~((local_ids >= 0) & (local_ids < 2)).any(-1)
    assert untouched.any() and (out[untouched] == 0).all()


def test_fused_moe_default_launch(dtype: torch.dtype, device: torch.device) -> None:
    x, w13, w2, weights, ids = _problem(3, 8, 2, 64, 32, dtype, device)
    out = fused_moe(x, w13, w2, weights, ids)
    expected = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_align_by_expert_exact_blocks() -> None:
    # Pairs (token * 2 + slot): expert 2 gets pairs 0, 3, 4; expert 0 gets 1; expert 5 (not
    # this rank's: 4 experts here) gets 2 and 5.
    ids = torch.tensor([[2, 0], [5, 2], [2, 5]])
    blocks = align_by_expert(ids, num_experts=4, block_m=4)
    pad = 6
    assert blocks.block_experts.tolist()[:2] == [0, 2]
    assert set(blocks.block_experts.tolist()[2:]) == {4}  # unused blocks
    assert blocks.sorted_pairs.tolist()[:8] == [1, pad, pad, pad, 0, 3, 4, pad]
    assert set(blocks.sorted_pairs.tolist()[8:]) == {pad}


def test_fused_moe_rejects_mismatched_down_weights(device: torch.device) -> None:
    x, w13, w2, weights, ids = _problem(2, 4, 2, 32, 16, torch.float32, device)
    with pytest.raises(ValueError, match="w2 shape"):
        fused_moe(x, w13, w2[:, :, :8], weights, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_fused_moe_mixtral_shape_on_gpu(tokens: int) -> None:
    cuda = torch.device("cuda")
    x, w13, w2, weights, ids = _problem(tokens, 8, 2, 4096, 14336, torch.bfloat16, cuda)
    out = fused_moe(x, w13, w2, weights, ids)
    expected = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=5e-2)
