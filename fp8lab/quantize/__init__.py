"""Casting onto the FP8 grids with scales given by ``fp8lab.scaling``: per tensor (``tensor``)
and per block (``blocks``), with the statistics of a cast (overflow, underflow, SQNR)."""
