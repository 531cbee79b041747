"""Merging: both bases measured, the closer one chosen, and a checkpoint plain transformers can load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from oracles import needs, needs_llama_cpp_source, vllm_greedy, vllm_python
from qtune import merge, models
from qtune.data import prepare_data
from qtune.evaluate import evaluate_run
from qtune.merge import merge_run
from qtune.metrics import divergence
from qtune.recipe import load_recipe
from qtune.shards import CheckpointReader
from qtune.training import train
from support import tiny_model, tiny_model_dir, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("merge")
    base = tiny_model_dir(work / "llama", hidden=128)
    recipe = write_recipe(work / "recipe.yaml", tiny_recipe(base, work / "run", training={"max_steps": 4, "learning_rate": 5e-3}))
    run_dir = train(load_recipe(recipe)).run_dir
    merge_run(run_dir)
    return run_dir


def _whole_model_merge(run_dir: Path, base_name: str, dtype: torch.dtype):
    """The merge computed the plain way, for comparison: whole fp32 base, every 4-bit weight dequantized
    from the loaded adapter model itself, the deltas added, rounded to the output dtype."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit

    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    recipe = loaded.recipe
    checkpoint = models.resolve_base(recipe.model)
    adapter_model = models.load_adapter_model(checkpoint, run_dir / "adapter", recipe.model, recipe.quantization)
    full = models.load_full_precision(checkpoint, recipe.model, torch.float32).eval()
    state = {k: v.detach().clone() for k, v in full.state_dict().items()}
    if base_name == "dequantized":
        for name, module in adapter_model.named_modules():
            if isinstance(module, Linear4bit):
                key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
                state[key] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    state.update(merge.apply_deltas(state, merge.lora_deltas(adapter_model)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    full.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return state, adapter_model, full, loaded


def test_streamed_merge_equals_the_whole_model_merge(merged_run: Path):
    """Streaming changes nothing: every merged tensor is bit-identical to the whole-model merge on the
    chosen base, and the KL the streaming merge measured block by block is the whole-model KL."""
    report = json.loads((merged_run / "merge_report.json").read_text())
    dtype = getattr(torch, report["dtype"])
    for base_name in ("dequantized", "original"):
        state, adapter_model, full, loaded = _whole_model_merge(merged_run, base_name, dtype)
        if base_name == report["chosen"]:
            written = CheckpointReader(merged_run / "merged")
            assert set(written.keys()) == set(state) - {"lm_head.weight"}  # tied head, not stored
            for name in written.keys():
                assert torch.equal(written.get(name), state[name]), name
        recipe = loaded.recipe
        tokenizer = models.load_tokenizer(models.resolve_base(recipe.model))
        rows = prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed).validation
        whole = divergence(models.for_inference(adapter_model), full, rows, tokenizer.pad_token_id)
        assert report["kl"][base_name] == pytest.approx(whole.mean_kl, rel=1e-3, abs=1e-9)
        assert report["top1"][base_name] == pytest.approx(whole.top1_agreement, abs=1 / whole.tokens)
        assert report["tokens"] == whole.tokens


def test_nf4_rebuilt_from_the_checkpoint_is_what_training_saw(merged_run: Path):
    """dequant(NF4(W)) rebuilt from W is bit-identical to the weights the loaded 4-bit model computes with."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit

    loaded = load_recipe(merged_run / "recipe.resolved.yaml")
    recipe = loaded.recipe
    checkpoint = models.resolve_base(recipe.model)
    adapter_model = models.load_adapter_model(checkpoint, merged_run / "adapter", recipe.model, recipe.quantization)
    specs = merge.nf4_specs(adapter_model)
    assert merge.planned_nf4_specs(checkpoint, recipe.model, recipe.quantization, models.device()) == specs
    reader = CheckpointReader(checkpoint)
    compared = 0
    for name, module in adapter_model.named_modules():
        if isinstance(module, Linear4bit):
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
            seen = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            rebuilt = merge.nf4_roundtrip(reader.get(key), specs[key])
            assert rebuilt.dtype == seen.dtype and torch.equal(rebuilt, seen), key
            compared += 1
    assert compared == 7 * 2  # every linear of both decoder blocks


def _assert_streamed_adapter_is_the_adapter_model(run_dir: Path) -> None:
    from qtune.metrics import model_reference, streamed_outputs

    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    recipe = loaded.recipe
    checkpoint = models.resolve_base(recipe.model)
    tokenizer = models.load_tokenizer(checkpoint)
    rows = prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed).validation
    adapter_model = models.for_inference(models.load_adapter_model(checkpoint, run_dir / "adapter", recipe.model, recipe.quantization))
    whole = model_reference(adapter_model, rows, tokenizer.pad_token_id)
    specs = merge.planned_nf4_specs(checkpoint, recipe.model, recipe.quantization, models.device())
    adapter = merge.streamed_adapter(checkpoint, run_dir / "adapter", models.device(), recipe.model)
    streamed = streamed_outputs(adapter.streamed, rows, tokenizer.pad_token_id, adapter.source(specs))
    expected_deltas = merge.lora_deltas(adapter_model)
    assert set(adapter.deltas) == set(expected_deltas)
    for name, delta in adapter.deltas.items():
        assert torch.equal(delta.delta(), expected_deltas[name].delta()), name
    assert all(t.is_meta for t in adapter.streamed.layers.parameters())  # no block stays loaded (the head does)
    positions = torch.arange(8)
    for index in range(len(whole.batches)):
        torch.testing.assert_close(streamed.logits(index, positions), whole.logits(index, positions), atol=1e-4, rtol=1e-4)
    untrained = merge.StreamedAdapter(adapter.streamed, {k: torch.zeros_like(v) for k, v in adapter.lora.items()}, {})
    if any("magnitude" in k for k in adapter.lora):  # DoRA: zero magnitudes would zero every output
        untrained.lora.update({k: v for k, v in adapter.lora.items() if "magnitude" in k or "lora_A" in k})
    without = streamed_outputs(untrained.streamed, rows, tokenizer.pad_token_id, untrained.source(specs))
    assert not torch.allclose(without.logits(0, positions), whole.logits(0, positions), atol=1e-3)  # the LoRA counts


def test_streamed_adapter_model_is_the_adapter_model(merged_run: Path):
    """The adapter model the merge measures against, run block by block from the checkpoint with peft's
    LoRA layers on a meta skeleton, gives the logits of the adapter model loaded whole in 4 bits."""
    _assert_streamed_adapter_is_the_adapter_model(merged_run)


def test_dora_rslora_merge_of_a_sharded_untied_base(tmp_path: Path):
    """DoRA with rsLoRA scaling, on a base in many shards with its own output head: the streamed adapter
    model is peft's, the merge into it passes its gate, and the head is merged and stored."""
    base = tiny_model_dir(tmp_path / "llama", hidden=128, tied=False, max_shard_size="1MB")
    assert len(list(base.glob("*.safetensors"))) > 3
    recipe = tiny_recipe(base, tmp_path / "run", training={"max_steps": 2, "learning_rate": 5e-3}, lora={"use_dora": True, "use_rslora": True})
    run_dir = train(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))).run_dir
    _assert_streamed_adapter_is_the_adapter_model(run_dir)
    merge_run(run_dir)
    report = json.loads((run_dir / "merge_report.json").read_text())
    assert report["passes"] and abs(report["kl"][report["chosen"]]) <= merge.KL_GATE
    merged = CheckpointReader(run_dir / "merged")
    assert torch.equal(merged.get("lm_head.weight"), CheckpointReader(base).get("lm_head.weight").to(merged.dtype("lm_head.weight")))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, merged_run: Path) -> Path:
    """The same merge written with a small max_shard_size: several shards and transformers' index."""
    import shutil

    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    recipe = load_recipe(merged_run / "recipe.resolved.yaml").recipe.model_dump(mode="json")
    recipe["output"].update(dir=str(run_dir), max_shard_size="300KB")
    shutil.copytree(merged_run, run_dir, ignore=shutil.ignore_patterns("merged", "merge_report.json", "eval", "exports"))
    write_recipe(run_dir / "recipe.resolved.yaml", recipe)
    merge_run(run_dir)
    return run_dir


def test_sharded_merge_loads_in_transformers(sharded_run: Path, merged_run: Path):
    """transformers loads the same tensors from the shards as from the single-file merge."""
    from transformers import AutoModelForCausalLM

    files = sorted(p.name for p in (sharded_run / "merged").glob("*.safetensors"))
    index = json.loads((sharded_run / "merged" / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for f in files for t in _tensors(sharded_run / "merged" / f))
    sharded = AutoModelForCausalLM.from_pretrained(sharded_run / "merged").state_dict()
    single = AutoModelForCausalLM.from_pretrained(merged_run / "merged").state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


@pytest.mark.slow
@needs_llama_cpp_source
def test_sharded_merge_converts_with_llama_cpp(sharded_run: Path, merged_run: Path, tmp_path: Path):
    """llama.cpp's own convert_hf_to_gguf.py reads the sharded merge unchanged: its GGUF (read by gguf-py)
    holds the very tensors it makes from the single-file merge."""
    import gguf

    from oracles import convert_with_llama_cpp

    def tensors(checkpoint: Path, name: str) -> dict[str, bytes]:
        (tmp_path / name).mkdir()
        reader = gguf.GGUFReader(convert_with_llama_cpp(checkpoint, tmp_path / name / "model.gguf", "--outtype", "f32"))
        return {t.name: bytes(t.data.tobytes()) for t in reader.tensors}

    sharded, single = tensors(sharded_run / "merged", "sharded"), tensors(merged_run / "merged", "single")
    assert len(sharded) == 2 + 9 * 2 and sharded == single  # embeddings, output norm, 9 tensors per block


@pytest.mark.slow
@needs(vllm_python(), "vLLM's CPU build (.cache/vllm-venv)")
def test_sharded_merge_answers_the_same_in_vllm(sharded_run: Path, tmp_path: Path):
    """vLLM (its CPU build, in its own venv) loads the sharded merge unchanged and its greedy answers, in
    float32, are transformers' greedy answers on the same token ids, on every held-out prompt."""
    loaded = load_recipe(sharded_run / "recipe.resolved.yaml")
    recipe = loaded.recipe
    tokenizer = models.load_tokenizer(sharded_run / "merged")
    prompts = prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed).eval_prompts[:8]
    ids = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in prompts]
    model = models.load_for_eval(sharded_run / "merged", recipe.model)
    expected = []
    for row in ids:
        out = model.generate(torch.tensor([row]), max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        expected.append(out[0, len(row) :].tolist())
    assert vllm_greedy(sharded_run / "merged", ids, 8, "float32", tmp_path) == expected


def _tensors(path: Path) -> list[torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return [handle.get_tensor(k) for k in handle.keys()]


def test_merge_measures_both_bases_and_keeps_the_closer(merged_run: Path):
    report = json.loads((merged_run / "merge_report.json").read_text())
    assert set(report["kl"]) == {"dequantized", "original"}
    assert report["chosen"] == min(report["kl"], key=report["kl"].get)
    # The adapter was trained on the NF4 weights, so merging into them reproduces the adapter model.
    assert report["chosen"] == "dequantized"
    assert report["kl"]["dequantized"] <= 1e-3 and report["passes"]
    assert report["kl"]["original"] > report["kl"]["dequantized"]
    assert report["dtype"] in ("float16", "bfloat16")


def test_merged_checkpoint_loads_in_plain_transformers(merged_run: Path):
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(merged_run / 'merged')!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(path)\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "assert tok.chat_template\n"
        "assert not any(m.startswith('qtune') or m.startswith('peft') for m in sys.modules), 'qtune or peft imported'\n"
        "print(model.dtype, sum(p.numel() for p in model.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = {p.name for p in (merged_run / "merged").iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt")) for name in files)


def test_merged_model_matches_the_adapter_model_on_eval(merged_run: Path):
    results = evaluate_run(merged_run, ["adapter", "merged"])
    assert results["adapter"].perplexity == pytest.approx(results["merged"].perplexity, rel=1e-2)
    assert (merged_run / "eval" / "merged.json").is_file()


def test_lora_delta_is_peft_own_delta(merged_run: Path):
    """The dense update formed from the kept LoRA factors equals peft's get_delta_weight bit for bit."""
    from peft.tuners.lora import LoraLayer

    recipe = load_recipe(merged_run / "recipe.resolved.yaml").recipe
    adapter_model = models.load_adapter_model(models.resolve_base(recipe.model), merged_run / "adapter", recipe.model, recipe.quantization)
    deltas = merge.lora_deltas(adapter_model)
    layers = {n.removeprefix("base_model.model."): m for n, m in adapter_model.named_modules() if isinstance(m, LoraLayer)}
    assert deltas.keys() == layers.keys() and len(deltas) == 14
    for name, lora in deltas.items():
        assert torch.equal(lora.delta(), layers[name].get_delta_weight("default").float()), name


def test_apply_deltas_dora_formula():
    weight = torch.randn(6, 4)
    lora = merge.LoraDelta(torch.randn(2, 4), torch.randn(6, 2) * 0.1, 0.5, torch.rand(6) + 0.5)
    magnitude, delta = lora.magnitude, lora.delta()
    merged = merge.apply_deltas({"m.weight": weight}, {"m": lora})["m.weight"]
    combined = weight + delta
    assert torch.allclose(merged, magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True))
    assert torch.allclose(merged.norm(dim=1), magnitude)


def test_choose_dtype_prefers_fp16_when_it_fits():
    assert merge.choose_dtype("auto", torch.float32, lambda: 1.0) == torch.float16
    assert merge.choose_dtype("auto", torch.float32, lambda: 1e6) == torch.bfloat16
    assert merge.choose_dtype("auto", torch.bfloat16, lambda: 1.0) == torch.bfloat16
    assert merge.choose_dtype("float32", torch.bfloat16, lambda: 1.0) == torch.float32


def test_offloaded_merged_model_scores_the_same(merged_run: Path, monkeypatch):
    """When the plan says the merged model does not fit, accelerate offloads it (on CPU to disk, loaded in
    float32) and evaluation gives the same numbers as the model held whole."""
    from qtune import evaluate, memory_plan

    whole = evaluate_run(merged_run, ["merged"])["merged"]
    loaded = load_recipe(merged_run / "recipe.resolved.yaml")
    config = json.loads((models.resolve_base(loaded.recipe.model) / "config.json").read_text())
    roomy = memory_plan.recipe_plan(loaded, config, None, 1 << 40)
    assert roomy.eval_offload() is None
    host = next(s for s in roomy.stages if s.stage.startswith("eval merged")).host_bytes - 1
    offload = memory_plan.recipe_plan(loaded, config, None, host).eval_offload()
    assert offload == memory_plan.Offload(0, 0, 4 * memory_plan.ModelShape.from_config(config).params)  # the margin exceeds a tiny model

    seen, real_load = {}, models.load_for_eval

    def load_for_eval(checkpoint, model, offload=None, offload_folder=None):
        loaded_model = real_load(checkpoint, model, offload, offload_folder)
        seen["placement"] = set(getattr(loaded_model, "hf_device_map", {}).values())
        return loaded_model

    monkeypatch.setattr(memory_plan, "machine_memory", lambda: (None, host))
    monkeypatch.setattr(evaluate.models, "load_for_eval", load_for_eval)
    offloaded = evaluate_run(merged_run, ["merged"])["merged"]
    assert seen["placement"] == {"disk"}
    assert offloaded.runtime == "transformers + accelerate offload"
    assert not (merged_run / evaluate.OFFLOAD_DIR).exists()
    assert offloaded.correct == whole.correct and offloaded.total == whole.total
    assert offloaded.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


def test_partly_offloaded_model_computes_what_the_whole_model_does(tmp_path: Path):
    """Half of the float32 weights in host memory, the rest on disk: the same logits and the same greedy
    answer as the half-precision model computing in float32. (A small vocabulary, so that no single
    module outweighs the rest: accelerate keeps room for the largest one beside what it places.)"""
    from qtune import memory_plan
    from qtune.recipe import ModelSection

    tiny_model("llama", 0, vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=6, max_position_embeddings=128).to(
        torch.bfloat16
    ).save_pretrained(tmp_path / "model")
    whole = models.load_for_eval(tmp_path / "model", ModelSection(base=str(tmp_path / "model")))
    weights = 4 * sum(p.numel() for p in whole.parameters())
    offload = memory_plan.Offload(0, weights // 2, weights - weights // 2)
    split = models.load_for_eval(tmp_path / "model", ModelSection(base=str(tmp_path / "model")), offload, tmp_path / "offload")
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(split(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert torch.equal(split.generate(ids[:1, :8], max_new_tokens=6, do_sample=False), whole.generate(ids[:1, :8], max_new_tokens=6, do_sample=False))
