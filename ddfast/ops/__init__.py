"""One module per op: its plain-PyTorch reference, public function, and autograd glue.

Kernels live in ``ddfast.kernels.<op>`` (Triton) and ``csrc/<op>.cpp`` / ``csrc/cuda/<op>.cu``.
"""
