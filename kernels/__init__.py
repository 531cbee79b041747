"""Triton kernels with pure-torch references beside them (shipped as qtune.kernels)."""
