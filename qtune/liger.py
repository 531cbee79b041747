"""liger-kernel's fused training kernels (fused linear cross-entropy, RMSNorm, SwiGLU/GeGLU) on one model,
once they have matched the same model without them on the training device.

liger's apply functions also replace transformers' module-level classes, which would change every model
built later in this process (the evaluation after training in ``qtune run``). Here they act on the one
instance only: the module-level replacements are undone, so RoPE, a module-level function with no
per-instance hook, stays transformers'.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qtune.errors import QtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

KERNELS = {"rope": False, "cross_entropy": False, "fused_linear_cross_entropy": True, "rms_norm": True, "swiglu": True, "geglu": True}
# Relative error of the loss and of each gradient allowed between the model with and without liger. Both
# compute the same functions; liger fuses them and, for the loss, never forms the logits.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (1e-2, 5e-2), torch.float16: (5e-3, 2e-2)}


@dataclass(frozen=True)
class LigerResult:
    applied: bool
    off_because: str = ""


def available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def supports(model_type: str) -> bool:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_to_instance(model: PreTrainedModel) -> None:
    """liger's kernels on this model instance only (see the module's docstring)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model.config.model_type]
    modeling = sys.modules[type(model).__module__]
    saved = dict(vars(modeling))
    saved_forward = type(model).__dict__.get("forward")
    try:
        apply(model=model, **{k: v for k, v in KERNELS.items() if k in inspect.signature(apply).parameters})
    finally:
        for name in set(vars(modeling)) - set(saved):
            delattr(modeling, name)
        for name, value in saved.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
        if saved_forward is not None and type(model).__dict__.get("forward") is not saved_forward:
            type.__setattr__(type(model), "forward", saved_forward)


def _tiny_copy(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """A small random model of the same architecture and config options (norms, caps, activations)."""
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    for key in ("quantization_config", "layer_types", "_name_or_path", "architectures", "rope_scaling"):
        config.pop(key, None)
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    if "head_dim" in config:
        small["head_dim"] = 16
    if "query_pre_attn_scalar" in config:
        small["query_pre_attn_scalar"] = 16
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(config.get(token), int):
            config[token] = 1
    tiny_config = type(model.config)(**{**config, **small})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config).to(device=device, dtype=torch.float32).train()


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, autocast: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def run_check(model: PreTrainedModel, device: torch.device, autocast: torch.dtype | None) -> str:
    """Loss and every gradient of a tiny model of ``model``'s architecture, with liger against without; '' if they agree."""
    reference = _tiny_copy(model, device)
    fused = copy.deepcopy(reference)
    apply_to_instance(fused)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    expected_loss, expected = _loss_and_grads(reference, ids, autocast)
    loss, grads = _loss_and_grads(fused, ids, autocast)
    loss_tol, grad_tol = TOLERANCE[autocast or torch.float32]
    if abs(loss - expected_loss) > loss_tol * abs(expected_loss):
        return f"loss {loss:.6g} with liger, {expected_loss:.6g} without"
    if grads.keys() != expected.keys():
        return f"gradients for {sorted(grads.keys() ^ expected.keys())[:3]} on one side only"
    for name, grad in expected.items():
        error = ((grads[name] - grad).norm() / grad.norm().clamp_min(1e-30)).item()
        if not error <= grad_tol:
            return f"grad of {name}: relative error {error:.3g} (allowed {grad_tol:g})"
    return ""


def enable(model: PreTrainedModel, required: bool, autocast: torch.dtype | None) -> LigerResult:
    """Apply liger to ``model`` after its self-check on the model's device passes (cached per device and
    versions). Not required: on any failure log why and leave the model as it is; required: raise."""
    from qtune.kernels import selfcheck

    device = next(model.parameters()).device
    model_type = model.config.model_type
    if not available():
        problem = "liger-kernel is not installed (pip install 'qtune[gpu]')"
    elif not supports(model_type):
        problem = f"liger-kernel has no kernels for {model_type}"
    else:
        key = {"fingerprint": selfcheck.fingerprint(device), "liger": model_type, "config": model.config.to_json_string(use_diff=True),
               "autocast": str(autocast)}  # fmt: skip
        problem, _ = selfcheck.cached_verdict(f"liger-kernel on {model_type} ({device})", key, lambda: run_check(model, device, autocast))
        problem = f"it failed its self-check on {device}: {problem}" if problem else ""
    if problem:
        if required:
            raise QtuneError(f"training.liger is on, but {problem}; set it to auto to train without it")
        log.warning("liger-kernel off: %s", problem)
        return LigerResult(False, problem)
    apply_to_instance(model)
    log.info("liger-kernel's fused linear cross-entropy, RMSNorm and gated MLP on %s", model_type)
    return LigerResult(True)
