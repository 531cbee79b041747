"""The ``qtune`` command: a thin layer over the library. Every user-facing failure exits non-zero
with one clear message instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from qtune import errors
from qtune.cpu import configure_threads
from qtune.errors import QtuneError
from qtune.paths import cache_dir, write_text_atomic
from qtune.quant import CT_SCHEMES
from qtune.secrets import RedactingFilter, redact


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to the recipe YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set training.learning_rate=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    from qtune.recipe import ExportTarget

    parser = argparse.ArgumentParser(prog="qtune", description="QLoRA fine-tuning from one YAML recipe to deployable files.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("validate", help="check a recipe without running anything heavy")
    _recipe_args(p)
    p.add_argument("--print", dest="print_resolved", action="store_true", help="print the fully resolved recipe")
    p.add_argument("--no-memory-plan", action="store_true", help="skip the memory plan (it imports torch)")
    _machine_args(p)

    p = commands.add_parser("train", help="train the recipe's LoRA adapter on the NF4 base")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace whatever the output directory holds")

    p = commands.add_parser("merge", help="merge the trained adapter into a standard HF checkpoint")
    p.add_argument("run_dir", help="a run directory written by qtune train")

    p = commands.add_parser("eval", help="score the run's artifacts (base, adapter, merged, exports) on the held-out data")
    p.add_argument("run_dir", help="a run directory written by qtune train")
    p.add_argument(
        "--artifact",
        action="append",
        help="what to score: base, adapter, merged, or the name of a GGUF file or GPTQ/AWQ directory under "
        "RUN_DIR/exports; a GGUF file with a llama.cpp KV cache as NAME.gguf@kv-q8_0 (or @kv-q8_0-q4_0 for K and V) "
        "(repeatable; default: everything the run has, with the recipe's evaluation.kv_cache_types)",
    )

    p = commands.add_parser("report", help="write report.md and report.html from the run's evaluations, and log them to W&B")
    p.add_argument("run_dir", help="a run directory written by qtune train")
    p.add_argument("--no-tracking", action="store_true", help="write the files only; log nothing to W&B")

    p = commands.add_parser(
        "export",
        help="re-quantize a run's merged model (or any HF checkpoint) to GGUF, GPTQ, AWQ or compressed-tensors, or write a run's adapter as a GGUF LoRA",
    )
    p.add_argument("source", help="a run directory (its merged model is used) or an HF checkpoint directory")
    p.add_argument(
        "--format",
        required=True,
        choices=["gguf", "gptq", "awq", "compressed-tensors", "gguf-lora"],
        help="gguf-lora: the run's LoRA adapter alone, for llama.cpp --lora or Ollama's ADAPTER",
    )
    default = {name: field.default for name, field in ExportTarget.model_fields.items()}  # the one place they are set
    p.add_argument(
        "--quant",
        help=f"GGUF type or mix, e.g. Q4_K_M, IQ4_XS, Q8_0, F16, or auto (each tensor's type chosen on the calibration data "
        f"within --target-bpw or --max-size) (default {default['quant']}; gguf-lora: F16)",
    )
    p.add_argument("--target-bpw", type=float, help="GGUF --quant auto: tensor bits per weight, e.g. 4.5")
    p.add_argument("--max-size", help="GGUF --quant auto: the tensors' size, e.g. 4.2GB (the file adds its metadata and tokenizer)")
    p.add_argument(
        "--tensor-type",
        action="append",
        default=[],
        metavar="PATTERN=TYPE",
        help="GGUF: the type of tensors whose name matches the regex PATTERN, e.g. ffn_down=Q6_K (repeatable, first match wins; as llama-quantize)",
    )
    p.add_argument("--output", help="output file (GGUF) or directory (GPTQ/AWQ); default: RUN_DIR/exports/<name>")
    p.add_argument("--bits", type=int, help=f"GPTQ: 2, 3, 4 or 8; AWQ: 4 (default {default['bits']})")
    p.add_argument("--group-size", type=int, help=f"32, 64, 128, or -1 for one group per row (default {default['group_size']})")
    p.add_argument(
        "--scheme",
        choices=list(CT_SCHEMES),
        help="compressed-tensors: W4A16 (4-bit weights by GPTQ, 16-bit activations; default), W8A8 (SmoothQuant, then int8 "
        "weights by GPTQ and int8 activations per token) or FP8 (E4M3 weights by GPTQ, E4M3 activations per token)",
    )
    p.add_argument(
        "--method",
        choices=["gptq", "awq"],
        help="compressed-tensors W4A16: the grid from GPTQ (default) or from AWQ's scale search and clipping (asymmetric; --awq-rounding applies)",
    )
    p.add_argument("--smoothing", type=float, help="compressed-tensors W8A8/FP8: SmoothQuant's strength α, 0 to 1, 0 for none (default: W8A8 0.5, FP8 0)")
    p.add_argument("--asym", action="store_true", help="GPTQ, compressed-tensors: asymmetric grid (GPTQ writes it as checkpoint_format gptq_v2)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in order of activation size (desc_act)")
    p.add_argument("--damp", type=float, help=f"GPTQ: damping, as a fraction of the mean Hessian diagonal (default {default['damp']})")
    p.add_argument(
        "--awq-rounding",
        choices=["rtn", "gptq"],
        help=f"AWQ grids: round the scaled weights to nearest (rtn, the published method) or with GPTQ's error compensation (default {default['rounding']})",
    )
    p.add_argument(
        "--no-group-aware", action="store_true", help="GPTQ: solve groups in natural order (default: most salient group first, same checkpoint layout)"
    )
    p.add_argument("--calibration", help="calibration text (.txt), jsonl file, saved dataset or datasets id; default: the run's training data")
    p.add_argument("--samples", type=int, help=f"calibration samples (default {default['samples']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per calibration sample (default {default['seq_len']})")
    p.add_argument("--seed", type=int, help=f"which calibration draw (default {default['seed']}); the draw is stratified by the records' category")
    p.add_argument("--no-imatrix", action="store_true", help="GGUF: quantize without an importance matrix (then byte-identical to llama.cpp)")
    p.add_argument(
        "--runtime",
        action="append",
        default=[],
        metavar="NAME",
        help="a runtime the file must load in (repeatable): refuse settings it would refuse (transformers, GPTQModel, vLLM, llama.cpp, Ollama)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    p = commands.add_parser("run", help="train, merge, export, evaluate every artifact and report, in one command (exit 1 when an artifact fails its gates)")
    _recipe_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace whatever the output directory holds")
    p.add_argument("--ignore-memory-plan", action="store_true", help="start even when the memory plan says a stage will not fit this machine")
    _machine_args(p)
    return parser


def _machine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-memory", metavar="SIZE", help="plan for a GPU of this size (e.g. 24GB; 0 for none) instead of this machine's")
    parser.add_argument("--host-memory", metavar="SIZE", help="plan for this much host memory (e.g. 32GB) instead of this machine's")


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("qtune: %(message)s"))
    root = logging.getLogger("qtune")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # bitsandbytes warns on every CPU start that an optional hub kernel is missing; it changes nothing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    for hf_handler in hf_logging.get_logger().handlers if hasattr(hf_logging, "get_logger") else []:
        hf_handler.addFilter(RedactingFilter())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_threads()  # before torch or numba starts its thread pool
    args = build_parser().parse_args(argv)
    try:
        _configure_logging(args.verbose)
        with errors.stage(args.command):
            return _dispatch(args)
    except QtuneError as exc:
        print(f"qtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qtune: interrupted", file=sys.stderr)
        return errors.INTERRUPTED_EXIT
    except Exception as exc:
        known = errors.explain(exc)
        if known is not None:
            print(f"qtune: error: {known}", file=sys.stderr)
            if args.verbose:
                print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
            return known.exit_code
        return _report_internal_error(exc, argv, args.verbose)


def _report_internal_error(exc: BaseException, argv: list[str], verbose: bool) -> int:
    """One line naming the stage and the cause; the traceback goes to a log file (and to stderr with -v)."""
    stage = errors.stage_of(exc) or "qtune"
    text = "".join(traceback.format_exception(exc))
    from qtune.rundir import LOGS_DIR

    run_dir = getattr(exc, "qtune_run_dir", None)
    folder = Path(run_dir) / LOGS_DIR if run_dir is not None and Path(run_dir).is_dir() else cache_dir() / "logs"
    log_file = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        write_text_atomic(log_file, f"qtune {' '.join(argv)}\n{redact(text)}")
        where = f"the traceback is in {log_file}"
    except OSError:
        where, verbose = "the traceback could not be saved, so here it is", True
    cause = redact(errors.first_line(exc))
    print(f"qtune: error: {stage} failed unexpectedly: {type(exc).__name__}{': ' + cause if cause else ''}", file=sys.stderr)
    print(f"qtune: this is a bug in qtune or in a library it uses; {where}", file=sys.stderr)
    if verbose:
        print(redact(text), file=sys.stderr, end="")
    return errors.INTERNAL_ERROR_EXIT


def _dispatch(args: argparse.Namespace) -> int:
    # torch and transformers are imported only by the commands that need them, after the recipe is read:
    # a mistake in the recipe is reported in a fraction of a second
    from qtune.recipe import base_model_type, dump_recipe, load_recipe

    if args.command == "validate":
        from qtune.data import check_local_data

        loaded = load_recipe(args.recipe, args.overrides)
        remote = check_local_data(loaded.recipe.data, loaded.base_dir)
        if args.print_resolved:
            print(dump_recipe(loaded.recipe), end="")
        if remote:
            print(f"qtune: note: {', '.join(remote)} come(s) from the hub; their records are checked when training loads them")
        if loaded.recipe.export and base_model_type(loaded.recipe.model, loaded.base_dir) is None:
            print(
                f"qtune: note: {loaded.recipe.model.base}'s architecture is not known before its download; "
                "train checks that it can be exported before training starts"
            )
        if not args.no_memory_plan:  # to stderr under --print, so the resolved recipe alone can be piped to a file
            _print_memory_plan(loaded, args, sys.stderr if args.print_resolved else sys.stdout)
        print(f"qtune: {args.recipe} is valid")
        return 0
    if args.command == "train":
        from qtune.training import train

        trained = train(load_recipe(args.recipe, args.overrides), resume=args.resume, overwrite=args.overwrite)
        print(f"qtune: adapter saved in {trained.adapter_dir}")
        return 0
    if args.command == "merge":
        from qtune.merge import merge_run

        merged = merge_run(Path(args.run_dir))
        print(f"qtune: merged model saved in {merged.folder}")
        return 0
    if args.command == "eval":
        from qtune.evaluate import evaluate_run

        results = evaluate_run(Path(args.run_dir), args.artifact)
        failed = [name for name, r in results.items() if not r.ok]
        if failed:
            print(f"qtune: error: could not evaluate {', '.join(failed)} (reasons in {Path(args.run_dir) / 'eval'})", file=sys.stderr)
            return 1
        return 0
    if args.command == "report":
        from qtune.report import write_report

        report = write_report(Path(args.run_dir), track=not args.no_tracking)
        print(report.summary())
        return 0 if report.passed else 1
    if args.command == "export":
        from pydantic import ValidationError

        from qtune.exports import export
        from qtune.recipe import ExportTarget

        given = {
            "quant": args.quant,
            "scheme": args.scheme,
            "smoothing": args.smoothing,
            "method": args.method,
            "sym": False if args.asym else None,  # unset: the format's default (AWQ's grid is asymmetric)
            "bits": args.bits,
            "group_size": args.group_size,
            "damp": args.damp,
            "rounding": args.awq_rounding,
            "calibration": _from_cwd(args.calibration),
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seed": args.seed,
            "target_bpw": args.target_bpw,
            "max_size": args.max_size,
            "tensor_types": _tensor_types(args.tensor_type) or None,
        }
        try:  # what is not given takes ExportTarget's default
            target = ExportTarget(
                format=args.format,
                act_order=args.act_order,
                group_aware=not args.no_group_aware,
                imatrix=not args.no_imatrix,
                runtimes=args.runtime,
                **{key: value for key, value in given.items() if value is not None},
            )
        except ValidationError as exc:
            raise QtuneError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())) from None
        exported = export(Path(args.source), target, Path(args.output) if args.output else None, overwrite=args.overwrite)
        print(f"qtune: {args.format} export written to {exported.path}")
        for row in exported.report["runtimes"]:
            print(f"  {row['runtime']:<12} {'loads it' if row['loads'] else 'refuses it'}{': ' + row['note'] if row['note'] else ''}")
        return 0
    if args.command == "run":
        loaded = load_recipe(args.recipe, args.overrides)
        plan = _print_memory_plan(loaded, args)
        if plan is not None and plan.too_big() and not args.ignore_memory_plan:
            raise QtuneError(
                "the memory plan says this run will not finish on this machine: "
                + "; ".join(plan.problems())
                + ". Change that setting, or pass --ignore-memory-plan to start anyway"
            )
        from qtune import pipeline

        report = pipeline.run(loaded, overwrite=args.overwrite)
        print(report.summary())
        failing = [row.artifact for row in report.rows if row.passed is False]
        if failing:
            print(f"qtune: {len(failing)} artifact(s) failed their gates: {', '.join(failing)} (see {report.run_dir / 'report.md'})", file=sys.stderr)
            return 1
        return 0
    raise AssertionError(args.command)


def _print_memory_plan(loaded, args: argparse.Namespace, stream=None):
    from qtune import memory_plan
    from qtune.recipe import parse_size

    try:
        gpu = None if args.gpu_memory is None else (parse_size(args.gpu_memory) if args.gpu_memory.strip() != "0" else 0)
        host = None if args.host_memory is None else parse_size(args.host_memory)
    except ValueError as exc:
        raise QtuneError(f"--gpu-memory/--host-memory: {exc}") from None
    plan = memory_plan.for_recipe(loaded, gpu, host)
    stream = stream or sys.stdout
    if plan is None:
        print(f"qtune: note: {loaded.recipe.model.base}'s config is not on this machine yet; its memory plan is made when training has it", file=stream)
    else:
        print("qtune: " + plan.table().replace("\n", "\nqtune: "), file=stream)
        for problem in plan.problems():
            print(f"qtune: warning: {problem}", file=stream)
    return plan


def _from_cwd(name: str | None) -> str | None:
    """A relative calibration path on the command line means one relative to where the user stands."""
    from qtune.recipe import looks_like_file

    if name is None or not looks_like_file(name, Path.cwd()):
        return name
    return str(Path(name).expanduser().resolve())


if __name__ == "__main__":
    sys.exit(main())


def _tensor_types(given: list[str]) -> dict[str, str]:
    """--tensor-type PATTERN=TYPE options, in order."""
    pairs = {}
    for item in given:
        pattern, sep, qtype = item.rpartition("=")
        if not sep or not pattern or not qtype:
            raise QtuneError(f"--tensor-type {item!r}: write PATTERN=TYPE, e.g. ffn_down=Q6_K")
        pairs[pattern] = qtype
    return pairs
