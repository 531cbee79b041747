"""`qtune run` to the report: every artifact scored through one interface, gates, plots, the W&B run,
and report.html as a real browser renders it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from oracles import chromium, needs, needs_llama_cpp
from qtune.gguf_model import gguf_runtime
from qtune.recipe import load_recipe
from qtune.runtimes import MERGED, RUNTIMES, runtime_support
from support import FULL_RUN_EXPORT_NAMES as EXPORT_NAMES
from support import qtune_cli, tiny_model_dir, wandb_records

CHROMIUM = chromium()


def test_perplexity_from_the_divergence_pass_equals_perplexity(tmp_path: Path):
    """Exports get their perplexity from the KL pass (one forward instead of two): the same number."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.metrics import divergence, perplexity

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "a", hidden=64, seed=1), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "b", hidden=64, seed=2), dtype=torch.float32)
    rows = [
        {"input_ids": ids, "labels": [-100] * 3 + ids[3:], "num_real_tokens": len(ids)}
        for ids in ([5, 17, 300, 41, 9, 77], [8, 1200, 6, 90, 33, 4, 501, 2], [60, 61, 62, 63])
    ]
    both = divergence(a, b, rows, pad_token_id=0, batch_size=2)
    assert both.perplexity == pytest.approx(perplexity(b, rows, pad_token_id=0, batch_size=2), rel=1e-6)
    assert both.mean_kl > 0


def _eval(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "eval" / f"{name}.json").read_text())


def test_run_scores_every_artifact_and_writes_the_report(full_run):
    run_dir, result = full_run
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ["base", "adapter", "merged", *EXPORT_NAMES]:
        scored = _eval(run_dir, name)
        assert scored["status"] == "ok", scored
        for key in ("task_metric", "perplexity", "size_bytes", "bits_per_weight", "generation_tokens_per_second", "runtime"):
            assert scored[key] is not None, (name, key)
        if name != "merged":
            assert scored["kl_vs_merged"] > -1e-6 and 0 <= scored["top1_vs_merged"] <= 1
            _check_tail(scored)
        assert np.isfinite(scored["perplexity"])
    assert _eval(run_dir, "model-Q8_0.gguf")["runtime"] == gguf_runtime()
    # a coarser file is smaller and further from the merged model
    q8, q4 = _eval(run_dir, "model-Q8_0.gguf"), _eval(run_dir, "model-Q4_K_M.gguf")
    assert q4["size_bytes"] < q8["size_bytes"] and q4["kl_vs_merged"] > q8["kl_vs_merged"]
    assert q4["tail_vs_merged"]["all"]["p99_kl"] > q8["tail_vs_merged"]["all"]["p99_kl"]
    # every artifact is measured over the same tokens
    assert len({json.dumps({k: v["tokens"] for k, v in _eval(run_dir, n)["tail_vs_merged"].items()}) for n in ["base", "adapter", *EXPORT_NAMES]}) == 1
    assert 8.4 < q8["bits_per_weight"] < 9.5  # Q8_0 is 8.5 bits per weight; norms stay F32
    report_md = (run_dir / "report.md").read_text()
    for name in ["base", "adapter", "merged", *EXPORT_NAMES]:
        assert f"| {name} |" in report_md and f"| {name} |" in result.stdout
    assert "report/quality_vs_size.png" in report_md
    tail = report_md[report_md.index("## Tail") : report_md.index("## Slices")]
    for name in EXPORT_NAMES:
        assert f"| {name} | all |" in tail and f"| {name} | answers |" in tail
    for plot in ("quality_vs_size.png", "loss.png"):
        assert (run_dir / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_tail(scored: dict) -> None:
    tails = scored["tail_vs_merged"]
    assert set(tails) == {"all", "answers"}
    assert 0 < tails["answers"]["tokens"] < tails["all"]["tokens"]
    assert tails["all"]["mean_kl"] == pytest.approx(scored["kl_vs_merged"])
    for tail in tails.values():
        assert -1e-6 < tail["median_kl"] <= tail["p99_kl"] <= tail["p999_kl"] <= tail["max_kl"]
        assert 0 <= tail["p99_abs_delta_p"] <= 1 and tail["p01_delta_p"] <= tail["p99_delta_p"]
    worst = scored["worst_prompt_vs_merged"]
    assert worst["mean_kl"] >= tails["answers"]["mean_kl"] - 1e-9 and worst["prompt"] and worst["answer"]


def test_the_report_says_where_each_file_runs(full_run):
    """Every export's report and the run's report list the runtimes that load the file, and why one can't."""
    run_dir, result = full_run
    assert result.returncode == 0, result.stderr[-4000:]
    expected = {"merged": runtime_support(MERGED)}
    for target in load_recipe(run_dir / "recipe.resolved.yaml").recipe.export:
        saved = json.loads((run_dir / "exports" / f"{target.default_name()}.report.json").read_text())
        expected[target.default_name()] = runtime_support(target.format, target.bits, target.sym, target.scheme)
        assert saved["runtimes"] == [row.as_dict() for row in expected[target.default_name()]]
    report_md = (run_dir / "report.md").read_text()
    table = report_md[report_md.index("## Where each file runs") :]
    assert table.splitlines()[2] == "| file | " + " | ".join(RUNTIMES) + " |"
    for name, rows in expected.items():
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in line.strip("|").split(" | ")][1:]
        assert [cell.startswith("yes") for cell in cells] == [row.loads for row in rows], line
    assert "no: no GGUF path" in next(line for line in table.splitlines() if line.startswith("| model-Q8_0.gguf |"))
    html_text = (run_dir / "report.html").read_text()
    assert "<table id='runtimes'>" in html_text and "Where each file runs" in html_text


@needs_llama_cpp
def test_gguf_scored_by_llama_cpp_agrees_with_the_dequantized_weights(full_run):
    """llama.cpp's Q8_0 scores and transformers' dequantized Q8_0 weights are two readers of one file."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtune.gguf_model import LlamaCppCausalLM

    run_dir, _ = full_run
    path = run_dir / "exports" / "model-Q8_0.gguf"
    ids = torch.tensor([[1, 520, 1180, 30, 4436, 253, 912, 29, 1300, 12]])
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        want = torch.log_softmax(dense(ids).logits, -1)
    got = torch.log_softmax(LlamaCppCausalLM(path, n_ctx=64, threads=1)(ids).logits, -1)
    kl = (want.exp() * (want - got)).sum(-1).mean().item()
    assert kl < 1e-3, kl


def test_a_rerun_redoes_only_what_is_missing(full_run):
    """Every stage is skipped when its output is complete; a lost export is made and scored again, alone."""
    run_dir, _ = full_run
    kept = {
        p: p.stat().st_mtime_ns
        for p in [
            run_dir / "adapter" / "adapter_model.safetensors",
            run_dir / "merged" / "config.json",
            *(run_dir / "eval").glob("*.json"),
            run_dir / "exports" / "model-Q8_0.gguf",
        ]
    }
    shutil.rmtree(run_dir / "exports" / "gptq-4bit-g32")
    (run_dir / "eval" / "gptq-4bit-g32.json").unlink()
    del kept[run_dir / "eval" / "gptq-4bit-g32.json"]
    result = qtune_cli("run", str(run_dir.parent / "recipe.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert _eval(run_dir, "gptq-4bit-g32")["status"] == "ok" and "gptq written" in result.stderr
    assert "gguf written" not in result.stderr and "merged into" not in result.stderr


def test_gates_fail_the_run_and_name_the_artifact(full_run):
    run_dir, _ = full_run
    recipe_file = run_dir / "recipe.resolved.yaml"
    saved = recipe_file.read_text()
    try:
        q4 = _eval(run_dir, "model-Q4_K_M.gguf")["tail_vs_merged"]["answers"]["p99_kl"]
        assert "max_kl_p99_vs_merged: null" in saved and "tokens: all" in saved
        recipe_file.write_text(saved.replace("max_kl_p99_vs_merged: null", f"max_kl_p99_vs_merged: {q4 * 0.99}").replace("tokens: all", "tokens: answers"))
        result = qtune_cli("report", str(run_dir), "--no-tracking")
        assert result.returncode == 1, result.stderr
        assert f"- model-Q4_K_M.gguf: FAIL (KL p99 over answers {q4:.4g} > {q4 * 0.99})" in result.stdout
        recipe_file.write_text(saved.replace("max_kl_vs_merged: 10.0", "max_kl_vs_merged: 1.0e-12"))
        result = qtune_cli("report", str(run_dir), "--no-tracking")
        assert result.returncode == 1, result.stderr
        assert "- model-Q4_K_M.gguf: FAIL (KL" in result.stdout and "- base: reference" in result.stdout
        assert "- merged: PASS" in result.stdout
        html = (run_dir / "report.html").read_text()
        # every export fails; the adapter's KL to its own merge is rounding noise of either sign, so it
        # fails this gate exactly when the noise came out above 1e-12
        adapter_kl = _eval(run_dir, "adapter")["kl_vs_merged"]
        assert abs(adapter_kl) < 1e-6
        assert html.count("<td class='gate'>FAIL</td>") == len(EXPORT_NAMES) + (adapter_kl > 1e-12)
    finally:
        recipe_file.write_text(saved)
        assert qtune_cli("report", str(run_dir), "--no-tracking").returncode == 0


def test_an_artifact_that_cannot_load_is_reported_not_fatal(full_run):
    run_dir, _ = full_run
    broken = run_dir / "exports" / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    try:
        result = qtune_cli("eval", str(run_dir), "--artifact", "broken.gguf", "--artifact", "model-Q8_0.gguf")
        assert result.returncode == 1 and "could not evaluate broken.gguf" in result.stderr
        assert "Traceback" not in result.stderr
        assert _eval(run_dir, "broken.gguf")["status"] == "failed" and _eval(run_dir, "broken.gguf")["stage"] == "load"
        assert _eval(run_dir, "model-Q8_0.gguf")["status"] == "ok"
        report = qtune_cli("report", str(run_dir), "--no-tracking")
        assert report.returncode == 1
        assert "| broken.gguf | failed to load:" in (run_dir / "report.md").read_text()
        assert "| model-Q8_0.gguf |" in (run_dir / "report.md").read_text()
    finally:
        broken.unlink()
        (run_dir / "eval" / "broken.gguf.json").unlink(missing_ok=True)


@needs_llama_cpp
def test_a_gguf_export_is_scored_with_a_quantized_kv_cache(full_run):
    """`NAME.gguf@kv-TYPE` runs the file in llama.cpp with that KV cache: an extra row that shows what the
    cache costs, placed after its file and not gated; a recipe's kv_cache_types list those rows."""
    from qtune.evaluate import available_artifacts

    run_dir, _ = full_run
    names = ["model-Q8_0.gguf@kv-q4_0", "model-Q8_0.gguf@kv-q8_0-q4_0"]
    assert set(names) <= set(available_artifacts(run_dir, ["q4_0", "q8_0/q4_0"]))
    assert not any("@kv-" in n for n in available_artifacts(run_dir))
    try:
        result = qtune_cli("eval", str(run_dir), *(a for n in names for a in ("--artifact", n)))
        assert result.returncode == 0, result.stderr[-3000:]
        plain = _eval(run_dir, "model-Q8_0.gguf")
        for name, kv in zip(names, ["q4_0", "q8_0/q4_0"]):
            scored = _eval(run_dir, name)
            assert scored["status"] == "ok" and scored["runtime"] == f"llama.cpp, KV cache {kv}, flash attention"
            assert scored["size_bytes"] == plain["size_bytes"]
            # on top of the file's own rounding, a 4-bit cache moves the logits further from the merged model
            assert scored["kl_vs_merged"] > plain["kl_vs_merged"], (name, scored["kl_vs_merged"], plain["kl_vs_merged"])
        report = qtune_cli("report", str(run_dir), "--no-tracking")
        assert report.returncode == 0, report.stderr[-2000:]
        assert "- model-Q8_0.gguf@kv-q4_0: not gated (a KV cache is a runtime setting" in report.stdout
        order = [line.split("|")[1].strip() for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| model-Q8_0.gguf")]
        assert order[:3] == ["model-Q8_0.gguf", *names]
        bad = qtune_cli("eval", str(run_dir), "--artifact", "model-Q8_0.gguf@kv-q3_k")
        assert bad.returncode != 0 and "KV cache type 'q3_k'" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        for name in names:
            (run_dir / "eval" / f"{name}.json").unlink(missing_ok=True)
        qtune_cli("report", str(run_dir), "--no-tracking")


def test_a_merged_model_that_cannot_load_is_reported_and_the_rest_scored(full_run, tmp_path: Path):
    run_dir, _ = full_run
    weights = run_dir / "merged" / "model.safetensors"
    saved = tmp_path / "model.safetensors"
    shutil.copy2(weights, saved)
    before = {n: (run_dir / "eval" / f"{n}.json").read_text() for n in ("merged", "model-Q8_0.gguf")}
    try:
        weights.write_bytes(b"not safetensors")
        result = qtune_cli("eval", str(run_dir), "--artifact", "merged", "--artifact", "model-Q8_0.gguf")
        assert result.returncode == 1 and "could not evaluate merged" in result.stderr and "Traceback" not in result.stderr
        assert _eval(run_dir, "merged")["status"] == "failed"
        q8 = _eval(run_dir, "model-Q8_0.gguf")
        assert q8["status"] == "ok" and q8["kl_vs_merged"] is None and q8["perplexity"] > 1
    finally:
        shutil.copy2(saved, weights)
        for name, text in before.items():
            (run_dir / "eval" / f"{name}.json").write_text(text)


def test_wandb_offline_run_holds_the_report(full_run):
    run_dir, _ = full_run
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [r for f in files for r in wandb_records(f)]
    logged = _history(records)
    assert "report/artifacts" in logged, "no W&B table record"
    table_meta = logged["report/artifacts"]
    assert table_meta["_type"] == "table-file" and table_meta["nrows"] == 3 + len(EXPORT_NAMES)
    table_file = next(run_dir.glob(f"wandb/offline-run-*/files/{table_meta['path']}"))
    table = json.loads(table_file.read_text())
    by_name = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    q8 = _eval(run_dir, "model-Q8_0.gguf")
    assert by_name["model-Q8_0.gguf"]["KL vs merged"] == f"{q8['kl_vs_merged']:.4g}"
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    assert summary["report/model-Q8_0.gguf/kl_vs_merged"] == pytest.approx(q8["kl_vs_merged"])
    assert summary["report/model-Q8_0.gguf/tail/all/p99_kl"] == pytest.approx(q8["tail_vs_merged"]["all"]["p99_kl"])
    assert summary["report/model-Q8_0.gguf/tail/answers/max_kl"] == pytest.approx(q8["tail_vs_merged"]["answers"]["max_kl"])
    assert logged["report/tail"]["_type"] == "table-file" and logged["report/tail"]["nrows"] == 2 * (2 + len(EXPORT_NAMES))
    assert summary["report/passed"] is True
    artifacts = {r.artifact.name: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    assert {"run-adapter", "run-merged", "run-model-Q8_0.gguf", "run-gptq-4bit-g32"} <= set(artifacts)
    assert artifacts["run-model-Q8_0.gguf"].type == "model"
    assert logged["report/quality_vs_size"]["_type"] == "image-file"
    assert logged["report/loss"]["_type"] == "image-file"


def _history(records) -> dict:
    """The last logged value of every history key; a logged object (table, image) arrives field by field."""
    values: dict = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key, *rest = list(item.nested_key) or [item.key]
            if rest:
                values.setdefault(key, {})["/".join(rest)] = json.loads(item.value_json)
            else:
                values[key] = json.loads(item.value_json)
    return values


def _screenshot(html_file: Path, png: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--hide-scrollbars",
    ]
    return subprocess.run([CHROMIUM, *flags, "--window-size=1400,1800", f"--screenshot={png}", html_file.as_uri()], capture_output=True, text=True, timeout=120)


@needs(CHROMIUM, "chromium")
def test_report_html_renders_its_table_and_plots_in_a_browser(full_run, tmp_path: Path):
    from PIL import Image

    run_dir, _ = full_run
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'dom-profile'}",
            "--dump-dom",
            (run_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<tr") >= 1 + 3 + len(EXPORT_NAMES) and "model-Q4_K_M.gguf" in dom.stdout
    png = tmp_path / "report.png"
    shot = _screenshot(run_dir / "report.html", png, tmp_path)
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)

    def area(colour: tuple[int, int, int], tolerance: int = 6) -> int:
        return int((np.abs(pixels - np.array(colour)).max(-1) <= tolerance).sum())

    assert area((0xE8, 0xEE, 0xF6)) > 2000, "the table header is not drawn"
    assert area((0xD8, 0xF0, 0xD8)) > 500, "no pass cell is drawn"
    # matplotlib's markers and curve (#1f77b4) appear only if the embedded PNG plots decoded and drew
    assert area((0x1F, 0x77, 0xB4), tolerance=12) > 300, "the plots are not drawn"
    # the same page without its images has none of that colour: the check above sees the plots, not the table
    bare = tmp_path / "bare.html"
    text = (run_dir / "report.html").read_text()
    bare.write_text(text[: text.index('<div id="plots">')] + "</body></html>")
    bare_png = tmp_path / "bare.png"
    assert _screenshot(bare, bare_png, tmp_path).returncode == 0
    bare_pixels = np.asarray(Image.open(bare_png).convert("RGB")).astype(int)
    assert int((np.abs(bare_pixels - np.array((0x1F, 0x77, 0xB4))).max(-1) <= 12).sum()) == 0


def test_the_readme_python_api_runs_as_written(full_run, tmp_path: Path):
    """The README's "Python API" block, run on a copy of the tiny full run (so training is already done):
    every stage returns its typed result and the report is written."""
    import re

    run_dir, _ = full_run
    copy = tmp_path / "api"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("exports", "eval", "report*"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert 'load_recipe("recipes/quickstart.yaml", ["output.dir=runs/api"])' in code
    code = code.replace('"recipes/quickstart.yaml"', repr(str(run_dir.parent / "recipe.yaml"))).replace('"output.dir=runs/api"', repr(f"output.dir={copy}"))
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    assert names["trained"].run_dir == copy and names["trained"].steps is None  # already trained: nothing to do
    assert names["merged"].folder == copy / "merged" and names["merged"].report.passes
    assert names["exported"].path == copy / "exports" / "model-Q4_K_M.gguf"
    scores = names["scores"]
    assert {"base", "adapter", "merged", "model-Q4_K_M.gguf"} <= set(scores) and all(r.ok for r in scores.values())
    assert (copy / "report.md").is_file() and [row.artifact for row in names["report"].rows][:3] == ["base", "adapter", "merged"]
