"""Calibration batches for GPTQ, AWQ and the GGUF importance matrix.

By default they come from the recipe's own training data, rendered exactly as training saw it (chat
template included), so the quantizers see the activations of the task the model was tuned for.
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
from qtune.recipe import DataSection, DataSource

MIN_TOKENS = 256


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [samples, seq_len]
    attention_mask: torch.Tensor
    description: str

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def _windows(token_lists: list[list[int]], seq_len: int, samples: int, pad_token_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate whole examples into windows of at most ``seq_len`` tokens, then pad."""
    order = list(range(len(token_lists)))
    random.Random(seed).shuffle(order)
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
    """``samples`` windows of up to ``seq_len`` tokens from ``source``, or from the recipe's training data."""
    if source is None:
        if data_cfg is None or not data_cfg.train:
            raise QtuneError("no calibration data: pass --calibration FILE (text or jsonl) or a datasets id, or export from a run directory")
        cfg, description = data_cfg, "the recipe's training data"
        records = qdata.load_records(cfg.train, base_dir)
    else:
        path = Path(source).expanduser()
        if path.suffix in (".txt", ".md", ".text"):
            if not path.is_file():
                raise QtuneError(f"calibration file not found: {path}")
            token_lists = _text_file_tokens(path, tokenizer, seq_len)
            return _finish(token_lists, tokenizer, seq_len, samples, seed, str(path))
        spec = {"path": str(path)} if path.suffix in qdata.READERS or path.is_dir() else {"hub": source}
        cfg = (data_cfg or DataSection()).model_copy(update={"train": [DataSource(**spec)], "validation": []})
        records = qdata.load_records(cfg.train, base_dir)
        description = source
    formatter = qdata.Formatter(cfg, tokenizer)
    qdata.check_fields(records, formatter, description)
    token_lists = [qdata.tokenize_rendered(formatter.render(r), tokenizer).input_ids for r in records]
    return _finish(token_lists, tokenizer, seq_len, samples, seed, description)


def _finish(token_lists: list[list[int]], tokenizer, seq_len: int, samples: int, seed: int, description: str) -> CalibrationSet:
    token_lists = [t for t in token_lists if t]
    if not token_lists:
        raise QtuneError(f"the calibration data ({description}) is empty")
    ids, mask = _windows(token_lists, seq_len, samples, tokenizer.pad_token_id, seed)
    calibration = CalibrationSet(ids, mask, description)
    if calibration.tokens < MIN_TOKENS:
        raise QtuneError(f"the calibration data ({description}) holds only {calibration.tokens} tokens; give at least {MIN_TOKENS}")
    return calibration
