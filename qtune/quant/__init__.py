"""Quantization math: pure functions from tensors to tensors, with no file formats."""
