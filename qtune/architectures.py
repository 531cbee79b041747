"""The model architectures qtune exports: one entry per Hugging Face ``model_type``, the only place their
layout is written down. GPTQ, AWQ, the imatrix, the GGUF writer and the recipe's checks all read it.

Adding an architecture means adding its entry here (and its tests); see docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtune.errors import QtuneError


@dataclass(frozen=True)
class BalanceGroup:
    """One AWQ scale search: the linears that share an input, the op before them (which absorbs the
    inverse scale) and the module whose output error is measured."""

    previous: str
    linears: tuple[str, ...]
    inspected: str
    # 0: the previous op is a norm, all of whose channels feed the linears. n > 0: it is a linear with n times
    # as many outputs as the linears have inputs, the last of which feed them (v, or v of a fused qkv, before
    # o; up of a fused gate_up before down); the search is skipped when the shapes say otherwise (GQA).
    previous_rows: int = 0


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
    # when llama.cpp types an 80-layer model LLM_TYPE_70B (its mixes give attn_v more bits): "gqa" (llama),
    # "always" (qwen2) or None (no such size)
    gguf_70b_at_80_layers: str | None = None
    gguf_keys: tuple[str, ...] = ()  # optional GGUF metadata llama.cpp's converter writes for it (formats.gguf.convert)
    # llama.cpp's default sliding-window layer pattern (every n-th layer is global); a config whose
    # layer_types differ is written out as an explicit pattern
    gguf_swa_period: int | None = None
    norm_offset: float = 0.0  # its RMSNorms scale by (offset + weight): Gemma's store weight - 1
    fused_qkv: bool = False  # one linear computes q, k and v (Phi-3's qkv_proj), written fused in GGUF too
    fused_gate_up: bool = False  # one linear computes gate and up (Phi-3's gate_up_proj, gate first)

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

    def gguf_is_70b(self, n_layer: int, n_head: int, n_head_kv: int) -> bool:
        """llama.cpp's LLM_TYPE_70B for this architecture and size."""
        rule = self.gguf_70b_at_80_layers
        return n_layer == 80 and (rule == "always" or (rule == "gqa" and n_head != n_head_kv))

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
    BalanceGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", previous_rows=1),
    BalanceGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    BalanceGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", previous_rows=1),
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
_LLAMA_KEYS = ("vocab_size", "rope_dimension_count")
_LLAMA_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _llama_family(
    model_type: str,
    gguf_arch: str,
    permute_qk: bool,
    gguf_layer_extra: dict[str, str] | None = None,
    gguf_keys: tuple[str, ...] = (),
    **differences: Any,
) -> Architecture:
    """Llama's block (q, k, v, o; gate, up, down) under its HF names; `differences` are other Architecture fields."""
    fields: dict[str, Any] = dict(balance_groups=_LLAMA_BALANCE, gguf_layer_tensors=_LLAMA_GGUF_LAYER) | differences
    fields["gguf_layer_tensors"] = fields["gguf_layer_tensors"] | (gguf_layer_extra or {})
    return Architecture(
        model_type=model_type,
        gguf_arch=gguf_arch,
        permute_qk=permute_qk,
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        sequential_groups=_LLAMA_GROUPS,
        attention="self_attn",
        unclipped=("self_attn.q_proj", "self_attn.k_proj"),
        gguf_global_tensors=_LLAMA_GGUF_GLOBAL,
        gguf_keys=gguf_keys,
        **fields,
    )


_PHI3 = Architecture(
    model_type="phi3",
    gguf_arch="phi3",
    permute_qk=False,  # llama.cpp runs Phi-3 with NEOX (rotate-half) RoPE
    query="self_attn.qkv_proj",
    key="self_attn.qkv_proj",
    sequential_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    balance_groups=(
        BalanceGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        BalanceGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", previous_rows=3),
        BalanceGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        BalanceGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", previous_rows=2),
    ),
    attention="self_attn",
    unclipped=("self_attn.qkv_proj",),
    gguf_layer_tensors={
        "input_layernorm": "attn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
    gguf_global_tensors=_LLAMA_GGUF_GLOBAL,
    gguf_keys=("rope_dimension_count", "rope_scaling_orig_ctx_len", "sliding_window"),
    fused_qkv=True,
    fused_gate_up=True,
)


_GEMMA_BALANCE = (
    BalanceGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    BalanceGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", previous_rows=1),
    # post_attention_layernorm normalizes the attention's output before the residual; the MLP's input
    # comes from pre_feedforward_layernorm
    BalanceGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    BalanceGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", previous_rows=1),
)
_GEMMA_GGUF_LAYER = {
    **{k: v for k, v in _LLAMA_GGUF_LAYER.items() if k != "post_attention_layernorm"},
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gemma(model_type: str, gguf_arch: str, gguf_layer_extra: dict[str, str], gguf_keys: tuple[str, ...], swa_period: int) -> Architecture:
    # llama.cpp runs Gemma with NEOX (rotate-half) RoPE: no q/k permutation
    return _llama_family(
        model_type, gguf_arch, False, gguf_layer_extra, gguf_keys,
        balance_groups=_GEMMA_BALANCE, gguf_layer_tensors=_GEMMA_GGUF_LAYER, gguf_swa_period=swa_period, norm_offset=1.0,
    )  # fmt: skip


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        _llama_family("llama", "llama", permute_qk=True, gguf_keys=_LLAMA_KEYS, gguf_70b_at_80_layers="gqa"),
        _llama_family("mistral", "llama", permute_qk=True, gguf_keys=_LLAMA_KEYS, gguf_70b_at_80_layers="gqa"),  # llama.cpp converts Mistral as llama
        _llama_family("qwen2", "qwen2", permute_qk=False, gguf_70b_at_80_layers="always"),  # q/k/v biases; llama.cpp keeps HF's RoPE layout
        # per-head RMSNorm of q and k before RoPE
        _llama_family("qwen3", "qwen3", permute_qk=False, gguf_layer_extra={"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}),
        _PHI3,
        # soft-capped attention and logits; every other layer sliding
        _gemma("gemma2", "gemma2", {}, ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "sliding_window_pattern"), 2),
        # Gemma 3's text model (1B; the larger ones are image-text checkpoints): q/k norms, local and global RoPE
        _gemma(
            "gemma3_text",
            "gemma3",
            {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
            ("final_logit_softcapping", "sliding_window", "rope_freq_base_swa", "sliding_window_pattern"),
            6,
        ),
    )
}


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def architecture(model_type: str | None) -> Architecture:
    """The entry for ``model_type``, or a QtuneError naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise QtuneError(f"the '{model_type}' architecture is not supported for export; supported: {supported()}")
    return ARCHITECTURES[model_type]
