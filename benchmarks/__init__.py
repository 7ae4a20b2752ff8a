"""CPU benchmarks of fp8lab; run from the repository root as ``python -m benchmarks.<name>``."""
