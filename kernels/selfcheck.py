"""A one-time self-check of the fused QLoRA path on the device that will train with it.

Before training routes peft's 4-bit LoRA layers through qtune's kernels, every kernel configuration
that training will use is run once on that device, the way training runs it (so Triton compiles it
there), and compared with the unfused stack, bitsandbytes' Linear4bit under peft's LoRA layer:
forward and backward of one LoRA layer whose B is not zero (with peft's default B = 0 the LoRA
output and grad A are zero on both sides and prove nothing). The verdict is cached per device,
driver and library versions and kernel sources, so the check runs once per machine and upgrade.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from qtune.paths import cache_dir, write_text_atomic

from . import qlora_linear

log = logging.getLogger(__name__)

# Relative error (Frobenius norm of the difference over the reference's) allowed between the fused
# path and peft + bitsandbytes. Both dequantize to the same bits; what differs is matmul
# accumulation order and, in half precision, where the LoRA product is rounded. A wrong kernel
# (a swapped nibble, a missed block scale, an unwritten tile) is off by far more than this.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
RECHECK_ENV = "QTUNE_KERNEL_RECHECK"  # set to 1 to ignore cached verdicts


@dataclass(frozen=True)
class KernelConfig:
    """What picks a kernel specialisation in training: dtypes, NF4 block size, double quantization, bias."""

    x_dtype: str
    compute_dtype: str
    adapter_dtype: str
    autocast_dtype: str | None
    blocksize: int
    nested: bool
    bias: bool

    def describe(self) -> str:
        autocast = f", autocast {self.autocast_dtype}" if self.autocast_dtype else ""
        nested = "double-quantized" if self.nested else "single-quantized"
        return (
            f"x {self.x_dtype}, compute {self.compute_dtype}, adapter {self.adapter_dtype}{autocast}, "
            f"NF4 blocks of {self.blocksize} {nested}{', bias' if self.bias else ''}"
        )


@dataclass(frozen=True)
class Verdict:
    config: KernelConfig
    ok: bool
    reason: str  # why it failed; empty when it passed
    cached: bool


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def configs_for(model: torch.nn.Module, layer_names: tuple[str, ...], autocast_dtype: torch.dtype | None) -> list[KernelConfig]:
    """The distinct kernel configurations the given LoRA layers of `model` will run in training."""
    modules = dict(model.named_modules())
    x_dtype = model.get_input_embeddings().weight.dtype if hasattr(model, "get_input_embeddings") else torch.float32
    configs = set()
    for name in layer_names:
        layer = modules[name]
        base = layer.get_base_layer()
        adapter = next(a for a in layer.active_adapters if a in layer.lora_A)
        quant_state = base.weight.quant_state
        compute = getattr(base, "compute_dtype", None) or x_dtype
        configs.add(
            KernelConfig(
                x_dtype=_dtype_name(x_dtype),
                compute_dtype=_dtype_name(compute),
                adapter_dtype=_dtype_name(layer.lora_A[adapter].weight.dtype),
                autocast_dtype=None if autocast_dtype is None else _dtype_name(autocast_dtype),
                blocksize=int(quant_state.blocksize),
                nested=bool(quant_state.nested),
                bias=base.bias is not None,
            )
        )
    return sorted(configs, key=lambda c: json.dumps(asdict(c)))


def _library_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except OSError:
        return None


def fingerprint(device: torch.device) -> dict[str, str | None]:
    """What a verdict depends on besides its configuration: the device, its driver, the libraries and our kernels."""
    sources = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        sources.update(file.read_bytes())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = {"device": props.name, "capability": f"{props.major}.{props.minor}", "driver": _nvidia_driver(), "cuda": torch.version.cuda}
    else:
        where = {"device": device.type, "processor": platform.machine()}
    libraries = {name: _library_version(name) for name in ("torch", "triton", "bitsandbytes", "peft", "transformers", "liger-kernel")}
    return {**where, **libraries, "kernels": sources.hexdigest()[:16]}


class _OneLinear(torch.nn.Module):
    is_loaded_in_4bit = True  # what peft reads to wrap a Linear4bit in its bitsandbytes LoRA layer

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# The test layer's widths: a multiple of the NF4 block, which the fused GEMMs take (every real model's
# widths are), and one whose blocks straddle rows, which falls back to dequantizing W whole.
IN_FEATURES = (lambda blocksize: 4 * blocksize, lambda blocksize: 3 * blocksize + 40)


def _lora_layer(config: KernelConfig, in_features: int, device: torch.device, seed: int) -> torch.nn.Module:
    """One peft LoRA layer over a bitsandbytes NF4 Linear4bit, quantized on `device`, with random A and B."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    generator = torch.Generator().manual_seed(seed)
    out_features = 96
    compute = _dtype(config.compute_dtype)
    linear = bnb.nn.Linear4bit(in_features, out_features, bias=config.bias, compute_dtype=compute,
                               compress_statistics=config.nested, quant_type="nf4")  # fmt: skip
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    linear.weight = bnb.nn.Params4bit(weight.to(compute), requires_grad=False, quant_type="nf4",
                                      blocksize=config.blocksize, compress_statistics=config.nested)  # fmt: skip
    if config.bias:
        linear.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator).to(compute) * 0.1, requires_grad=False)
    model = _OneLinear(linear).to(device)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False)
    model = inject_adapter_in_model(lora, model)
    layer = model.proj
    adapter_dtype = _dtype(config.adapter_dtype)
    with torch.no_grad():
        for name in layer.lora_A:
            layer.lora_A[name].weight.copy_(torch.randn(layer.lora_A[name].weight.shape, generator=generator) * 0.2)
            layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=generator) * 0.2)
            layer.lora_A[name].to(adapter_dtype)
            layer.lora_B[name].to(adapter_dtype)
    return model.train()


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor, autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
    layer = model.proj
    x = x.detach().clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        y = model(x)
    y.backward(grad_y)
    adapter = next(iter(layer.lora_A))
    return {
        "output": y.detach().float(),
        "grad x": x.grad.float(),
        "grad A": layer.lora_A[adapter].weight.grad.float(),
        "grad B": layer.lora_B[adapter].weight.grad.float(),
    }


def run_check(config: KernelConfig, device: torch.device, backend: str = "auto") -> str:
    """Compare the fused path with peft + bitsandbytes for one configuration, at both IN_FEATURES widths;
    returns why it failed, or ''."""
    for width in IN_FEATURES:
        in_features = width(config.blocksize)
        reason = _check_layer(config, _lora_layer(config, in_features, device, seed=in_features), device, backend)
        if reason:
            return f"{reason} (a {in_features}-wide layer)"
    return ""


def _check_layer(config: KernelConfig, model: torch.nn.Module, device: torch.device, backend: str) -> str:
    generator = torch.Generator().manual_seed(1)
    in_features, out_features = model.proj.in_features, model.proj.out_features
    x = torch.randn(3, 17, in_features, generator=generator).to(_dtype(config.x_dtype)).to(device)
    grad_y = torch.randn(3, 17, out_features, generator=generator).to(_dtype(config.x_dtype)).to(device)
    autocast = None if config.autocast_dtype is None else _dtype(config.autocast_dtype)
    import bitsandbytes.functional as bnb_functional

    weight = model.proj.get_base_layer().weight
    compute = _dtype(config.compute_dtype)
    dequantized = qlora_linear.dequantize_nf4_op(*qlora_linear.nf4_weight_args(weight.data, weight.quant_state), compute, backend)
    reference = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(compute)
    bits = torch.int32 if compute == torch.float32 else torch.int16
    if dequantized.shape != reference.shape or not torch.equal(dequantized.view(bits), reference.view(bits)):
        wrong = int((dequantized != reference).sum())
        return f"NF4 dequant: {wrong} of {reference.numel()} values differ from bitsandbytes' (it must be bit-identical)"
    matmuls = qlora_linear._base_weight(qlora_linear.nf4_weight_args(weight.data, weight.quant_state), compute, backend)
    if isinstance(matmuls, qlora_linear._NF4Matmuls):  # x = I: each output is one product, so bits must match
        eye_in = torch.eye(in_features, dtype=compute, device=device)
        eye_out = torch.eye(out_features, dtype=compute, device=device)
        for what, got, want in [("forward", matmuls.linear(eye_in), reference.t()), ("input gradient", matmuls.input_grad(eye_out), reference)]:
            if got.shape != want.shape or not torch.equal(got.contiguous().view(bits), want.contiguous().view(bits)):
                return f"fused NF4 GEMM ({what}): the weight it reads differs from bitsandbytes' dequant"
    expected = _forward_backward(model, x, grad_y, autocast)
    if not expected["grad A"].abs().sum() > 0:
        return "the reference LoRA gradient is zero: the check would prove nothing"
    try:
        if qlora_linear.patch_peft_model(model, backend=backend) != 1:
            return "the fused path did not take the test layer"
        actual = _forward_backward(model, x, grad_y, autocast)
    finally:
        qlora_linear.unpatch_peft_model(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    limit = max(TOLERANCE[_dtype(config.compute_dtype)], TOLERANCE[autocast] if autocast else 0.0)
    for what, reference in expected.items():
        got = actual[what]
        if got.shape != reference.shape:
            return f"{what}: shape {tuple(got.shape)}, peft + bitsandbytes give {tuple(reference.shape)}"
        if not torch.isfinite(got).all():
            return f"{what}: not finite"
        error = ((got - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        if error > limit:
            return f"{what}: relative error {error:.3g} against peft + bitsandbytes (allowed {limit:g})"
    return ""


def cached_verdict(what: str, key: dict, run: Callable[[], str]) -> tuple[str, bool]:
    """(reason, cached): `run()`'s verdict ('' = passed) for `key` (device fingerprint and configuration),
    from the cache when one is there (``QTUNE_KERNEL_RECHECK=1`` ignores it). Any exception from `run`
    is a failure with its message; out-of-memory is reported but not remembered (the device was busy)."""
    file = cache_dir() / "kernel-checks" / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    if file.exists() and os.environ.get(RECHECK_ENV) != "1":
        try:
            return str(json.loads(file.read_text())["reason"]), True
        except (OSError, ValueError, KeyError):
            pass  # an unreadable verdict is checked again
    started = time.perf_counter()
    transient = False
    try:
        reason = run()
    except torch.cuda.OutOfMemoryError as exc:
        reason, transient = f"out of memory during the check ({exc})", True
    except Exception as exc:  # a compile error, a missing library, a launch failure: all mean "do not use"
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
    log.info("self-check of %s: %s in %.1f s", what, reason or "passed", time.perf_counter() - started)
    if not transient:
        try:
            write_text_atomic(file, json.dumps({"ok": not reason, "reason": reason, **key}, indent=2))
        except OSError as exc:
            log.warning("could not cache the self-check verdict in %s: %s", file, exc)
    return reason, False


def check(configs: list[KernelConfig], device: torch.device, backend: str = "auto") -> list[Verdict]:
    """One verdict per configuration, from the cache when this device, driver, library and kernel set has one."""
    device_fingerprint = fingerprint(device)
    verdicts = []
    for config in configs:
        key = {"fingerprint": device_fingerprint, "config": asdict(config)}
        reason, cached = cached_verdict(f"the fused QLoRA kernels ({config.describe()}) on {device}", key,
                                        lambda config=config: run_check(config, device, backend))  # fmt: skip
        verdicts.append(Verdict(config, not reason, reason, cached))
    return verdicts
