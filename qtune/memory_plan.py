"""How much memory each stage of a run will need, computed from the model's config and the recipe before
anything heavy starts, and which setting to change when a stage will not fit.

Every figure is a sum of the tensors a stage holds at its peak (the formulas are in each function, in
bytes); ``BASELINE`` covers the libraries themselves. The plan is checked against measured peaks in
docs/benchmarks.md (``scripts/bench_memory.py``).

Notation: H hidden size, I intermediate size, L decoder layers, V vocabulary, B micro-batch, S sequence
length, r LoRA rank; "compute" is 2 bytes (bf16/fp16) on CUDA and 4 (fp32) on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qtune.architectures import ARCHITECTURES

GB = 2**30
BASELINE_HOST = 1.2 * GB  # python, torch, transformers, tokenizer and data, measured on the quickstart
BASELINE_CUDA = 0.8 * GB  # CUDA context and allocator reserve
MERGE_MEASURE_TOKENS = 32768  # held-out tokens the merge bases are compared on (their hidden states: 512 MB each at H=4096)
_FUSED = {name for name, arch in ARCHITECTURES.items() if arch.fused_qkv}
OPTIMIZER_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int
    fused: bool = False  # one linear for q, k, v and one for gate, up (Phi-3)

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        text = config.get("text_config", config)
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return cls(
            hidden,
            int(text["intermediate_size"]),
            int(text["num_hidden_layers"]),
            heads,
            int(text.get("num_key_value_heads") or heads),
            int(text["vocab_size"]),
            bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            int(text.get("head_dim") or hidden // heads),
            text.get("model_type", config.get("model_type")) in _FUSED,
        )

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear of one decoder block: q, k, v, o, gate, up, down (or qkv, o, gate_up, down)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        if self.fused:
            return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def block_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * (self.block_linear_params + 2 * self.hidden) + self.embedding_params + self.hidden


@dataclass
class StagePlan:
    stage: str
    device_bytes: int  # on the GPU (0 on a CPU-only machine: everything is host memory)
    host_bytes: int
    knob: str = ""  # the recipe setting that shrinks this stage most
    offload: Offload | None = None  # where the merged model's weights go when they do not fit (eval only)


@dataclass(frozen=True)
class Offload:
    """How much of a model's weights (in the dtype they are loaded in) each place holds, for accelerate's
    ``device_map="auto"`` and ``max_memory``; what neither holds goes to an offload folder on disk."""

    device_bytes: int  # on the GPU (0 on a CPU-only machine)
    host_bytes: int
    disk_bytes: int

    def max_memory(self, gpu_index: int | None) -> dict:
        budget = {"cpu": self.host_bytes}
        if gpu_index is not None:
            budget = {gpu_index: self.device_bytes, **budget}
        return budget


@dataclass
class MemoryPlan:
    stages: list[StagePlan]
    gpu_bytes: int | None  # the GPU's total memory; None without one
    host_bytes: int
    notes: list[str] = field(default_factory=list)

    def too_big(self) -> list[StagePlan]:
        return [s for s in self.stages if s.host_bytes > self.host_bytes or (self.gpu_bytes is not None and s.device_bytes > self.gpu_bytes)]

    def eval_offload(self) -> Offload | None:
        """Where evaluation puts the merged model's weights, when they do not all fit on its device."""
        return next((s.offload for s in self.stages if s.stage.startswith("eval merged")), None)

    def problems(self) -> list[str]:
        out = []
        for stage in self.too_big():
            where = (
                ("GPU", stage.device_bytes, self.gpu_bytes)
                if self.gpu_bytes is not None and stage.device_bytes > self.gpu_bytes
                else ("host", stage.host_bytes, self.host_bytes)
            )
            out.append(f"{stage.stage} needs about {where[1] / GB:.1f} GiB of {where[0]} memory, the machine has {where[2] / GB:.1f} GiB; {stage.knob}")
        return out

    def table(self) -> str:
        gpu = f"GPU {self.gpu_bytes / GB:.1f} GiB" if self.gpu_bytes is not None else "no GPU"
        lines = [f"memory plan ({gpu}, host {self.host_bytes / GB:.1f} GiB):", f"  {'stage':<28}{'GPU GiB':>9}{'host GiB':>10}"]
        for s in self.stages:
            flag = "  <- does not fit" if s in self.too_big() else ""
            device = f"{s.device_bytes / GB:9.1f}" if self.gpu_bytes is not None else f"{'-':>9}"
            lines.append(f"  {s.stage:<28}{device}{s.host_bytes / GB:10.1f}{flag}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _nf4_bytes(params: int) -> int:
    """4-bit codes, one uint8 absmax per 64 weights (double quant) and its fp32 constants per 256 blocks."""
    return int(params * (0.5 + 1 / 64 + 4 / (64 * 256)))


def plan(recipe, shape: ModelShape, gpu_bytes: int | None, host_bytes: int, validation_rows: int = 256) -> MemoryPlan:
    """Each stage's peak memory for ``recipe`` on ``shape`` (see the module docstring for the notation)."""
    from qtune.metrics import TOKEN_CHUNK as LOGIT_CHUNK

    cuda = gpu_bytes is not None
    compute = 2 if cuda else 4
    h, v, L = shape.hidden, shape.vocab, shape.layers
    seq, batch = recipe.data.max_length, recipe.training.micro_batch_size
    lora_r = recipe.lora.r
    block_fp32 = 4 * (shape.block_linear_params + 2 * h)
    largest_linear = max(a * b for a, b in shape.linear_shapes)
    largest_tensor_fp32 = 4 * max(v * h, largest_linear)
    lora_params = L * sum(lora_r * (a + b) for a, b in shape.linear_shapes)
    non_quantized = shape.embedding_params + L * 2 * h + h
    base_4bit = _nf4_bytes(L * shape.block_linear_params)
    stages = []

    def add(name: str, device: int, host_extra: int, knob: str) -> None:
        if cuda:
            stages.append(StagePlan(name, int(device + BASELINE_CUDA), int(BASELINE_HOST + host_extra), knob))
        else:
            stages.append(StagePlan(name, 0, int(BASELINE_HOST + device + host_extra), knob))

    # training: the 4-bit base, non-quantized weights upcast to fp32 by peft's k-bit preparation, LoRA
    # weights + grads + optimizer state, saved activations (one H vector per token per layer with
    # checkpointing, else ~(10H + 4I) per token per layer), one block's working set, fp32 logits and grads
    tokens = batch * seq
    per_layer_acts = tokens * (h if recipe.training.gradient_checkpointing else 10 * h + 4 * shape.intermediate) * compute
    working = tokens * (10 * h + 4 * shape.intermediate) * compute
    logits = tokens * v * (compute + 8)
    optimizer = OPTIMIZER_BYTES.get(recipe.training.optimizer, 8)
    train = base_4bit + 4 * non_quantized + lora_params * (4 + 4 + optimizer) + L * per_layer_acts + working + logits
    add("train", train, largest_tensor_fp32, "lower training.micro_batch_size or data.max_length, or turn on training.gradient_checkpointing")

    # merge: the adapter model first, one fp32 block at a time (loaded and its NF4 round trip) with the
    # LoRA factors, keeping its head's fp32 inputs for at most MERGE_MEASURE_TOKENS tokens and its fp32 head;
    # then one candidate at a time the same way: its hidden states, its head and a logits chunk
    held_out = min(validation_rows * seq, MERGE_MEASURE_TOKENS)
    scored = validation_rows * seq
    reference = held_out * h * 4 + 4 * v * h
    reference_pass = 2 * block_fp32 + 4 * lora_params + reference
    candidate = 2 * block_fp32 + held_out * h * 4 + 4 * v * h + LOGIT_CHUNK * v * 4 * 5
    merge = max(reference_pass, candidate + reference)
    add("merge", merge, 2 * largest_tensor_fp32, "use fewer validation rows or a shorter data.max_length")

    # GPTQ's solve (also AWQ's GPTQ rounding) holds six matrices of its largest Hessian at once (the
    # accumulated one, its permuted copy, the identity, the Cholesky factor, the inverse and its factor)
    # and three float32 copies of the weight (its working copy, the per-weight losses, the result)
    hessian_solve = 4 * max(3 * h * h, shape.intermediate**2) * 6 + 3 * 4 * largest_linear
    for target in recipe.export:
        if target.format == "gguf-lora":
            continue
        cal = target.samples * target.seq_len
        carried = cal * h * 4  # every calibration token's hidden state, carried from block to block
        capture = 4 * v * h + 2 * carried  # the embeddings, once, to make the first block's inputs
        if target.format == "gguf":
            device = max(capture, block_fp32 + 2 * carried) if target.uses_imatrix else 0
            host = 3 * largest_tensor_fp32
        elif target.format == "gptq" or (target.format == "compressed-tensors" and target.method == "gptq"):
            # GPTQ's rounding (W8A8's too; FP8 needs less): one group's Hessians (q/k/v share H x H inputs;
            # down has I x I) and its solve
            device, host = max(capture, block_fp32 + 2 * carried + hessian_solve), largest_tensor_fp32
        else:  # awq: the inputs of q, o, gate (H wide) and down (I wide), the four inspected outputs, one
            # input gathered for clipping, and GPTQ rounding's Hessian
            features = cal * 4 * (3 * h + shape.intermediate) + cal * 4 * 4 * h + cal * 4 * shape.intermediate
            device = max(capture, block_fp32 + 2 * carried + features + hessian_solve)
            host = largest_tensor_fp32
        add(f"export {target.default_name()}", device, host, "lower the export's samples or seq_len")

    # evaluation: first the fp32 reference, one block at a time, carrying every held-out token's hidden
    # state; then the merged model in half precision (or an export), the fp32 reference head, one batch's
    # hidden states, a logits chunk, and the KV cache of a generation batch
    eval_batch = recipe.evaluation.batch_size
    kv_cache = eval_batch * (seq + recipe.evaluation.max_new_tokens) * L * 2 * shape.kv_heads * shape.head_dim * compute
    reference_pass = scored * h * 4 + block_fp32 + 4 * v * h
    scoring = 2 * shape.params + 4 * v * h + 8 * seq * h * 4 * 2 + LOGIT_CHUNK * v * 4 * 5 + kv_cache
    if cuda:  # the reference's hidden states wait in host memory while the artifacts use the GPU
        add("eval merged / exports", max(reference_pass, scoring), scored * h * 4, "lower evaluation.batch_size")
    else:
        add("eval merged / exports", scoring + scored * h * 4, 0, "lower evaluation.batch_size")
    notes = []
    offload = _eval_offload(stages[-1], shape, gpu_bytes, host_bytes)
    if offload is not None:
        entry = stages[-1]
        entry.offload = offload
        if cuda:
            entry.device_bytes = int(max(reference_pass, scoring - 2 * shape.params + offload.device_bytes) + BASELINE_CUDA)
        entry.host_bytes += offload.host_bytes - (0 if cuda else 2 * shape.params)
        where = f"{offload.host_bytes / GB:.1f} GiB to host memory" if cuda else ""
        disk = f"{offload.disk_bytes / GB:.1f} GiB to disk" if offload.disk_bytes else ""
        notes.append(
            "eval: the merged model does not fit "
            + ("on the GPU" if cuda else "in host memory")
            + "; accelerate offloads its weights ("
            + ", ".join(x for x in (where, disk) if x)
            + ("; in float32 on CPU, so the numbers are those of a float32 load" if not cuda else "")
            + "), which is slower but computes the same"
        )
    if not cuda:
        dense = 4 * L * shape.block_linear_params
        add("eval base / adapter (CPU)", base_4bit + dense + LOGIT_CHUNK * v * 4 * 5, 0, "score base and adapter on a GPU, where they stay in 4-bit")
        notes.append("on CPU the NF4 base and adapter are scored with each weight dequantized once (float32)")
    return MemoryPlan(stages, gpu_bytes, host_bytes, notes)


OFFLOAD_MARGIN = 0.05  # of each memory, kept free when weights are offloaded


def _eval_offload(entry: StagePlan, shape: ModelShape, gpu_bytes: int | None, host_bytes: int) -> Offload | None:
    """Where the merged model's weights go when evaluation does not fit with them all on its device:
    the device keeps what its other tensors leave, host memory the next part, disk the rest. On CPU the
    offloaded model is loaded in float32 (accelerate's hooks cannot feed the half-precision weights
    through ``compute_in_float32``), so the weights count 4 bytes each there. None when it fits."""
    half = 2 * shape.params
    if gpu_bytes is not None:
        if entry.device_bytes <= gpu_bytes:
            return None
        on_device = max(0, int(gpu_bytes * (1 - OFFLOAD_MARGIN)) - (entry.device_bytes - half))
        on_host = min(half - on_device, max(0, int(host_bytes * (1 - OFFLOAD_MARGIN)) - entry.host_bytes))
        return Offload(on_device, on_host, half - on_device - on_host)
    if entry.host_bytes <= host_bytes:
        return None
    full = 2 * half
    on_host = min(full, max(0, int(host_bytes * (1 - OFFLOAD_MARGIN)) - (entry.host_bytes - half)))
    return Offload(0, on_host, full - on_host)


def _with(recipe, section: str, **values):
    return recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=values)})


def _smaller_recipes(recipe, stage: str):
    """(setting, recipe) pairs that shrink ``stage``, mildest first."""
    if stage == "train":
        if not recipe.training.gradient_checkpointing:
            yield "training.gradient_checkpointing: true", _with(recipe, "training", gradient_checkpointing=True)
        batch, length = recipe.training.micro_batch_size, recipe.data.max_length
        while batch > 1:
            batch //= 2
            yield f"training.micro_batch_size: {batch}", _with(recipe, "training", micro_batch_size=batch)
        while length > 256:
            length //= 2
            yield f"data.max_length: {length}", _with(_with(recipe, "training", micro_batch_size=1), "data", max_length=length)
    elif stage.startswith("export "):
        for index, target in enumerate(recipe.export):
            if stage == f"export {target.default_name()}":
                samples = target.samples
                while samples > 16:
                    samples //= 2
                    export = list(recipe.export)
                    export[index] = target.model_copy(update={"samples": samples})
                    yield f"samples: {samples} for this export", recipe.model_copy(update={"export": export})
    elif stage.startswith("eval merged"):
        size = recipe.evaluation.batch_size
        while size > 1:
            size //= 2
            yield f"evaluation.batch_size: {size}", _with(recipe, "evaluation", batch_size=size)


def suggest(recipe, shape: ModelShape, gpu_bytes: int | None, host_bytes: int, validation_rows: int, stage: str) -> str | None:
    """The mildest recipe change that makes ``stage`` fit, by the same plan; None when none found."""
    for setting, smaller in _smaller_recipes(recipe, stage):
        replanned = plan(smaller, shape, gpu_bytes, host_bytes, validation_rows)
        entry = next((s for s in replanned.stages if s.stage == stage), None)
        if entry is not None and entry not in replanned.too_big():
            return setting
    return None


def machine_memory() -> tuple[int | None, int]:
    """(GPU total bytes or None, host total bytes)."""
    import os

    import torch

    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return gpu, host


def count_rows(path: Path) -> int | None:
    """Rows of a local jsonl/json-lines or csv file, counted without parsing; None for anything else."""
    if not path.is_file() or path.suffix not in (".jsonl", ".csv", ".txt"):
        return None
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def recipe_plan(loaded, config: dict, gpu_bytes: int | None, host_bytes: int) -> MemoryPlan:
    from qtune.recipe import resolve_path

    counts = [count_rows(resolve_path(s.path, loaded.base_dir)) if s.path else None for s in loaded.recipe.data.validation]
    rows = sum(c for c in counts if c) if counts and all(counts) else 256
    shape = ModelShape.from_config(config)
    result = plan(loaded.recipe, shape, gpu_bytes, host_bytes, rows)
    for stage in result.too_big():
        setting = suggest(loaded.recipe, shape, gpu_bytes, host_bytes, rows, stage.stage)
        if setting:
            stage.knob = f"with {setting} it fits"
    return result


def for_recipe(loaded, gpu_bytes: int | None = None, host_bytes: int | None = None) -> MemoryPlan | None:
    """The plan for a loaded recipe on this machine (or on one with the given GPU and host memory; a GPU
    of 0 bytes means none); None when the model's config cannot be read without a download (it is then
    planned when training has fetched it)."""
    from qtune.recipe import base_model_config

    config = base_model_config(loaded.recipe.model, loaded.base_dir)
    if config is None:
        return None
    detected_gpu, detected_host = machine_memory()
    gpu = detected_gpu if gpu_bytes is None else (gpu_bytes or None)
    try:
        return recipe_plan(loaded, config, gpu, host_bytes or detected_host)
    except (KeyError, TypeError, ValueError):  # a config of an unfamiliar shape: no plan rather than a wrong one
        return None


def stage_line(memory_plan: MemoryPlan | None, stage: str) -> str | None:
    """One log line with a stage's planned peak, for the start of that stage."""
    for entry in memory_plan.stages if memory_plan else []:
        if entry.stage.startswith(stage):
            gpu = f"{entry.device_bytes / GB:.1f} GiB GPU, " if memory_plan.gpu_bytes is not None else ""
            return f"{entry.stage}: planned peak {gpu}{entry.host_bytes / GB:.1f} GiB host"
    return None


def log_stage(loaded, stage: str) -> MemoryPlan | None:
    """Log a stage's planned peak at its start, and a warning when the plan says it will not fit; returns
    the plan (None when the model's config cannot be read)."""
    import logging

    log = logging.getLogger("qtune.memory_plan")
    memory_plan = for_recipe(loaded)
    line = stage_line(memory_plan, stage)
    if line:
        log.info(line)
    for problem in memory_plan.problems() if memory_plan else []:
        if problem.startswith(stage):
            log.warning(problem)
    return memory_plan
