"""Scoring a model on the held-out data: the task metric (with a per-slice breakdown), perplexity, and
per-token KL divergence and top-1 agreement against a reference model."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
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


def chunk_logits(logits: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """The logits of flat [b*s] ``positions`` from ``token_logits``' answer (a [b, s, vocab] tensor or a callable)."""
    if isinstance(logits, torch.Tensor):
        flat = logits.flatten(0, 1)
        return flat[positions.to(flat.device)]
    return logits(positions)


@torch.no_grad()
def perplexity(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8) -> float:
    """exp(mean NLL) over the trainable (label) tokens of the rows."""
    model.eval()
    nll, count = 0.0, 0
    for batch in batches(rows, pad_token_id, batch_size):
        logits = token_logits(model, batch)
        for chunk in real_token_chunks(batch):
            labelled = chunk.targets != IGNORE_INDEX
            if not labelled.any():
                continue
            part = chunk_logits(logits, chunk.positions)
            log_probs = F.log_softmax(part.float(), dim=-1)[labelled.to(part.device)]
            nll += F.nll_loss(log_probs, chunk.targets[labelled].to(log_probs.device), reduction="sum").item()
            count += int(labelled.sum())
    return math.exp(nll / count) if count else float("nan")


TAIL_QUANTILES = {"median": 0.5, "p99": 0.99, "p99.9": 0.999}
TOKEN_SETS = ("all", "answers")  # every real token; the tokens that predict a label (the answers)


@dataclass
class TokenTail:
    """Per-token statistics of a candidate against a reference over one set of tokens: KL(reference ||
    candidate) in nats, and Δp, the candidate's probability of the text's next token minus the
    reference's (over the tokens that have a next token)."""

    tokens: int
    mean_kl: float
    median_kl: float
    p99_kl: float
    p999_kl: float
    max_kl: float
    rms_delta_p: float
    p99_abs_delta_p: float  # 99th percentile of |Δp|
    p01_delta_p: float  # signed 1st and 99th percentiles, as llama.cpp's KLD table gives them
    p99_delta_p: float
    top1_agreement: float

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of a 1-D tensor, interpolated linearly between order statistics (numpy's
    default); NaN for an empty tensor. torch.quantile refuses more than 2**24 values."""
    if not values.numel():
        return float("nan")
    ordered = values.double().sort().values
    position = q * (ordered.numel() - 1)
    low = int(math.floor(position))
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def token_tail(kl: torch.Tensor, delta_p: torch.Tensor, agree: torch.Tensor) -> TokenTail:
    """``kl`` and ``agree`` per token; ``delta_p`` per token, NaN where the text has no next token."""
    known = delta_p[~delta_p.isnan()].double()
    empty = not kl.numel()
    return TokenTail(
        tokens=int(kl.numel()),
        mean_kl=float("nan") if empty else float(kl.double().mean()),
        median_kl=quantile(kl, TAIL_QUANTILES["median"]),
        p99_kl=quantile(kl, TAIL_QUANTILES["p99"]),
        p999_kl=quantile(kl, TAIL_QUANTILES["p99.9"]),
        max_kl=float("nan") if empty else float(kl.max()),
        rms_delta_p=float(known.square().mean().sqrt()) if known.numel() else float("nan"),
        p99_abs_delta_p=quantile(known.abs(), 0.99),
        p01_delta_p=quantile(known, 0.01),
        p99_delta_p=quantile(known, 0.99),
        top1_agreement=float(agree.double().mean()) if not empty else float("nan"),
    )


@dataclass
class Divergence:
    mean_kl: float
    top1_agreement: float
    tokens: int
    perplexity: float = float("nan")  # the candidate's, over the label tokens: one forward pass serves both
    tails: dict[str, TokenTail] = field(default_factory=dict)  # per TOKEN_SETS entry
    row_kl: list[float] = field(default_factory=list)  # per reference row: mean KL over its answer tokens (all its tokens if it has none)

    def worst_row(self) -> tuple[int, float] | None:
        """The row (index into the reference's rows) with the highest ``row_kl``, and that KL."""
        if not self.row_kl:
            return None
        index = max(range(len(self.row_kl)), key=self.row_kl.__getitem__)
        return index, self.row_kl[index]

    def kl_by_group(self, groups: Sequence[str | None]) -> dict[str, float]:
        """Mean of ``row_kl`` per group, one group name per row (None: ungrouped, left out)."""
        sums: dict[str, list[float]] = defaultdict(list)
        for name, value in zip(groups, self.row_kl):
            if name is not None:
                sums[name].append(value)
        return {name: sum(v) / len(v) for name, v in sorted(sums.items())}


TOKEN_CHUNK = 512  # tokens whose full-vocabulary log-probabilities are held at once (256 MB each at 128k vocabulary)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """For each position, the label of the next token (IGNORE_INDEX where there is none to predict)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


@dataclass
class TokenChunk:
    """Real tokens of a batch: flat indices into its [b*s] positions, the row each belongs to (index into
    the reference's rows), each one's next-token label (IGNORE_INDEX outside the answers) and the text's
    next token (IGNORE_INDEX at a row's last token)."""

    positions: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    next_ids: torch.Tensor


@dataclass
class DivergenceSum:
    """Per-token KL, Δp and top-1 agreement for ``Divergence``, fed the logits of the same tokens from a
    reference and a candidate (kept on the host: 13 bytes a token)."""

    kl: list[torch.Tensor] = field(default_factory=list)
    delta_p: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    answer: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    nll: float = 0.0
    labelled: int = 0

    def add(self, reference_logits: torch.Tensor, candidate_logits: torch.Tensor, chunk: TokenChunk) -> None:
        """[tokens, vocab] logits of ``chunk``'s tokens from both models."""
        ref = F.log_softmax(reference_logits.float(), dim=-1)
        cand = F.log_softmax(candidate_logits.float().to(ref.device), dim=-1)
        self.kl.append(F.kl_div(cand, ref, log_target=True, reduction="none").sum(-1).cpu())
        self.agree.append((ref.argmax(-1) == cand.argmax(-1)).cpu())
        has_next = chunk.next_ids != IGNORE_INDEX
        index = chunk.next_ids.clamp(min=0).to(ref.device).unsqueeze(1)
        delta = cand.gather(1, index).exp().squeeze(1) - ref.gather(1, index).exp().squeeze(1)
        self.delta_p.append(torch.where(has_next, delta.cpu(), float("nan")))
        labelled = chunk.targets != IGNORE_INDEX
        self.answer.append(labelled)
        self.rows.append(chunk.rows)
        if labelled.any():
            self.nll += F.nll_loss(cand[labelled.to(cand.device)], chunk.targets[labelled].to(cand.device), reduction="sum").item()
            self.labelled += int(labelled.sum())

    def result(self, n_rows: int) -> Divergence:
        kl, delta_p, agree = torch.cat(self.kl), torch.cat(self.delta_p), torch.cat(self.agree)
        answer, rows = torch.cat(self.answer), torch.cat(self.rows)
        chosen = dict(zip(TOKEN_SETS, (torch.ones_like(answer), answer)))
        tails = {name: token_tail(kl[keep], delta_p[keep], agree[keep]) for name, keep in chosen.items()}
        return Divergence(
            mean_kl=tails["all"].mean_kl,
            top1_agreement=tails["all"].top1_agreement,
            tokens=tails["all"].tokens,
            perplexity=math.exp(self.nll / self.labelled) if self.labelled else float("nan"),
            tails=tails,
            row_kl=_row_means(kl, rows, answer, n_rows),
        )


def _row_means(kl: torch.Tensor, rows: torch.Tensor, answer: torch.Tensor, n_rows: int) -> list[float]:
    def means(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows[keep], kl[keep].double())
        count = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
        return total, count

    answer_sum, answer_count = means(answer)
    all_sum, all_count = means(torch.ones_like(answer))
    row_kl = torch.where(answer_count > 0, answer_sum / answer_count.clamp(min=1), all_sum / all_count.clamp(min=1))
    return row_kl.tolist()


def real_token_chunks(batch: dict[str, torch.Tensor], first_row: int = 0, chunk: int = TOKEN_CHUNK) -> Iterator[TokenChunk]:
    """A batch's real tokens, ``chunk`` at a time; its rows are numbered from ``first_row``."""
    mask = batch["attention_mask"]
    positions = mask.reshape(-1).nonzero().squeeze(1)
    targets = next_token_targets(batch["labels"]).reshape(-1)[positions]
    following = torch.where(mask.bool(), batch["input_ids"], IGNORE_INDEX)
    next_ids = next_token_targets(following).reshape(-1)[positions]
    rows = first_row + positions // mask.shape[1]
    for start in range(0, positions.numel(), chunk):
        part = slice(start, start + chunk)
        yield TokenChunk(positions[part], rows[part], targets[part], next_ids[part])


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
    total, first_row = DivergenceSum(), 0
    for index, batch in enumerate(reference.batches):
        logits = candidate_logits(index, batch)
        for chunk in real_token_chunks(batch, first_row):
            total.add(reference.logits(index, chunk.positions), chunk_logits(logits, chunk.positions), chunk)
        first_row += batch["input_ids"].shape[0]
    return total.result(first_row)


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
