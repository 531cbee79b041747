"""Training, checkpoints, resume, failure handling and tracking, on a tiny random llama with NF4 loading."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qtune import rundir
from qtune.errors import NonFiniteLossError, QtuneError
from qtune.recipe import load_recipe
from qtune.training import train
from support import qtune_cli, step_losses, tiny_model_dir, tiny_recipe, wandb_records, write_recipe


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def trained_run(tiny_base, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(work / "recipe.yaml", tiny_recipe(tiny_base, work / "run"))
    return train(load_recipe(recipe)).run_dir


def _wandb_history(run_dir: Path) -> list[dict]:
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir / 'wandb'}"
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in wandb_records(files[0])
        if record.WhichOneof("record_type") == "history"
    ]


def test_training_writes_adapter_checkpoints_and_metrics(trained_run: Path):
    adapter = trained_run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert [p.name for p in rundir.checkpoints(trained_run)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(trained_run.glob(".*tmp-*")), "staging directories left behind"
    for checkpoint in rundir.checkpoints(trained_run):
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= {p.name for p in checkpoint.iterdir()}
    losses = step_losses(trained_run)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert losses[-1][1] < losses[0][1], "the loss should fall on this easy task"
    logged = [h for h in json.loads((trained_run / "train_log.json").read_text()) if "loss" in h]
    assert all(h["tokens_per_second"] > 0 and h["peak_memory_gb"] > 0 for h in logged)
    info = json.loads((trained_run / "run.json").read_text())
    assert info["trained"] and info["steps"] == 6 and info["fingerprint"]
    resolved = load_recipe(trained_run / "recipe.resolved.yaml").recipe
    assert Path(resolved.data.train[0].path).is_absolute()


def test_wandb_offline_run_holds_the_training_metrics(trained_run: Path):
    history = _wandb_history(trained_run)
    keys = set().union(*history)
    for metric in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/peak_memory_gb"):
        assert metric in keys, f"{metric} missing from the W&B run (has {sorted(keys)})"
    logged_losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert logged_losses == pytest.approx([loss for _, loss in step_losses(trained_run)])


def test_second_train_of_a_finished_run_does_nothing(trained_run: Path):
    before = (trained_run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    train(load_recipe(trained_run / "recipe.resolved.yaml"))
    assert (trained_run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_refuses_an_output_dir_holding_a_different_run(trained_run: Path, tmp_path: Path):
    recipe = write_recipe(tmp_path / "r.yaml", yaml_of(trained_run, training={"learning_rate": 5e-4}))
    with pytest.raises(QtuneError, match="holds a different run"):
        train(load_recipe(recipe))
    result = qtune_cli("train", str(recipe))
    assert result.returncode == 2 and "holds a different run" in result.stderr and "Traceback" not in result.stderr


def test_refuses_a_non_run_directory(tiny_base: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("not a run")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_base, out))
    with pytest.raises(QtuneError, match="holds no qtune run"):
        train(load_recipe(recipe))
    assert (out / "precious.txt").read_text() == "not a run"


def test_other_ranks_wait_for_rank_0s_claim(tmp_path: Path):
    from qtune.training import _wait_for_claim

    with pytest.raises(QtuneError, match="rank 0 did not claim"):
        _wait_for_claim(tmp_path, "abc", timeout=0.5)
    (tmp_path / rundir.RUN_FILE).write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(QtuneError, match="rank 0 did not claim"):
        _wait_for_claim(tmp_path, "abc", timeout=0.5)
    (tmp_path / rundir.RUN_FILE).write_text(json.dumps({"fingerprint": "abc"}))
    _wait_for_claim(tmp_path, "abc", timeout=0.5)


def yaml_of(run_dir: Path, **changes) -> dict:
    import yaml

    recipe = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    for section, values in changes.items():
        recipe[section].update(values)
    return recipe


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_base: Path, tmp_path: Path, monkeypatch):
    from transformers import Trainer

    calls = {"n": 0}
    original = Trainer._save_rng_state

    def fail_second_time(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", fail_second_time)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_base, tmp_path / "run"))
    with pytest.raises(QtuneError, match="disk is full.*checkpoint-2"):
        train(load_recipe(recipe))
    run_dir = tmp_path / "run"
    assert [p.name for p in rundir.checkpoints(run_dir)] == ["checkpoint-2"]
    assert not list(run_dir.glob(".*tmp-*"))
    assert not (run_dir / "adapter").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_base: Path, tmp_path: Path, monkeypatch):
    from transformers import Trainer

    original = Trainer.compute_loss
    calls = {"n": 0}

    def poisoned(self, model, inputs, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_base, tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"nan at step 4.*last good checkpoint is checkpoint-2"):
        train(load_recipe(recipe))
    assert [p.name for p in rundir.checkpoints(tmp_path / "run")] == ["checkpoint-2"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_loss_curve(tiny_base: Path, tmp_path: Path):
    settings = {"max_steps": 24, "save_steps": 4}
    straight = write_recipe(tmp_path / "straight.yaml", tiny_recipe(tiny_base, tmp_path / "straight", training=settings))
    killed = write_recipe(tmp_path / "killed.yaml", tiny_recipe(tiny_base, tmp_path / "killed", training=settings))

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, "-m", "qtune", "train", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (tmp_path / "killed" / "checkpoint-8").is_dir():
        assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before the kill"

    refused = qtune_cli("train", str(killed))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = qtune_cli("train", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    complete = qtune_cli("train", str(straight))
    assert complete.returncode == 0, complete.stderr[-3000:]

    match = re.search(r"resuming from checkpoint-(\d+)", resumed.stderr)
    assert match and int(match.group(1)) >= 8, resumed.stderr[-2000:]
    straight_losses = step_losses(tmp_path / "straight")
    assert [s for s, _ in straight_losses] == list(range(1, 25))
    # Steps before the checkpoint come from its saved history; every step after it was recomputed.
    assert step_losses(tmp_path / "killed") == straight_losses


def test_secrets_from_the_environment_never_reach_files_or_logs(tiny_base: Path, tmp_path: Path):
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secretTOKEN0123456789"}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_base, tmp_path / "run", training={"max_steps": 2}))
    result = qtune_cli("train", str(recipe), env=secrets)
    assert result.returncode == 0, result.stderr[-3000:]
    for value in secrets.values():
        assert value not in result.stdout + result.stderr
        for path in (tmp_path / "run").rglob("*"):
            if path.is_file():
                assert value.encode() not in path.read_bytes(), f"secret found in {path}"


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_base: Path, tmp_path: Path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_base, tmp_path / "run", training={"max_steps": 3, "save_steps": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # accelerate's --cpu flag selects its single-process launcher; --multi_gpu is its torch.distributed
        # launcher, which runs gloo DDP on a machine without GPUs.
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "qtune",
            "train",
            str(recipe),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == 3
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in rundir.checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (run_dir / "checkpoint-2").iterdir()}


def test_unknown_model_without_network_says_so(tmp_path: Path):
    recipe = tiny_recipe(Path("qtune-tests/no-such-model"), tmp_path / "run")
    recipe["model"]["base"] = "qtune-tests/no-such-model"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = qtune_cli("train", str(path), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr and "Traceback" not in result.stderr


def test_builtin_model_is_a_real_chat_model():
    from transformers import AutoModelForCausalLM

    from qtune.models import builtin_checkpoint, load_tokenizer

    checkpoint = builtin_checkpoint("smollm2-135m-instruct")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_peak_memory_counts_paged_optimizer_states(monkeypatch):
    """Paged optimizers keep their states in CUDA managed memory, which torch's allocator statistics omit."""
    from bitsandbytes.functional import GlobalPageManager

    from qtune import training

    # the shapes of an 8-bit paged AdamW's states: a float32 buffer and uint8 codes (stand-ins, on the host)
    states = [torch.empty(1024, 256), torch.empty(4096, dtype=torch.uint8)]
    monkeypatch.setattr(GlobalPageManager.get_instance(), "paged_tensors", states)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 3 * 2**30)
    assert training.paged_memory_bytes() == 1024 * 256 * 4 + 4096
    assert training.peak_memory_gb() == (3 * 2**30 + 1024 * 256 * 4 + 4096) / 2**30
