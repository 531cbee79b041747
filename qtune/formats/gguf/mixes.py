"""Per-tensor ggml types of a GGUF quantization mix, as llama.cpp's llama_model_quantize picks them.

Mirrors ``src/llama-quant.cpp`` of the llama.cpp bundled with llama-cpp-python 0.3.36
(``tensor_allows_quantization``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``) for dense
(non-MoE) models:

- mixes Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS: llama.cpp's own file types,
  with its per-tensor rules (output/tied embeddings to Q6_K, more bits for some attn_v / ffn_down
  layers; for IQ4_NL/IQ4_XS attn_v gets Q5_K under GQA of 4 or more, and without an imatrix the
  first eighth of ffn_down gets Q5_K);
- single types F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K: every quantizable tensor gets
  that type, as ``llama-quantize --pure`` does.

Both then apply llama.cpp's fallback when a row is not a multiple of the type's block (k-quants need
256: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL; F16 when even 32
does not divide).
The iteration order matters (attn_v / ffn_down use running counters), so tensors are visited in
llama.cpp's ``weights_map`` order; ``llama_tensor_order`` gives it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from qtune.quant.ggml_types import GGML_TYPES

Q = GGMLQuantizationType
F = LlamaFileType


@dataclass(frozen=True)
class QuantMix:
    """A user-facing quantization name and what llama.cpp calls it."""

    name: str
    default_type: GGMLQuantizationType
    file_type: LlamaFileType  # general.file_type, and the ftype to give llama_model_quantize
    pure: bool  # True: every quantizable tensor gets default_type (llama-quantize --pure)

    @property
    def uses_imatrix(self) -> bool:
        """Whether an importance matrix changes the file (every type of a mix uses it as its default type does)."""
        return GGML_TYPES[self.default_type].uses_imatrix


_MIXES = [
    QuantMix("Q3_K_M", Q.Q3_K, F.MOSTLY_Q3_K_M, False),
    QuantMix("Q4_K_S", Q.Q4_K, F.MOSTLY_Q4_K_S, False),
    QuantMix("Q4_K_M", Q.Q4_K, F.MOSTLY_Q4_K_M, False),
    QuantMix("Q5_K_S", Q.Q5_K, F.MOSTLY_Q5_K_S, False),
    QuantMix("Q5_K_M", Q.Q5_K, F.MOSTLY_Q5_K_M, False),
    QuantMix("Q6_K", Q.Q6_K, F.MOSTLY_Q6_K, False),
    QuantMix("IQ4_NL", Q.IQ4_NL, F.MOSTLY_IQ4_NL, False),
    QuantMix("IQ4_XS", Q.IQ4_XS, F.MOSTLY_IQ4_XS, False),
    QuantMix("F32", Q.F32, F.ALL_F32, True),
    QuantMix("F16", Q.F16, F.MOSTLY_F16, True),
    QuantMix("BF16", Q.BF16, F.MOSTLY_BF16, True),
    QuantMix("Q8_0", Q.Q8_0, F.MOSTLY_Q8_0, True),
    QuantMix("Q4_0", Q.Q4_0, F.MOSTLY_Q4_0, True),
    QuantMix("Q4_1", Q.Q4_1, F.MOSTLY_Q4_1, True),
    QuantMix("Q5_0", Q.Q5_0, F.MOSTLY_Q5_0, True),
    QuantMix("Q5_1", Q.Q5_1, F.MOSTLY_Q5_1, True),
    QuantMix("Q2_K", Q.Q2_K, F.MOSTLY_Q2_K, True),
    QuantMix("Q3_K", Q.Q3_K, F.MOSTLY_Q3_K_M, True),
    QuantMix("Q4_K", Q.Q4_K, F.MOSTLY_Q4_K_M, True),
    QuantMix("Q5_K", Q.Q5_K, F.MOSTLY_Q5_K_M, True),
]
QUANT_MIXES: dict[str, QuantMix] = {m.name: m for m in _MIXES}

_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}
_NOT_QUANTIZED_PARTS = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "ssm_conv1d", "attn_rel_b.weight")


@dataclass(frozen=True)
class Fallback:
    """A tensor whose row length does not fit the type the mix wanted."""

    name: str
    wanted: GGMLQuantizationType
    used: GGMLQuantizationType
    n_per_row: int

    def __str__(self) -> str:
        return f"{self.name}: rows of {self.n_per_row} are not a multiple of {GGML_QUANT_SIZES[self.wanted][0]} ({self.wanted.name}), using {self.used.name}"


@dataclass(frozen=True)
class MixChoice:
    """The ggml type of every tensor (in llama.cpp's order) and the fallbacks taken."""

    mix: QuantMix
    types: dict[str, GGMLQuantizationType]
    fallbacks: list[Fallback]


def quant_mix(name: str) -> QuantMix:
    """The mix called ``name`` (case-insensitive); ValueError listing the supported ones otherwise."""
    mix = QUANT_MIXES.get(name.upper())
    if mix is None:
        raise ValueError(f"unknown GGUF quantization '{name}'; supported: {', '.join(QUANT_MIXES)}")
    return mix


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order: non-``blk.N.`` tensors first, then by layer number, then by name."""

    def key(name: str) -> tuple[int, bytes]:
        match = re.match(r"blk\.(\d+)\.", name)
        return (int(match.group(1)) if match else -1, name.encode())

    return sorted(names, key=key)


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization for the tensors of dense decoder models (shape in numpy order)."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(part in name for part in _NOT_QUANTIZED_PARTS) and name not in ("position_embd.weight", "token_types.weight")


def choose_types(
    quant: str,
    tensors: Sequence[tuple[str, Sequence[int]]],
    n_layer: int,
    *,
    is_70b: bool = False,
    n_gqa: int = 1,
    has_imatrix: bool = False,
    tensor_types: Sequence[tuple[str, GGMLQuantizationType]] = (),
) -> MixChoice:
    """Types for ``tensors`` ((GGUF name, numpy shape) pairs) under mix ``quant``.

    Tensors that are not quantized (1-D norms and the like) stay F32. ``n_layer`` is the model's
    block count; ``is_70b`` is llama.cpp's LLM_TYPE_70B (``Architecture.gguf_is_70b``), which
    gives attn_v more bits; ``n_gqa`` is heads per KV head (n_head // n_head_kv) and ``has_imatrix``
    whether an importance matrix is given, which some rules read. ``tensor_types`` are (regex, type)
    overrides as llama-quantize's ``--tensor-type``: the first pattern found in a quantized tensor's
    name gives its type in place of the mix's rule (whose layer counters then skip it), and the
    row-length fallback still applies.
    """
    mix = quant_mix(quant)
    shapes = {name: tuple(shape) for name, shape in tensors}
    order = llama_tensor_order(shapes)
    n_attention_wv = sum(1 for n in order if tensor_category(n) == "attn_v")
    tied = "output.weight" not in shapes
    counters = {"attn_v": 0, "ffn_down": 0}

    types: dict[str, GGMLQuantizationType] = {}
    fallbacks: list[Fallback] = []
    for name in order:
        shape = shapes[name]
        if not allows_quantization(name, shape):
            types[name] = Q.F32
            continue
        qtype = mix.default_type
        if qtype in _FLOAT_TYPES:
            types[name] = qtype
            continue
        manual = override_type(name, tensor_types)
        if manual is not None:
            qtype = manual
        elif not mix.pure:
            qtype = _mix_rule(mix, name, shape[-1], qtype, counters, n_attention_wv, n_layer, tied, is_70b, n_gqa, has_imatrix)
        used = _fallback(qtype, shape[-1])
        if used != qtype:
            fallbacks.append(Fallback(name, qtype, used, shape[-1]))
        types[name] = used
    return MixChoice(mix, types, fallbacks)


def parse_tensor_types(overrides: dict[str, str]) -> list[tuple[str, GGMLQuantizationType]]:
    """``{pattern: type name}`` (llama-quantize's ``--tensor-type PATTERN=TYPE``) as (regex, type) pairs in
    the given order; ValueError naming a pattern that is not a regex or a type qtune does not write."""
    pairs = []
    for pattern, type_name in overrides.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"tensor_types: '{pattern}' is not a regular expression ({exc})") from None
        qtype = Q.__members__.get(str(type_name).upper())
        if qtype is None or qtype not in GGML_TYPES:
            raise ValueError(f"tensor_types: '{pattern}': unknown type '{type_name}'; one of {', '.join(t.name for t in GGML_TYPES)}")
        pairs.append((pattern, qtype))
    return pairs


def override_type(name: str, tensor_types: Sequence[tuple[str, GGMLQuantizationType]]) -> GGMLQuantizationType | None:
    """The type of the first (regex, type) override whose pattern is found in ``name``, as llama-quantize matches them."""
    return next((qtype for pattern, qtype in tensor_types if re.search(pattern, name)), None)


def explicit_types(label: str, types: dict[str, GGMLQuantizationType], tensors: Sequence[tuple[str, Sequence[int]]]) -> MixChoice:
    """A MixChoice from a type for every quantized tensor (``quant: auto``); the others stay F32. The file
    type written is llama.cpp's for the type that holds the most weights."""
    chosen: dict[str, GGMLQuantizationType] = {}
    weights: dict[GGMLQuantizationType, int] = {}
    for name, shape in tensors:
        if not allows_quantization(name, shape):
            chosen[name] = Q.F32
            continue
        if name not in types:
            raise ValueError(f"no type chosen for {name}")
        qtype = chosen[name] = types[name]
        if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            raise ValueError(f"{name}: rows of {shape[-1]} are not a multiple of {GGML_QUANT_SIZES[qtype][0]} ({qtype.name})")
        weights[qtype] = weights.get(qtype, 0) + math.prod(shape)
    dominant = max(weights, key=weights.__getitem__) if weights else Q.F32
    file_type = next((m.file_type for m in _MIXES if m.default_type == dominant), F.GUESSED)
    return MixChoice(QuantMix(label, dominant, file_type, pure=False), chosen, [])


def tensor_category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    # attn_qkv and attn_kv_b count as attn_v (category_is_attn_v), and take its branch
    for part, category in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if part in name:
            return category
    return "other"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # C integer division; (i - n/8) can be negative only when i < n/8, which already returned True
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _mix_rule(
    mix: QuantMix,
    name: str,
    n_per_row: int,
    qtype: GGMLQuantizationType,
    counters: dict[str, int],
    n_attention_wv: int,
    n_layer: int,
    tied: bool,
    is_70b: bool,
    n_gqa: int,
    has_imatrix: bool,
) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl restricted to the K-quant and IQ4 mixes of dense models."""
    iq4 = mix.file_type in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS)
    ftype = mix.file_type
    category = tensor_category(name)
    if category == "output" or (tied and category == "token_embd"):
        if n_per_row % GGML_QUANT_SIZES[qtype][0] != 0:
            return Q.Q8_0
        return Q.Q6_K if qtype != Q.Q8_0 else qtype
    if category == "attn_v":
        i = counters["attn_v"]
        if ftype == F.MOSTLY_Q3_K_M:
            qtype = Q.Q5_K if i < 2 else Q.Q4_K
        elif iq4 and n_gqa >= 4:
            qtype = Q.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i, n_attention_wv):
            qtype = Q.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i < 4:
            qtype = Q.Q5_K
        if is_70b and qtype in (Q.Q3_K, Q.Q4_K):
            qtype = Q.Q5_K
        counters["attn_v"] += 1
        return qtype
    if category == "ffn_down":
        i = counters["ffn_down"]
        if ftype == F.MOSTLY_Q3_K_M:
            qtype = Q.Q5_K if i < n_layer // 16 else Q.Q4_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if _use_more_bits(i, n_layer):
                qtype = Q.Q6_K
        elif iq4 and i < n_layer // 8 and not has_imatrix:
            qtype = Q.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i, n_layer):
            qtype = Q.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i < n_layer // 8:
            qtype = Q.Q5_K
        counters["ffn_down"] += 1
        return qtype
    if category == "attn_output" and ftype == F.MOSTLY_Q3_K_M:
        return Q.Q4_K
    return qtype


def _fallback(qtype: GGMLQuantizationType, n_per_row: int) -> GGMLQuantizationType:
    """tensor_type_fallback: a type whose block divides the row, else F16."""
    if n_per_row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    used = _FALLBACK.get(qtype, qtype)
    if n_per_row % GGML_QUANT_SIZES[used][0] != 0:
        used = Q.F16
    return used
