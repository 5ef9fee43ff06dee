"""qlora-kernels benchmarks: ``python -m bench [--quick] [--out DIR] [--only PATTERN]`` (see bench/README.md)."""
