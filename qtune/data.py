"""Training data: loading, prompt formats, tokenization, label masking, length limits and packing."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtune.errors import QtuneError, first_line
from qtune.recipe import DataSection, DataSource, resolve_path

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


# ---------------------------------------------------------------- loading


class Records(list):
    """Records (plain dicts) that also know where each one came from, e.g. ``train.jsonl line 12``, so a
    problem found later can point at the line to fix."""

    def __init__(self, rows: Sequence[dict] = (), origins: Sequence[str] | None = None):
        super().__init__(rows)
        self.origins = list(origins) if origins is not None else [f"record {i + 1}" for i in range(len(self))]

    def subset(self, indices: Sequence[int]) -> Records:
        return Records([self[i] for i in indices], [self.origins[i] for i in indices])


def _read_jsonl(path: Path) -> Records:
    records, origins = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QtuneError(f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise QtuneError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
            origins.append(f"{path.name} line {number}")
    return Records(records, origins)


def _read_json(path: Path) -> list[dict]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise QtuneError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise QtuneError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
    return _numbered(payload, path.name, "item")


def _numbered(rows: list[dict], name: str, unit: str) -> Records:
    return Records(rows, [f"{name} {unit} {i + 1}" for i in range(len(rows))])


def _read_csv(path: Path) -> Records:
    rows, origins = [], []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                if None in row:  # DictReader files the extra cells of a long row under the key None
                    raise QtuneError(
                        f"{path}, line {reader.line_num}: {len(row) - 1 + len(row[None])} cells, but the header names {len(reader.fieldnames or [])} columns"
                    )
                rows.append(dict(row))
                origins.append(f"{path.name} line {reader.line_num}")
    except csv.Error as exc:
        raise QtuneError(f"{path}: malformed CSV: {exc}") from None
    return Records(rows, origins)


def _read_parquet(path: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        return _numbered(pq.read_table(path).to_pylist(), path.name, "row")
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise QtuneError(f"{path}: cannot read parquet file: {exc}") from None


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def load_source(source: DataSource, base_dir: Path) -> Records:
    """All records of one data source, as plain dicts."""
    if source.path is not None:
        path = resolve_path(source.path, base_dir)
        if not path.exists():
            raise QtuneError(f"dataset file not found: {path}")
        if path.is_dir():
            return _load_saved_dataset(path, source.split)
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise QtuneError(f"{path}: unsupported file type; use one of {', '.join(READERS)}")
        try:
            return reader(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise QtuneError(f"cannot read dataset file {path}: {exc}") from None
    return _load_hub_dataset(source, base_dir)


def _load_saved_dataset(path: Path, split: str) -> Records:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise QtuneError(f"{path} is a directory but not a dataset saved with datasets.save_to_disk") from None
    except Exception as exc:  # a damaged arrow file or state.json: pyarrow and json raise many types
        raise QtuneError(f"{path}: cannot read the saved dataset: {type(exc).__name__}: {first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise QtuneError(f"{path} has no split '{split}' (it has {', '.join(loaded)})")
        loaded = loaded[split]
    return _numbered(loaded.to_list(), f"{path.name}[{split}]", "row")


def _load_hub_dataset(source: DataSource, base_dir: Path) -> Records:
    import datasets

    local = resolve_path(source.hub, base_dir)  # a folder holding a copy of the dataset's repository
    name = str(local) if local.is_dir() else source.hub
    try:
        return _numbered(datasets.load_dataset(name, source.subset, split=source.split).to_list(), source.describe(), "row")
    except Exception as exc:  # offline, missing, or a bad split: all reported the same way
        raise QtuneError(
            f"cannot load dataset '{source.hub}' (split {source.split}) from the local cache or the hub: {type(exc).__name__}: {first_line(exc)}"
        ) from None


# ---------------------------------------------------------------- formats


@dataclass
class Segment:
    text: str
    trainable: bool


@dataclass
class Rendered:
    segments: list[Segment]
    prompt: str | None = None
    reference: str | None = None
    category: str | None = None


class Formatter:
    """Turns one record into text segments marked trainable or not, plus the prompt/answer pair used by eval."""

    def __init__(self, cfg: DataSection, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        style = cfg.prompt_style
        if style == "auto":
            style = "chat_template" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise QtuneError("data.format is 'chat' but the tokenizer has no chat template")
        self.style = style
        self.completion_only = cfg.loss_on_completions_only

    def render(self, record: dict) -> Rendered:
        fmt = self.cfg.format
        category = record.get(self.cfg.fields.category)
        if fmt == "alpaca":
            rendered = self._alpaca(record)
        elif fmt == "chat":
            rendered = self._chat(record[self.cfg.fields.messages])
        else:
            rendered = self._completion(record)
        rendered.category = None if category is None else str(category)
        return rendered

    def _user_text(self, record: dict) -> str:
        instruction = str(record[self.cfg.fields.instruction])
        extra = record.get(self.cfg.fields.input)
        return f"{instruction}\n\n{extra}" if extra not in (None, "") else instruction

    def _alpaca(self, record: dict) -> Rendered:
        output = str(record[self.cfg.fields.output])
        if self.style == "chat_template":
            messages = [{"role": "user", "content": self._user_text(record)}, {"role": "assistant", "content": output}]
            return self._chat(messages)
        extra = record.get(self.cfg.fields.input)
        has_input = extra not in (None, "")
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if has_input else "",
            instruction=record[self.cfg.fields.instruction],
            input_block=f"### Input:\n{extra}\n\n" if has_input else "",
        )
        eos = self.tokenizer.eos_token or ""
        return Rendered(
            [Segment(self._bos_text() + prompt, not self.completion_only), Segment(output + eos, True)],
            prompt=self._bos_text() + prompt,
            reference=output,
        )

    def _chat(self, messages: Any) -> Rendered:
        problem = conversation_problem(messages)
        if problem:
            raise ValueError(problem)
        if self.cfg.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        render = self.tokenizer.apply_chat_template
        segments, so_far, prompt = [], "", None
        for i in assistant_turns:
            prefix = render(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = render(messages[: i + 1], tokenize=False)
            if not prefix.startswith(so_far) or not upto.startswith(prefix):
                raise QtuneError(
                    "the tokenizer's chat template does not render conversations prefix-consistently, so assistant "
                    "turns cannot be located for completion-only loss; set data.completion_only_loss: false"
                )
            segments.append(Segment(prefix[len(so_far) :], not self.completion_only))
            segments.append(Segment(upto[len(prefix) :], True))
            so_far, prompt = upto, prefix
        full = render(messages, tokenize=False)
        if full.startswith(so_far) and len(full) > len(so_far):
            segments.append(Segment(full[len(so_far) :], not self.completion_only))
        return Rendered(segments, prompt=prompt, reference=str(messages[assistant_turns[-1]]["content"]))

    def _completion(self, record: dict) -> Rendered:
        names, eos = self.cfg.fields, self.tokenizer.eos_token or ""
        if names.prompt in record:
            prompt, completion = str(record[names.prompt]), str(record[names.completion])
            return Rendered(
                [Segment(self._bos_text() + prompt, not self.completion_only), Segment(completion + eos, True)],
                prompt=self._bos_text() + prompt,
                reference=completion,
            )
        return Rendered([Segment(self._bos_text() + str(record[names.text]) + eos, True)])

    def _bos_text(self) -> str:
        """The BOS text the tokenizer would add on its own, spelled out so segments can be tokenized separately."""
        with_special = self.tokenizer("a")["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        if len(with_special) > len(without) and with_special[0] == self.tokenizer.bos_token_id:
            return self.tokenizer.bos_token
        return ""


# ---------------------------------------------------------------- tokenization


@dataclass
class DataReport:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    max_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    category: str | None = None


@dataclass
class PreparedData:
    train: list[dict]
    validation: list[dict]
    eval_prompts: list[dict]
    reports: dict[str, DataReport] = field(default_factory=dict)
    validation_categories: list[str | None] = field(default_factory=list)  # one per validation row


def tokenize_rendered(rendered: Rendered, tokenizer) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in rendered.segments:
        ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if segment.trainable else [IGNORE_INDEX] * len(ids))
    return Example(input_ids, labels)


CHAT_ROLES = ("system", "user", "assistant", "tool")


def required_fields(cfg: DataSection, record: dict) -> list[str]:
    """The text fields a record must carry for ``cfg.format`` (completion data: prompt and completion, or text)."""
    names, fmt = cfg.fields, cfg.format
    if fmt == "alpaca":
        return [names.instruction, names.output]
    if fmt == "chat":
        return [names.messages]
    if names.prompt in record or names.completion in record:
        return [names.prompt, names.completion]
    return [names.text]


def conversation_problem(messages: Any) -> str | None:
    """Why ``messages`` is not a conversation to train on; None when it is."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        return "'messages' must be a list of {role, content} objects"
    for number, message in enumerate(messages, start=1):
        if message["role"] not in CHAT_ROLES:
            return f"message {number} has role {message['role']!r}; the roles are {', '.join(CHAT_ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {number}'s content must be text, got {_describe_value(message['content'])}"
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant message to learn from"
    return None


def _describe_value(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _value_problem(cfg: DataSection, record: dict, name: str) -> str | None:
    value = record[name]
    if name == cfg.fields.messages and cfg.format == "chat":
        return conversation_problem(value)
    if not isinstance(value, str):
        return f"'{name}' must be text, got {_describe_value(value)}"
    return None


def check_records(records: Sequence[dict], cfg: DataSection, where: str) -> None:
    """Refuse records that lack a field the format needs, or hold something other than text in one."""
    origins = getattr(records, "origins", None) or [None] * len(records)
    missing, malformed = [], []
    for i, record in enumerate(records):
        names = required_fields(cfg, record)
        if cfg.format == "alpaca" and record.get(cfg.fields.input) not in (None, ""):
            names = [*names, cfg.fields.input]
        absent = [name for name in names if record.get(name) in (None, "")]
        if absent:
            missing.append((i, absent))
            continue
        problem = next((p for p in (_value_problem(cfg, record, n) for n in names) if p), None)
        if problem:
            malformed.append((i, problem))

    def at(i: int) -> str:
        origin = origins[i]
        return f" ({origin})" if origin and origin != f"record {i + 1}" else ""

    def listing(items: list, describe) -> str:
        shown = "; ".join(describe(i, detail) + at(i) for i, detail in items[:3])
        return shown + (f" (and {len(items) - 3} more)" if len(items) > 3 else "")

    if missing:
        shown = listing(missing, lambda i, absent: f"record {i + 1} lacks {', '.join(repr(m) for m in absent)}")
        raise QtuneError(f"{where}: {len(missing)} record(s) miss fields that format '{cfg.format}' needs: {shown}. Map your column names with data.fields")
    if malformed:
        shown = listing(malformed, lambda i, problem: f"record {i + 1}: {problem}")
        raise QtuneError(f"{where}: {len(malformed)} record(s) hold values format '{cfg.format}' cannot use: {shown}")


def tokenize_records(records: Sequence[dict], formatter: Formatter, cfg: DataSection, where: str) -> tuple[list[Example], list[dict], DataReport]:
    check_records(records, cfg, where)
    report = DataReport(records=len(records))
    examples, prompts = [], []
    for i, record in enumerate(records):
        try:
            rendered = formatter.render(record)
        except ValueError as exc:
            raise QtuneError(f"{where}: record {i + 1}: {exc}") from None
        example = tokenize_rendered(rendered, formatter.tokenizer)
        truncated = len(example.input_ids) > cfg.max_length
        if truncated:
            if cfg.overlong == "drop":
                report.dropped_overlong += 1
                continue
            example = Example(example.input_ids[: cfg.max_length], example.labels[: cfg.max_length])
        example.category = rendered.category
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            report.dropped_no_labels += 1
            continue
        report.truncated += truncated
        examples.append(example)
        if rendered.prompt is not None:
            prompts.append({"prompt": rendered.prompt, "reference": rendered.reference, "category": rendered.category})
        report.tokens += len(example.input_ids)
        report.trainable_tokens += sum(label != IGNORE_INDEX for label in example.labels[1:])
        report.max_tokens = max(report.max_tokens, len(example.input_ids))
    report.examples = len(examples)
    return examples, prompts, report


def pack_examples(examples: Sequence[Example], max_length: int, pad_token_id: int) -> list[dict]:
    """Concatenate examples into rows of ``max_length``; position ids restart at each example.

    transformers reads restarting position ids (with no attention mask) as separate sequences and keeps
    them from attending to each other, so packing never mixes examples. The first label of each example
    is masked: unpacked, no token predicts it either.
    """
    rows, ids, labels, positions = [], [], [], []

    def flush() -> None:
        if not ids:
            return
        pad = max_length - len(ids)
        rows.append(
            {
                "input_ids": ids + [pad_token_id] * pad,
                "labels": labels + [IGNORE_INDEX] * pad,
                "position_ids": positions + list(range(pad)),
                "num_real_tokens": len(ids),
            }
        )
        ids.clear(), labels.clear(), positions.clear()

    for example in examples:
        if len(ids) + len(example.input_ids) > max_length:
            flush()
        ids.extend(example.input_ids)
        labels.extend([IGNORE_INDEX, *example.labels[1:]])
        positions.extend(range(len(example.input_ids)))
    flush()
    return rows


def as_rows(examples: Sequence[Example]) -> list[dict]:
    return [{"input_ids": e.input_ids, "labels": e.labels, "num_real_tokens": len(e.input_ids)} for e in examples]


class Collator:
    """Right-pads a batch; packed rows arrive at full length with position ids and need no attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"num_real_tokens": torch.tensor(sum(r["num_real_tokens"] for r in rows))}
        if "position_ids" in rows[0]:
            for key in ("input_ids", "labels", "position_ids"):
                batch[key] = torch.tensor([r[key] for r in rows])
            return batch
        longest = max(len(r["input_ids"]) for r in rows)
        pad = [longest - len(r["input_ids"]) for r in rows]
        batch["input_ids"] = torch.tensor([r["input_ids"] + [self.pad_token_id] * p for r, p in zip(rows, pad)])
        batch["labels"] = torch.tensor([r["labels"] + [IGNORE_INDEX] * p for r, p in zip(rows, pad)])
        batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)])
        return batch


def load_records(sources: Sequence[DataSource], base_dir: Path) -> Records:
    records = Records()
    for source in sources:
        loaded = load_source(source, base_dir)
        records.extend(loaded)
        records.origins.extend(loaded.origins)
    return records


def check_local_data(cfg: DataSection, base_dir: Path) -> list[str]:
    """Read every local data file of the recipe and check its records for the format, as training will;
    returns the hub sources, which are checked only when training loads them."""
    remote = []
    for split in ("train", "validation"):
        for source in getattr(cfg, split):
            if source.hub is not None:
                remote.append(source.describe())
                continue
            records = load_source(source, base_dir)
            if split == "train" and not records:
                raise QtuneError(f"the training data is empty: {source.describe()}")
            check_records(records, cfg, source.describe())
    return remote


def prepare_data(cfg: DataSection, tokenizer, base_dir: Path, seed: int) -> PreparedData:
    """Load, split, format, tokenize and (optionally) pack the recipe's data."""
    formatter = Formatter(cfg, tokenizer)
    train_records = load_records(cfg.train, base_dir)
    where_train = ", ".join(s.describe() for s in cfg.train)
    if not train_records:
        raise QtuneError(f"the training data is empty: {where_train}")
    if cfg.validation:
        validation_records = load_records(cfg.validation, base_dir)
        where_val = ", ".join(s.describe() for s in cfg.validation)
    elif cfg.validation_fraction:
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        cut = max(1, round(len(order) * cfg.validation_fraction))
        if cut >= len(order):
            raise QtuneError(f"{where_train} has {len(order)} record(s): too few to hold out {cfg.validation_fraction:.0%} for validation")
        validation_records, train_records = train_records.subset(order[:cut]), train_records.subset(order[cut:])
        where_val = f"{cfg.validation_fraction:.0%} of {where_train}"
    else:
        validation_records, where_val = Records(), "(none)"
    if cfg.max_train_samples is not None:
        train_records = train_records.subset(range(min(cfg.max_train_samples, len(train_records))))

    train_examples, _, train_report = tokenize_records(train_records, formatter, cfg, where_train)
    if not train_examples:
        raise QtuneError(
            f"no training examples left after filtering {where_train}: {train_report.dropped_overlong} longer than "
            f"data.max_length={cfg.max_length} were dropped and {train_report.dropped_no_labels} had no trainable tokens"
        )
    val_examples, eval_prompts, val_report = tokenize_records(validation_records, formatter, cfg, where_val)
    if validation_records and not val_examples:
        raise QtuneError(f"no validation examples left after filtering {where_val}")
    for name, report in (("train", train_report), ("validation", val_report)):
        if report.truncated or report.dropped_overlong:
            log.warning(
                "%s: %d example(s) longer than max_length=%d were %s",
                name,
                report.truncated or report.dropped_overlong,
                cfg.max_length,
                "truncated" if report.truncated else "dropped",
            )
    pad = tokenizer.pad_token_id
    if cfg.packing:
        shuffled = list(train_examples)
        random.Random(seed).shuffle(shuffled)
        train_rows = pack_examples(shuffled, cfg.max_length, pad)
    else:
        train_rows = as_rows(train_examples)
    return PreparedData(train_rows, as_rows(val_examples), eval_prompts, {"train": train_report, "validation": val_report}, [e.category for e in val_examples])
