"""The ggml tensor types qtune writes: one entry per type, the only place their facts are kept.

Sizes come from gguf-py's ``GGML_QUANT_SIZES``. The encoders and decoders live in ``ggml_legacy``
(Q4_0…Q8_0), ``ggml_kquants`` (Q2_K…Q6_K) and ``ggml_iquants`` (IQ4_NL, IQ4_XS) under the names ``quantize_<type>``,
``quantize_<type>_weighted`` and ``dequantize_<type>``; an entry imports its module on first use, so
reading the table needs no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import IQ4_NL

Q = GGMLQuantizationType
IQ4_NL_VALUES: tuple[int, ...] = IQ4_NL.kvalues  # kvalues_iq4nl: the 16 levels of IQ4_NL and IQ4_XS
_CODEC_MODULES = {"legacy": "qtune.quant.ggml_legacy", "k-quant": "qtune.quant.ggml_kquants", "i-quant": "qtune.quant.ggml_iquants"}


@dataclass(frozen=True)
class GGMLType:
    qtype: GGMLQuantizationType
    family: Literal["float", "legacy", "k-quant", "i-quant"]
    uses_imatrix: bool  # ggml's quantizer switches to its importance-weighted search when given one

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def block_size(self) -> int:
        """Values per block (1 for the float types)."""
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.qtype][1]

    def _codec(self, prefix: str, suffix: str = "") -> Callable:
        if self.family == "float":
            raise ValueError(f"{self.name} is stored by a bit cast, not a block codec")
        module = importlib.import_module(_CODEC_MODULES[self.family])
        return getattr(module, f"{prefix}_{self.name.lower()}{suffix}")

    @property
    def encode(self) -> Callable:
        """blocks [n, block_size] float32 (and, for k-quants, importance weights or None) -> bytes [n, type_size]."""
        return self._codec("quantize")

    @property
    def encode_weighted(self) -> Callable:
        """The importance-weighted encoder: (blocks, weights) -> bytes; k- and i-quants take weights in ``encode``."""
        return self._codec("quantize", "_weighted") if self.family == "legacy" else self._codec("quantize")

    @property
    def decode(self) -> Callable:
        """bytes [n, type_size] as int32 -> float32 values [n, block_size]."""
        return self._codec("dequantize")


GGML_TYPES: dict[GGMLQuantizationType, GGMLType] = {
    t.qtype: t
    for t in (
        GGMLType(Q.F32, "float", uses_imatrix=False),
        GGMLType(Q.F16, "float", uses_imatrix=False),
        GGMLType(Q.BF16, "float", uses_imatrix=False),
        GGMLType(Q.Q4_0, "legacy", uses_imatrix=True),
        GGMLType(Q.Q4_1, "legacy", uses_imatrix=True),
        GGMLType(Q.Q5_0, "legacy", uses_imatrix=True),
        GGMLType(Q.Q5_1, "legacy", uses_imatrix=True),
        GGMLType(Q.Q8_0, "legacy", uses_imatrix=False),
        GGMLType(Q.Q2_K, "k-quant", uses_imatrix=True),
        GGMLType(Q.Q3_K, "k-quant", uses_imatrix=True),
        GGMLType(Q.Q4_K, "k-quant", uses_imatrix=True),
        GGMLType(Q.Q5_K, "k-quant", uses_imatrix=True),
        GGMLType(Q.Q6_K, "k-quant", uses_imatrix=True),
        GGMLType(Q.IQ4_NL, "i-quant", uses_imatrix=True),
        GGMLType(Q.IQ4_XS, "i-quant", uses_imatrix=True),
    )
}


def ggml_type(qtype: GGMLQuantizationType | int | str) -> GGMLType:
    """The entry for a type given as a GGMLQuantizationType, its number or its name."""
    try:
        qtype = Q[qtype.upper()] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    except (KeyError, ValueError):
        raise ValueError(f"unknown ggml type {qtype!r}") from None
    if qtype not in GGML_TYPES:
        raise ValueError(f"ggml type {qtype.name} is not supported (supported: {', '.join(t.name for t in GGML_TYPES.values())})")
    return GGML_TYPES[qtype]


# The KV-cache types llama.cpp accepts (its --cache-type-k/-v list); a quantized V cache needs flash attention.
KV_CACHE_TYPES: dict[str, GGMLQuantizationType] = {t.name.lower(): t for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.IQ4_NL, Q.Q5_0, Q.Q5_1)}


def kv_cache_pair(spec: str) -> tuple[str, str]:
    """``"q8_0"`` (K and V alike) or ``"q8_0/q4_0"`` (K, then V) as the two cache types' names."""
    parts = spec.lower().split("/")
    unknown = [p for p in parts if p not in KV_CACHE_TYPES]
    if len(parts) > 2 or unknown or not all(parts):
        raise ValueError(f"KV cache type {spec!r}: give one of {', '.join(KV_CACHE_TYPES)}, or K/V as two of them (e.g. q8_0/q4_0)")
    return (parts[0], parts[-1])
