"""The memory plan: computed from the model's config and the recipe, printed by validate, and run refuses
to start when a stage will not fit, naming the stage and a setting with which it fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtune import memory_plan
from qtune.recipe import load_recipe
from support import LLAMA31_8B, LLAMA31_70B, REPO, qtune_cli

GiB = 2**30


def _plan(recipe: str, config: dict, gpu: int | None, host: int) -> memory_plan.MemoryPlan:
    return memory_plan.recipe_plan(load_recipe(REPO / "recipes" / recipe), config, gpu, host)


def test_the_shape_counts_llama_8b_parameters():
    shape = memory_plan.ModelShape.from_config(LLAMA31_8B)
    assert shape.params == pytest.approx(8.03e9, rel=0.01)  # Llama-3.1-8B's published size


def test_the_shape_of_a_fused_phi3_model():
    """Phi-3-mini (fused qkv and gate_up): 3.82B parameters, and its largest linear is gate_up."""
    config = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32}
    config |= {"num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "tie_word_embeddings": False}
    shape = memory_plan.ModelShape.from_config(config)
    assert shape.params == pytest.approx(3.821e9, rel=1e-3)
    assert max(a * b for a, b in shape.linear_shapes) == 3072 * 2 * 8192
    assert len(shape.linear_shapes) == 4


def test_the_8b_recipe_fits_one_24gb_gpu_with_32gb_of_host_memory():
    result = _plan("llama3.1-8b-alpaca.yaml", LLAMA31_8B, 24 * GiB, 32 * GiB)
    assert not result.too_big(), result.table()
    train = next(s for s in result.stages if s.stage == "train")
    assert 5 * GiB < train.device_bytes < 24 * GiB  # the 4-bit base alone is about 5.5 GB


def test_a_stage_that_does_not_fit_names_a_setting_with_which_it_fits():
    result = _plan("llama3.1-8b-alpaca.yaml", LLAMA31_8B, 10 * GiB, 32 * GiB)
    train = next(s for s in result.stages if s.stage == "train")
    assert train in result.too_big()
    setting = train.knob.removeprefix("with ").removesuffix(" it fits")
    assert setting.startswith(("training.micro_batch_size", "data.max_length"))
    assert any(p.startswith("train needs about") and setting in p for p in result.problems())


def test_smaller_settings_plan_less():
    recipe = load_recipe(REPO / "recipes" / "llama3.1-8b-alpaca.yaml").recipe
    shape = memory_plan.ModelShape.from_config(LLAMA31_8B)
    full = memory_plan.plan(recipe, shape, 24 * GiB, 32 * GiB)
    half = memory_plan.plan(memory_plan._with(recipe, "data", max_length=1024), shape, 24 * GiB, 32 * GiB)
    assert half.stages[0].device_bytes < full.stages[0].device_bytes


def test_validate_prints_the_plan_and_run_refuses_before_training(tmp_path: Path):
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    shown = qtune_cli("validate", recipe, "--gpu-memory", "0", "--host-memory", "64GB")
    assert shown.returncode == 0, shown.stderr
    assert "memory plan" in shown.stdout and "merge" in shown.stdout and "does not fit" not in shown.stdout
    refused = qtune_cli("run", recipe, "--gpu-memory", "0", "--host-memory", "2GB", "--set", f"output.dir={tmp_path / 'run'}")
    assert refused.returncode != 0
    assert "will not finish on this machine" in refused.stderr and "train needs about" in refused.stderr
    assert "--ignore-memory-plan" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "run").exists(), "nothing may start when the plan says no"
    bad = qtune_cli("validate", recipe, "--host-memory", "lots")
    assert bad.returncode != 0 and "--host-memory" in bad.stderr and "Traceback" not in bad.stderr


def test_a_70b_model_exports_on_one_80gb_gpu_with_64gb_of_host_memory():
    result = _plan("llama3.1-8b-alpaca.yaml", LLAMA31_70B, 80 * GiB, 64 * GiB)
    exports = [s for s in result.stages if s.stage.startswith("export ")]
    assert {s.stage.split()[1].split("-")[0] for s in exports} >= {"model", "gptq", "awq"}  # GGUF, GPTQ and AWQ
    assert not [s for s in exports if s in result.too_big()], result.table()


def _eval(result: memory_plan.MemoryPlan) -> memory_plan.StagePlan:
    return next(s for s in result.stages if s.stage.startswith("eval merged"))


def test_evaluation_offloads_the_weights_that_do_not_fit():
    params = memory_plan.ModelShape.from_config(LLAMA31_8B).params
    assert _plan("llama3.1-8b-alpaca.yaml", LLAMA31_8B, 24 * GiB, 32 * GiB).eval_offload() is None

    small_gpu = _plan("llama3.1-8b-alpaca.yaml", LLAMA31_8B, 16 * GiB, 32 * GiB)
    offload = small_gpu.eval_offload()
    assert offload is not None and 0 < offload.device_bytes and 0 < offload.host_bytes and offload.disk_bytes == 0
    assert offload.device_bytes + offload.host_bytes == 2 * params  # half precision on a GPU
    assert _eval(small_gpu) not in small_gpu.too_big() and _eval(small_gpu).device_bytes <= 16 * GiB
    assert offload.max_memory(0) == {0: offload.device_bytes, "cpu": offload.host_bytes}
    assert any(n.startswith("eval: the merged model does not fit on the GPU") for n in small_gpu.notes)

    big = _plan("llama3.1-8b-alpaca.yaml", LLAMA31_70B, 80 * GiB, 64 * GiB)
    offload = big.eval_offload()
    assert offload.disk_bytes > 0 and _eval(big) not in big.too_big(), big.table()
    assert offload.device_bytes + offload.host_bytes + offload.disk_bytes == 2 * memory_plan.ModelShape.from_config(LLAMA31_70B).params

    cpu = _plan("quickstart.yaml", LLAMA31_8B, None, 16 * GiB)
    offload = cpu.eval_offload()
    assert offload is not None and offload.device_bytes == 0 and offload.max_memory(None) == {"cpu": offload.host_bytes}
    assert offload.host_bytes + offload.disk_bytes == 4 * params and _eval(cpu) not in cpu.too_big()  # float32 on CPU
