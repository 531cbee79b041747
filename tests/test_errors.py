"""What a user sees when something goes wrong: one line naming the stage and the cause, never a bare
traceback; known failures (out of memory, a full disk, a damaged file) say what to do."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from qtune import errors, evaluate, merge
from qtune.checkpoint_files import check_checkpoint
from support import REPO, tiny_model_dir
from test_fuzz_inputs import run_cli


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory holding only its recipe: enough for a stage to start."""
    folder = tmp_path / "run"
    folder.mkdir()
    text = (REPO / "recipes" / "quickstart.yaml").read_text().replace("data/", str(REPO / "recipes" / "data") + "/")
    (folder / "recipe.resolved.yaml").write_text(text)
    return folder


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def test_an_unexpected_error_is_one_line_with_its_traceback_in_the_run_log(run_dir, monkeypatch):
    monkeypatch.setattr(merge, "_merge_run", _raise(KeyError("lm_head.weight")))
    code, output = run_cli("merge", str(run_dir))
    assert code == errors.INTERNAL_ERROR_EXIT
    assert "qtune: error: merge failed unexpectedly: KeyError: 'lm_head.weight'" in output
    assert "Traceback" not in output
    logs = sorted((run_dir / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in output
    logged = logs[0].read_text()
    assert "Traceback" in logged and "KeyError: 'lm_head.weight'" in logged
    assert logged.startswith(f"qtune merge {run_dir}")


def test_verbose_shows_the_traceback_too(run_dir, monkeypatch):
    monkeypatch.setattr(merge, "_merge_run", _raise(RuntimeError("shape mismatch")))
    code, output = run_cli("-v", "merge", str(run_dir))
    assert code == errors.INTERNAL_ERROR_EXIT and "Traceback (most recent call last)" in output and "shape mismatch" in output


def test_an_error_outside_a_run_logs_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_CACHE", str(tmp_path / "cache"))
    from qtune import recipe

    monkeypatch.setattr(recipe, "check_rules", _raise(ZeroDivisionError("division by zero")))
    code, output = run_cli("validate", str(REPO / "recipes" / "quickstart.yaml"))
    assert code == errors.INTERNAL_ERROR_EXIT and "validate failed unexpectedly: ZeroDivisionError" in output
    assert len(list((tmp_path / "cache" / "logs").glob("error-*.log"))) == 1


@pytest.mark.parametrize(
    ("stage_module", "stage_function", "command", "advice"),
    [
        (merge, "_merge_run", "merge", "merge holds the whole model"),
        (evaluate, "_evaluate_run", "eval", "evaluation.batch_size"),
    ],
)
def test_out_of_gpu_memory_names_the_stage_and_what_to_change(run_dir, monkeypatch, stage_module, stage_function, command, advice):
    monkeypatch.setattr(stage_module, stage_function, _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    code, output = run_cli(command, str(run_dir))
    assert code == 2 and f"out of GPU memory during {command}" in output and advice in output and "Traceback" not in output


def test_out_of_gpu_memory_in_training_points_at_the_batch(monkeypatch, tmp_path):
    from qtune import training

    monkeypatch.setattr(training, "_train", _raise(RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB")))
    recipe = REPO / "recipes" / "quickstart.yaml"
    code, output = run_cli("train", str(recipe), "--set", f"output.dir={tmp_path / 'run'}")
    assert code == 2 and "out of GPU memory during train" in output and "training.micro_batch_size" in output


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device", "/runs/x/eval/merged.json"),
        RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    ],
)
def test_a_full_disk_is_named(run_dir, monkeypatch, exc):
    monkeypatch.setattr(evaluate, "_evaluate_run", _raise(exc))
    code, output = run_cli("eval", str(run_dir))
    assert code == 2 and "the disk is full during eval" in output and "run the same command again" in output


def test_damaged_checkpoint_files_are_named(tmp_path):
    checkpoint = tiny_model_dir(tmp_path / "tiny", hidden=32, layers=1)
    check_checkpoint(checkpoint)  # intact
    weights = checkpoint / "model.safetensors"
    whole = weights.read_bytes()
    for damaged, problem in [(whole[: len(whole) // 2], "truncated"), (b"GGUF" + whole[4:], "header"), (b"tiny", "shorter than")]:
        weights.write_bytes(damaged)
        with pytest.raises(errors.QtuneError, match=f"model.safetensors is damaged: .*{problem}"):
            check_checkpoint(checkpoint)
    weights.write_bytes(whole)
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "truncated')
    with pytest.raises(errors.QtuneError, match="tokenizer.json is damaged"):
        check_checkpoint(checkpoint)


def test_a_sharded_checkpoint_missing_a_shard_is_named(tmp_path):
    checkpoint = tiny_model_dir(tmp_path / "tiny", hidden=32, layers=1)
    index = {
        "metadata": {},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"},
    }
    shutil.move(checkpoint / "model.safetensors", checkpoint / "model-00001-of-00002.safetensors")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.QtuneError, match="lacks the shard.*model-00002-of-00002.safetensors"):
        check_checkpoint(checkpoint)


def test_a_damaged_merged_model_is_named_when_exporting(tmp_path):
    checkpoint = tiny_model_dir(tmp_path / "tiny", hidden=32, layers=1)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, output = run_cli("export", str(checkpoint), "--format", "gguf", "--quant", "Q8_0")
    assert code == 2 and "model.safetensors is damaged" in output and "Traceback" not in output
