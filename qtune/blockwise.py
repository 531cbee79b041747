"""An HF causal LM run one decoder block at a time, its weights read from the checkpoint when needed.

The model is built with its parameters on the meta device, so it holds no weights at all. The embeddings load once to
turn token ids into the first block's inputs (and to catch every keyword argument each block is
called with: the attention mask, the rotary position embeddings); then each block is loaded, run on
the carried hidden states, and sent back to the meta device; the final norm and the head load last.
Host or device memory therefore grows with the batch of hidden states and one block, never with depth.

A caller may substitute any block's tensors (a merge candidate, a quantized block), which is how the
merge measures its candidates without building either as a whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from qtune.host_memory import map_large_allocations, return_freed_memory
from qtune.layerwise import _Batch, _first_output, capture_block_inputs, decoder_layers
from qtune.shards import CheckpointReader

TensorSource = Callable[[str], Tensor]


def empty_model(config, **kwargs) -> nn.Module:
    """``config``'s model class with its parameters on the meta device (no memory) and its buffers real:
    those are computed from the config, not stored (rotary frequencies, Gemma's embedding scale)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def skeleton(checkpoint: Path, trust_remote_code: bool = False, attn_implementation: str | None = None) -> nn.Module:
    """The checkpoint's model class with none of its weights loaded (``empty_model``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return empty_model(config, trust_remote_code=trust_remote_code, **kwargs).eval()


def _computed_buffers(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The buffers a module computes rather than stores (non-persistent: not in its state dict)."""
    return [(sub, name) for sub in module.modules() for name in sub._non_persistent_buffers_set if sub._buffers.get(name) is not None]


def move_computed_buffers(module: nn.Module, device: torch.device) -> None:
    for sub, name in _computed_buffers(module):
        sub._buffers[name] = sub._buffers[name].to(device)  # pyright: ignore[reportOptionalMemberAccess]


def load_module(module: nn.Module, prefix: str, source: TensorSource, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Give ``module`` real tensors: ``source(prefix + name)`` for each of its parameters and buffers in
    its state dict, floating ones cast to ``dtype``; its computed buffers move to ``device``."""
    state = {}
    for name, placeholder in module.state_dict(keep_vars=True).items():
        tensor = source(prefix + name)
        if tuple(tensor.shape) != tuple(placeholder.shape):
            raise ValueError(f"{prefix + name} has shape {list(tensor.shape)}, the model expects {list(placeholder.shape)}")
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    module.load_state_dict(state, assign=True, strict=True)
    move_computed_buffers(module, device)
    return module


def release(module: nn.Module) -> None:
    """Free a module's loaded tensors (they become meta tensors again; its small computed buffers stay) and
    hand the memory back to the system."""
    kept = {id(sub._buffers[name]) for sub, name in _computed_buffers(module)}
    module._apply(lambda t: t if id(t) in kept else t.to("meta"))
    return_freed_memory()


class StreamedModel:
    """A causal LM whose weights stay in its checkpoint until a block runs (see the module docstring)."""

    def __init__(
        self,
        checkpoint: Path,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        map_large_allocations()
        self.checkpoint = Path(checkpoint)
        self.reader = CheckpointReader(self.checkpoint)
        self.model = skeleton(self.checkpoint, trust_remote_code, attn_implementation)
        self.config = self.model.config
        self.layers = decoder_layers(self.model)
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or "lm_head.weight" not in self.reader

    def head_source_name(self, name: str) -> str:
        """The checkpoint tensor behind a head tensor (the embedding matrix when they are tied)."""
        return "model.embed_tokens.weight" if name == "lm_head.weight" and self.tied else name

    def embed(self, inputs: list[tuple[Tensor, Tensor]], source: TensorSource | None = None) -> list[_Batch]:
        """The first block's inputs for each (input_ids, attention_mask) batch, with every block's keyword
        arguments; the embeddings load once for all of them."""
        source = source or self.reader.get
        inner = self.model.model
        for name, child in inner.named_children():
            if name not in ("layers", "norm", "rotary_emb"):  # rotary frequencies are computed, not stored
                load_module(child, f"model.{name}.", source, self.device, self.dtype)
        try:
            return [capture_block_inputs(self.model, ids, mask, ids.shape[0], self.device)[0] for ids, mask in inputs]
        finally:
            for name, child in inner.named_children():
                if name not in ("layers", "norm", "rotary_emb"):
                    release(child)

    def load_block(self, index: int, source: TensorSource | None = None) -> nn.Module:
        return load_module(self.layers[index], f"model.layers.{index}.", source or self.reader.get, self.device, self.dtype)

    def run_block(self, index: int, batches: list[_Batch], source: TensorSource | None = None) -> None:
        """Load block ``index`` (from ``source`` when given), carry every batch's hidden states through it, free it."""
        layer = self.load_block(index, source)
        try:
            with torch.no_grad():
                for batch in batches:
                    batch.hidden = _first_output(layer(batch.hidden, **batch.layer_kwargs[index]))
        finally:
            release(layer)

    def final_hidden(self, batches: list[dict[str, Tensor]], source: TensorSource | None = None) -> list[Tensor]:
        """Each batch's hidden states after the final norm (what the head is applied to), block by block."""
        carried = self.embed([(b["input_ids"], b["attention_mask"]) for b in batches], source)
        for index in range(len(self.layers)):
            self.run_block(index, carried, source)
        norm = load_module(self.model.model.norm, "model.norm.", source or self.reader.get, self.device, self.dtype)
        try:
            with torch.no_grad():
                return [norm(batch.hidden) for batch in carried]
        finally:
            release(norm)

    def output_head(self, source: TensorSource | None = None) -> nn.Module:
        """The output head, loaded (release it when done)."""
        source = source or self.reader.get
        return load_module(self.model.lm_head, "lm_head.", lambda name: source(self.head_source_name(name)), self.device, self.dtype)
