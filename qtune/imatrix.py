"""Importance matrices: per-input-column mean of x² for each linear layer, as llama.cpp's imatrix tool.

``collect_imatrix`` runs an HF model over calibration batches and accumulates, for every
``nn.Linear`` inside the decoder layers, the sum of squared inputs per input channel and the number
of tokens. The importance of a column is sum / count (llama.cpp's quantize divides the same way).
Like llama.cpp's tool (without --process-output), ``lm_head`` is left out.

The files llama.cpp reads and writes are ``qtune.formats.gguf.imatrix``'s.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qtune.cpu import fit_threads
from qtune.errors import QtuneError
from qtune.formats.gguf.imatrix import Imatrix


def _accumulate(stats: Imatrix, name: str):
    def hook(_module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
        total = stats.sums.get(name)
        squares = (x * x).sum(dim=0).cpu()
        stats.sums[name] = squares if total is None else total + squares
        stats.counts[name] = stats.counts.get(name, 0) + x.shape[0]

    return hook


def _hook_linears(module: torch.nn.Module, prefix: str, stats: Imatrix) -> list:
    return [
        child.register_forward_hook(_accumulate(stats, prefix + name))
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear) and ".layers." in f".{prefix}{name}"
    ]


@torch.no_grad()
def collect_imatrix(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    chunk_size: int = 512,
    dataset: str = "qtune-calibration",
) -> Imatrix:
    """Accumulate x² per input column of every decoder-layer linear over ``batches`` (input_ids [B, T])."""
    stats = Imatrix(chunk_size=chunk_size, datasets=[dataset])
    hooks = _hook_linears(model, "", stats)
    if not hooks:
        raise QtuneError("collect_imatrix found no linear layers inside decoder layers ('.layers.') of the model")
    device = next(model.parameters()).device
    try:
        n_batches = 0
        for input_ids in batches:
            fit_threads()
            input_ids = torch.as_tensor(input_ids)
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            model(input_ids=input_ids.to(device))
            n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise QtuneError("collect_imatrix got no calibration batches")
    return stats


@torch.no_grad()
def collect_imatrix_streamed(streamed, batches: list[torch.Tensor], chunk_size: int = 512, dataset: str = "qtune-calibration") -> Imatrix:
    """``collect_imatrix`` for a ``blockwise.StreamedModel``: the same sums, one decoder block in memory at a time."""
    from qtune.blockwise import release

    if not batches:
        raise QtuneError("collect_imatrix got no calibration batches")
    stats = Imatrix(chunk_size=chunk_size, datasets=[dataset])
    carried = streamed.embed([(ids, torch.ones_like(ids, dtype=torch.bool)) for ids in batches])
    for index in range(len(streamed.layers)):
        fit_threads()
        layer = streamed.load_block(index)
        hooks = _hook_linears(layer, f"model.layers.{index}.", stats)
        try:
            for batch in carried:
                batch.hidden = layer(batch.hidden, **batch.layer_kwargs[index])
                batch.hidden = batch.hidden[0] if isinstance(batch.hidden, tuple) else batch.hidden
        finally:
            for h in hooks:
                h.remove()
            release(layer)
    return stats
