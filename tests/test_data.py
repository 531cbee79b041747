"""Training data: loading, formats, label masking, length limits, splits, packing and the collator."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from qtune.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    as_rows,
    load_records,
    load_source,
    pack_examples,
    prepare_data,
)
from qtune.errors import QtuneError
from qtune.recipe import DataSection, DataSource
from support import REPO, decode, label_spans, tiny_model

QUICKSTART_TRAIN = REPO / "recipes" / "data" / "quickstart_train.jsonl"
END_OF_TURN = "<|im_end|>\n"  # how SmolLM2's ChatML template closes every turn


# ---------------------------------------------------------------- helpers


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def alpaca_records(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "output": f"The sum is {2 * i + 1}."} for i in range(n)]


def prepare(tmp_path: Path, tokenizer, records: list[dict], seed: int = 0, **data):
    write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DataSection(train="train.jsonl", **data)
    return prepare_data(cfg, tokenizer, tmp_path, seed)


def source(path: Path, **kw) -> DataSource:
    return DataSource(path=str(path), **kw)


# ---------------------------------------------------------------- loading


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n', encoding="utf-8")  # the blank line still counts
    with pytest.raises(QtuneError) as excinfo:
        load_source(source(path), tmp_path)
    message = str(excinfo.value)
    assert str(path) in message and "line 3" in message and "malformed JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(QtuneError, match=r"line 2: expected a JSON object, got list"):
        load_source(source(path), tmp_path)


def test_jsonl_loads_and_skips_blank_lines(tmp_path):
    records = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(records[0]) + "\n   \n" + json.dumps(records[1]), encoding="utf-8")
    assert load_source(DataSource(path="ok.jsonl"), tmp_path) == records  # relative to base_dir


def test_missing_file(tmp_path):
    with pytest.raises(QtuneError, match=f"dataset file not found: {tmp_path / 'sub' / 'nope.jsonl'}"):
        load_source(DataSource(path="sub/nope.jsonl"), tmp_path)


def test_unsupported_suffix_at_load_time(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(QtuneError, match="unsupported file type"):
        load_source(source(tmp_path / "x.txt"), tmp_path)


def test_json_list_and_data_wrapper(tmp_path):
    records = alpaca_records(3)
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records, "version": 2}, indent=2))
    assert load_source(source(tmp_path / "list.json"), tmp_path) == records
    assert load_source(source(tmp_path / "wrapped.json"), tmp_path) == records


def test_json_that_is_not_a_list_of_objects(tmp_path):
    (tmp_path / "obj.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(QtuneError, match="expected a JSON list of objects"):
        load_source(source(tmp_path / "obj.json"), tmp_path)
    (tmp_path / "broken.json").write_text('[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(QtuneError, match=r"broken.json, line 3: malformed JSON"):
        load_source(source(tmp_path / "broken.json"), tmp_path)


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"Say ""hi""",,hi\n"Count, please",1 2,3\n', encoding="utf-8")
    assert load_source(source(path), tmp_path) == [
        {"instruction": 'Say "hi"', "input": "", "output": "hi"},
        {"instruction": "Count, please", "input": "1 2", "output": "3"},
    ]


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,output\r\nSay hi,hi\r\n".encode("utf-8-sig"))
    assert load_source(source(path), tmp_path) == [{"instruction": "Say hi", "output": "hi"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"instruction": "a", "output": "b", "n": 1}, {"instruction": "c", "output": "d", "n": 2}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert load_source(source(tmp_path / "d.parquet"), tmp_path) == records
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(QtuneError, match="cannot read parquet file"):
        load_source(source(tmp_path / "bad.parquet"), tmp_path)


def test_saved_dataset_folder(tmp_path):
    import datasets

    records = alpaca_records(4)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert load_source(DataSource(path="saved"), tmp_path) == records


def test_saved_dataset_dict_split(tmp_path):
    import datasets

    train, test = alpaca_records(3), alpaca_records(5)[3:]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}).save_to_disk(str(tmp_path / "dd"))
    assert load_source(DataSource(path="dd"), tmp_path) == train
    assert load_source(DataSource(path="dd", split="test"), tmp_path) == test
    with pytest.raises(QtuneError, match="has no split 'validation'"):
        load_source(DataSource(path="dd", split="validation"), tmp_path)


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(QtuneError, match="not a dataset saved with datasets.save_to_disk"):
        load_source(DataSource(path="plain"), tmp_path)


def test_hub_source_goes_through_datasets_and_errors_are_wrapped(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        if name == "org/missing":
            raise ConnectionError("no network\nmore detail")
        return datasets.Dataset.from_list(alpaca_records(2))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_source(DataSource(hub="org/name", subset="en", split="train[:2]"), tmp_path) == alpaca_records(2)
    with pytest.raises(QtuneError) as excinfo:
        load_source(DataSource(hub="org/missing", split="test"), tmp_path)
    message = str(excinfo.value)
    assert "'org/missing'" in message and "split test" in message and "ConnectionError: no network" in message
    assert "more detail" not in message
    assert calls == [("org/name", "en", "train[:2]"), ("org/missing", None, "test")]


def test_load_records_concatenates_sources_in_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca_records(2))
    (tmp_path / "b.json").write_text(json.dumps(alpaca_records(3)[2:]))
    assert load_records([DataSource(path="a.jsonl"), DataSource(path="b.json")], tmp_path) == alpaca_records(3)


# ---------------------------------------------------------------- records that cannot be used


def test_records_missing_fields_are_named_and_counted(tmp_path, smol_tokenizer):
    records = alpaca_records(8)
    for i in (1, 3, 4, 5, 6):
        records[i]["output"] = "" if i == 1 else None
    del records[3]["instruction"]
    with pytest.raises(QtuneError) as excinfo:
        prepare(tmp_path, smol_tokenizer, records)
    message = str(excinfo.value)
    assert "5 record(s) miss fields that format 'alpaca' needs" in message
    assert "record 2 lacks 'output'" in message
    assert "record 4 lacks 'instruction', 'output'" in message
    assert "record 5 lacks 'output'" in message
    assert "(and 2 more)" in message
    assert "data.fields" in message


def test_field_names_can_be_mapped(tmp_path, smol_tokenizer):
    records = [{"question": "2+2?", "answer": "4"}]
    with pytest.raises(QtuneError, match="lacks 'instruction', 'output'"):
        prepare(tmp_path, smol_tokenizer, records)
    prepared = prepare(tmp_path, smol_tokenizer, records, fields={"instruction": "question", "output": "answer"})
    assert label_spans(smol_tokenizer, prepared.train[0]["labels"]) == ["4" + END_OF_TURN]


def test_empty_dataset(tmp_path, smol_tokenizer):
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(QtuneError, match="the training data is empty: train.jsonl"):
        prepare_data(DataSection(train="train.jsonl"), smol_tokenizer, tmp_path, 0)


def test_all_examples_dropped_is_a_clear_error(tmp_path, smol_tokenizer):
    with pytest.raises(QtuneError) as excinfo:
        prepare(tmp_path, smol_tokenizer, alpaca_records(3), max_length=16, overlong="drop")
    message = str(excinfo.value)
    assert "no training examples left" in message
    assert "3 longer than data.max_length=16 were dropped" in message


def test_truncate_and_drop_counts(tmp_path, smol_tokenizer, caplog):
    records = alpaca_records(3) + [{"instruction": "Repeat.", "output": "word " * 200}]
    unlimited = prepare(tmp_path, smol_tokenizer, records, max_length=4096)
    lengths = [len(r["input_ids"]) for r in unlimited.train]
    limit = max(lengths[:3])
    assert lengths[3] > limit + 50  # only the last one is overlong

    dropped = prepare(tmp_path, smol_tokenizer, records, max_length=limit, overlong="drop")
    report = dropped.reports["train"]
    assert (report.records, report.examples, report.dropped_overlong, report.truncated) == (4, 3, 1, 0)
    assert [r["input_ids"] for r in dropped.train] == [r["input_ids"] for r in unlimited.train[:3]]

    with caplog.at_level(logging.WARNING, logger="qtune"):
        truncated = prepare(tmp_path, smol_tokenizer, records, max_length=limit, overlong="truncate")
    report = truncated.reports["train"]
    assert (report.records, report.examples, report.dropped_overlong, report.truncated) == (4, 4, 0, 1)
    assert truncated.train[3]["input_ids"] == unlimited.train[3]["input_ids"][:limit]
    assert truncated.train[3]["labels"] == unlimited.train[3]["labels"][:limit]
    assert report.max_tokens == limit
    assert report.tokens == sum(len(r["input_ids"]) for r in truncated.train)
    assert report.trainable_tokens == sum(l != IGNORE_INDEX for r in truncated.train for l in r["labels"][1:])
    assert any("truncated" in rec.getMessage() and f"max_length={limit}" in rec.getMessage() for rec in caplog.records)


def test_truncation_that_leaves_no_labels_drops_the_example(tmp_path, smol_tokenizer):
    records = [{"instruction": "Long question " * 40, "output": "x"}] + alpaca_records(1)
    prepared = prepare(tmp_path, smol_tokenizer, records, max_length=64)
    report = prepared.reports["train"]
    assert report.dropped_no_labels == 1 and report.examples == 1
    assert label_spans(smol_tokenizer, prepared.train[0]["labels"]) == ["The sum is 1." + END_OF_TURN]


# ---------------------------------------------------------------- formats and label masking


def test_alpaca_with_chat_template_trains_on_the_answer_only(tmp_path, smol_tokenizer):
    record = {"instruction": "Extract the city.", "input": "Ana lives in Porto.", "output": '{"city": "Porto"}'}
    prepared = prepare(tmp_path, smol_tokenizer, [record])
    row = prepared.train[0]
    messages = [{"role": "user", "content": "Extract the city.\n\nAna lives in Porto."}, {"role": "assistant", "content": record["output"]}]
    assert decode(smol_tokenizer, row["input_ids"]) == smol_tokenizer.apply_chat_template(messages, tokenize=False)
    assert label_spans(smol_tokenizer, row["labels"]) == [record["output"] + END_OF_TURN]
    # the trainable tokens are exactly the last ones: everything before the answer is masked
    n = sum(label != IGNORE_INDEX for label in row["labels"])
    assert row["labels"][-n:] == row["input_ids"][-n:]
    assert set(row["labels"][:-n]) == {IGNORE_INDEX}
    assert row["num_real_tokens"] == len(row["input_ids"])


def test_alpaca_text_style_appends_eos_and_masks_prompt(tmp_path, smol_tokenizer):
    records = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Name the city.", "input": "Ana lives in Porto.", "output": "Porto"}]
    prepared = prepare(tmp_path, smol_tokenizer, records, prompt_style="alpaca")
    eos = smol_tokenizer.eos_token
    expected_prompts = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nName the city.\n\n"
        "### Input:\nAna lives in Porto.\n\n### Response:\n",
    ]
    for row, record, prompt in zip(prepared.train, records, expected_prompts):
        assert decode(smol_tokenizer, row["input_ids"]) == prompt + record["output"] + eos
        assert row["input_ids"][-1] == smol_tokenizer.eos_token_id
        assert label_spans(smol_tokenizer, row["labels"]) == [record["output"] + eos]
        assert "<|im_start|>" not in decode(smol_tokenizer, row["input_ids"])


def test_completion_only_loss_false_trains_on_everything(tmp_path, smol_tokenizer):
    for style in ("chat_template", "alpaca"):
        prepared = prepare(tmp_path, smol_tokenizer, alpaca_records(2), prompt_style=style, completion_only_loss=False)
        for row in prepared.train:
            assert row["labels"] == row["input_ids"]
        report = prepared.reports["train"]
        assert report.trainable_tokens == report.tokens - len(prepared.train)


def test_chat_multi_turn_only_assistant_turns_are_trainable(tmp_path, smol_tokenizer):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12, since 4 x 3 = 12."},
        {"role": "user", "content": "Thanks!"},
    ]
    prepared = prepare(tmp_path, smol_tokenizer, [{"messages": messages}], format="chat", system_prompt="Be terse.")
    row = prepared.train[0]
    text = decode(smol_tokenizer, row["input_ids"])
    with_system = [{"role": "system", "content": "Be terse."}, *messages]
    assert text == smol_tokenizer.apply_chat_template(with_system, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert "SmolLM" not in text  # the template's default system prompt was replaced
    assert label_spans(smol_tokenizer, row["labels"]) == ["4" + END_OF_TURN, "12, since 4 x 3 = 12." + END_OF_TURN]


def test_chat_keeps_the_records_own_system_message(tmp_path, smol_tokenizer):
    messages = [{"role": "system", "content": "Speak French."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut"}]
    prepared = prepare(tmp_path, smol_tokenizer, [{"messages": messages}], format="chat", system_prompt="Be terse.")
    text = decode(smol_tokenizer, prepared.train[0]["input_ids"])
    assert "Speak French." in text and "Be terse." not in text
    assert label_spans(smol_tokenizer, prepared.train[0]["labels"]) == ["Salut" + END_OF_TURN]


def test_alpaca_system_prompt_is_injected(tmp_path, smol_tokenizer):
    prepared = prepare(tmp_path, smol_tokenizer, alpaca_records(1), system_prompt="Answer in JSON.")
    assert decode(smol_tokenizer, prepared.train[0]["input_ids"]).startswith("<|im_start|>system\nAnswer in JSON.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ("just a string", "must be a list of {role, content}"),
        ([{"role": "user"}], "must be a list of {role, content}"),
    ],
)
def test_bad_conversations_name_the_record(tmp_path, smol_tokenizer, messages, words):
    records = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"messages": messages}]
    with pytest.raises(QtuneError, match=f"record 2: .*{words}"):
        prepare(tmp_path, smol_tokenizer, records, format="chat")


def test_tokenizer_without_chat_template(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", None)
    with pytest.raises(QtuneError, match="data.format is 'chat' but the tokenizer has no chat template"):
        prepare(tmp_path, smol_tokenizer, [{"messages": [{"role": "assistant", "content": "x"}]}], format="chat")
    # alpaca with prompt_style auto falls back to the plain alpaca prompt
    row = prepare(tmp_path, smol_tokenizer, alpaca_records(1)).train[0]
    assert decode(smol_tokenizer, row["input_ids"]).startswith("Below is an instruction")
    assert label_spans(smol_tokenizer, row["labels"]) == ["The sum is 1." + smol_tokenizer.eos_token]


def test_completion_text_trains_on_all_of_it(tmp_path, smol_tokenizer):
    records = [{"body": "Once upon a time there was a tiny model."}, {"body": "It learned to count."}]
    prepared = prepare(tmp_path, smol_tokenizer, records, format="completion", fields={"text": "body"})
    eos = smol_tokenizer.eos_token
    for row, record in zip(prepared.train, records):
        assert decode(smol_tokenizer, row["input_ids"]) == record["body"] + eos
        assert row["labels"] == row["input_ids"]
    assert prepared.eval_prompts == []


def test_completion_prompt_and_completion(tmp_path, smol_tokenizer):
    records = [{"prompt": "The capital of France is", "completion": " Paris."}]
    eos = smol_tokenizer.eos_token
    everything = prepare(tmp_path, smol_tokenizer, records, format="completion").train[0]
    assert decode(smol_tokenizer, everything["input_ids"]) == "The capital of France is Paris." + eos
    assert everything["labels"] == everything["input_ids"]  # completion format trains on the prompt by default
    only = prepare(tmp_path, smol_tokenizer, records, format="completion", completion_only_loss=True).train[0]
    assert only["input_ids"] == everything["input_ids"]
    assert label_spans(smol_tokenizer, only["labels"]) == [" Paris." + eos]
    assert set(only["labels"][: len(only["labels"]) - len(smol_tokenizer(" Paris." + eos)["input_ids"])]) == {IGNORE_INDEX}


def test_completion_record_with_prompt_but_no_completion(tmp_path, smol_tokenizer):
    with pytest.raises(QtuneError, match="record 1 lacks 'completion'"):
        prepare(tmp_path, smol_tokenizer, [{"prompt": "p"}], format="completion")


def test_eval_prompts_and_references_come_from_validation(tmp_path, smol_tokenizer):
    train = alpaca_records(2)
    validation = [
        {"instruction": "Name the city.", "input": "Ana lives in Porto.", "output": "Porto", "category": 3},
        {"instruction": "Say hi.", "output": "hi"},
    ]
    write_jsonl(tmp_path / "val.jsonl", validation)
    write_jsonl(tmp_path / "train.jsonl", train)
    prepared = prepare_data(DataSection(train="train.jsonl", validation="val.jsonl"), smol_tokenizer, tmp_path, 0)
    assert [p["reference"] for p in prepared.eval_prompts] == ["Porto", "hi"]
    assert [p["category"] for p in prepared.eval_prompts] == ["3", None]
    expected = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name the city.\n\nAna lives in Porto."}], tokenize=False, add_generation_prompt=True
    )
    assert prepared.eval_prompts[0]["prompt"] == expected
    # the validation rows are the same examples, unpacked and label-masked
    assert len(prepared.validation) == 2
    assert decode(smol_tokenizer, prepared.validation[0]["input_ids"]) == expected + "Porto" + END_OF_TURN
    assert label_spans(smol_tokenizer, prepared.validation[1]["labels"]) == ["hi" + END_OF_TURN]
    assert prepared.reports["validation"].examples == 2 and prepared.reports["train"].examples == 2


def train_outputs(tokenizer, prepared) -> list[str]:
    outputs = []
    for row in prepared.train:
        (span,) = label_spans(tokenizer, row["labels"])
        assert span.endswith(END_OF_TURN)
        outputs.append(span[: -len(END_OF_TURN)])
    return outputs


def test_validation_fraction_split_is_deterministic_and_disjoint(tmp_path, smol_tokenizer):
    records = alpaca_records(20)
    everything = {r["output"] for r in records}
    first = prepare(tmp_path, smol_tokenizer, records, seed=3, validation_fraction=0.25)
    again = prepare(tmp_path, smol_tokenizer, records, seed=3, validation_fraction=0.25)
    other = prepare(tmp_path, smol_tokenizer, records, seed=4, validation_fraction=0.25)

    val = [p["reference"] for p in first.eval_prompts]
    train = train_outputs(smol_tokenizer, first)
    assert len(val) == 5 and len(train) == 15
    assert set(val).isdisjoint(train)
    assert set(val) | set(train) == everything
    assert [p["reference"] for p in again.eval_prompts] == val
    assert again.train == first.train
    other_val = [p["reference"] for p in other.eval_prompts]
    assert set(other_val) != set(val) and set(other_val).isdisjoint(train_outputs(smol_tokenizer, other))


def test_max_train_samples(tmp_path, smol_tokenizer):
    prepared = prepare(tmp_path, smol_tokenizer, alpaca_records(6), max_train_samples=4)
    assert train_outputs(smol_tokenizer, prepared) == [r["output"] for r in alpaca_records(4)]


# ---------------------------------------------------------------- packing


def segments_of(row: dict) -> list[tuple[list[int], list[int]]]:
    """Split a packed row's real tokens into (input_ids, labels) per example, using where position ids restart."""
    n = row["num_real_tokens"]
    starts = [i for i in range(n) if row["position_ids"][i] == 0] + [n]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_pack_examples_unit():
    examples = [
        Example(list(range(10 * k + 1, 10 * k + 1 + size)), list(range(100 + 10 * k, 100 + 10 * k + size))) for k, size in enumerate([5, 4, 3, 8, 2, 10])
    ]
    rows = pack_examples(examples, max_length=10, pad_token_id=0)
    # greedy and in order: [5+4], [3], [8+2], [10]
    assert [len(segments_of(r)) for r in rows] == [2, 1, 2, 1]
    assert [r["num_real_tokens"] for r in rows] == [9, 3, 10, 10]
    packed = [seg for r in rows for seg in segments_of(r)]
    assert [ids for ids, _ in packed] == [e.input_ids for e in examples]
    assert [labels for _, labels in packed] == [[IGNORE_INDEX, *e.labels[1:]] for e in examples]
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == 10
        n = row["num_real_tokens"]
        assert row["input_ids"][n:] == [0] * (10 - n) and set(row["labels"][n:]) <= {IGNORE_INDEX}
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]


def test_packing_in_prepare_data(tmp_path, smol_tokenizer):
    records = [json.loads(line) for line in QUICKSTART_TRAIN.read_text().splitlines()[:24]]
    max_length = 256
    unpacked = prepare(tmp_path, smol_tokenizer, records, max_length=max_length)
    packed = prepare(tmp_path, smol_tokenizer, records, max_length=max_length, packing=True)
    assert len(packed.train) < len(unpacked.train)
    segments = []
    for row in packed.train:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == max_length
        assert 0 < row["num_real_tokens"] <= max_length
        for ids, labels in segments_of(row):
            assert labels[0] == IGNORE_INDEX  # nothing in the row may predict an example's first token
            segments.append((ids, labels))
    # every example appears whole, exactly once, with the same labels after the first
    expected = sorted((r["input_ids"], [IGNORE_INDEX, *r["labels"][1:]]) for r in unpacked.train)
    assert sorted(segments) == expected
    assert packed.reports["train"] == unpacked.reports["train"]
    # the validation data is never packed
    assert all("position_ids" not in row for row in packed.validation)


def test_packed_examples_do_not_attend_to_each_other(tmp_path, smol_tokenizer):
    """The loss of a packed row equals the summed token losses of its examples run one by one."""
    records = [json.loads(line) for line in QUICKSTART_TRAIN.read_text().splitlines()[:6]]
    unpacked = prepare(tmp_path, smol_tokenizer, records, max_length=256).train
    row = pack_examples([Example(r["input_ids"], r["labels"]) for r in unpacked], 256, smol_tokenizer.pad_token_id)[0]
    count = len(segments_of(row))
    assert count >= 2

    model = tiny_model(
        "llama",
        0,
        vocab_size=len(smol_tokenizer),
        max_position_embeddings=512,
        use_cache=False,
        attn_implementation="sdpa",
        dtype=torch.float32,
    )
    assert model.config._attn_implementation == "sdpa"

    def summed_nll(input_ids, labels, position_ids=None) -> tuple[float, int]:
        with torch.no_grad():
            kwargs = {} if position_ids is None else {"position_ids": torch.tensor([position_ids])}
            logits = model(input_ids=torch.tensor([input_ids]), use_cache=False, **kwargs).logits[0, :-1]
        targets = torch.tensor(labels[1:])
        loss = torch.nn.functional.cross_entropy(logits.double(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss.item(), int((targets != IGNORE_INDEX).sum())

    separate = [summed_nll(r["input_ids"], r["labels"]) for r in unpacked[:count]]
    expected, expected_tokens = sum(loss for loss, _ in separate), sum(n for _, n in separate)
    packed_loss, packed_tokens = summed_nll(row["input_ids"], row["labels"], row["position_ids"])
    assert packed_tokens == expected_tokens
    assert packed_loss == pytest.approx(expected, rel=0, abs=1e-4 * max(1.0, expected_tokens / 100))

    # the comparison can fail: with one running position sequence the examples see each other
    leaky, _ = summed_nll(row["input_ids"], row["labels"], list(range(len(row["input_ids"]))))
    assert abs(leaky - expected) > 1e-2


# ---------------------------------------------------------------- collator


def test_collator_pads_unpacked_rows():
    rows = as_rows([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8, 9], [8, 9])])
    batch = Collator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_real_tokens"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["num_real_tokens"].item() == 5
    assert batch["input_ids"].dtype == torch.long


def test_collator_passes_packed_rows_without_attention_mask():
    rows = pack_examples([Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])], max_length=6, pad_token_id=0)
    batch = Collator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["num_real_tokens"].item() == 9
