"""The run report: one row per artifact (what it costs on disk, what it costs in quality), gates from the
recipe, a quality-against-size plot and the training loss curve, as report.md and report.html."""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from qtune import rundir
from qtune.errors import QtuneError, stage
from qtune.evaluate import EvalResult, gate_failures, read_results, split_kv_cache_artifact
from qtune.paths import atomic_file, write_text_atomic
from qtune.recipe import GateSection, Recipe
from qtune.runtimes import MERGED, RUNTIMES, runtime_support

log = logging.getLogger(__name__)

FIXED_ORDER = ("base", "adapter", "merged")


@dataclass
class Row:
    artifact: str
    result: EvalResult
    passed: bool | None = None  # None: not gated (the base model is the starting point, not a deliverable)
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result.ok

    def get(self, key: str):
        return getattr(self.result, key, None)

    @property
    def kind(self) -> str:
        if self.artifact in FIXED_ORDER:
            return self.artifact
        return "gguf" if self.artifact.endswith(".gguf") else self.artifact.split("-", 1)[0]

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "info" if split_kv_cache_artifact(self.artifact)[1] else "reference"
        return "pass" if self.passed else "FAIL"


@dataclass
class Report:
    run_dir: Path
    recipe: Recipe
    rows: list[Row]
    merge: dict | None
    losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    last_step: int  # the last training step on record; later logging to the same W&B run starts after it

    @property
    def metric(self) -> str:
        return self.recipe.evaluation.scorer

    @property
    def gates(self) -> GateSection:
        return self.recipe.evaluation.gates

    @property
    def _over(self) -> str:
        """The main table's KL columns read the token set the gates read, named unless it is all tokens."""
        return "" if self.gates.tokens == "all" else f" ({self.gates.tokens})"

    @property
    def passed(self) -> bool:
        return all(row.passed is not False for row in self.rows)

    def table(self) -> tuple[list[str], list[list[str]]]:
        columns = [
            "artifact",
            self.metric,
            "Δ vs merged (points)",
            "perplexity",
            *(f"{name}{self._over}" for name in ("KL vs merged", "KL p99", "|Δp| p99")),
            "top-1 vs merged",
            "size (MB)",
            "bits/weight",
            "gen tokens/s",
            "runtime",
            "gate",
        ]
        merged = self._merged_metric()
        body = []
        for row in self.rows:
            if not row.ok:
                error = f"failed to {row.get('stage')}: {row.get('error')}"
                body.append([row.artifact, error] + ["–"] * (len(columns) - 3) + [row.verdict])
                continue
            metric = row.get("task_metric")
            body.append(
                [
                    row.artifact,
                    f"{100 * metric:.1f}% ({row.get('correct')}/{row.get('total')})",
                    "–" if merged is None or row.artifact == "merged" else f"{100 * (metric - merged):+.1f}",
                    _num(row.get("perplexity"), ".4f"),
                    _num(row.result.vs_merged("mean_kl", self.gates.tokens), ".4g"),
                    _num(row.result.vs_merged("p99_kl", self.gates.tokens), ".4g"),
                    _pct(row.result.vs_merged("p99_abs_delta_p", self.gates.tokens)),
                    _num(row.get("top1_vs_merged"), ".3f"),
                    _num(row.get("size_bytes") and row.get("size_bytes") / 1e6, ".1f"),
                    _num(row.get("bits_per_weight"), ".2f"),
                    _num(row.get("generation_tokens_per_second"), ".1f"),
                    row.get("runtime") or "–",
                    row.verdict,
                ]
            )
        return columns, body

    def runtimes_table(self) -> tuple[list[str], list[list[str]]]:
        """Where each deployable file of the run loads: the merged checkpoint and every export on disk."""
        targets = {t.default_name(): t for t in self.recipe.export}
        body = []
        for row in self.rows:
            if row.artifact == "merged":
                support = [s.as_dict() for s in runtime_support(MERGED)]
            elif isinstance(saved := _read_json(self.run_dir / "exports" / f"{row.artifact}.report.json"), dict) and "runtimes" in saved:
                support = saved["runtimes"]
            elif (target := targets.get(row.artifact)) is not None:
                support = [s.as_dict() for s in runtime_support(target.format, target.bits, target.sym, target.scheme)]
            else:
                continue  # the base and the adapter are not deployable files
            cells = {s["runtime"]: ("yes" if s["loads"] else "no") + (f": {s['note']}" if s["note"] else "") for s in support}
            body.append([row.artifact, *(cells.get(name, "–") for name in RUNTIMES)])
        return ["file", *RUNTIMES], body

    def tail_table(self) -> tuple[list[str], list[list[str]]]:
        """Per-token KL and Δp against the merged model, over every token and over the answers alone."""
        columns = ["artifact", "tokens", "count", "mean KL", "median", "p99", "p99.9", "max", "Δp RMS", "|Δp| p99", "Δp p1", "Δp p99", "same top-1"]
        body = []
        for row in self.rows:
            for name, tail in (row.get("tail_vs_merged") or {}).items():
                body.append(
                    [
                        row.artifact,
                        name,
                        _num(tail.get("tokens"), "d"),
                        *(_num(tail.get(k), ".4g") for k in ("mean_kl", "median_kl", "p99_kl", "p999_kl", "max_kl")),
                        *(_pct(tail.get(k), 2) for k in ("rms_delta_p", "p99_abs_delta_p", "p01_delta_p", "p99_delta_p")),
                        _pct(tail.get("top1_agreement")),
                    ]
                )
        return columns, body

    def worst_table(self) -> tuple[list[str], list[list[str]]]:
        """Where each artifact loses most: the category and the held-out prompt with the highest mean KL over
        their answer tokens, and the category whose task metric falls furthest below the merged model's."""
        merged = next((r for r in self.rows if r.artifact == "merged" and r.ok), None)
        merged_slices = (merged.get("by_category") or {}) if merged else {}
        body = []
        for row in self.rows:
            prompt = row.get("worst_prompt_vs_merged")
            if not row.ok or prompt is None:
                continue
            category = row.get("worst_category_vs_merged")
            drops = {k: 100 * (merged_slices[k] - v) for k, v in (row.get("by_category") or {}).items() if k in merged_slices}
            task = max(drops.items(), key=lambda item: item[1]) if len(drops) > 1 else None
            body.append(
                [
                    row.artifact,
                    f"{category[0]}: {category[1]:.4g}" if category else "–",
                    ("none below merged" if task[1] <= 0 else f"{task[0]}: {task[1]:+.1f}") if task else "–",
                    f"{prompt['mean_kl']:.4g}",
                    _clip(prompt["prompt"], 80) + " ⟶ " + _clip(prompt["answer"], 40, end=False),
                ]
            )
        return ["artifact", "worst category (mean KL)", f"worst category ({self.metric} points below merged)", "worst prompt (mean KL)", "its text"], body

    def _merged_metric(self) -> float | None:
        merged = next((r for r in self.rows if r.artifact == "merged" and r.ok), None)
        return merged.get("task_metric") if merged else None

    def gate_lines(self) -> list[str]:
        lines = []
        for row in self.rows:
            if row.passed is None and row.verdict == "info":
                lines.append(f"- {row.artifact}: not gated (a KV cache is a runtime setting; scored to show its cost)")
            elif row.passed is None:
                lines.append(f"- {row.artifact}: reference (not gated)")
            else:
                lines.append(f"- {row.artifact}: {'PASS' if row.passed else 'FAIL'}" + (f" ({'; '.join(row.reasons)})" if row.reasons else ""))
        return lines

    def summary(self) -> str:
        columns, body = self.table()
        lines = ["", _md_table(columns, body), ""]
        lines += self.gate_lines()
        lines.append(f"\nreport: {self.run_dir / 'report.html'}")
        return "\n".join(lines)


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _md_table(columns: list[str], body: list[list[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(escape(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(run_dir: Path) -> Report:
    """Everything the run has on record: evaluations, the merge report, the training log."""
    run_dir = Path(run_dir).resolve()
    recipe = rundir.load_run_recipe(run_dir).recipe
    results = read_results(run_dir)
    export_order = [t.default_name() for t in recipe.export]
    by_file: dict[str, list[str]] = {}
    for name in sorted(results):  # a file's KV-cache rows follow it
        by_file.setdefault(split_kv_cache_artifact(name)[0], []).append(name)
    order = [n for n in FIXED_ORDER if n in results]
    order += [n for file in export_order for n in by_file.get(file, [])]
    order += sorted(n for n in results if n not in order)
    history = _read_json(run_dir / "train_log.json") or []
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    last_step = max((h.get("step", 0) for h in history), default=0)
    report = Report(run_dir, recipe, [Row(n, results[n]) for n in order], _read_json(run_dir / rundir.MERGE_REPORT), losses, eval_losses, last_step)
    apply_gates(report)
    return report


def apply_gates(report: Report) -> None:
    merged = report._merged_metric()
    for row in report.rows:
        row.reasons = gate_failures(row.result, report.gates, report.metric, merged, report.merge)
        row.passed = None if row.reasons is None else not row.reasons
        row.reasons = row.reasons or []


def _plot_quality_vs_size(report: Report, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.ok and r.get("size_bytes")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    tail_labelled = False
    for row in rows:
        size = row.get("size_bytes") / 1e6
        colour = "#1f77b4" if row.passed is not False else "#d62728"
        left.scatter(size, 100 * row.get("task_metric"), color=colour, s=46, zorder=3)
        left.annotate(row.artifact, (size, 100 * row.get("task_metric")), textcoords="offset points", xytext=(5, 4), fontsize=8)
        mean, p99 = row.result.vs_merged("mean_kl", report.gates.tokens), row.result.vs_merged("p99_kl", report.gates.tokens)
        if mean:
            if p99:  # the tail above its mean, on one vertical line per artifact
                right.plot([size, size], [mean, p99], color=colour, linewidth=1, alpha=0.6, zorder=2)
                right.scatter(size, p99, color=colour, marker="^", s=40, zorder=3, label=None if tail_labelled else "p99 per-token KL")
                tail_labelled = True
            right.scatter(size, mean, color=colour, s=46, zorder=3)
            right.annotate(row.artifact, (size, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    sizes = [r.get("size_bytes") for r in rows]
    xscale = "log" if sizes and max(sizes) > 20 * min(sizes) else "linear"  # log ticks crowd over a small range
    left.set(xlabel="size (MB)", ylabel=f"{report.metric} (%)", title="task metric against size", xscale=xscale)
    right.set(
        xlabel="size (MB)",
        ylabel=f"KL vs merged (nats/token, {report.gates.tokens} tokens)",
        title="divergence from the merged model: mean (●) and p99 (▲)",
        xscale=xscale,
    )
    for limit, style, label in ((report.gates.max_kl_vs_merged, "--", "mean KL gate"), (report.gates.max_kl_p99_vs_merged, ":", "p99 KL gate")):
        if limit:
            right.axhline(limit, color="#d62728", linestyle=style, linewidth=1, label=label)
    if right.get_legend_handles_labels()[0]:
        right.legend(loc="best", fontsize=8)
    if any(r.result.vs_merged("mean_kl", report.gates.tokens) for r in rows):
        right.set_yscale("log")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _plot_loss(report: Report, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 3.8))
    if report.losses:
        axis.plot(*zip(*report.losses), color="#1f77b4", marker=".", label="training loss")
    if report.eval_losses:
        axis.plot(*zip(*report.eval_losses), color="#ff7f0e", marker="o", label="validation loss")
    axis.set(xlabel="step", ylabel="loss", title="training")
    axis.grid(True, alpha=0.3)
    if report.losses or report.eval_losses:
        axis.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def _slices(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per-slice task metric tables (title, slice names, one row per artifact); a single slice says nothing new."""
    tables = []
    kl = lambda value: _num(value, ".4g")  # noqa: E731
    for key, title, cell in (
        ("by_category", f"{report.metric} by category", _pct),
        ("by_length", f"{report.metric} by reference length", _pct),
        ("kl_by_category_vs_merged", "mean KL vs merged by category (answer tokens)", kl),
    ):
        names = sorted({s for r in report.rows if r.ok for s in (r.get(key) or {})})
        if len(names) > 1:
            body = [[r.artifact] + [cell((r.get(key) or {}).get(s)) for s in names] for r in report.rows if r.ok and r.get(key)]
            tables.append((title, names, body))
    return tables


def _html_table(columns: list[str], body: list[list[str]], attributes: str) -> str:
    cell = lambda tag, text: f"<{tag}>{html.escape(text)}</{tag}>"  # noqa: E731
    return (
        f"<table {attributes}><tr>{''.join(cell('th', c) for c in columns)}</tr>"
        + "".join(f"<tr>{''.join(cell('td', c) for c in cells)}</tr>" for cells in body)
        + "</table>"
    )


def _slices_html(report: Report) -> str:
    return "\n".join(f"<h3>{html.escape(title)}</h3>" + _html_table(["artifact", *names], body, "class='slices'") for title, names, body in _slices(report))


def _slices_md(report: Report) -> str:
    return "\n\n".join(f"### {title}\n\n" + _md_table(["artifact", *names], body) for title, names, body in _slices(report))


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _clip(text: str, width: int, end: bool = True) -> str:
    """``width`` characters of one line of ``text``: its end (or its start, ``end=False``)."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    return "…" + flat[-width:] if end else flat[:width] + "…"


TAIL_NOTE = (
    "Per-token KL (nats) and Δp (the change in the probability of the text's next token) against the merged model, "
    "over the same held-out tokens for every artifact: all tokens (prompts and answers) and the answer tokens alone "
    "(the recipe's evaluation.gates.tokens says which the gates read). Worst category and prompt: the highest mean KL "
    "over their answer tokens."
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #e8eef6; }
td:first-child, th:first-child { text-align: left; }
tr.pass td.gate { background: #d8f0d8; }
tr.FAIL td.gate { background: #f6d0d0; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""


def _html(report: Report, images: dict[str, bytes]) -> str:
    columns, body = report.table()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = "".join(
        f"<tr class='{html.escape(cells[-1])}'>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in cells[:-1])
        + f"<td class='gate'>{html.escape(cells[-1])}</td></tr>"
        for cells in body
    )
    gates = "".join(f"<li>{html.escape(line[2:])}</li>" for line in report.gate_lines())
    plots = "".join(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>" for name, data in images.items())
    merge = ""
    if report.merge:
        kl = ", ".join(f"{k} {v:.3g}" for k, v in report.merge["kl"].items())
        chosen, dtype = html.escape(report.merge["chosen"]), html.escape(report.merge["dtype"])
        merge = f"<p>Merge base: <b>{chosen}</b> ({dtype}); KL to the adapter model, nats/token: {html.escape(kl)}</p>"
    verdict = "every artifact passes its gates" if report.passed else "some artifacts FAIL their gates"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qtune report: {html.escape(report.run_dir.name)}</title>
<style>{CSS}</style></head>
<body>
<h1>qtune report: {html.escape(report.run_dir.name)}</h1>
<p id="verdict">{verdict}.</p>
<table id="artifacts"><tr>{head}</tr>{rows}</table>
<h2>Gates</h2><ul>{gates}</ul>
{merge}
<h2>Plots</h2>
<div id="plots">{plots}</div>
<h2>Tail</h2>
<p>{html.escape(TAIL_NOTE)}</p>
{_html_table(*report.tail_table(), "id='tail'")}
{_html_table(*report.worst_table(), "id='worst'")}
<h2>Slices</h2>
{_slices_html(report)}
<h2>Where each file runs</h2>
{_html_table(*report.runtimes_table(), "id='runtimes'")}
</body></html>
"""


def _markdown(report: Report) -> str:
    columns, body = report.table()
    merge = ""
    if report.merge:
        kl = ", ".join(f"{k} {v:.3g}" for k, v in report.merge["kl"].items())
        merge = f"Merge base: **{report.merge['chosen']}** ({report.merge['dtype']}); KL to the adapter model, nats/token: {kl}\n\n"
    plots = "\n".join(f"![{name}](report/{name})" for name in rundir.REPORT_PLOTS)
    sections = [
        f"# qtune report: {report.run_dir.name}\n\n{_md_table(columns, body)}",
        "## Gates\n\n" + "\n".join(report.gate_lines()) + (f"\n\n{merge.rstrip()}" if merge else ""),
        f"## Plots\n\n{plots}",
        f"## Tail\n\n{TAIL_NOTE}\n\n{_md_table(*report.tail_table())}\n\n{_md_table(*report.worst_table())}",
        f"## Slices\n\n{_slices_md(report)}",
        f"## Where each file runs\n\n{_md_table(*report.runtimes_table())}",
    ]
    return "\n\n".join(sections) + "\n"


def write_report(run_dir: Path, track: bool = True) -> Report:
    """report.md, report.html and report/*.png in the run directory, and the same table in W&B."""
    with stage("report", Path(run_dir).resolve()):
        rundir.remove_staging(Path(run_dir).resolve())
        return _write_report(run_dir, track)


def _write_report(run_dir: Path, track: bool) -> Report:
    report = collect(run_dir)
    if not report.rows:
        raise QtuneError(f"{report.run_dir} has no evaluations yet; run qtune eval first")
    folder = report.run_dir / "report"
    _plot_quality_vs_size(report, folder / rundir.REPORT_PLOTS[0])
    _plot_loss(report, folder / rundir.REPORT_PLOTS[1])
    images = {name: (folder / name).read_bytes() for name in rundir.REPORT_PLOTS}
    write_text_atomic(report.run_dir / "report.md", _markdown(report))
    write_text_atomic(report.run_dir / "report.html", _html(report, images))
    if track:
        from qtune.tracking import log_report

        try:
            log_report(report)
        except Exception as exc:  # the report files are written; a tracking outage must not fail the run
            log.warning("logging the report to W&B failed (%s); report.md and report.html are complete", exc)
    return report
