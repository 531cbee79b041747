"""liger-kernel in training: applied to one model instance only, and only after its self-check passes on
the training device (on this CPU machine it fails for real: liger's Triton kernels need a GPU driver)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.llama import modeling_llama

from qtune import liger
from qtune.errors import QtuneError
from qtune.recipe import Recipe, check_rules
from qtune.training import use_liger
from support import tiny_model

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def verdict_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path))


def test_liger_acts_on_one_instance_and_leaves_transformers_alone():
    module_level = dict(vars(modeling_llama))
    class_forward = modeling_llama.LlamaForCausalLM.forward
    model = tiny_model("llama", 0)
    liger.apply_to_instance(model)
    assert model.forward.__func__.__module__.startswith("liger_kernel")  # fused linear cross-entropy
    assert model.model.norm.forward.__func__.__module__.startswith("liger_kernel")
    assert model.model.layers[1].mlp.forward.__func__.__module__.startswith("liger_kernel")
    assert dict(vars(modeling_llama)) == module_level
    assert modeling_llama.LlamaForCausalLM.forward is class_forward
    later = tiny_model("llama", 1)  # another model in the same process: transformers' own modules
    assert later.forward.__func__ is class_forward
    assert type(later.model.norm) is modeling_llama.LlamaRMSNorm and "forward" not in vars(later.model.norm)


@pytest.mark.skipif(CUDA, reason="on a GPU the self-check runs liger's kernels and passes")
def test_liger_fails_its_self_check_without_a_gpu():
    """For real: liger's Triton kernels cannot run here (no driver; under the interpreter they fail too)."""
    result = liger.enable(tiny_model("qwen3", 0, head_dim=16), required=False, autocast=None)
    assert not result.applied and result.off_because.startswith("it failed its self-check on cpu: ")


def test_liger_falls_back_when_its_self_check_fails(monkeypatch):
    def no_driver(*args):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(liger, "run_check", no_driver)
    model = tiny_model("qwen3", 0, head_dim=16)
    result = liger.enable(model, required=False, autocast=None)
    assert not result.applied and result.off_because == "it failed its self-check on cpu: RuntimeError: 0 active drivers ([]). There should only be one."
    assert "forward" not in vars(model) and "forward" not in vars(model.model.norm)
    with pytest.raises(QtuneError, match="training.liger is on, but it failed its self-check on cpu: RuntimeError"):
        liger.enable(model, required=True, autocast=None)
    assert "forward" not in vars(model)


def test_liger_names_what_it_cannot_do(monkeypatch):
    assert liger.enable(tiny_model("gpt2", 0, n_embd=64, n_layer=1, n_head=4), required=False, autocast=None).off_because == (
        "liger-kernel has no kernels for gpt2"
    )
    monkeypatch.setattr(liger, "available", lambda: False)
    with pytest.raises(QtuneError, match="liger-kernel is not installed"):
        liger.enable(tiny_model("llama", 0), required=True, autocast=None)


def test_liger_switch(tmp_path: Path):
    model = tiny_model("llama", 0)
    assert use_liger(model, Recipe(training={"liger": "off"})).off_because == "training.liger is off"
    auto = use_liger(model, Recipe(training={"liger": "auto"}))
    assert auto.applied == CUDA and (CUDA or auto.off_because.startswith("no CUDA device"))
    problems = [p.message for p in check_rules(Recipe(training={"liger": "on"}), tmp_path)]
    assert CUDA or "liger-kernel's kernels need a CUDA GPU; use auto or off on CPU" in problems
