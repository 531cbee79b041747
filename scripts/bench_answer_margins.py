"""How close each held-out answer of a run's model is to flipping (issue 18, point 1).

Teacher-forced on the validation split, it takes each prompt's smallest probability of a reference
token: an answer whose weakest token sits near 0.5 is one that any small numeric change (a 4-bit export,
another CPU's float rounding) can flip. Prints the weakest prompts and how many fall below 0.5, 0.9 and
0.99.

    .venv/bin/python scripts/bench_answer_margins.py runs/quickstart [--artifact merged]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--artifact", default="merged", help="merged, or a GPTQ/AWQ directory under RUN_DIR/exports")
    parser.add_argument("--show", type=int, default=10)
    args = parser.parse_args()

    import torch

    from qtune import data as qdata
    from qtune import models, rundir
    from qtune.quantized_models import load_quantized_model

    loaded = rundir.load_run_recipe(args.run_dir)
    tokenizer = models.load_tokenizer(args.run_dir / rundir.MERGED_DIR)
    prepared = qdata.prepare_data(loaded.recipe.data, tokenizer, loaded.base_dir, loaded.recipe.training.seed)
    if args.artifact == "merged":
        model = models.load_full_precision(args.run_dir / rundir.MERGED_DIR, loaded.recipe.model, torch.float32)
    else:
        model = load_quantized_model(args.run_dir / rundir.EXPORTS_DIR / args.artifact)
    model.eval()
    weakest = []
    with torch.no_grad():
        for row, prompt in zip(prepared.validation, prepared.eval_prompts):
            labels = torch.tensor(row["labels"][1:])
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
            positions = (labels != qdata.IGNORE_INDEX).nonzero().flatten()
            probabilities = torch.softmax(logits[positions], -1)[torch.arange(len(positions)), labels[positions]]
            i = int(probabilities.argmin())
            weakest.append((float(probabilities[i]), tokenizer.decode([int(labels[positions][i])]), prompt["reference"]))
    weakest.sort()
    print(f"{args.run_dir} ({args.artifact}), {len(weakest)} validation prompts; weakest reference token per prompt:")
    for probability, token, reference in weakest[: args.show]:
        print(f"  p={probability:.3f} {token!r:10} {reference!r}")
    counts = {t: sum(p < t for p, _, _ in weakest) for t in (0.5, 0.9, 0.99)}
    print("| prompts with a token below p = 0.5 | below 0.9 | below 0.99 |\n|---|---|---|")
    print(f"| {counts[0.5]} | {counts[0.9]} | {counts[0.99]} |")


if __name__ == "__main__":
    main()
