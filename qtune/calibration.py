"""Calibration batches for GPTQ, AWQ and the GGUF importance matrix.

By default they come from the recipe's own training data, rendered exactly as training saw it (chat
template included), so the quantizers see the activations of the task the model was tuned for, drawn
evenly over the records' categories. A relative path is relative to the recipe (``base_dir``).
Given an explicit source, a plain text file is cut into windows, and a jsonl file or a ``datasets``
id is read like training data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from qtune import data as qdata
from qtune.errors import QtuneError
from qtune.recipe import CALIBRATION_TEXT_SUFFIXES, DataSection, DataSource, looks_like_file, resolve_path

MIN_TOKENS = 256


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [samples, seq_len]
    attention_mask: torch.Tensor
    description: str

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def draw_order(strata: list[str | None], seed: int) -> list[int]:
    """Indices of the examples in the order calibration takes them: each stratum (the records' category)
    shuffled by ``seed``, then the strata interleaved, so that any prefix covers every category about
    evenly. Deterministic: the same data and seed give the same draw on every machine."""
    groups: dict[str, list[int]] = {}
    for index, stratum in enumerate(strata):
        groups.setdefault("" if stratum is None else str(stratum), []).append(index)
    rng = random.Random(seed)
    queues = []
    for name in sorted(groups):
        members = groups[name]
        rng.shuffle(members)
        queues.append(members)
    # interleave by position within each stratum, so strata of unequal size stay proportionate
    ranked = sorted((position / len(queue), q, index) for q, queue in enumerate(queues) for position, index in enumerate(queue))
    return [index for _, _, index in ranked]


def _windows(token_lists: list[list[int]], order: list[int], seq_len: int, samples: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate whole examples, in ``order``, into windows of at most ``seq_len`` tokens, then pad."""
    rows, current = [], []
    for index in order:
        tokens = token_lists[index][:seq_len]
        if current and len(current) + len(tokens) > seq_len:
            rows.append(current)
            current = []
            if len(rows) == samples:
                break
        current = current + tokens
    if current and len(rows) < samples:
        rows.append(current)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _text_file_tokens(path: Path, tokenizer, seq_len: int) -> list[list[int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QtuneError(f"cannot read calibration file {path}: {exc}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


def calibration_set(
    tokenizer,
    data_cfg: DataSection | None,
    base_dir: Path,
    source: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> CalibrationSet:
    """``samples`` windows of up to ``seq_len`` tokens from ``source``, or from the recipe's training data,
    drawn by ``draw_order`` (stratified by category where the records have one)."""
    if source is None:
        if data_cfg is None or not data_cfg.train:
            raise QtuneError("no calibration data: pass --calibration FILE (text or jsonl) or a datasets id, or export from a run directory")
        cfg, description = data_cfg, "the recipe's training data"
        records = qdata.load_records(cfg.train, base_dir)
    else:
        path = resolve_path(source, base_dir) if looks_like_file(source, base_dir) else None
        if path is not None and path.suffix.lower() in CALIBRATION_TEXT_SUFFIXES:
            if not path.is_file():
                raise QtuneError(f"calibration file not found: {path}")
            token_lists = _text_file_tokens(path, tokenizer, seq_len)
            return _finish(token_lists, draw_order([None] * len(token_lists), seed), tokenizer, seq_len, samples, str(path))
        spec = {"path": str(path)} if path is not None else {"hub": source}
        cfg = (data_cfg or DataSection()).model_copy(update={"train": [DataSource(**spec)], "validation": []})
        records = qdata.load_records(cfg.train, base_dir)
        description = source
    formatter = qdata.Formatter(cfg, tokenizer)
    qdata.check_records(records, cfg, description)
    token_lists = [qdata.tokenize_rendered(formatter.render(r), tokenizer).input_ids for r in records]
    order = draw_order([r.get(cfg.fields.category) for r in records], seed)
    return _finish(token_lists, order, tokenizer, seq_len, samples, description)


def _finish(token_lists: list[list[int]], order: list[int], tokenizer, seq_len: int, samples: int, description: str) -> CalibrationSet:
    if not any(token_lists):
        raise QtuneError(f"the calibration data ({description}) is empty")
    order = [i for i in order if token_lists[i]]
    ids, mask = _windows(token_lists, order, seq_len, samples, tokenizer.pad_token_id)
    calibration = CalibrationSet(ids, mask, description)
    if calibration.tokens < MIN_TOKENS:
        raise QtuneError(f"the calibration data ({description}) holds only {calibration.tokens} tokens; give at least {MIN_TOKENS}")
    return calibration
