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
    """Where a model's inputs go. A model accelerate offloads keeps its offloaded weights on the meta
    device; its hooks run each module on the GPU of its device map, or on the CPU when it has none."""
    placed = [d for d in getattr(model, "hf_device_map", {}).values() if d not in ("cpu", "disk")]
    if placed:
        return torch.device("cuda", placed[0]) if isinstance(placed[0], int) else torch.device(placed[0])
    device = getattr(model, "device", None) or next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


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
def task_accuracy(model, tokenizer, prompts: Sequence[dict], max_new_tokens: int, batch_size: int = 16, scorer: Scorer = exact_match_scorer) -> TaskResult:
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
            out = model.generate(**enc, max_new_tokens=budget, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, use_cache=True)
            new = out[:, enc["input_ids"].shape[1] :]
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
    """The model's logits for a batch, left on its device."""
    device = _device(model)
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def head_inputs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What the model's head is applied to for a batch ([b, s, hidden], after the final norm), without
    forming any logits; None for a model that only gives logits (llama.cpp)."""
    decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    device = _device(model)
    return decoder()(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).last_hidden_state


def logit_cap(config) -> float | None:
    """The soft cap a model's forward puts on its logits after the head (Gemma 2's ``final_logit_softcapping``)."""
    return getattr(config, "final_logit_softcapping", None) or None


def capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)``, as the model's own forward computes it; the logits unchanged without a cap."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def token_logits(model, batch: dict[str, torch.Tensor]):
    """A batch's logits a chunk of tokens at a time where the model allows it: a callable of flat
    [b*s] positions; otherwise (llama.cpp) the whole [b, s, vocab] tensor."""
    hidden = head_inputs(model, batch)
    if hidden is None:
        return _logits(model, batch)
    head, flat, cap = model.get_output_embeddings(), hidden.flatten(0, 1), logit_cap(model.config)
    return lambda positions: capped(head(flat[positions.to(flat.device)]), cap)


@torch.no_grad()
def perplexity(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8) -> float:
    """exp(mean NLL) over the trainable (label) tokens of the rows."""
    model.eval()
    nll, count = 0.0, 0
    for batch in batches(rows, pad_token_id, batch_size):
        logits = token_logits(model, batch)
        flat = logits.flatten(0, 1) if isinstance(logits, torch.Tensor) else None
        for positions, targets in real_token_chunks(batch):
            labelled = targets != IGNORE_INDEX
            if not labelled.any():
                continue
            chunk = flat[positions.to(flat.device)] if flat is not None else logits(positions)
            log_probs = F.log_softmax(chunk.float(), dim=-1)[labelled.to(chunk.device)]
            nll += F.nll_loss(log_probs, targets[labelled].to(log_probs.device), reduction="sum").item()
            count += int(labelled.sum())
    return math.exp(nll / count) if count else float("nan")


@dataclass
class Divergence:
    mean_kl: float
    top1_agreement: float
    tokens: int
    perplexity: float = float("nan")  # the candidate's, over the label tokens: one forward pass serves both


TOKEN_CHUNK = 512  # tokens whose full-vocabulary log-probabilities are held at once (256 MB each at 128k vocabulary)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """For each position, the label of the next token (IGNORE_INDEX where there is none to predict)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


@dataclass
class DivergenceSum:
    """Running sums for ``Divergence``, fed the logits of the same tokens from a reference and a candidate."""

    kl_sum: float = 0.0
    agree: int = 0
    count: int = 0
    nll: float = 0.0
    labelled: int = 0

    def add(self, reference_logits: torch.Tensor, candidate_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """[tokens, vocab] logits of real tokens from both models, and each token's next-token target."""
        ref = F.log_softmax(reference_logits.float(), dim=-1)
        cand = F.log_softmax(candidate_logits.float(), dim=-1)
        self.kl_sum += F.kl_div(cand, ref, log_target=True, reduction="sum").item()
        self.agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.count += ref.shape[0]
        labelled = targets != IGNORE_INDEX
        if labelled.any():
            self.nll += F.nll_loss(cand[labelled], targets[labelled].to(cand.device), reduction="sum").item()
            self.labelled += int(labelled.sum())

    def result(self) -> Divergence:
        return Divergence(
            mean_kl=self.kl_sum / self.count,
            top1_agreement=self.agree / self.count,
            tokens=self.count,
            perplexity=math.exp(self.nll / self.labelled) if self.labelled else float("nan"),
        )


def real_token_chunks(batch: dict[str, torch.Tensor], chunk: int = TOKEN_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(flat indices into the batch's [b*s] positions, next-token targets) of its real tokens, ``chunk`` at a time."""
    positions = batch["attention_mask"].reshape(-1).nonzero().squeeze(1)
    targets = next_token_targets(batch["labels"]).reshape(-1)[positions]
    for start in range(0, positions.numel(), chunk):
        yield positions[start : start + chunk], targets[start : start + chunk]


@dataclass
class ReferenceOutputs:
    """A reference model's output on held-out batches, kept as the head's inputs (one vector per token)
    plus the head: full-vocabulary logits are formed a chunk of tokens at a time, when compared."""

    head: torch.nn.Module
    hidden: list[torch.Tensor]  # per batch: [b, s, hidden], what the head is applied to
    batches: list[dict[str, torch.Tensor]]
    cap: float | None = None  # the model's soft cap on its logits (logit_cap)

    def logits(self, batch_index: int, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden[batch_index].flatten(0, 1)
        return capped(self.head(hidden[positions.to(hidden.device)].to(self.head.weight.device)), self.cap)


@torch.no_grad()
def model_reference(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8) -> ReferenceOutputs:
    """A loaded model's reference outputs: its head's inputs for each batch (no logits are formed)."""
    model.eval()
    kept = list(batches(rows, pad_token_id, batch_size))
    hidden = [head_inputs(model, batch) for batch in kept]
    if any(h is None for h in hidden):
        raise ValueError(f"{type(model).__name__} gives no head inputs to use as a reference")
    return ReferenceOutputs(model.get_output_embeddings(), hidden, kept, logit_cap(model.config))


@torch.no_grad()
def streamed_outputs(streamed, rows: Sequence[dict], pad_token_id: int, source=None, batch_size: int = 8, on_host: bool = False) -> ReferenceOutputs:
    """A ``blockwise.StreamedModel``'s reference outputs in its dtype, one decoder block at a time, its
    tensors from ``source`` (default: its checkpoint); ``on_host`` keeps the head's inputs in host memory."""
    kept = list(batches(rows, pad_token_id, batch_size))
    hidden = streamed.final_hidden(kept, source)
    if on_host:
        hidden = [h.cpu() for h in hidden]
    return ReferenceOutputs(streamed.output_head(source), hidden, kept, logit_cap(streamed.config))


@torch.no_grad()
def streamed_reference(checkpoint, rows: Sequence[dict], pad_token_id: int, device: torch.device | str, batch_size: int = 8) -> ReferenceOutputs:
    """A checkpoint's reference outputs in float32, computed one decoder block at a time (see blockwise)."""
    from qtune.blockwise import StreamedModel
    from qtune.host_memory import HEAP_THRESHOLD, map_large_allocations

    # host memory for the head's inputs: the GPU is for the artifacts
    reference = streamed_outputs(StreamedModel(checkpoint, device, torch.float32), rows, pad_token_id, batch_size=batch_size, on_host=True)
    map_large_allocations(HEAP_THRESHOLD)  # the artifacts generate next (see map_large_allocations)
    return reference


def divergence_sum(reference: ReferenceOutputs, candidate_logits) -> Divergence:
    """``candidate_logits(batch_index, batch)`` gives a candidate's [b, s, vocab] logits (or a callable
    of the token positions); compared with the reference a chunk of tokens at a time."""
    total = DivergenceSum()
    for index, batch in enumerate(reference.batches):
        logits = candidate_logits(index, batch)
        flat = logits.flatten(0, 1) if isinstance(logits, torch.Tensor) else None
        for positions, targets in real_token_chunks(batch):
            cand = flat[positions.to(flat.device)] if flat is not None else logits(positions)
            total.add(reference.logits(index, positions), cand, targets)
    return total.result()


@torch.no_grad()
def divergence_from(reference: ReferenceOutputs, candidate) -> Divergence:
    """Mean per-token KL(reference || candidate) in nats and top-1 agreement over every real token of the
    reference's batches, and the candidate's perplexity on their label tokens."""
    candidate.eval()
    return divergence_sum(reference, lambda index, batch: token_logits(candidate, batch))


@torch.no_grad()
def divergence(reference, candidate, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8) -> Divergence:
    """``divergence_from`` with a loaded reference model."""
    return divergence_from(model_reference(reference, rows, pad_token_id, batch_size), candidate)
