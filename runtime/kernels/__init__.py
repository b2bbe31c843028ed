"""Triton kernels (each in its own file: the Triton interpreter reads kernel source)."""
