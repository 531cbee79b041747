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
    p.add_argument("--artifact", action="append", choices=["base", "adapter", "merged"],
                   help="what to score (repeatable; default: everything the run has)")

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
    if args.command == "run":
        return pipeline.run(load_recipe(args.recipe, args.overrides), overwrite=args.overwrite)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
