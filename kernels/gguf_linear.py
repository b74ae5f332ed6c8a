"""Linear layers on GGUF block-quantized weights (Q8_0, Q4_0, Q4_1), dequantized in the kernel.

A GGUF row is a run of 32-element blocks: Q8_0 = fp16 d + 32 int8 (w = d q); Q4_0 = fp16 d +
16 bytes of nibbles (w = d (q - 8)); Q4_1 = fp16 d, fp16 m + 16 bytes (w = d q + m). In a
Q4 block, byte j holds element j (low nibble) and element j + 16 (high nibble).
``split_blocks`` lays the same bits out as planes (quants, d, m: one row of each per weight
row) so a tile loads with plain strides; nothing is re-quantized.

Status: kernels, references and tests only; the engine does not load GGUF weights through
them yet (it still dequantizes at load, engine/gguf_weights.py).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, require

BLOCK = 32
#: Format -> (kernel constant, bytes per 32-element block).
FORMATS = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20)}


@dataclass(frozen=True)
class GGUFPlanes:
    """One weight (N, K) in block format. quants: Q8_0 int8 (N, K), Q4 uint8 (N, K / 2);
    d and m: float16 (N, K / 32) (m only for Q4_1)."""

    kind: str
    quants: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK


def split_blocks(raw: torch.Tensor, kind: str) -> GGUFPlanes:
    """raw: uint8 (N, blocks * block bytes) as in the GGUF file -> planes (a relayout)."""
    require(kind in FORMATS, "unsupported GGUF format {}", kind)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, FORMATS[kind][1])  # (N, K / 32, block bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(rows, -1)
    if kind == "Q8_0":
        quants = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1)
        return GGUFPlanes(kind, quants, d, None)
    start = 4 if kind == "Q4_1" else 2
    m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(rows, -1)
    quants = blocks[..., start:].contiguous().reshape(rows, -1)
    return GGUFPlanes(kind, quants, d, m if kind == "Q4_1" else None)


def dequantize_ref(w: GGUFPlanes) -> torch.Tensor:
    """float32 (N, K), bit-identical to ``gguf.quants.dequantize`` of the same blocks."""
    rows, width = w.shape
    d = w.d.float()[:, :, None]  # (N, K / 32, 1)
    if w.kind == "Q8_0":
        return (w.quants.float().view(rows, -1, BLOCK) * d).reshape(rows, width)
    q = w.quants.view(rows, -1, BLOCK // 2)
    nibbles = torch.cat([q & 0x0F, q >> 4], dim=-1)  # (N, K / 32, 32): low half first
    if w.kind == "Q4_0":
        return (d * (nibbles.to(torch.int8) - 8).float()).reshape(rows, width)
    assert w.m is not None
    return (d * nibbles.float() + w.m.float()[:, :, None]).reshape(rows, width)


def gguf_linear_ref(x: torch.Tensor, w: GGUFPlanes, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) -> (M, N): the dequantized path (weights widened to x's dtype first)."""
    y = x @ dequantize_ref(w).to(x.dtype).t()
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------
# Triton. A "column" c indexes the quants plane: an element for Q8_0, a byte (two elements:
# lo = c + (c // 16) * 16 and lo + 16) for Q4.


@triton.jit
def _dequant_tile(q, d, m, KIND: tl.constexpr):  # type: ignore[no-untyped-def]
    """(lo, hi) float32 weights of a tile of quants (hi unused for Q8_0)."""
    if KIND == 0:
        return q.to(tl.float32) * d, q.to(tl.float32)
    lo = (q & 15).to(tl.float32)
    hi = (q >> 4).to(tl.float32)
    if KIND == 1:
        return d * (lo - 8.0), d * (hi - 8.0)
    return d * lo + m, d * hi + m


@triton.jit(do_not_specialize=["rows_m"])
def _gguf_gemm_kernel(
    x_ptr: tl.tensor,
    q_ptr: tl.tensor,
    d_ptr: tl.tensor,
    m_ptr: tl.tensor,
    b_ptr: tl.tensor,
    y_ptr: tl.tensor,
    rows_m: tl.tensor,
    n: tl.tensor,
    cols: tl.tensor,
    stride_x: tl.tensor,
    stride_q: tl.tensor,
    stride_d: tl.tensor,
    stride_y: tl.tensor,
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < rows_m
    n_ok = rn < n
    per_block: tl.constexpr = 32 if KIND == 0 else 16  # plane columns per 32-element block
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_ok = c < cols
        w_mask = c_ok[:, None] & n_ok[None, :]
        q = tl.load(q_ptr + rn.to(tl.int64)[None, :] * stride_q + c[:, None], mask=w_mask, other=0)
        scale_at = rn.to(tl.int64)[None, :] * stride_d + (c // per_block)[:, None]
        d = tl.load(d_ptr + scale_at, mask=w_mask, other=0.0).to(tl.float32)
        m = d
        if KIND == 2:
            m = tl.load(m_ptr + scale_at, mask=w_mask, other=0.0).to(tl.float32)
        w_lo, w_hi = _dequant_tile(q, d, m, KIND)  # (BLOCK_C, BLOCK_N)
        x_mask = m_ok[:, None] & c_ok[None, :]
        if KIND == 0:
            x = tl.load(x_rows + c[None, :], mask=x_mask, other=0.0)
            acc = tl.dot(x, w_lo.to(x.dtype), acc)
        else:
            lo_at = c + (c // 16) * 16
            x_lo = tl.load(x_rows + lo_at[None, :], mask=x_mask, other=0.0)
            x_hi = tl.load(x_rows + lo_at[None, :] + 16, mask=x_mask, other=0.0)
            acc = tl.dot(x_lo, w_lo.to(x_lo.dtype), acc)
            acc = tl.dot(x_hi, w_hi.to(x_hi.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_y + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gguf_linear(x: torch.Tensor, w: GGUFPlanes, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton ``gguf_linear_ref``: x (M, K) -> (M, N), blocks dequantized tile by tile."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    num_out, width = w.shape
    require(x.shape[1] == width, "x must be (M, {}), got {}", width, tuple(x.shape))
    require(width % BLOCK == 0, "K must be a multiple of 32, got {}", width)
    for name in ("quants", "d"):
        plane = getattr(w, name)
        require(plane.device == x.device, "{} is on {}, expected {}", name, plane.device, x.device)
        require(plane.stride(-1) == 1, "{} must be contiguous in its last dim", name)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_launchable(_gguf_gemm_kernel, x.device)
    rows = x.shape[0]
    y = torch.empty((rows, num_out), dtype=x.dtype, device=x.device)
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    block_n = 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(num_out, block_n))
    _gguf_gemm_kernel[grid](
        x,
        w.quants,
        w.d,
        w.m if w.m is not None else w.d,
        bias if bias is not None else w.d,
        y,
        rows,
        num_out,
        w.quants.shape[1],
        x.stride(0),
        w.quants.stride(0),
        w.d.stride(0),
        y.stride(0),
        KIND=FORMATS[w.kind][0],
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_C=64,
    )
    return y
