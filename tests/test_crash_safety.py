"""Crash anywhere, lose nothing: `qtune run` killed at moments spread over its whole life, a full disk in
each stage, and a native crash in llama.cpp, each leaving only complete files under final names."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oracles import needs_llama_cpp
from support import FULL_RUN_EXPORT_NAMES, full_run_recipe, qtune_cli, write_recipe

ARTIFACTS = ["base", "adapter", "merged", *FULL_RUN_EXPORT_NAMES]
# (what the kill interrupts, the -v log line it waits for, seconds to wait after it). The delays put some
# kills at a stage's start and some inside its writes; wherever they land, the checks must hold.
KILL_POINTS = [
    ("training", r"'loss'", 0.0),
    ("merge", r"stage merge: started", 1.5),
    ("export Q8_0", r"stage export model-Q8_0\.gguf: started", 0.3),
    ("export Q4_K_M", r"stage export model-Q4_K_M\.gguf: started", 2.0),
    ("export GPTQ", r"stage export gptq-4bit-g32: started", 1.0),
    ("export AWQ", r"stage export awq-4bit-g32: started", 3.0),
    ("eval of an export", r"stage eval gptq-4bit-g32: started", 0.5),
    ("report", r"stage report: started", 0.2),
]
SCORES = ("task_metric", "correct", "total", "perplexity", "kl_vs_merged", "top1_vs_merged", "size_bytes", "bits_per_weight")


def _run_until_killed(recipe: Path, pattern: str, delay: float, timeout: float = 900) -> str:
    """Start `qtune -v run`, SIGKILL it `delay` s after a log line matches, and return its output."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "qtune", "-v", "run", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stdout:  # text mode splits tqdm's carriage returns into lines too
            seen.append(line)
            if re.search(pattern, line):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, f"no line matched {pattern!r} in {timeout} s"
        else:
            pytest.fail(f"qtune run ended (exit {proc.wait()}) before a line matched {pattern!r}:\n{''.join(seen[-40:])}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    return "".join(seen)


def _final_files(run_dir: Path) -> list[Path]:
    """Everything under a final name: not staged (hidden), not W&B's own files."""
    return [
        p
        for p in run_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts) and p.relative_to(run_dir).parts[0] != "wandb"
    ]


def _check_complete(path: Path) -> None:
    if path.suffix == ".gguf":
        import gguf

        reader = gguf.GGUFReader(path)  # reads the header; each tensor's data must lie inside the file
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
        assert end <= path.stat().st_size, f"{path} is truncated"
        for tensor in reader.tensors:
            assert tensor.data.size > 0
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    elif path.suffix == ".json":
        json.loads(path.read_text())


def _check_run_dir(run_dir: Path, when: str) -> None:
    for path in _final_files(run_dir):
        try:
            _check_complete(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read back is the finding
            pytest.fail(f"after a kill during {when}: {path.relative_to(run_dir)} is incomplete: {exc}")
    for folder in ("merged", "adapter", *[f"exports/{n}" for n in FULL_RUN_EXPORT_NAMES if not n.endswith(".gguf")]):
        if (run_dir / folder).is_dir():
            assert (run_dir / folder / "config.json").is_file() or (run_dir / folder / "adapter_config.json").is_file(), folder
    report = run_dir / "report.md"
    if report.is_file():  # the report exists only with all its rows
        text = report.read_text()
        assert all(f"| {name} |" in text for name in ARTIFACTS), f"after a kill during {when}: report.md misses rows"


def _scores(run_dir: Path) -> dict[str, dict]:
    return {name: {k: json.loads((run_dir / "eval" / f"{name}.json").read_text()).get(k) for k in SCORES} for name in ARTIFACTS}


@pytest.mark.slow
def test_killed_anywhere_the_next_run_continues_to_the_same_scores(full_run, tmp_path: Path):
    reference_dir, reference = full_run
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    recipe = full_run_recipe(reference_dir.parent, run_dir)
    recipe["tracking"] = {"backend": "none"}  # W&B's own files are W&B's to keep consistent
    recipe_file = write_recipe(tmp_path / "recipe.yaml", recipe)
    for when, pattern, delay in KILL_POINTS:
        _run_until_killed(recipe_file, pattern, delay)
        _check_run_dir(run_dir, when)
    finished = qtune_cli("run", str(recipe_file), timeout=1500)
    assert finished.returncode == 0, finished.stderr[-3000:]
    _check_run_dir(run_dir, "nothing")
    leftovers = [p for p in run_dir.rglob(".*.tmp-*")]
    assert not leftovers, f"staging leftovers of killed processes were not cleaned up: {leftovers}"
    assert _scores(run_dir) == _scores(reference_dir)


# ---------------------------------------------------------------- a full disk


@contextlib.contextmanager
def _small_disk(path: Path, size_mb: int):
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    """Leave no free space on the file system that holds ``folder``."""
    with open(folder / "ballast", "wb", buffering=0) as handle:  # unbuffered: closing must not flush into a full disk
        for size in (1 << 20, 4096, 256):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)


def _digests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file() and p.name != "ballast"}


# (stage, what the run already holds, the command that writes the stage's outputs)
DISK_FULL_STAGES = [
    ("merge", ("adapter",), ("merge",)),
    ("export", ("adapter", "merged", "merge_report.json"), ("export", "--format", "gguf", "--quant", "Q8_0")),
    ("export", ("adapter", "merged", "merge_report.json"), ("export", "--format", "gptq", "--group-size", "32", "--samples", "8", "--seq-len", "128")),
    ("eval", ("adapter", "merged", "merge_report.json", "exports", "eval/base.json"), ("eval", "--artifact", "adapter")),
    ("report", ("adapter", "merged", "merge_report.json", "exports", "eval"), ("report", "--no-tracking")),
]


@pytest.mark.skipif(os.geteuid() != 0, reason="filling a disk needs a tmpfs of its own, which only root can mount")
@pytest.mark.parametrize(("stage", "kept", "command"), DISK_FULL_STAGES, ids=[" ".join(c[:3]) for _, _, c in DISK_FULL_STAGES])
def test_a_full_disk_is_named_and_leaves_earlier_outputs_intact(full_run, tmp_path: Path, stage, kept, command):
    reference_dir, reference = full_run
    assert reference.returncode == 0, reference.stderr[-3000:]
    with _small_disk(tmp_path / "disk", 96) as disk:
        run_dir = disk / "run"
        run_dir.mkdir()
        for name in ("recipe.resolved.yaml", "run.json", "train_log.json", *kept):
            source = reference_dir / name
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, run_dir / name) if source.is_dir() else shutil.copy2(source, run_dir / name)
        before = _digests(run_dir)
        _fill(disk)
        result = qtune_cli(command[0], str(run_dir), *command[1:])
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert "disk is full" in output and f"during {stage}" in output, output[-3000:]
        assert "Traceback" not in output
        (disk / "ballast").unlink()
        after = _digests(run_dir)
        assert {k: after.get(k) for k in before} == before, "an earlier output changed"
        new = sorted(set(after) - set(before))
        for name in new:
            _check_complete(run_dir / name)
        assert not [n for n in new if Path(n).name.startswith(".")], f"staging left behind: {new}"


# ---------------------------------------------------------------- a native crash in llama.cpp

FAKE_LLAMA_CPP = '''
import os, signal

class Llama:
    """Stands in for llama_cpp.Llama and dies like a build whose instructions this CPU lacks."""
    def __init__(self, **kwargs):
        self.metadata = {"tokenizer.ggml.eos_token_id": "2"}
    def n_vocab(self):
        return 49152
    def reset(self):
        pass
    def eval(self, ids):
        os.kill(os.getpid(), signal.SIG%s)
'''


def _crashing_llama_cpp(folder: Path, signal_name: str = "ILL") -> Path:
    (folder / "llama_cpp").mkdir(parents=True)
    (folder / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP % signal_name)
    return folder


@pytest.mark.parametrize("signal_name", ["ILL", "SEGV"])
def test_a_llama_cpp_crash_is_an_exception_naming_the_signal(tmp_path: Path, monkeypatch, signal_name):
    import torch

    from qtune.gguf_model import LlamaCppCausalLM, LlamaCppCrash

    monkeypatch.setenv("PYTHONPATH", str(_crashing_llama_cpp(tmp_path / "fake", signal_name)))
    model = LlamaCppCausalLM(tmp_path / "model.gguf", n_ctx=64, threads=1)
    with pytest.raises(LlamaCppCrash, match=f"SIG{signal_name}"):
        model(torch.tensor([[1, 2, 3]]))
    model.close()


def test_a_llama_cpp_crash_fails_one_row_and_the_rest_are_scored(full_run, tmp_path: Path):
    reference_dir, reference = full_run
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir, ignore=shutil.ignore_patterns("checkpoint-*", "wandb"))
    fake = _crashing_llama_cpp(tmp_path / "fake")
    result = qtune_cli("eval", str(run_dir), "--artifact", "model-Q8_0.gguf", "--artifact", "gptq-4bit-g32", env={"PYTHONPATH": str(fake)})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "could not evaluate model-Q8_0.gguf" in result.stderr
    crashed = json.loads((run_dir / "eval" / "model-Q8_0.gguf.json").read_text())
    assert crashed["status"] == "failed" and "SIGILL" in crashed["error"] and "instruction" in crashed["error"], crashed
    scored = json.loads((run_dir / "eval" / "gptq-4bit-g32.json").read_text())
    assert scored["status"] == "ok" and scored == json.loads((reference_dir / "eval" / "gptq-4bit-g32.json").read_text()) | {
        "eval_seconds": scored["eval_seconds"],
        "generation_tokens_per_second": scored["generation_tokens_per_second"],
    }


@needs_llama_cpp
def test_the_llama_cpp_oracle_is_built_for_instructions_this_cpu_runs():
    """scripts/build_llama_cpp.sh builds without -march=native: a CPU can advertise AMX that its VM never
    enabled, and the first Q8_0 matmul then dies with SIGILL."""
    probe = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    info = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    compiled = set(re.findall(r"(\w+) = 1", info))
    assert not {name for name in compiled if name.startswith(("AVX512", "AMX", "AVX_VNNI"))}, info
    flags = set((Path("/proc/cpuinfo").read_text().split("\nflags")[1].split("\n")[0]).split()) if Path("/proc/cpuinfo").is_file() else set()
    for feature in {"AVX", "AVX2", "F16C", "FMA", "BMI2", "SSSE3"} & compiled:
        assert feature.lower() in flags, f"built with {feature}, which this CPU does not report"
