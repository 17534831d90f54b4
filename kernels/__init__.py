"""Triton kernels (added with the triton backend)."""
