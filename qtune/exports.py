"""Exports: the merged model re-quantized into deployable files (GGUF, GPTQ, AWQ), or the adapter alone
as a GGUF LoRA.

An export starts from a run directory (its merged model, calibrated on its own training data) or from
any HF checkpoint directory (calibrated on ``calibration``). Every output is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType

from qtune import rundir
from qtune.architectures import Architecture
from qtune.calibration import CalibrationSet, calibration_set
from qtune.checkpoint_files import check_checkpoint, copy_generation_config
from qtune.cpu import fit_threads
from qtune.errors import QtuneError, is_disk_full, stage
from qtune.paths import atomic_dir, staging_prefix, write_text_atomic
from qtune.quant import CT_SCHEMES
from qtune.recipe import AUTO_QUANT, DEFAULT_MAX_SHARD_SIZE, DataSection, ExportTarget, parse_size
from qtune.runtimes import runtime_support

log = logging.getLogger(__name__)


@dataclass
class ExportSource:
    checkpoint: Path
    data: DataSection | None
    base_dir: Path
    exports_dir: Path
    adapter: Path | None = None
    run_dir: Path | None = None  # None when exporting a plain checkpoint


def resolve_source(path: Path) -> ExportSource:
    """A run directory (merging first if needed) or a plain HF checkpoint directory."""
    path = Path(path).resolve()
    if (path / rundir.RECIPE_FILE).is_file():
        if not rundir.is_merged(path):
            from qtune.merge import merge_run

            merge_run(path)
        loaded = rundir.load_run_recipe(path)
        adapter = path / rundir.ADAPTER_DIR
        return ExportSource(
            path / rundir.MERGED_DIR, loaded.recipe.data, loaded.base_dir, path / "exports", adapter if adapter.is_dir() else None, run_dir=path
        )
    if (path / "config.json").is_file():
        return ExportSource(path, None, path, path.parent / f"{path.name}-exports")
    raise QtuneError(f"{path} is neither a qtune run directory nor a Hugging Face checkpoint (no config.json)")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _calibration(source: ExportSource, target: ExportTarget, tokenizer) -> CalibrationSet:
    calibration = calibration_set(tokenizer, source.data, source.base_dir, target.calibration, target.samples, target.seq_len, target.seed)
    log.info("calibration: %d samples, %d tokens, from %s", calibration.input_ids.shape[0], calibration.tokens, calibration.description)
    return calibration


@dataclass
class ExportResult:
    path: Path
    report: dict  # what lands beside it as <name>.report.json


def export(path: Path, target: ExportTarget, output: Path | None = None, overwrite: bool = False) -> ExportResult:
    """Write one export of a run directory or a checkpoint. Its report lands beside it as ``<name>.report.json``."""
    problems = target.problems()
    if problems:
        raise QtuneError("; ".join(f"{key}: {message}" for key, message in problems))
    source = resolve_source(path)
    check_checkpoint(source.checkpoint)
    output = Path(output) if output else source.exports_dir / target.default_name()
    with stage(f"export {output.name}", source.run_dir):
        if source.run_dir is not None:
            rundir.remove_staging(source.run_dir)
            from qtune import memory_plan

            memory_plan.log_stage(rundir.load_run_recipe(source.run_dir), f"export {target.default_name()}")
        return _export(source, target, output, overwrite)


def report_path(output: Path) -> Path:
    """Where an export's report lands; written right after the export itself, so its presence marks an
    export that finished."""
    return output.with_name(output.name + ".report.json")


def _export(source: ExportSource, target: ExportTarget, output: Path, overwrite: bool) -> ExportResult:
    if output.exists() and not overwrite:
        raise QtuneError(f"{output} already exists; pass --overwrite to replace it")
    from qtune.models import load_tokenizer

    tokenizer = load_tokenizer(source.checkpoint)
    started = time.perf_counter()
    try:
        if target.format == "gguf":
            report = _export_gguf(source, target, tokenizer, output)
        elif target.format == "gguf-lora":
            report = _export_gguf_lora(source, target, output)
        else:
            report = _export_checkpoint(source, target, tokenizer, output, overwrite)
    except Exception as exc:
        if is_disk_full(exc):  # an OSError from Python, a SafetensorError from Rust
            raise QtuneError(
                f"the disk is full during export {output.name}: nothing was left under that name and earlier "
                "outputs are intact; free some space and run the same command again"
            ) from None
        if isinstance(exc, ValueError):  # the quantizers' own checks: shapes, group sizes, non-finite weights
            raise QtuneError(f"cannot export {target.format}: {exc}") from None
        if isinstance(exc, OSError):
            raise QtuneError(f"writing {output} failed ({exc.strerror or exc}); nothing was left under that name") from None
        raise
    report.update(
        format=target.format,
        output=str(output),
        seconds=round(time.perf_counter() - started, 1),
        size_bytes=_size(output),
        settings=target.model_dump(mode="json"),
        runtimes=[row.as_dict() for row in runtime_support(target.format, target.bits, target.sym, target.scheme)],
    )
    write_text_atomic(report_path(output), json.dumps(report, indent=2))
    log.info("%s written to %s (%.1f MB, %.0f s)", target.format, output, report["size_bytes"] / 1e6, report["seconds"])
    return ExportResult(output, report)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _export_gguf_lora(source: ExportSource, target: ExportTarget, output: Path) -> dict:
    from qtune.formats.gguf.lora import export_gguf_lora

    if source.adapter is None:
        raise QtuneError(f"a GGUF LoRA export needs a qtune run directory with a trained adapter; {source.checkpoint} has none")
    report = export_gguf_lora(source.adapter, source.checkpoint, output, target.quant)
    log.info("LoRA adapter: rank %d, alpha %g, %d tensors; apply it to a GGUF of the base model", report.rank, report.alpha, report.tensors)
    return {"rank": report.rank, "alpha": report.alpha, "tensors": report.tensors}


def _export_gguf(source: ExportSource, target: ExportTarget, tokenizer, output: Path) -> dict:
    from qtune.formats.gguf.convert import export_gguf
    from qtune.formats.gguf.vocab import check_chat_roundtrip
    from qtune.modelfile import write_modelfile

    importance, calibrated_on, batches = None, None, []
    weighted = target.uses_imatrix
    auto = target.quant == AUTO_QUANT
    if weighted and (source.data is not None or target.calibration is not None):
        from qtune.blockwise import StreamedModel
        from qtune.imatrix import collect_imatrix_streamed

        calibration = _calibration(source, target, tokenizer)
        streamed = StreamedModel(source.checkpoint, _device(), torch.float32)
        batches = [row[mask.bool()].unsqueeze(0) for row, mask in zip(calibration.input_ids, calibration.attention_mask)]
        importance = collect_imatrix_streamed(streamed, batches).means()
        calibrated_on = calibration.description
        del streamed
    elif auto:
        raise QtuneError("quant: auto measures each tensor's loss on calibration data: export a run directory, or give --calibration")
    elif weighted:
        log.warning("no calibration data for the importance matrix (plain checkpoint, no --calibration); quantizing without one")
    device = _device()
    overrides = [(pattern, GGMLQuantizationType[name]) for pattern, name in target.tensor_types.items()]
    mix = _auto_mix(source, target, importance, batches, tokenizer, overrides, device) if auto else None
    # The file is checked before it takes its final name: a GGUF whose chat template or stop tokens
    # differ from training's is never published.
    staged = output.with_name(f"{staging_prefix(output)}{uuid.uuid4().hex[:8]}")
    try:
        types = mix.types if mix else None
        report = export_gguf(source.checkpoint, staged, target.quant, imatrix=importance, device=device, tensor_types=overrides, types=types)
        problems = check_chat_roundtrip(staged, source.checkpoint)
        if problems:
            raise QtuneError(f"the GGUF's chat template or stop tokens differ from training, so {output} was not written: {'; '.join(problems)}")
        write_modelfile(output, source.checkpoint, output.with_suffix(".Modelfile"))
        os.replace(staged, output)
    finally:
        staged.unlink(missing_ok=True)
    for fallback in report.fallbacks:
        log.debug("fallback: %s", fallback)
    swaps = Counter(f"{f.wanted.name}→{f.used.name}" for f in report.fallbacks)
    if swaps:
        log.info(
            "%d tensor(s) have rows the wanted type cannot split, so they use another (%s); each is listed in the export's report",
            len(report.fallbacks),
            ", ".join(f"{n}× {s}" for s, n in swaps.most_common()),
        )
    return {
        "quant": report.quant,
        "bits_per_weight": report.bits_per_weight,
        "types": report.type_counts(),
        "fallbacks": [str(f) for f in report.fallbacks],
        "imatrix": calibrated_on,
        "chat_roundtrip": "ok",
        **({"tensor_types": target.tensor_types} if target.tensor_types else {}),
        **({"auto": mix.as_dict()} if mix else {}),
    }


AUTO_KL_TOKENS = 2048  # calibration tokens the auto mix's KL probes run on (each probe is a forward pass of the model)


def kl_probe_rows(sequences: list[torch.Tensor], tokens: int = AUTO_KL_TOKENS) -> list[dict]:
    """The first calibration sequences, up to ``tokens`` tokens in all, as rows for ``metrics``."""
    rows, total = [], 0
    for ids in sequences:
        ids = ids[: tokens - total].tolist()
        if len(ids) < 2:
            break
        rows.append({"input_ids": ids, "labels": ids, "num_real_tokens": len(ids)})
        total += len(ids)
    return rows


def _auto_mix(source: ExportSource, target: ExportTarget, importance, batches: list, tokenizer, overrides, device):
    """quant: auto's per-tensor types (qtune.auto_mix), measured on the first calibration rows."""
    from qtune.auto_mix import calibration_kl, choose_mix
    from qtune.formats.gguf.convert import gguf_tensors

    plan = gguf_tensors(source.checkpoint)
    weights = plan.importance(importance)
    rows = kl_probe_rows([b[0] for b in batches])
    measure = calibration_kl(plan, source.checkpoint, weights, rows, tokenizer.pad_token_id, device)
    try:
        mix = choose_mix(plan, weights, target.budget_bytes(plan.n_params), measure, overrides, device)
    except ValueError as exc:
        raise QtuneError(f"quant: auto: {exc}") from None
    log.info("auto mix: %s", ", ".join(f"{n}× {t}" for t, n in sorted(mix.as_dict()["type_counts"].items())))
    return mix


def _export_checkpoint(source: ExportSource, target: ExportTarget, tokenizer, output: Path, overwrite: bool) -> dict:
    """GPTQ, AWQ or compressed-tensors (any scheme), one decoder block at a time: each block is read from the merged checkpoint, quantized on
    the calibration activations it receives from the block before, written into the output's shards
    and freed. No stage holds more than one block besides the embeddings and the head."""
    from qtune import layerwise
    from qtune.blockwise import StreamedModel, release
    from qtune.formats.awq import awq_packed_shapes, awq_quantization_config, pack_awq_layer
    from qtune.formats.compressed_tensors import (
        ct_channel_quantization_config,
        ct_channel_shapes,
        ct_packed_shapes,
        ct_quantization_config,
        pack_ct_channel_layer,
        pack_ct_layer,
    )
    from qtune.formats.gptq import (
        collect_tensors,
        gptq_packed_shapes,
        gptq_quantization_config,
        pack_gptq_layer,
        quantized_config,
    )
    from qtune.shards import ShardedWriter

    calibration = _calibration(source, target, tokenizer)
    device = _device()
    streamed = StreamedModel(source.checkpoint, device, torch.float32)
    arch, _ = layerwise.quantizable_layers(streamed.model)
    saved_dtype = _checkpoint_dtype(source.checkpoint)
    settings: dict[str, Any]
    if target.format == "compressed-tensors" and CT_SCHEMES[target.scheme].per_channel:
        scheme = CT_SCHEMES[target.scheme]
        settings = dict(
            weights="int8" if scheme.weight_type == "int" else "fp8",
            smoothing=target.smoothing_strength,
            damp=target.damp,
            scale_dtype=saved_dtype,
            group_aware=target.group_aware,
        )
        quantize_block = layerwise.w8a8_block
        shapes = lambda n, k, name: ct_channel_shapes(n, k, target.scheme, saved_dtype)  # noqa: E731
        pack = lambda name, q: pack_ct_channel_layer(q, target.scheme, saved_dtype, name)  # noqa: E731
        config = ct_channel_quantization_config(target.scheme)
    elif target.format == "gptq" or (target.format == "compressed-tensors" and target.method == "gptq"):  # compressed-tensors refuses act-order
        settings = dict(
            bits=target.bits,
            group_size=target.group_size,
            sym=target.sym,
            act_order=target.act_order,
            damp=target.damp,
            group_aware=target.group_aware,
        )
        quantize_block = layerwise.gptq_block
        if target.format == "gptq":
            checkpoint_format = "gptq" if target.sym else "gptq_v2"
            shapes = lambda n, k, name: gptq_packed_shapes(n, k, target.bits, target.group_size)  # noqa: E731
            pack = lambda name, q: pack_gptq_layer(q, checkpoint_format, name)  # noqa: E731
            config = gptq_quantization_config(target.bits, target.group_size, target.sym, target.act_order, checkpoint_format, target.damp, True)
        else:
            shapes = lambda n, k, name: ct_packed_shapes(n, k, target.bits, target.group_size, target.sym, saved_dtype)  # noqa: E731
            pack = lambda name, q: pack_ct_layer(q, saved_dtype, name)  # noqa: E731
            config = ct_quantization_config(target.bits, target.group_size, target.sym)
    else:
        if target.bits != 4:
            raise ValueError(f"AWQ GEMM holds 4-bit weights only, got bits={target.bits}")
        settings = dict(bits=target.bits, group_size=target.group_size, rounding=target.rounding, damp=target.damp)
        quantize_block = layerwise.awq_block
        if target.format == "awq":
            shapes = lambda n, k, name: awq_packed_shapes(n, k, target.group_size, name)  # noqa: E731
            pack = lambda name, q: pack_awq_layer(q, name)  # noqa: E731
            config = awq_quantization_config(target.group_size, None)
        else:  # compressed-tensors W4A16 on AWQ's grid
            shapes = lambda n, k, name: ct_packed_shapes(n, k, target.bits, target.group_size, False, saved_dtype)  # noqa: E731
            pack = lambda name, q: pack_ct_layer(q, saved_dtype, name)  # noqa: E731
            config = ct_quantization_config(target.bits, target.group_size, False)
    entries = _quantized_plan(streamed, arch, shapes, saved_dtype)
    ids = calibration.input_ids
    mask = torch.ones_like(ids, dtype=torch.bool) if calibration.attention_mask is None else calibration.attention_mask.bool()
    batches = streamed.embed([(ids[i : i + 8], mask[i : i + 8]) for i in range(0, ids.shape[0], 8)])
    stats, layers = {}, 0
    with atomic_dir(output, overwrite=overwrite) as staging:
        writer = ShardedWriter(staging, entries, parse_size(DEFAULT_MAX_SHARD_SIZE))
        for name in _outside_blocks(entries):
            tensor = streamed.reader.get(streamed.head_source_name(name))
            writer.add(name, tensor.to(saved_dtype) if tensor.is_floating_point() else tensor)
        for index in range(len(streamed.layers)):
            fit_threads()
            layer = streamed.load_block(index)
            block = quantize_block(layer, index, batches, device, arch=arch, **settings)
            for name, tensor in collect_tensors(layer, block.quantized_layers, pack, saved_dtype, f"model.layers.{index}.").items():
                writer.add(name, tensor)
            release(layer)
            stats.update(block.stats)
            layers += len(block.quantized_layers)
            log.debug("%s: block %d/%d done", target.format, index + 1, len(streamed.layers))
        writer.close()
        quantized_config(source.checkpoint, config, saved_dtype).save_pretrained(staging)
        copy_generation_config(source.checkpoint, staging)
        tokenizer.save_pretrained(staging)
        if target.format == "gptq":
            (staging / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"layers": layers, "calibration": calibration.description, "calibration_tokens": calibration.tokens, "stats": _jsonable(stats)}


def _quantized_plan(streamed, arch: Architecture, shapes, saved_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Every tensor of the quantized checkpoint, with dtype and shape, before any is computed."""
    entries = []
    for name, placeholder in streamed.model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and streamed.tied:
            continue
        module, _, leaf = name.rpartition(".")
        local = module.split(".", 3)[-1] if module.startswith("model.layers.") else None
        if local in arch.linear_names and leaf == "weight":
            out_features, in_features = placeholder.shape
            entries += [(f"{module}.{suffix}", dtype, shape) for suffix, (dtype, shape) in shapes(out_features, in_features, module).items()]
        elif local in arch.linear_names and leaf == "bias":
            entries.append((name, torch.float16, tuple(placeholder.shape)))
        else:
            stored = streamed.reader.dtype(streamed.head_source_name(name))
            entries.append((name, saved_dtype if stored.is_floating_point else stored, tuple(placeholder.shape)))
    return entries


def _outside_blocks(entries) -> list[str]:
    return [name for name, _, _ in entries if not name.startswith("model.layers.")]


def _checkpoint_dtype(checkpoint: Path) -> torch.dtype:
    """Unquantized tensors (embeddings, norms) keep the merged checkpoint's half-precision dtype."""
    config = json.loads((checkpoint / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float16"
    return torch.bfloat16 if name == "bfloat16" else torch.float16


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)
