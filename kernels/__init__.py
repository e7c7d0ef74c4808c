"""Triton kernels of ddfast (installed as ``ddfast.kernels``), one module per op.

Each module holds the ``@triton.jit`` kernels of one op and plain-Python launchers that take
and return torch tensors. They run on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (tests).
Importing this package does not import triton; the op modules do, when first used.
"""
