"""Triton kernels, one module per kernel family; each defines functions named like the ops they implement."""
