"""Fused QLoRA linear over a bitsandbytes NF4 weight, and a patch that routes peft's LoRA layers through it.

    y = x @ dequant(W)^T + bias + scaling * (dropout(x) @ A^T) @ B^T

On the Triton backend (CUDA), x @ W^T and the input gradient g @ W run as GEMMs that dequantize W tile by
tile (kernels/nf4_matmul.py), so no [out, in] weight is ever formed; elsewhere, or when a quantization
block straddles two rows, W is dequantized whole for each matmul. Nothing dequantized is kept between
forward and backward either way. The backward is written by hand and returns gradients for x, A, B and
the bias, never for W. Dropout is applied outside (the caller passes x_lora = dropout(x)), so any LoRA
dropout works and autograd routes its gradient.

Dtypes follow bitsandbytes' Linear4bit + peft's LoRA Linear4bit exactly:
  base = linear(x.to(compute_dtype), W (dequantized to compute_dtype), bias).to(x.dtype)
  lora = (linear(linear(x_lora.to(A.dtype), A), B) * scaling).to(x.dtype)
  y    = base + lora
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import nf4_matmul
from .nf4 import dequantize_nf4, dequantize_nf4_reference, uses_triton
from .nf4_matmul import nf4_linear, nf4_linear_grad

# ---------------------------------------------------------------------------------------------
# NF4 weight as plain custom-op arguments (custom ops take tensors and scalars, not QuantState).


class _NF4StateView:
    """Duck-types the bitsandbytes QuantState attributes that dequantize_nf4 reads."""

    quant_type = "nf4"

    def __init__(
        self,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        nested_code: torch.Tensor | None,
        offset: torch.Tensor | None,
        blocksize: int,
        nested_blocksize: int,
        shape: tuple[int, int],
        dtype: torch.dtype,
    ):
        self.absmax, self.offset, self.blocksize = absmax, offset, blocksize
        self.shape, self.dtype = torch.Size(shape), dtype
        self.nested = nested_absmax is not None
        self.state2 = types.SimpleNamespace(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize) if self.nested else None


def nf4_weight_args(packed: torch.Tensor, quant_state: Any) -> tuple:
    """(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features, in_features)."""
    if quant_state.quant_type != "nf4" or len(quant_state.shape) != 2:
        raise ValueError("expected a 2-D NF4 weight")
    if quant_state.nested:
        state2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device).reshape(1)
        nested = (state2.absmax, state2.code, offset, int(state2.blocksize))
    else:
        nested = (None, None, None, 1)
    out_features, in_features = (int(d) for d in quant_state.shape)
    return (packed, quant_state.absmax, *nested[:3], int(quant_state.blocksize), nested[3], out_features, in_features)


@torch.library.custom_op("qtune::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    state = _NF4StateView(absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, (out_features, in_features), dtype)
    return dequantize_nf4(packed, state, dtype, backend).reshape(out_features, in_features)


@dequantize_nf4_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features, in_features, dtype, backend):
    return packed.new_empty((out_features, in_features), dtype=dtype)


@torch.library.custom_op("qtune::nf4_matmul", mutates_args=())
def nf4_matmul_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    in_features: int,
    transposed: bool,
) -> torch.Tensor:
    """x @ dequant(W)^T, or x @ dequant(W) when transposed (the input gradient), W read in place (nf4_matmul)."""
    state = _NF4StateView(absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, (out_features, in_features), x.dtype)
    return (nf4_linear_grad if transposed else nf4_linear)(x, packed, state)


@nf4_matmul_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features, in_features, transposed):
    return x.new_empty((*x.shape[:-1], in_features if transposed else out_features))


class _NF4Matmuls:
    """The base weight as the fused NF4 matmuls read it: in place, tile by tile, never dequantized whole."""

    def __init__(self, nf4_args: tuple):
        self.nf4_args = nf4_args  # nf4_weight_args(...)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qtune.nf4_matmul(x, *self.nf4_args, False)

    def input_grad(self, g: torch.Tensor) -> torch.Tensor:
        return torch.ops.qtune.nf4_matmul(g, *self.nf4_args, True)


def _base_weight(nf4_args: tuple, compute_dtype: torch.dtype, backend: str) -> torch.Tensor | _NF4Matmuls:
    """What the base matmul reads: the fused NF4 matmuls where the Triton backend runs and no quantization
    block straddles two rows (nf4_matmul.supports), else the dequantized [out, in] weight."""
    packed, blocksize, in_features = nf4_args[0], nf4_args[5], nf4_args[8]
    if uses_triton(packed, backend) and nf4_matmul.supports(blocksize, in_features):
        return _NF4Matmuls(nf4_args)
    return torch.ops.qtune.dequantize_nf4(*nf4_args, compute_dtype, backend)


# ---------------------------------------------------------------------------------------------
# Forward and backward math, shared by the autograd.Function and the custom op.


def _qlora_forward(x, x_lora, weight, lora_A, lora_B, bias, scaling, compute_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, x_lora @ A^T); the second is kept for backward (it is [tokens, r], small).
    `weight` is the dequantized base weight or the fused NF4 matmuls (`_base_weight`)."""
    xc = x.to(compute_dtype)
    if isinstance(weight, _NF4Matmuls):
        base = weight.linear(xc)
        if bias is not None:
            base = base + bias.to(compute_dtype)
    else:
        base = F.linear(xc, weight, None if bias is None else bias.to(compute_dtype))
    base = base.to(x.dtype)
    xa = F.linear(x_lora.to(lora_A.dtype), lora_A)
    lora = (F.linear(xa, lora_B) * scaling).to(x.dtype)
    return base + lora, xa


def _qlora_backward(grad_y, x_dtype, x_lora, weight_fn, lora_A, lora_B, xa, bias_dtype, scaling, compute_dtype, needs):
    """needs = (x, x_lora, A, B, bias) flags; weight_fn() gives the base weight again (`_base_weight`), only if
    grad x is wanted: dequantized, or the fused NF4 matmuls, which never form it."""
    need_x, need_x_lora, need_A, need_B, need_bias = needs
    grad_x = grad_x_lora = grad_A = grad_B = grad_bias = None
    grad_base = grad_y.to(compute_dtype)
    if need_x:
        weight = weight_fn()
        grad_x = (weight.input_grad(grad_base) if isinstance(weight, _NF4Matmuls) else grad_base @ weight).to(x_dtype)
    if need_bias:
        grad_bias = grad_base.reshape(-1, grad_base.shape[-1]).sum(0).to(bias_dtype)
    if need_x_lora or need_A or need_B:
        grad_lora = grad_y.to(lora_A.dtype) * scaling  # [.., out]
        grad_lora_2d = grad_lora.reshape(-1, grad_lora.shape[-1])
        if need_B:
            grad_B = grad_lora_2d.t() @ xa.reshape(-1, xa.shape[-1])
        grad_xa = grad_lora @ lora_B  # [.., r]
        if need_A:
            grad_A = grad_xa.reshape(-1, grad_xa.shape[-1]).t() @ x_lora.to(lora_A.dtype).reshape(-1, x_lora.shape[-1])
        if need_x_lora:
            grad_x_lora = (grad_xa @ lora_A).to(x_lora.dtype)
    return grad_x, grad_x_lora, grad_A, grad_B, grad_bias


# ---------------------------------------------------------------------------------------------
# The custom op (what torch.compile sees) with its autograd formula.


@torch.library.custom_op("qtune::qlora_linear", mutates_args=())
def qlora_linear_op(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    in_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    compute_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        nf4_args = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features, in_features)
        return _qlora_forward(x, x_lora, _base_weight(nf4_args, compute_dtype, backend), lora_A, lora_B, bias, scaling, compute_dtype)[0]


@qlora_linear_op.register_fake
def _(x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
      out_features, in_features, lora_A, lora_B, bias, scaling, compute_dtype, backend):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    (x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
     out_features, in_features, lora_A, lora_B, bias, scaling, compute_dtype, backend) = inputs  # fmt: skip
    # x itself is not saved: only its dtype is needed; x_lora is what grad A needs.
    ctx.save_for_backward(x_lora, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B)
    ctx.meta = (x.dtype, blocksize, nested_blocksize, out_features, in_features,
                None if bias is None else bias.dtype, scaling, compute_dtype, backend)  # fmt: skip


def _op_backward(ctx, grad_y):
    x_lora, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B = ctx.saved_tensors
    (x_dtype, blocksize, nested_blocksize, out_features, in_features,
     bias_dtype, scaling, compute_dtype, backend) = ctx.meta  # fmt: skip
    needs = ctx.needs_input_grad
    with torch.autocast(grad_y.device.type, enabled=False):

        def weight_fn():
            nf4_args = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features, in_features)
            return _base_weight(nf4_args, compute_dtype, backend)

        xa = F.linear(x_lora.to(lora_A.dtype), lora_A)  # recomputed: [tokens, r], cheap
        grads = _qlora_backward(
            grad_y, x_dtype, x_lora, weight_fn, lora_A, lora_B, xa, bias_dtype, scaling,
            compute_dtype, (needs[0], needs[1], needs[11], needs[12], needs[13]),
        )  # fmt: skip
    grad_x, grad_x_lora, grad_A, grad_B, grad_bias = grads
    return (grad_x, grad_x_lora) + (None,) * 9 + (grad_A, grad_B, grad_bias, None, None, None)


qlora_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


def qlora_linear(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    packed: torch.Tensor,
    quant_state: Any,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = linear(x, dequant(W), bias) + scaling * linear(linear(x_lora, A), B), as the torch custom op.

    x_lora is dropout(x) (pass x itself when LoRA dropout is 0). compute_dtype defaults to x.dtype.
    backend picks the dequant implementation (see dequantize_nf4).
    """
    return qlora_linear_op(
        x, x_lora, *nf4_weight_args(packed, quant_state), lora_A, lora_B, bias, float(scaling),
        compute_dtype or x.dtype, backend,
    )  # fmt: skip


class QLoRALinearFunction(torch.autograd.Function):
    """The same computation as a plain autograd.Function (eager only; torch.compile wants qlora_linear)."""

    @staticmethod
    def forward(ctx, x, x_lora, packed, quant_state, lora_A, lora_B, bias, scaling, compute_dtype, backend):
        compute_dtype = compute_dtype or x.dtype
        weight = _base_weight(nf4_weight_args(packed, quant_state), compute_dtype, backend)
        y, xa = _qlora_forward(x, x_lora, weight, lora_A, lora_B, bias, scaling, compute_dtype)
        del weight  # the point: backward reads W again rather than holding [out, in]
        ctx.save_for_backward(x_lora, packed, lora_A, lora_B, xa)
        ctx.quant_state, ctx.x_dtype, ctx.scaling = quant_state, x.dtype, scaling
        ctx.compute_dtype, ctx.backend = compute_dtype, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, packed, lora_A, lora_B, xa = ctx.saved_tensors
        qs = ctx.quant_state

        def weight_fn():
            return _base_weight(nf4_weight_args(packed, qs), ctx.compute_dtype, ctx.backend)

        needs = ctx.needs_input_grad
        grads = _qlora_backward(
            grad_y, ctx.x_dtype, x_lora, weight_fn, lora_A, lora_B, xa,
            ctx.bias_dtype, ctx.scaling, ctx.compute_dtype, (needs[0], needs[1], needs[4], needs[5], needs[6]),
        )  # fmt: skip
        grad_x, grad_x_lora, grad_A, grad_B, grad_bias = grads
        return grad_x, grad_x_lora, None, None, grad_A, grad_B, grad_bias, None, None, None


def qlora_linear_reference(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    packed: torch.Tensor,
    quant_state: Any,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain autograd through the torch dequant reference and F.linear (the gradient oracle)."""
    compute_dtype = compute_dtype or x.dtype
    weight = dequantize_nf4_reference(packed, quant_state, compute_dtype).reshape(quant_state.shape)
    return _qlora_forward(x, x_lora, weight, lora_A, lora_B, bias, scaling, compute_dtype)[0]


# ---------------------------------------------------------------------------------------------
# peft integration.


def _unfusable_reason(layer: torch.nn.Module) -> str | None:
    """Why a LoRA layer over a bitsandbytes 4-bit linear cannot take the fused path at all, or None."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    if not isinstance(layer, LoraLinear4bit):
        return f"peft wrapped it as {type(layer).__name__}, not its bitsandbytes LoRA layer"
    if any(getattr(layer, "use_dora", {}).values()) or getattr(layer, "lora_variant", {}):
        return "DoRA (and other LoRA variants) keep peft's own path"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "a LoRA bias keeps peft's own path"
    quant_state = getattr(layer.get_base_layer().weight, "quant_state", None)
    if quant_state is None:
        return "its weight is not quantized yet"
    if quant_state.quant_type != "nf4":
        return f"quant type {quant_state.quant_type} (the kernels cover nf4)"
    if getattr(quant_state, "packing_format_for_cpu", False):
        return "bitsandbytes repacked it for CPU inference"
    if len(quant_state.shape) != 2:
        return f"a {len(quant_state.shape)}-D weight"
    return None


@dataclass(frozen=True)
class FusionPlan:
    """The model's LoRA layers over bitsandbytes 4-bit linears: which take the fused path, which do not and why."""

    fusable: tuple[str, ...]
    left_out: dict[str, str]

    @property
    def layers(self) -> int:
        return len(self.fusable) + len(self.left_out)


def lora_4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every peft LoRA layer whose base layer is a bitsandbytes Linear4bit, whatever class peft wrapped it in."""
    from bitsandbytes.nn import Linear4bit
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), Linear4bit)]


def fusion_plan(model: torch.nn.Module) -> FusionPlan:
    fusable, left_out = [], {}
    for name, layer in lora_4bit_layers(model):
        reason = _unfusable_reason(layer)
        if reason is None:
            fusable.append(name)
        else:
            left_out[name] = reason
    return FusionPlan(tuple(fusable), left_out)


def _fusable(layer: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Per call: the layer's state now (adapters switched, merged or disabled) and the call's arguments."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    return len(adapters) == 1 and _unfusable_reason(layer) is None


def _fused_lora_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not _fusable(self, args, kwargs):
        return self._qtune_unfused_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    adapter = next(a for a in self.active_adapters if a in self.lora_A)
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    compute_dtype = base.compute_dtype or x.dtype
    lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    dropout = self.lora_dropout[adapter]
    if torch.is_autocast_enabled(x.device.type):
        # peft then runs the LoRA matmuls under autocast; the op runs with autocast off, so cast here.
        autocast_dtype = torch.get_autocast_dtype(x.device.type)
        lora_A, lora_B = lora_A.to(autocast_dtype), lora_B.to(autocast_dtype)
        x_lora = dropout(x).to(autocast_dtype)
    else:
        x_lora = dropout(x.to(lora_A.dtype))
    return qlora_linear(
        x, x_lora, base.weight, base.weight.quant_state, lora_A, lora_B, self.scaling[adapter],
        bias=base.bias, compute_dtype=compute_dtype, backend=getattr(self, "_qtune_backend", "auto"),
    )  # fmt: skip


def patch_peft_model(model: torch.nn.Module, backend: str = "auto") -> int:
    """Route every fusable peft LoRA layer over a bitsandbytes NF4 Linear4bit (``fusion_plan``) through the fused op.

    Layers fall back to peft's own forward, call by call, when fusion does not apply (several active
    adapters, merged or disabled adapters, extra forward arguments). Returns the number of layers
    patched; patching twice is harmless. `unpatch_peft_model` undoes it.
    """
    modules = dict(model.named_modules())
    for name in fusion_plan(model).fusable:
        module = modules[name]
        if "_qtune_unfused_forward" not in module.__dict__:
            module._qtune_unfused_forward = module.forward
            module.forward = types.MethodType(_fused_lora_forward, module)
        module._qtune_backend = backend
    return sum("_qtune_unfused_forward" in m.__dict__ for m in model.modules())


def unpatch_peft_model(model: torch.nn.Module) -> int:
    """Restore peft's own forward on layers patched by patch_peft_model; returns how many."""
    count = 0
    for module in model.modules():
        if "_qtune_unfused_forward" in module.__dict__:
            del module.__dict__["forward"]
            del module.__dict__["_qtune_unfused_forward"]
            count += 1
    return count
