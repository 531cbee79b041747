"""The model architectures qtune exports: one entry per Hugging Face ``model_type``, the only place their
layout is written down. GPTQ, AWQ, the imatrix, the GGUF writer and the recipe's checks all read it.

Adding an architecture means adding its entry here (and its tests); see docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtune.errors import QtuneError


@dataclass(frozen=True)
class BalanceGroup:
    """One AWQ scale search: the linears that share an input, the op before them (which absorbs the
    inverse scale) and the module whose output error is measured."""

    previous: str
    linears: tuple[str, ...]
    inspected: str
    same_shape_only: bool = False  # only when the previous op's weight has the linear's shape (v -> o without GQA, as AutoAWQ)


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    gguf_arch: str  # general.architecture in a GGUF, as llama.cpp's converter writes it
    permute_qk: bool  # HF's rotate-half RoPE layout becomes llama.cpp's interleaved pairs
    query: str  # the query and key projections (their rows are permuted when permute_qk)
    key: str
    sequential_groups: tuple[tuple[str, ...], ...]  # GPTQ's true-sequential order; each group shares one input
    balance_groups: tuple[BalanceGroup, ...]  # AWQ's
    attention: str  # the block's attention module (it mixes tokens, so AWQ runs it per batch)
    unclipped: tuple[str, ...]  # linears AWQ does not clip (their outputs meet in a softmax)
    gguf_layer_tensors: dict[str, str]  # module inside a decoder block -> GGUF tensor name
    gguf_global_tensors: dict[str, str]  # module outside the blocks -> GGUF tensor name

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every quantized linear of a decoder block, in true-sequential order."""
        return tuple(name for group in self.sequential_groups for name in group)

    def rope_heads(self, module: str, n_head: int, n_head_kv: int) -> int | None:
        """How many heads' rows to permute for llama.cpp's RoPE layout in ``module`` (an HF module or
        parameter name), or None."""
        if not self.permute_qk:
            return None
        parts = module.removesuffix(".weight").removesuffix(".bias").split(".")
        local = ".".join(parts[-2:])
        return n_head if local == self.query else n_head_kv if local == self.key else None

    def input_of(self, linear: str) -> str:
        """The linear whose input ``linear`` shares (the first of its sequential group)."""
        return next(group[0] for group in self.sequential_groups if linear in group)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_BALANCE = (
    BalanceGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    BalanceGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", same_shape_only=True),
    BalanceGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    BalanceGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
_LLAMA_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LLAMA_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _llama_family(model_type: str, gguf_arch: str, permute_qk: bool) -> Architecture:
    return Architecture(
        model_type=model_type,
        gguf_arch=gguf_arch,
        permute_qk=permute_qk,
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        sequential_groups=_LLAMA_GROUPS,
        balance_groups=_LLAMA_BALANCE,
        attention="self_attn",
        unclipped=("self_attn.q_proj", "self_attn.k_proj"),
        gguf_layer_tensors=_LLAMA_GGUF_LAYER,
        gguf_global_tensors=_LLAMA_GGUF_GLOBAL,
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        _llama_family("llama", "llama", permute_qk=True),
        _llama_family("mistral", "llama", permute_qk=True),  # llama.cpp converts Mistral as llama
        _llama_family("qwen2", "qwen2", permute_qk=False),  # q/k/v biases; llama.cpp keeps HF's RoPE layout
    )
}


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def architecture(model_type: str | None) -> Architecture:
    """The entry for ``model_type``, or a QtuneError naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise QtuneError(f"the '{model_type}' architecture is not supported for export; supported: {supported()}")
    return ARCHITECTURES[model_type]
