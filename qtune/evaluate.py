"""Scoring a model on the held-out data: the task metric (with a per-slice breakdown), perplexity, and
per-token KL divergence and top-1 agreement against a reference model."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from qtune.cpu import fit_threads
from qtune.data import IGNORE_INDEX, Collator
from qtune.scorers import Scorer
from qtune.scorers import exact_match as exact_match_scorer


@dataclass
class TaskResult:
    accuracy: float
    correct: int
    total: int
    by_category: dict[str, float] = field(default_factory=dict)
    by_length: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    tokens_per_second: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


def _length_bucket(n_tokens: int) -> str:
    upper = 16
    while n_tokens > upper:
        upper *= 2
    return f"<={upper} tokens"


@torch.no_grad()
def task_accuracy(model, tokenizer, prompts: Sequence[dict], max_new_tokens: int, batch_size: int = 16,
                  scorer: Scorer = exact_match_scorer) -> TaskResult:
    """Greedy generation for each prompt, judged against its reference by ``scorer`` (default: equal
    after trimming whitespace).

    The generation budget is the longest reference plus a margin (capped by ``max_new_tokens``): an
    answer that runs past it cannot equal any reference, so for exact match the result is the same as
    with a larger budget.
    """
    model.eval()
    device = _device(model)
    ref_lengths = [len(tokenizer(p["reference"], add_special_tokens=False)["input_ids"]) for p in prompts]
    budget = min(max_new_tokens, max(ref_lengths, default=1) + 4)
    stops = stop_token_ids(model, tokenizer)
    not_text = torch.tensor(stops + [tokenizer.pad_token_id])
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct, generated_tokens, samples = 0, 0, []
    by_cat, by_len = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    started = time.perf_counter()
    try:
        for start in range(0, len(prompts), batch_size):
            fit_threads()
            chunk = prompts[start : start + batch_size]
            enc = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=budget, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, (p, tokens) in enumerate(zip(chunk, new)):
                keep = tokens[~torch.isin(tokens, not_text.to(tokens.device))]
                generated_tokens += int(keep.numel())
                answer = tokenizer.decode(keep, skip_special_tokens=True).strip()
                hit = bool(scorer(answer, p["reference"]))
                correct += hit
                for table, key in ((by_cat, p.get("category") or "all"), (by_len, _length_bucket(ref_lengths[start + i]))):
                    table[key][0] += hit
                    table[key][1] += 1
                if len(samples) < 8 or not hit and len(samples) < 16:
                    samples.append({"prompt": p["prompt"][-200:], "reference": p["reference"], "answer": answer, "correct": hit})
    finally:
        tokenizer.padding_side = side
    elapsed = time.perf_counter() - started
    total = len(prompts)
    return TaskResult(
        accuracy=correct / total if total else float("nan"),
        correct=correct,
        total=total,
        by_category={k: v[0] / v[1] for k, v in sorted(by_cat.items())},
        by_length={k: v[0] / v[1] for k, v in sorted(by_len.items())},
        samples=samples,
        tokens_per_second=round(generated_tokens / elapsed, 2) if elapsed else 0.0,
    )


def batches(rows: Sequence[dict], pad_token_id: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    collate = Collator(pad_token_id)
    for start in range(0, len(rows), batch_size):
        fit_threads()
        batch = collate(list(rows[start : start + batch_size]))
        batch.pop("num_real_tokens")
        yield batch


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = _device(model)
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()


def _label_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over the label tokens, and their count."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.item(), int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def perplexity(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8) -> float:
    """exp(mean NLL) over the trainable (label) tokens of the rows."""
    model.eval()
    nll, count = 0.0, 0
    for batch in batches(rows, pad_token_id, batch_size):
        batch_nll, batch_count = _label_nll(_logits(model, batch), batch["labels"])
        nll, count = nll + batch_nll, count + batch_count
    return math.exp(nll / count) if count else float("nan")


@dataclass
class Divergence:
    mean_kl: float
    top1_agreement: float
    tokens: int
    perplexity: float = float("nan")  # the candidate's, over the label tokens: one forward pass serves both


@torch.no_grad()
def divergence(reference, candidate, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8) -> Divergence:
    """Mean per-token KL(reference || candidate) in nats and top-1 agreement, over every real token,
    and the candidate's perplexity on the label tokens."""
    reference.eval(), candidate.eval()
    kl_sum, agree, count, nll, labelled = 0.0, 0, 0, 0.0, 0
    for batch in batches(rows, pad_token_id, batch_size):
        mask = batch["attention_mask"].bool()
        candidate_logits = _logits(candidate, batch)
        batch_nll, batch_labelled = _label_nll(candidate_logits, batch["labels"])
        nll, labelled = nll + batch_nll, labelled + batch_labelled
        ref = F.log_softmax(_logits(reference, batch), dim=-1)[mask]
        cand = F.log_softmax(candidate_logits, dim=-1)[mask]
        kl_sum += F.kl_div(cand, ref, log_target=True, reduction="sum").item()
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += int(mask.sum())
    return Divergence(mean_kl=kl_sum / count, top1_agreement=agree / count, tokens=count,
                      perplexity=math.exp(nll / labelled) if labelled else float("nan"))
