"""The quantized GEMM: one autograd Function (``qlinear``), the exact hardware model of a
scaled GEMM (``exact``), and the backends that run it (``backends``)."""
