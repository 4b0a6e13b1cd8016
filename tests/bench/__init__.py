"""Tests of the benchmark harness (python -m vstar_kernels bench)."""
