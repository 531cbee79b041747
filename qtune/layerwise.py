"""Decoder-block-by-block GPTQ / AWQ over an HF causal LM (the layouts of ``qtune.architectures``).

Only one block and its calibration activations live on ``device`` at a time:
1. the embeddings run once and the inputs (and every keyword argument, e.g.
   ``position_embeddings`` and the attention mask) of each decoder layer call are caught;
2. each block is quantized, then run on its inputs to make the next block's inputs,
   so later blocks see the errors of earlier quantized blocks.

The model is changed in place: quantized linears hold their fake-quantized
weights (and for AWQ, norms and preceding linears carry the folded scales), so the
returned ``QuantizedWeight`` records plus the model are what a format writer needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qtune.architectures import Architecture, architecture, supported
from qtune.cpu import fit_threads
from qtune.errors import QtuneError
from qtune.quant import DEFAULT_BITS, DEFAULT_DAMP, DEFAULT_GROUP_SIZE
from qtune.quant import awq as awq_math
from qtune.quant.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from qtune.quant.rtn import QuantizedWeight, check_bits, rtn_quantize
from qtune.quant.w8a8 import ChannelWeight, fp8_gptq_channels, int8_channels, smoothing_scales

TOKENWISE_CHUNK = 8192  # tokens per matmul when AWQ evaluates token-wise modules


@dataclass
class LayerwiseResult:
    quantized_layers: dict[str, QuantizedWeight | ChannelWeight]  # full module name -> codes and grids
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # full module name -> per-layer numbers
    method: str = ""


class _StopForward(Exception):
    pass


@dataclass
class _Batch:
    hidden: Tensor  # [b, s, H] input to the current block
    token_mask: Tensor  # [b, s] bool, real (non-padding) tokens
    layer_kwargs: list[dict[str, Any]]  # per decoder layer: keyword arguments of its call


def decoder_layers(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    """The model's decoder blocks; with ``arch``, checked to hold every linear it quantizes as a plain
    nn.Linear (not yet wrapped by LoRA or a quantized layer)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no model.layers; supported architectures are {supported()}")
    if arch is not None:
        present = dict(layers[0].named_modules())
        missing = [name for name in arch.linear_names if not isinstance(present.get(name), nn.Linear)]
        if missing:
            raise ValueError(f"decoder layer {type(layers[0]).__name__} lacks nn.Linear modules {missing}")
    return layers


def model_architecture(model: nn.Module) -> Architecture:
    """The registry's entry for a transformers model (by its config's model_type)."""
    try:
        return architecture(getattr(getattr(model, "config", None), "model_type", None))
    except QtuneError as exc:
        raise ValueError(str(exc)) from None


def quantizable_layers(model: nn.Module) -> tuple[Architecture, nn.ModuleList]:
    """The model's registry entry and its decoder blocks, checked to hold every linear the entry quantizes
    (a model without decoder blocks is named as such before its architecture is looked up)."""
    decoder_layers(model)
    arch = model_architecture(model)
    return arch, decoder_layers(model, arch)


def _quantize_blocks(
    layers: nn.ModuleList,
    device: torch.device,
    method: str,
    quantize_block: Callable[[nn.Module, int], LayerwiseResult],
    progress: Callable[[str], None] | None,
) -> LayerwiseResult:
    """``quantize_block(layer, index)`` for each decoder block in turn, with the block on ``device``."""
    result = LayerwiseResult(quantized_layers={}, method=method)
    for index, layer in enumerate(layers):
        fit_threads()
        with _block_on(layer, device):
            block = quantize_block(layer, index)
        result.quantized_layers.update(block.quantized_layers)
        result.stats.update(block.stats)
        if progress is not None:
            progress(f"{method}: layer {index + 1}/{len(layers)} done")
    return result


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _check_calibration(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [n_samples, seq_len] tensor, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    return attention_mask.to(torch.bool)


class _LayerCatcher(nn.Module):
    """Stands in for a decoder layer: records its call and passes hidden states through."""

    def __init__(self, index: int, last: bool, sink: list[tuple[Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            raise ValueError("decoder layers called with positional arguments beyond hidden_states are unsupported")
        self.sink.append((hidden_states, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def capture_block_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, batch_size: int, device: torch.device) -> list[_Batch]:
    """Run the embeddings only, catching each decoder layer's call (inputs + all kwargs)."""
    mask = _check_calibration(input_ids, attention_mask)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    layers = decoder_layers(model)
    inner = model.model
    originals = list(layers)
    moved: list[tuple[nn.Module, torch.device]] = []
    for name, child in inner.named_children():
        if name in ("layers", "norm"):
            continue
        params = list(child.parameters()) + list(child.buffers())
        if params:
            moved.append((child, params[0].device))
            child.to(device)
    batches: list[_Batch] = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink: list[tuple[Tensor, dict[str, Any]]] = []
            for i in range(len(layers)):
                layers[i] = _LayerCatcher(i, i == len(layers) - 1, sink)
            ids = input_ids[start : start + batch_size].to(device)
            batch_mask = mask[start : start + batch_size].to(device)
            try:
                with torch.no_grad():
                    inner(input_ids=ids, attention_mask=batch_mask.long(), use_cache=False)
            except _StopForward:
                pass
            if len(sink) != len(originals):
                raise RuntimeError(f"caught {len(sink)} decoder layer calls, expected {len(originals)}")
            batches.append(_Batch(hidden=sink[0][0], token_mask=batch_mask, layer_kwargs=[kw for _, kw in sink]))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for child, original_device in moved:
            child.to(original_device)
    return batches


def _first_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_block(layer: nn.Module, batches: list[_Batch], layer_index: int) -> None:
    with torch.no_grad():
        for batch in batches:
            batch.hidden = _first_output(layer(batch.hidden, **batch.layer_kwargs[layer_index]))


@contextmanager
def _input_hooks(layer: nn.Module, names: tuple[str, ...], on_input: Callable[[str, Tensor], None], stop_after_all: bool) -> Iterator[None]:
    """Call ``on_input(name, x)`` for each named linear's input; optionally stop the block once all fired."""
    fired: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            on_input(name, args[0])
            fired.add(name)
            if stop_after_all and fired.issuperset(names):
                fired.clear()
                raise _StopForward

        return hook

    handles = [layer.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_block_for_inputs(layer: nn.Module, batches: list[_Batch], layer_index: int) -> None:
    with torch.no_grad():
        for batch in batches:
            try:
                layer(batch.hidden, **batch.layer_kwargs[layer_index])
            except _StopForward:
                pass


def _feed_inputs(layer: nn.Module, index: int, batches: list[_Batch], names: tuple[str, ...], on_input: Callable[[str, Tensor, Tensor], None]) -> None:
    """Run the block on every batch up to the last of the named linears, calling ``on_input(name, x,
    token_mask)`` with each one's input."""
    current_mask: list[Tensor] = []
    with _input_hooks(layer, names, lambda name, x: on_input(name, x, current_mask[0]), stop_after_all=True), torch.no_grad():
        for batch in batches:
            current_mask[:] = [batch.token_mask]
            try:
                layer(batch.hidden, **batch.layer_kwargs[index])
            except _StopForward:
                pass


def _set_weight(linear: nn.Linear, weight: Tensor) -> None:
    linear.weight.data.copy_(weight.to(linear.weight.dtype))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _block_on(layer: nn.Module, device: torch.device) -> Iterator[None]:
    params = list(layer.parameters())
    home = params[0].device if params else device
    layer.to(device)
    try:
        yield
    finally:
        layer.to(home)


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def quantize_model_gptq(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    sym: bool = True,
    act_order: bool = False,
    damp: float = DEFAULT_DAMP,
    block_size: int = 128,
    group_aware: bool = True,
    true_sequential: bool = True,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LayerwiseResult:
    """GPTQ every q/k/v/o/gate/up/down linear of every decoder layer, in place."""
    with _eval_mode(model):
        return _quantize_model_gptq(
            model,
            input_ids,
            attention_mask,
            bits,
            group_size,
            sym,
            act_order,
            damp,
            block_size,
            group_aware,
            true_sequential,
            batch_size,
            device,
            progress,
        )


def _quantize_model_gptq(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    damp: float,
    block_size: int,
    group_aware: bool,
    true_sequential: bool,
    batch_size: int,
    device: torch.device | str | None,
    progress: Callable[[str], None] | None,
) -> LayerwiseResult:
    check_bits(bits)
    arch, layers = quantizable_layers(model)
    device_ = _resolve_device(model, device)
    batches = capture_block_inputs(model, input_ids, attention_mask, batch_size, device_)

    def quantize_block(layer: nn.Module, index: int) -> LayerwiseResult:
        return gptq_block(
            layer,
            index,
            batches,
            device_,
            arch=arch,
            bits=bits,
            group_size=group_size,
            sym=sym,
            act_order=act_order,
            damp=damp,
            block_size=block_size,
            group_aware=group_aware,
            true_sequential=true_sequential,
        )

    return _quantize_blocks(layers, device_, "gptq", quantize_block, progress)


def gptq_block(
    layer: nn.Module,
    index: int,
    batches: list[_Batch],
    device: torch.device,
    *,
    arch: Architecture,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    damp: float,
    block_size: int = 128,
    group_aware: bool = True,
    true_sequential: bool = True,
) -> LayerwiseResult:
    """GPTQ one decoder block (on ``device``) in place, then carry ``batches`` through the quantized block."""

    def solve(linear: nn.Linear, hessian: Tensor) -> tuple[QuantizedWeight, Tensor, dict[str, Any]]:
        quantized = gptq_quantize(linear.weight.data, hessian, bits, group_size, sym, act_order, damp, block_size, group_aware)
        return quantized.to("cpu"), quantized.weight, _gptq_stats(quantized)  # codes only, off the device

    groups = arch.sequential_groups if true_sequential else (arch.linear_names,)
    result = LayerwiseResult(quantized_layers={}, method="gptq")
    with _eval_mode(layer):
        _solve_sequentially(layer, index, batches, device, groups, solve, result)
        _run_block(layer, batches, index)
    return result


def _gptq_stats(quantized: GPTQResult) -> dict[str, Any]:
    return {"loss": quantized.loss, "damp": quantized.damp, "damp_retries": quantized.damp_retries, "dead_columns": quantized.dead_columns}


def _solve_sequentially(
    layer: nn.Module,
    index: int,
    batches: list[_Batch],
    device: torch.device,
    groups: tuple[tuple[str, ...], ...],
    solve: Callable[[nn.Linear, Tensor], tuple[Any, Tensor, dict[str, Any]]],
    result: LayerwiseResult,
) -> None:
    """For each group of linears sharing an input, in order: their input Hessian over the real calibration
    tokens (the block run up to them, after the groups before were rounded), then ``solve(linear, H)`` ->
    (the record kept, the rounded weight set in place, stats)."""
    for names in groups:
        accumulators = {name: HessianAccumulator(_linear(layer, name).in_features, device) for name in names}
        _feed_inputs(layer, index, batches, names, lambda name, x, mask: accumulators[name].add_batch(x, mask))
        for name in names:
            linear = _linear(layer, name)
            full_name = f"model.layers.{index}.{name}"
            try:
                record, weight, stats = solve(linear, accumulators.pop(name).hessian)
            except ValueError as exc:
                raise ValueError(f"{full_name}: {exc}") from exc
            _set_weight(linear, weight)
            result.quantized_layers[full_name] = record
            result.stats[full_name] = stats


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    linear = layer.get_submodule(name)
    assert isinstance(linear, nn.Linear), f"{name} is a {type(linear).__name__}, not an nn.Linear"
    return linear


def smooth_block(layer: nn.Module, index: int, batches: list[_Batch], *, arch: Architecture, strength: float) -> dict[str, dict[str, Any]]:
    """SmoothQuant one decoder block in place: for each group of linears that share an input, the largest
    |activation| per input channel over the real calibration tokens sets the factors by which the op
    before them (a norm, or the linear whose outputs feed them: v before o, up before down) is divided and
    the linears' columns are multiplied, so the block computes the same function. The groups are AWQ's
    (``arch.balance_groups``); a v before o whose shapes differ (grouped-query attention) is left as is.
    Groups after a linear go first: scaling v's or up's rows changes the column maxima the norm groups'
    factors read, while no norm group changes what a later group reads."""
    groups = sorted(_balance_groups(layer, arch), key=lambda group: not isinstance(layer.get_submodule(group[0]), nn.Linear))
    inputs = tuple(dict.fromkeys(arch.input_of(linears[0]) for _, linears, _ in groups))
    absmax: dict[str, Tensor] = {}

    def collect(name: str, x: Tensor, mask: Tensor) -> None:
        top = x.detach()[mask].abs().amax(dim=0).float()
        absmax[name] = top if name not in absmax else torch.maximum(absmax[name], top)

    with _eval_mode(layer):
        _feed_inputs(layer, index, batches, inputs, collect)
    stats: dict[str, dict[str, Any]] = {}
    for previous, names, _ in groups:
        key = arch.input_of(names[0])
        linears = [_linear(layer, name) for name in names]
        scales = smoothing_scales(absmax[key], [linear.weight.data for linear in linears], strength)
        _scale_previous_op(layer.get_submodule(previous), scales, arch.norm_offset)
        for linear in linears:
            _scale_linear_inputs(linear, scales)
        before, after = float(absmax[key].max()), float((absmax[key].to(scales.device) / scales).max())
        for name in names:
            stats[f"model.layers.{index}.{name}"] = {"smoothed_by": previous, "activation_max": before, "smoothed_activation_max": after}
    return stats


def w8a8_block(
    layer: nn.Module,
    index: int,
    batches: list[_Batch],
    device: torch.device,
    *,
    arch: Architecture,
    weights: str,
    smoothing: float,
    damp: float,
    scale_dtype: torch.dtype = torch.float32,
    group_aware: bool = True,
) -> LayerwiseResult:
    """One decoder block for 8-bit weights and per-token 8-bit activations, in place: SmoothQuant first
    (``smoothing`` is its strength, 0 for none), then GPTQ on the smoothed block's inputs onto int8
    (``weights="int8"``) or FP8 E4M3 (``"fp8"``) grids with one scale per output channel, stored in
    ``scale_dtype``; then ``batches`` are carried through the rounded block."""

    def solve(linear: nn.Linear, hessian: Tensor) -> tuple[ChannelWeight, Tensor, dict[str, Any]]:
        if weights == "int8":
            grid = gptq_quantize(linear.weight.data, hessian, 8, -1, sym=True, damp=damp, group_aware=group_aware)
            quantized, stats = int8_channels(grid.qweight_int, grid.scales, scale_dtype), _gptq_stats(grid)
        else:
            quantized, loss = fp8_gptq_channels(linear.weight.data, hessian, scale_dtype, damp)
            stats = {"loss": loss}
        return quantized.to("cpu"), quantized.dequantize(), stats

    if weights not in ("int8", "fp8"):
        raise ValueError(f"8-bit weights are int8 or fp8, not {weights!r}")
    smoothed = smooth_block(layer, index, batches, arch=arch, strength=smoothing) if smoothing else {}
    result = LayerwiseResult(quantized_layers={}, method=f"gptq-{weights}")
    with _eval_mode(layer):
        _solve_sequentially(layer, index, batches, device, arch.sequential_groups, solve, result)
        _run_block(layer, batches, index)
    for name, numbers in smoothed.items():
        result.stats[name].update(numbers)
    return result


def _masked_mse(output: Tensor, reference: Tensor, token_mask: Tensor | None) -> tuple[float, int]:
    """Sum of squared differences over real tokens (all when ``token_mask`` is None), and the element count."""
    diff = output.float() - reference.float()
    if token_mask is not None:
        diff = diff[token_mask]
    return float(diff.pow(2).sum()), diff.numel()


def _real_tokens(chunks: list[Tensor], masks: list[Tensor | None]) -> Tensor:
    """[tokens, K]: the non-padding rows of every chunk."""
    return torch.cat([x.reshape(-1, x.shape[-1]) if m is None else x[m] for x, m in zip(chunks, masks)])


def _scale_linear_inputs(linear: nn.Linear, scales: Tensor) -> None:
    linear.weight.data.copy_((linear.weight.data.float() * scales.unsqueeze(0)).to(linear.weight.dtype))


def _scale_previous_op(previous: nn.Module, scales: Tensor, norm_offset: float = 0.0) -> None:
    """Divide the previous op's output channels by ``scales``: a norm's weight (which scales by
    ``norm_offset + weight``), or a linear's last rows (all of them, or v of a fused qkv, or up of a fused gate_up)."""
    weight: Tensor = previous.weight.data  # pyright: ignore[reportAssignmentType]
    if weight.dim() == 1:
        weight.copy_(((weight.float() + norm_offset) / scales - norm_offset).to(weight.dtype))
    else:
        rows = weight[-scales.numel() :]
        rows.copy_((rows.float() / scales.unsqueeze(1)).to(weight.dtype))
    bias = getattr(previous, "bias", None)
    if bias is not None:
        tail: Tensor = bias.data[-scales.numel() :]
        tail.copy_((tail.float() / scales).to(tail.dtype))


def _balance_groups(layer: nn.Module, arch: Architecture) -> list[tuple[str, tuple[str, ...], str]]:
    """(previous op, balanced linears, inspected module) for one decoder layer."""
    groups = []
    for group in arch.balance_groups:
        if group.previous_rows:  # with GQA, v has fewer outputs than o has inputs
            previous, first = layer.get_submodule(group.previous), layer.get_submodule(group.linears[0])
            assert isinstance(previous, nn.Linear) and isinstance(first, nn.Linear)
            if previous.out_features != group.previous_rows * first.in_features:
                continue
        groups.append((group.previous, group.linears, group.inspected))
    return groups


def quantize_model_awq(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    n_grid: int = 20,
    duo_scaling: bool = True,
    apply_clip: bool = True,
    rounding: str = "rtn",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LayerwiseResult:
    """AWQ every decoder layer in place: fold scales, clip, then round to the asymmetric grid.

    ``rounding="rtn"`` is the published method (round to nearest). ``"gptq"`` rounds the scaled, clipped
    weights with GPTQ's error compensation instead (Hessian from the same scaled calibration inputs,
    group-aware order, asymmetric grid); the checkpoint layout is the same.
    """
    if rounding not in ("rtn", "gptq"):
        raise ValueError(f"rounding must be 'rtn' or 'gptq', got {rounding!r}")
    with _eval_mode(model):
        return _quantize_model_awq(
            model,
            input_ids,
            attention_mask,
            bits,
            group_size,
            n_grid,
            duo_scaling,
            apply_clip,
            rounding,
            damp,
            batch_size,
            device,
            progress,
        )


def _quantize_model_awq(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    bits: int,
    group_size: int,
    n_grid: int,
    duo_scaling: bool,
    apply_clip: bool,
    rounding: str,
    damp: float,
    batch_size: int,
    device: torch.device | str | None,
    progress: Callable[[str], None] | None,
) -> LayerwiseResult:
    check_bits(bits)  # any width for the math; the AWQ GEMM writer takes 4-bit only
    arch, layers = quantizable_layers(model)
    device_ = _resolve_device(model, device)
    for index, layer in enumerate(layers):
        for name in arch.linear_names:
            linear = layer.get_submodule(name)
            awq_math.check_awq_group_size(linear.in_features, group_size, f"model.layers.{index}.{name}")
    batches = capture_block_inputs(model, input_ids, attention_mask, batch_size, device_)

    def quantize_block(layer: nn.Module, index: int) -> LayerwiseResult:
        return awq_block(
            layer,
            index,
            batches,
            device_,
            arch=arch,
            bits=bits,
            group_size=group_size,
            n_grid=n_grid,
            duo_scaling=duo_scaling,
            apply_clip=apply_clip,
            rounding=rounding,
            damp=damp,
        )

    return _quantize_blocks(layers, device_, "awq", quantize_block, progress)


def awq_block(
    layer: nn.Module,
    index: int,
    batches: list[_Batch],
    device: torch.device,
    *,
    arch: Architecture,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    duo_scaling: bool = True,
    apply_clip: bool = True,
    rounding: str = "rtn",
    damp: float = DEFAULT_DAMP,
) -> LayerwiseResult:
    """AWQ one decoder block (on ``device``) in place, then carry ``batches`` through the quantized block."""
    captured_names = tuple(group[0] for group in arch.sequential_groups)
    result = LayerwiseResult(quantized_layers={}, method="awq")
    with _eval_mode(layer):
        features: dict[str, list[Tensor]] = {name: [] for name in captured_names}
        with _input_hooks(layer, captured_names, lambda n, x: features[n].append(x.detach()), False):
            _run_block_for_inputs(layer, batches, index)
        # only attention mixes tokens: every other inspected module sees the real tokens of all
        # batches as a few large chunks, with the padding dropped
        attention_input = next(arch.input_of(g.linears[0]) for g in arch.balance_groups if g.inspected == arch.attention)
        chunk_masks: dict[str, list[Tensor | None]] = {attention_input: [b.token_mask for b in batches]}
        for name in captured_names:
            if name == attention_input:
                continue
            valid = torch.cat([x[b.token_mask] for x, b in zip(features[name], batches)])
            features[name] = list(valid.split(TOKENWISE_CHUNK))
            chunk_masks[name] = [None] * len(features[name])

        for previous_name, linear_names, inspected_name in _balance_groups(layer, arch):
            feature_key = arch.input_of(linear_names[0])
            inputs, masks = features[feature_key], chunk_masks[feature_key]
            inspected = layer.get_submodule(inspected_name)
            linears = [layer.get_submodule(name) for name in linear_names]
            is_attention = inspected_name == arch.attention

            def run_inspected(x: Tensor, chunk: int) -> Tensor:
                if is_attention:
                    kwargs = batches[chunk].layer_kwargs[index]
                    return _first_output(inspected(hidden_states=x, **kwargs))
                return _first_output(inspected(x))

            with torch.no_grad():
                references = [run_inspected(x, i) for i, x in enumerate(inputs)]
            originals = [linear.weight.data.clone() for linear in linears]

            def evaluate(candidates: list[Tensor]) -> float:
                total, count = 0.0, 0
                try:
                    for linear, weight in zip(linears, candidates):
                        _set_weight(linear, weight)
                    with torch.no_grad():
                        for i, x in enumerate(inputs):
                            sq, n = _masked_mse(run_inspected(x, i), references[i], masks[i])
                            total, count = total + sq, count + n
                finally:
                    for linear, weight in zip(linears, originals):
                        linear.weight.data.copy_(weight)
                return total / max(count, 1)

            x_mean = awq_math.activation_mean(_real_tokens(inputs, masks))
            search = awq_math.search_scales(
                x_mean,
                originals,
                evaluate,
                bits=bits,
                group_size=group_size,
                n_grid=n_grid,
                duo_scaling=duo_scaling,
            )
            scales = search.scales.to(device)
            _scale_previous_op(layer.get_submodule(previous_name), scales, arch.norm_offset)
            for linear in linears:
                _scale_linear_inputs(linear, scales)
            features[feature_key] = [(x.float() / scales).to(x.dtype) for x in inputs]
            for name in linear_names:
                result.stats[f"model.layers.{index}.{name}"] = {
                    "awq_ratio": search.ratio,
                    "awq_error": search.error,
                    "rtn_error": search.rtn_error,
                    "scaled_by": previous_name,
                }

        for name in arch.linear_names:
            full_name = f"model.layers.{index}.{name}"
            linear = layer.get_submodule(name)
            weight = linear.weight.data.float()
            key = arch.input_of(name)
            x = _real_tokens(features[key], chunk_masks[key])
            if apply_clip and name not in arch.unclipped:
                weight = awq_math.apply_clip(weight, awq_math.search_clip(weight, x, bits, group_size))
            if rounding == "gptq":
                hessian = HessianAccumulator(weight.shape[1], weight.device)
                hessian.add_batch(x)
                quantized = gptq_quantize(weight, hessian.hessian, bits, group_size, sym=False, damp=damp, group_aware=True)
            else:
                quantized = rtn_quantize(weight, bits, group_size, sym=False, convention="awq")
            _set_weight(linear, quantized.dequantize())
            result.quantized_layers[full_name] = quantized.to("cpu")
            result.stats.setdefault(full_name, {})["clipped"] = apply_clip and name not in arch.unclipped
        features.clear()
        _run_block(layer, batches, index)
    return result
