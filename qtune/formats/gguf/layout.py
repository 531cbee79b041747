"""How a ggml tensor's bytes are shaped in a GGUF file (for any type gguf-py knows)."""

from __future__ import annotations

import math

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType


def byte_shape(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> tuple[int, ...]:
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


def tensor_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    return math.prod(byte_shape(qtype, shape))
