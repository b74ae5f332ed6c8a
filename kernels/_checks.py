"""Input checks shared by the Triton wrappers.

A wrapper validates everything a kernel assumes (ranks, dtypes, devices, strides) before it
launches, so that a bad call fails with a ValueError naming the argument instead of reading
out of bounds or returning a wrong answer.
"""

import functools

import torch
import triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def require(condition: bool, message: str, *args: object) -> None:
    """Raises ValueError(message.format(*args)) unless condition holds. The message is only
    formatted on failure: wrappers run these checks on every call, so the passing path must
    cost next to nothing."""
    if not condition:
        raise ValueError(message.format(*args))


def check_tensor(
    name: str,
    tensor: torch.Tensor,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
) -> None:
    """Rank, dtype and device of one argument; the last dim must be unit-stride (kernels
    vectorize along it), while outer strides are passed to the kernel."""
    require(isinstance(tensor, torch.Tensor), "{} must be a torch.Tensor", name)
    if (
        tensor.dim() == ndim
        and tensor.dtype in dtypes
        and tensor.device == device
        and (tensor.stride(-1) == 1 or tensor.shape[-1] <= 1)
    ):
        return  # the common case, decided without building any message
    require(tensor.dim() == ndim, "{} must be {}-D, got shape {}", name, ndim, tuple(tensor.shape))
    require(
        tensor.dtype in dtypes, "{} dtype must be one of {}, got {}", name, dtypes, tensor.dtype
    )
    require(tensor.device == device, "{} is on {}, expected {}", name, tensor.device, device)
    require(
        tensor.numel() == 0,
        "{} must be contiguous in its last dim, got strides {}",
        name,
        tensor.stride(),
    )


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    require(tensor.is_contiguous(), "{} must be contiguous, got strides {}", name, tensor.stride())


def check_launchable(kernel: object, device: torch.device) -> None:
    """Triton compiles for CUDA; CPU tensors only work when the kernels were defined under
    the interpreter (TRITON_INTERPRET=1 must be set before ``kernels`` is imported)."""
    if device.type == "cuda":
        return
    interpreted = not isinstance(kernel, triton.runtime.JITFunction)
    require(
        device.type == "cpu" and interpreted,
        "Triton kernels need CUDA tensors, got {}; for CPU set TRITON_INTERPRET=1 "
        "before importing the kernels package",
        device,
    )


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a typical H100 count under the interpreter,
    so launch heuristics take the same decisions on CPU as on the GPU they stand in for)."""
    if device.type != "cuda":
        return 132
    return int(torch.cuda.get_device_properties(device).multi_processor_count)
