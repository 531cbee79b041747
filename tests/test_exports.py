"""`qtune export` and the recipe's export list, wired end to end on a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from qtune.errors import QtuneError
from qtune.exports import export
from qtune.formats.gptq import load_dequantized_gptq_model
from qtune.recipe import ExportTarget, RecipeError, load_recipe
from qtune.training import train
from support import qtune_cli, tiny_model_dir, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("export")
    base = tiny_model_dir(work / "llama", hidden=256)
    recipe = write_recipe(work / "recipe.yaml", tiny_recipe(base, work / "run", training={"max_steps": 2}))
    return train(load_recipe(recipe)).run_dir


def test_gguf_export_from_a_run_merges_calibrates_and_checks_the_chat_template(run_dir: Path):
    result = qtune_cli("export", str(run_dir), "--format", "gguf", "--quant", "Q4_K_M", "--samples", "8", "--seq-len", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    path = run_dir / "exports" / "model-Q4_K_M.gguf"
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K"
    report = json.loads((run_dir / "exports" / "model-Q4_K_M.gguf.report.json").read_text())
    assert report["imatrix"] == "the recipe's training data" and report["chat_roundtrip"] == "ok"
    assert (run_dir / "merged" / "config.json").is_file(), "exporting a run merges it first"
    modelfiles = [p for p in (run_dir / "exports").iterdir() if "Modelfile" in p.name]
    assert modelfiles and "model-Q4_K_M.gguf" in modelfiles[0].read_text()
    again = qtune_cli("export", str(run_dir), "--format", "gguf", "--quant", "Q4_K_M")
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("quant,qtype", [("IQ4_XS", "IQ4_XS"), ("iq4_nl", "IQ4_NL")])
def test_iq4_gguf_export_needs_no_imatrix(run_dir: Path, tmp_path: Path, quant: str, qtype: str):
    out = tmp_path / f"model-{qtype}.gguf"
    result = qtune_cli("export", str(run_dir), "--format", "gguf", "--quant", quant, "--no-imatrix", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == "Q6_K"
    assert json.loads(out.with_name(out.name + ".report.json").read_text())["imatrix"] is None


def test_gptq_export_reads_back_through_our_dequantizer(run_dir: Path, tmp_path: Path):
    out = tmp_path / "gptq"
    result = qtune_cli("export", str(run_dir), "--format", "gptq", "--group-size", "64", "--samples", "8", "--seq-len", "128", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 64
    assert (out / "quantize_config.json").is_file() and (out / "tokenizer.json").is_file()
    model = load_dequantized_gptq_model(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_missing_calibration_file_is_refused(run_dir: Path, tmp_path: Path):
    with pytest.raises(QtuneError, match="calibration file not found"):
        export(run_dir, ExportTarget(format="awq", calibration=str(tmp_path / "missing.txt")), tmp_path / "awq")
    assert not (tmp_path / "awq").exists()


def test_too_little_calibration_data_is_refused(run_dir: Path, tmp_path: Path):
    text = tmp_path / "tiny.txt"
    text.write_text("just a few words")
    with pytest.raises(QtuneError, match="only .* tokens"):
        export(run_dir, ExportTarget(format="gptq", calibration=str(text)), tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


def test_unsupported_bits_are_refused_before_any_work(run_dir: Path, tmp_path: Path):
    result = qtune_cli("export", str(run_dir), "--format", "awq", "--bits", "3", "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "4 bits only" in result.stderr


def test_recipe_export_of_an_unsupported_architecture_fails_at_validation(tmp_path: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(base)
    recipe = tiny_recipe(base, tmp_path / "run")
    recipe["export"] = [{"format": "gguf", "quant": "Q4_K_M"}]
    with pytest.raises(RecipeError, match="architecture 'gpt2' cannot be exported; supported: llama, mistral, qwen2"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_a_hub_base_of_an_unsupported_architecture_fails_before_training(tmp_path: Path, monkeypatch):
    """Validation cannot read an uncached hub model's config; train checks it after the download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qtune import models

    downloaded = tmp_path / "hub-snapshot"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(downloaded)
    recipe = tiny_recipe(tmp_path / "unused", tmp_path / "run")
    recipe["model"]["base"] = "example-org/never-downloaded-model"
    recipe["export"] = [{"format": "gguf", "quant": "Q4_K_M"}]
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))  # nothing to read yet: valid
    monkeypatch.setattr(models, "resolve_base", lambda section: downloaded)
    with pytest.raises(QtuneError, match="architecture 'gpt2' cannot be exported"):
        train(loaded)
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "adapter").exists()


def test_exported_gptq_and_awq_are_scored_by_qtune_eval(run_dir: Path):
    for fmt in ("gptq", "awq"):
        result = qtune_cli("export", str(run_dir), "--format", fmt, "--group-size", "64", "--samples", "8", "--seq-len", "128")
        assert result.returncode == 0, result.stderr[-3000:]
    result = qtune_cli("eval", str(run_dir), "--artifact", "gptq-4bit-g64", "--artifact", "awq-4bit-g64")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("gptq-4bit-g64", "awq-4bit-g64"):
        score = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        assert score["perplexity"] > 1 and score["kl_vs_merged"] >= 0 and 0 <= score["top1_vs_merged"] <= 1


def test_w4a16_kernel_path_matches_the_dequantized_model(run_dir: Path, tmp_path: Path):
    """The packed model that eval loads computes what the checkpoint's dequantized weights compute; it
    rounds each dequantized weight to fp16 as the GPU kernels do, hence the tolerance."""
    import torch

    from qtune.kernels.w4a16 import QuantLinearW4A16
    from qtune.quantized_models import load_quantized_model

    out = tmp_path / "gptq"
    export(run_dir, ExportTarget(format="gptq", group_size=64, samples=8, seq_len=128), out)
    dense = load_dequantized_gptq_model(out)
    packed = load_quantized_model(out, backend="torch")
    assert sum(isinstance(m, QuantLinearW4A16) for m in packed.modules()) == 7 * 2
    assert not any(
        p.dtype == torch.float32 and p.dim() == 2 and p.shape[0] > 1000 and p.shape[1] == 256 for n, p in packed.named_parameters() if "layers" in n
    ), "a quantized linear was dequantized"
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, packed(ids).logits, atol=2e-2, rtol=2e-2)


def test_export_names_and_awq_only_options():
    assert ExportTarget(format="gptq", group_size=32, sym=False).default_name() == "gptq-4bit-g32-asym"
    assert ExportTarget(format="awq", group_size=32, rounding="gptq").default_name() == "awq-4bit-g32-gptq"
    assert ExportTarget(format="awq", group_size=64).default_name() == "awq-4bit-g64"
    refused = ("rounding", "rounding applies to AWQ grids: format awq, or compressed-tensors with method awq")
    assert refused in ExportTarget(format="gptq", rounding="gptq").problems()


def test_gguf_lora_export_from_a_run(run_dir: Path, tmp_path: Path):
    from qtune.evaluate import available_artifacts

    result = qtune_cli("export", str(run_dir), "--format", "gguf-lora")
    assert result.returncode == 0, result.stderr[-3000:]
    path = run_dir / "exports" / "lora-F16.gguf"
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.0.attn_q.weight.lora_a"] == "F16" and "blk.0.attn_q.weight.lora_b" in names
    report = json.loads((run_dir / "exports" / "lora-F16.gguf.report.json").read_text())
    assert report["format"] == "gguf-lora" and report["tensors"] == len(names)
    assert "lora-F16.gguf" not in available_artifacts(run_dir), "an adapter alone is not scored as a model"

    bad = qtune_cli("export", str(run_dir), "--format", "gguf-lora", "--quant", "Q4_K", "--output", str(tmp_path / "x.gguf"))
    assert bad.returncode == 2 and "F32, F16 or BF16" in bad.stderr
    plain = qtune_cli("export", str(run_dir / "merged"), "--format", "gguf-lora", "--output", str(tmp_path / "y.gguf"))
    assert plain.returncode == 2 and "needs a qtune run directory with a trained adapter" in plain.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "target",
    [
        {"format": "gguf", "quant": "Q4_K_M", "samples": 8, "seq_len": 128},
        {"format": "gptq", "group_size": 32, "sym": False, "samples": 8, "seq_len": 128},
        {"format": "awq", "group_size": 32, "rounding": "gptq", "samples": 8, "seq_len": 128},
    ],
    ids=lambda t: t["format"],
)
def test_an_export_repeated_on_one_machine_is_the_same_bytes(run_dir: Path, tmp_path: Path, target: dict):
    """Calibration draws, quantizers and writers are deterministic: what can differ is only the CPU
    (its float rounding in matmuls) and the thread count, never a second run."""
    outputs = []
    for attempt in ("first", "second"):
        name = "model.gguf" if target["format"] == "gguf" else target["format"]
        outputs.append(export(run_dir, ExportTarget(**target), tmp_path / attempt / name).path)
    first, second = outputs
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file()) if first.is_dir() else [Path()]
    assert files
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


@pytest.mark.parametrize(
    "target",
    [
        {"format": "gptq", "group_size": 32, "sym": False, "samples": 8, "seq_len": 128},
        {"format": "gptq", "group_size": 64, "act_order": True, "samples": 8, "seq_len": 128},
        {"format": "awq", "group_size": 32, "rounding": "gptq", "samples": 8, "seq_len": 128},
        {"format": "awq", "group_size": 64, "samples": 8, "seq_len": 128},
    ],
    ids=lambda t: f"{t['format']}-g{t['group_size']}{'-act' if t.get('act_order') else ''}{'-' + t['rounding'] if 'rounding' in t else ''}",
)
def test_block_by_block_export_equals_the_whole_model_quantizer(run_dir: Path, tmp_path: Path, target: dict):
    """The export reads one block at a time from the merged checkpoint; the whole-model quantizer on the
    same calibration set gives the very same codes, scales, zeros and unquantized tensors."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtune import layerwise
    from qtune.calibration import calibration_set
    from qtune.formats.awq import pack_awq_layer
    from qtune.formats.gptq import collect_tensors, pack_gptq_layer
    from qtune.models import load_tokenizer

    settings = ExportTarget(**target)
    out = export(run_dir, settings, tmp_path / "streamed").path
    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    merged = run_dir / "merged"
    calibration = calibration_set(load_tokenizer(merged), loaded.recipe.data, loaded.base_dir, None, settings.samples, settings.seq_len, settings.seed)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids, mask = calibration.input_ids, calibration.attention_mask
    if settings.format == "gptq":
        result = layerwise.quantize_model_gptq(
            model, ids, mask, bits=4, group_size=settings.group_size, sym=settings.sym, act_order=settings.act_order, damp=settings.damp
        )
        expected = collect_tensors(model, result.quantized_layers, lambda n, q: pack_gptq_layer(q, "gptq" if settings.sym else "gptq_v2", n), torch.float16)
    else:
        result = layerwise.quantize_model_awq(model, ids, mask, bits=4, group_size=settings.group_size, rounding=settings.rounding, damp=settings.damp)
        expected = collect_tensors(model, result.quantized_layers, lambda n, q: pack_awq_layer(q, n), torch.float16)
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        written = {key: handle.get_tensor(key) for key in handle.keys()}
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and config["quantization_config"]["quant_method"] == settings.format
    if settings.format == "gptq":
        assert config["quantization_config"]["desc_act"] is settings.act_order


def test_streamed_imatrix_equals_the_whole_model_imatrix(run_dir: Path):
    """The GGUF export's importance matrix, gathered one block at a time, has the very sums the whole model gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.blockwise import StreamedModel
    from qtune.calibration import calibration_set
    from qtune.imatrix import collect_imatrix, collect_imatrix_streamed
    from qtune.models import load_tokenizer

    export(run_dir, ExportTarget(format="gguf", quant="Q8_0"), run_dir / "exports" / "merge-first.gguf", overwrite=True)
    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    merged = run_dir / "merged"
    calibration = calibration_set(load_tokenizer(merged), loaded.recipe.data, loaded.base_dir, None, 6, 96, 0)
    rows = [row[mask.bool()].unsqueeze(0) for row, mask in zip(calibration.input_ids, calibration.attention_mask)]
    whole = collect_imatrix(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), rows)
    streamed = collect_imatrix_streamed(StreamedModel(merged, "cpu", torch.float32), rows)
    assert whole.sums.keys() == streamed.sums.keys() and len(whole.sums) == 14
    for name in whole.sums:
        assert torch.equal(whole.sums[name], streamed.sums[name]), name
        assert whole.counts[name] == streamed.counts[name]
