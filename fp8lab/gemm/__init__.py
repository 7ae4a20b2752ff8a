"""The quantized GEMM: one autograd Function (``qlinear``), the exact hardware model of a
scaled GEMM (``exact``), and the backends that run it (``backends``).

Invariant: GEMM code takes scales as inputs and never computes them (the scalings do), and
every GEMM is the hardware model of ``exact`` on whichever device runs it. Reading order:
``hardware`` (facts) -> ``exact`` -> ``telemetry_slot``, ``shadow`` -> ``qlinear`` -> ``backends``.
"""
