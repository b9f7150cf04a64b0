"""Batched masked forwards per architecture family, built on bpp_kernels ops."""
