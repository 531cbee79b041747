"""The ``qtune`` command: a thin layer over the library. Every user-facing failure exits non-zero
with one clear message instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from qtune.errors import QtuneError
from qtune.secrets import RedactingFilter


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to the recipe YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set training.learning_rate=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtune", description="QLoRA fine-tuning from one YAML recipe to deployable files.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("validate", help="check a recipe without running anything heavy")
    _recipe_args(p)
    p.add_argument("--print", dest="print_resolved", action="store_true", help="print the fully resolved recipe")

    p = commands.add_parser("train", help="train the recipe's LoRA adapter on the NF4 base")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace whatever the output directory holds")

    p = commands.add_parser("merge", help="merge the trained adapter into a standard HF checkpoint")
    p.add_argument("run_dir", help="a run directory written by qtune train")

    p = commands.add_parser("eval", help="score the base, adapter or merged model on the held-out data")
    p.add_argument("run_dir", help="a run directory written by qtune train")
    p.add_argument("--artifact", action="append",
                   help="what to score: base, adapter, merged, or an export directory name under RUN_DIR/exports "
                        "(repeatable; default: everything the run has)")

    p = commands.add_parser("export", help="re-quantize a run's merged model (or any HF checkpoint) to GGUF, GPTQ or AWQ")
    p.add_argument("source", help="a run directory (its merged model is used) or an HF checkpoint directory")
    p.add_argument("--format", required=True, choices=["gguf", "gptq", "awq"])
    p.add_argument("--quant", default="Q4_K_M", help="GGUF type or mix, e.g. Q4_K_M, Q5_K_M, Q8_0, F16 (default Q4_K_M)")
    p.add_argument("--output", help="output file (GGUF) or directory (GPTQ/AWQ); default: RUN_DIR/exports/<name>")
    p.add_argument("--bits", type=int, default=4, help="GPTQ: 2, 3, 4 or 8; AWQ: 4 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, or -1 for one group per row (default 128)")
    p.add_argument("--asym", action="store_true", help="GPTQ: asymmetric grid (written as checkpoint_format gptq_v2)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in order of activation size (desc_act)")
    p.add_argument("--calibration", help="calibration text (.txt), jsonl file, saved dataset or datasets id; default: the run's training data")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--no-imatrix", action="store_true", help="GGUF: quantize without an importance matrix (then byte-identical to llama.cpp)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    p = commands.add_parser("run", help="train, evaluate, merge and evaluate again, in one command")
    _recipe_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace whatever the output directory holds")
    return parser


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
    args = build_parser().parse_args(argv)
    try:
        _configure_logging(args.verbose)
        return _dispatch(args)
    except QtuneError as exc:
        print(f"qtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qtune: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qtune import pipeline
    from qtune.recipe import dump_recipe, load_recipe

    if args.command == "validate":
        loaded = load_recipe(args.recipe, args.overrides)
        if args.print_resolved:
            print(dump_recipe(loaded.recipe), end="")
        print(f"qtune: {args.recipe} is valid")
        return 0
    if args.command == "train":
        from qtune.train import train

        run_dir = train(load_recipe(args.recipe, args.overrides), resume=args.resume, overwrite=args.overwrite)
        print(f"qtune: adapter saved in {run_dir / 'adapter'}")
        return 0
    if args.command == "merge":
        result = pipeline.merge_run(Path(args.run_dir))
        print(f"qtune: merged model saved in {result}")
        return 0
    if args.command == "eval":
        pipeline.evaluate_run(Path(args.run_dir), args.artifact)
        return 0
    if args.command == "export":
        from pydantic import ValidationError

        from qtune.exports import export
        from qtune.recipe import ExportTarget

        try:
            target = ExportTarget(
                format=args.format, quant=args.quant, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                act_order=args.act_order, calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                imatrix=not args.no_imatrix,
            )
        except ValidationError as exc:
            raise QtuneError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())) from None
        out = export(Path(args.source), target, Path(args.output) if args.output else None, overwrite=args.overwrite)
        print(f"qtune: {args.format} export written to {out}")
        return 0
    if args.command == "run":
        return pipeline.run(load_recipe(args.recipe, args.overrides), overwrite=args.overwrite)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
