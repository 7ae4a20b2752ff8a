"""Casting onto the FP8 grids: per tensor (``tensor``) and per block (``blocks``), with the
statistics of a cast (overflow, underflow, SQNR) and the amaxes the scalings start from.

Invariant: casts take scales as inputs and never compute them (``fp8lab.scaling`` does); a
cast clamps to +-fp8_max and rounds to nearest even, exactly as the hardware casts.
"""
