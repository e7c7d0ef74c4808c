"""Launcher helpers shared by the Triton kernel modules."""
import torch
import triton.language as tl


def acc_dtypes(dtype: torch.dtype):
    """(Triton, torch) accumulation dtypes: float64 for float64, else float32 (also for half types)."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def dot_precision(z: torch.Tensor) -> str:
    """tl.dot precision: exact fp32 products unless the user opted into TF32 the torch way (CUDA)."""
    tf32 = z.is_cuda and z.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"
