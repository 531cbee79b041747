"""Quantization math: pure functions from tensors to tensors, with no file formats."""

# GPTQ's and AWQ's settings when none are given: the recipe's export targets, the CLI and the math below.
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
DEFAULT_DAMP = 0.01  # GPTQ's damping, a fraction of the Hessian's mean diagonal
# compressed-tensors schemes qtune writes, with their weight bits (activations stay 16-bit)
CT_SCHEMES = {"W4A16": 4}
