"""Kernel benchmark: each Triton kernel against the physical limits measured in the same run.

    python -m bench.kernels --out bench/results/kernels-h100.json
    python -m bench.kernels --dry-run          # CPU, Triton interpreter, tiny shapes

The run first measures the device's limits (HBM read and copy bandwidth, bf16 GEMM TFLOP/s),
then times every kernel and its torch reference with ``triton.testing.do_bench`` (median, L2
flushed between runs), and reports achieved GB/s or TFLOP/s as a fraction of the limit next
to its target. Rates use the Triton wrapper replayed from a CUDA graph (GPU time alone); its
eager time, Python checks and launch included, is reported beside it. Every Triton output is
also checked against the reference, so a fast wrong kernel shows up as FAIL rather than as a
good number.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]

# Targets as fractions of the measured limit.
TARGET_DECODE_HBM = 0.80
TARGET_PREFILL_PEAK = 0.50
TARGET_ELEMENTWISE_HBM = 0.80


@dataclass(frozen=True)
class Limits:
    hbm_read_gbps: float  # streaming read + reduce of a large buffer
    hbm_copy_gbps: float  # device-to-device copy, bytes read + written
    bf16_tflops: float  # torch.matmul of two 8192 x 8192 bf16 matrices
    fp8_tflops: float = 0.0  # torch._scaled_mm of two 8192 x 8192 e4m3 matrices (row scales)

    @property
    def hbm_gbps(self) -> float:
        # The better of the two measurements, so that fractions are never flattered.
        return max(self.hbm_read_gbps, self.hbm_copy_gbps)


@dataclass(frozen=True)
class Case:
    """One kernel at one shape: callables for both implementations plus the work they do."""

    kernel: str
    shape: str
    run_triton: Callable[[], Any]
    run_torch: Callable[[], Any]
    bytes_moved: float = 0.0  # for bandwidth-bound kernels
    flops: float = 0.0  # for compute-bound kernels
    target: float = TARGET_ELEMENTWISE_HBM
    #: Tensor-core limit of a compute-bound case: "bf16" or "fp8".
    compute: str = "bf16"


@dataclass(frozen=True)
class Result:
    kernel: str
    shape: str
    triton_ms: float  # GPU time: replay of a CUDA graph holding the wrapper's launches
    triton_eager_ms: float  # plain calls, the wrapper's Python checks and launch included
    torch_ms: float  # the reference, plain calls
    speedup: float
    achieved: float
    unit: str
    limit: float
    fraction_of_limit: float
    target: float
    meets_target: bool
    max_abs_err: float
    correct: bool
    # Bandwidth-bound kernels only: the same bytes moved by a device copy of this size, which
    # shows how much of any shortfall is the size (launch, ramp-up, tail), not the kernel.
    same_size_copy_gbps: float | None = None


# ---------------------------------------------------------------------------------------------
# Timing and limits.


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured once as a CUDA graph. A replay is one cheap launch, so its time is the GPU
    work alone (as when the engine runs decode under graphs) even where the wrapper's Python
    costs more than a small kernel runs. Capture also proves the wrapper never synchronizes
    with the host."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, rep: int) -> float:
    """Median milliseconds per call. On CPU (dry run) a plain wall-clock loop: the numbers
    only prove the harness runs."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _read_gbps(elems: int, device: torch.device, warmup: int, rep: int) -> float:
    x = torch.rand(elems, dtype=torch.float32, device=device)
    return _nbytes(x) / time_ms(lambda: x.sum(), device, warmup, rep) / 1e6


def _copy_gbps(elems: int, device: torch.device, warmup: int, rep: int) -> float:
    src = torch.rand(elems, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * _nbytes(src) / time_ms(lambda: dst.copy_(src), device, warmup, rep) / 1e6


def _gemm_tflops(n: int, dtype: torch.dtype, device: torch.device, warmup: int, rep: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / time_ms(lambda: a @ b, device, warmup, rep) / 1e9


def _fp8_tflops(n: int, device: torch.device, warmup: int, rep: int) -> float:
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    scale_a = torch.ones(n, 1, device=device)
    scale_b = torch.ones(1, n, device=device)
    out = torch.bfloat16 if device.type == "cuda" else torch.float32

    def run() -> torch.Tensor:
        return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out)

    return 2 * n**3 / time_ms(run, device, warmup, rep) / 1e9


def measure_limits(device: torch.device, dry_run: bool, warmup: int, rep: int) -> Limits:
    elems = (1 << 18) if dry_run else (1 << 30)  # 4 GiB of float32 on the GPU, far beyond L2
    return Limits(
        fp8_tflops=_fp8_tflops(256 if dry_run else 8192, device, warmup, rep),
        hbm_read_gbps=_read_gbps(elems, device, warmup, rep),
        hbm_copy_gbps=_copy_gbps(elems, device, warmup, rep),
        bf16_tflops=(
            _gemm_tflops(256, torch.float32, device, warmup, rep)
            if dry_run
            else _gemm_tflops(8192, torch.bfloat16, device, warmup, rep)
        ),
    )


# ---------------------------------------------------------------------------------------------
# Cases. Shapes are Llama-3.1-8B-like: hidden 4096, intermediate 14336, 32 query heads, 8 KV
# heads, head_dim 128, 16-token pages.


@dataclass(frozen=True)
class Shapes:
    tokens: tuple[int, ...]
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    page: int
    decode: tuple[tuple[int, int], ...]  # (batch, context)
    prefill_tokens: int
    chunked: tuple[int, int, int]  # (sequences, new tokens each, cached prefix each)
    dtype: torch.dtype


GPU_SHAPES = Shapes(
    tokens=(4096, 16384),
    hidden=4096,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    head_dim=128,
    page=16,
    decode=((32, 4096), (32, 8192), (64, 4096), (64, 8192)),
    prefill_tokens=4096,
    chunked=(4, 1024, 3072),
    dtype=torch.bfloat16,
)
# Tiny shapes for the interpreter (which has no bfloat16).
DRY_RUN_SHAPES = Shapes(
    tokens=(8,),
    hidden=64,
    intermediate=96,
    heads=4,
    kv_heads=2,
    head_dim=32,
    page=16,
    decode=((2, 48),),
    prefill_tokens=40,
    chunked=(2, 16, 16),
    dtype=torch.float32,
)


def norm_cases(s: Shapes, device: torch.device) -> list[Case]:
    from kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

    cases = []
    for tokens in s.tokens:
        x = torch.randn(tokens, s.hidden, dtype=s.dtype, device=device)
        residual = torch.randn_like(x)
        weight = torch.randn(s.hidden, dtype=s.dtype, device=device)
        shape = f"T={tokens} hidden={s.hidden}"
        cases.append(
            Case(
                "rms_norm",
                shape,
                partial(rms_norm, x, weight, 1e-5),
                partial(rms_norm_ref, x, weight, 1e-5),
                bytes_moved=2 * _nbytes(x) + _nbytes(weight),
            )
        )
        cases.append(
            Case(
                "fused_add_rms_norm",
                shape,
                partial(fused_add_rms_norm, x, residual, weight, 1e-5),
                partial(fused_add_rms_norm_ref, x, residual, weight, 1e-5),
                bytes_moved=4 * _nbytes(x) + _nbytes(weight),  # read x, r; write out, sum
            )
        )
    return cases


def activation_cases(s: Shapes, device: torch.device) -> list[Case]:
    from kernels.activation import silu_and_mul, silu_and_mul_ref

    cases = []
    for tokens in s.tokens:
        gate_up = torch.randn(tokens, 2 * s.intermediate, dtype=s.dtype, device=device)
        cases.append(
            Case(
                "silu_and_mul",
                f"T={tokens} intermediate={s.intermediate}",
                partial(silu_and_mul, gate_up),
                partial(silu_and_mul_ref, gate_up),
                bytes_moved=1.5 * _nbytes(gate_up),
            )
        )
    return cases


def gemv_cases(s: Shapes, device: torch.device) -> list[Case]:
    """Batch-1 projections of one layer (the reference is cuBLAS through F.linear)."""
    from kernels.gemv import gemv, gemv_ref

    heads_width = (s.heads + 2 * s.kv_heads) * s.head_dim
    shapes = {
        "qkv": (heads_width, s.hidden),
        "gate_up": (2 * s.intermediate, s.hidden),
        "down": (s.hidden, s.intermediate),
    }
    cases = []
    for name, (num_out, width) in shapes.items():
        x = torch.randn(1, width, dtype=s.dtype, device=device)
        weight = torch.randn(num_out, width, dtype=s.dtype, device=device) * 0.01
        cases.append(
            Case(
                "gemv",
                f"{name} {num_out}x{width}",
                partial(gemv, x, weight, None),
                partial(gemv_ref, x, weight, None),
                bytes_moved=_nbytes(weight, x),
            )
        )
    return cases


def rope_cases(s: Shapes, device: torch.device) -> list[Case]:
    from kernels.rotary import rope_and_cache, rope_and_cache_ref

    cases = []
    for tokens in s.tokens:
        width = (s.heads + 2 * s.kv_heads) * s.head_dim
        qkv = torch.randn(tokens, width, dtype=s.dtype, device=device)
        q, k, v = qkv.split(
            [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1
        )
        q = q.view(tokens, s.heads, s.head_dim)
        k = k.view(tokens, s.kv_heads, s.head_dim)
        v = v.view(tokens, s.kv_heads, s.head_dim)
        positions = torch.arange(tokens, device=device)
        # A real rotary table row per position: cos then sin of the angles (unit scale).
        angles = torch.rand(tokens, s.head_dim // 2, device=device) * 2 * torch.pi
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
        num_blocks = tokens // s.page + 1
        k_cache = torch.zeros(
            num_blocks, s.page, s.kv_heads, s.head_dim, dtype=s.dtype, device=device
        )
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(num_blocks * s.page, device=device)[:tokens]
        args = (q, k, v, positions, cos_sin, k_cache, v_cache, slots)
        # Reads q, k, v, one cos/sin row, position and slot per token; writes q_rot, k_rot
        # and the k, v cache slots.
        bytes_moved = 2 * _nbytes(qkv) + _nbytes(k) + _nbytes(cos_sin, positions, slots)
        cases.append(
            Case(
                "rope_and_cache",
                f"T={tokens} heads={s.heads}/{s.kv_heads} D={s.head_dim}",
                partial(rope_and_cache, *args),
                partial(rope_and_cache_ref, *args),
                bytes_moved=bytes_moved,
            )
        )
    return cases


def _paged_cache(
    s: Shapes, seq_lens: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches with each sequence's pages scattered over shuffled blocks."""
    pages = [(n + s.page - 1) // s.page for n in seq_lens]
    num_blocks = sum(pages) + 1
    shape = (num_blocks, s.page, s.kv_heads, s.head_dim)
    k_cache = torch.randn(shape, dtype=s.dtype, device=device)
    v_cache = torch.randn(shape, dtype=s.dtype, device=device)
    physical = torch.randperm(num_blocks - 1, device=device).to(torch.int32) + 1
    block_tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=device)
    offset = 0
    for seq, count in enumerate(pages):
        block_tables[seq, :count] = physical[offset : offset + count]
        offset += count
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables, seq_lens_t


def decode_cases(s: Shapes, device: torch.device) -> list[Case]:
    from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    cases = []
    scale = s.head_dim**-0.5
    for batch, context in s.decode:
        k_cache, v_cache, block_tables, seq_lens = _paged_cache(s, [context] * batch, device)
        q = torch.randn(batch, s.heads, s.head_dim, dtype=s.dtype, device=device)
        args = (q, k_cache, v_cache, block_tables, seq_lens, scale)
        kv_bytes = 2 * batch * context * s.kv_heads * s.head_dim * q.element_size()
        cases.append(
            Case(
                "paged_decode_attention",
                f"batch={batch} ctx={context} heads={s.heads}/{s.kv_heads} D={s.head_dim}",
                partial(paged_decode_attention, *args),
                partial(paged_decode_attention_ref, *args),
                bytes_moved=kv_bytes + 2 * _nbytes(q) + _nbytes(block_tables, seq_lens),
                target=TARGET_DECODE_HBM,
            )
        )
    return cases


def _causal_flops(q_len: int, seq_len: int, heads: int, head_dim: int) -> float:
    """QK^T and PV over the causal triangle: 4 * q_len * (mean keys per query) * H * D; a full
    prefill gives 4 * T * T * H * D / 2."""
    prefix = seq_len - q_len
    return 4.0 * q_len * (prefix + q_len / 2) * heads * head_dim


def prefill_cases(s: Shapes, device: torch.device) -> list[Case]:
    from kernels.paged_attention import paged_attention, paged_attention_ref

    scale = s.head_dim**-0.5
    num_chunked, chunk, prefix = s.chunked
    batches = [
        ("prefill", [s.prefill_tokens], [s.prefill_tokens]),
        ("chunk", [chunk] * num_chunked, [prefix + chunk] * num_chunked),
    ]
    cases = []
    for label, q_lens, seq_lens in batches:
        k_cache, v_cache, block_tables, seq_lens_t = _paged_cache(s, seq_lens, device)
        q = torch.randn(sum(q_lens), s.heads, s.head_dim, dtype=s.dtype, device=device)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        args = (q, k_cache, v_cache, block_tables, cu.to(device), seq_lens_t, scale)
        flops = sum(
            _causal_flops(ql, sl, s.heads, s.head_dim)
            for ql, sl in zip(q_lens, seq_lens, strict=True)
        )
        shape = f"{label} {len(q_lens)}x{q_lens[0]} ctx={seq_lens[0]} heads={s.heads}/{s.kv_heads}"
        cases.append(
            Case(
                "paged_attention",
                f"{shape} D={s.head_dim} causal",
                partial(paged_attention, *args),
                partial(paged_attention_ref, *args),
                flops=flops,
                target=TARGET_PREFILL_PEAK,
            )
        )
    return cases


def _experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts a batch of ``tokens`` routes to (uniform routing)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def moe_cases(s: Shapes, device: torch.device) -> list[Case]:
    """One Mixtral-8x7B MoE layer (8 experts, top 2, the shapes' hidden/intermediate): the
    fused kernel against the per-expert torch loop. Decode batches count the bytes of the
    experts they touch (bandwidth bound); the prefill batch counts FLOPs."""
    from kernels.fused_moe import fused_moe, fused_moe_ref

    num_experts, top_k = 8, 2
    w13 = torch.randn(num_experts, 2 * s.intermediate, s.hidden, dtype=s.dtype, device=device)
    w2 = torch.randn(num_experts, s.hidden, s.intermediate, dtype=s.dtype, device=device)
    w13, w2 = w13 * 0.02, w2 * 0.02
    expert_bytes = (_nbytes(w13) + _nbytes(w2)) / num_experts
    cases = []
    batches = (1, 16, 64) if device.type == "cuda" else (1, 4)
    for tokens in (*batches, s.prefill_tokens):
        x = torch.randn(tokens, s.hidden, dtype=s.dtype, device=device)
        logits = torch.randn(tokens, num_experts, device=device)
        weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
        decode = tokens in batches
        touched = _experts_touched(num_experts, top_k, tokens)
        cases.append(
            Case(
                "fused_moe",
                f"T={tokens} E={num_experts} top{top_k} H={s.hidden} I={s.intermediate}",
                partial(fused_moe, x, w13, w2, weights, ids),
                partial(fused_moe_ref, x, w13, w2, weights, ids),
                bytes_moved=touched * expert_bytes if decode else 0.0,
                flops=0.0 if decode else 6.0 * tokens * top_k * s.hidden * s.intermediate,
                target=TARGET_DECODE_HBM if decode else TARGET_PREFILL_PEAK,
            )
        )
    return cases


def quant_cases(s: Shapes, device: torch.device) -> list[Case]:
    """int8 / fp8 GEMV and GEMM against their limits, cuBLAS bf16 as the peer
    (bench/quant_kernels.py)."""
    from bench.quant_kernels import quant_cases as build

    return build(s, device)  # type: ignore[no-any-return]


CASE_BUILDERS: dict[str, Callable[[Shapes, torch.device], list[Case]]] = {
    "norm": norm_cases,
    "activation": activation_cases,
    "gemv": gemv_cases,
    "rope": rope_cases,
    "decode": decode_cases,
    "prefill": prefill_cases,
    "moe": moe_cases,
    "quant": quant_cases,
}


# ---------------------------------------------------------------------------------------------
# Running and reporting.


def _max_abs_err(actual: Any, expected: Any) -> float:
    """Largest |triton - torch| over the (possibly tuple) outputs, in float32."""
    if isinstance(actual, tuple):
        return max(_max_abs_err(a, e) for a, e in zip(actual, expected, strict=True))
    return float((actual.float() - expected.float()).abs().max())


def run_case(case: Case, limits: Limits, device: torch.device, warmup: int, rep: int) -> Result:
    err = _max_abs_err(case.run_triton(), case.run_torch())
    # bf16 outputs of unit scale: a few ulps; anything larger is a bug, not rounding.
    correct = err == err and err < 0.1
    triton_eager_ms = time_ms(case.run_triton, device, warmup, rep)
    triton_ms = (
        time_ms(graphed(case.run_triton), device, warmup, rep)
        if device.type == "cuda"
        else triton_eager_ms
    )
    torch_ms = time_ms(case.run_torch, device, warmup, rep)
    if case.flops:
        peak = limits.fp8_tflops if case.compute == "fp8" else limits.bf16_tflops
        achieved, unit, limit = case.flops / triton_ms / 1e9, "TFLOP/s", peak
    else:
        achieved, unit, limit = case.bytes_moved / triton_ms / 1e6, "GB/s", limits.hbm_gbps
    fraction = achieved / limit
    copy_gbps = None
    if not case.flops and device.type == "cuda":
        copy_gbps = _copy_gbps(int(case.bytes_moved) // 8, device, warmup, rep)  # float32 halves
    return Result(
        kernel=case.kernel,
        shape=case.shape,
        triton_ms=triton_ms,
        triton_eager_ms=triton_eager_ms,
        torch_ms=torch_ms,
        speedup=torch_ms / triton_eager_ms,  # both eager: what a caller sees
        achieved=achieved,
        unit=unit,
        limit=limit,
        fraction_of_limit=fraction,
        target=case.target,
        meets_target=fraction >= case.target,
        max_abs_err=err,
        correct=correct,
        same_size_copy_gbps=copy_gbps,
    )


def _copy_column(result: Result) -> str:
    if result.same_size_copy_gbps is None:
        return "-"
    return f"{result.same_size_copy_gbps / result.limit:.0%}"


def format_table(results: list[Result], limits: Limits) -> str:
    lines = [
        f"HBM read {limits.hbm_read_gbps:,.0f} GB/s | HBM copy {limits.hbm_copy_gbps:,.0f} GB/s"
        f" | bf16 GEMM {limits.bf16_tflops:,.1f} TFLOP/s"
        f" | fp8 GEMM {limits.fp8_tflops:,.1f} TFLOP/s",
        "",
        f"{'kernel':<24}{'shape':<52}{'graph ms':>10}{'eager ms':>10}{'torch ms':>10}"
        f"{'speedup':>9}"
        f"{'achieved':>18}{'of limit':>10}{'target':>8}{'copy@size':>11}  status",
    ]
    for r in results:
        status = "ok" if r.meets_target else "BELOW"
        if not r.correct:
            status = f"FAIL (err {r.max_abs_err:.3g})"
        lines.append(
            f"{r.kernel:<24}{r.shape:<52}{r.triton_ms:>10.3f}{r.triton_eager_ms:>10.3f}"
            f"{r.torch_ms:>10.3f}"
            f"{r.speedup:>8.2f}x{r.achieved:>10,.1f} {r.unit:<7}{r.fraction_of_limit:>9.0%}"
            f"{r.target:>8.0%}{_copy_column(r):>11}  {status}"
        )
    return "\n".join(lines)


def _use_repo_kernels() -> None:
    """Run as ``python bench/kernels.py``, this file's folder heads sys.path and its own name
    would shadow the ``kernels`` package; put the repository root first instead."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(_REPO_ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write results as JSON to this path")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, Triton interpreter, tiny shapes: checks the harness, not performance",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CASE_BUILDERS),
        default=list(CASE_BUILDERS),
        help="kernel groups to run",
    )
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measurement time, ms")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Before any kernels module is imported: @triton.jit reads it at decoration time.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device; use --dry-run to exercise the harness on CPU", file=sys.stderr)
        return 2
    _use_repo_kernels()
    import triton

    shapes = DRY_RUN_SHAPES if args.dry_run else GPU_SHAPES
    torch.manual_seed(0)
    limits = measure_limits(device, args.dry_run, args.warmup, args.rep)
    results = []
    for group in args.only:
        for case in CASE_BUILDERS[group](shapes, device):
            results.append(run_case(case, limits, device, args.warmup, args.rep))
            print(f"{case.kernel:<24}{case.shape}: done", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(results, limits))
    if args.out is not None:
        report = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "command": " ".join([sys.executable, *sys.argv]),
            "dry_run": args.dry_run,
            "limits": {**asdict(limits), "hbm_gbps_used": limits.hbm_gbps},
            "timing": "triton.testing.do_bench median, L2 flushed before each run; achieved "
            "rates use triton_ms (CUDA graph replay), speedup compares eager calls",
            "results": [asdict(r) for r in results],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r.correct for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
