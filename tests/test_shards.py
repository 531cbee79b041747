"""Safetensors one tensor at a time: the planned shard writer (read back by safetensors itself) and the reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtune.recipe import parse_size
from qtune.shards import INDEX_FILE, CheckpointReader, ShardedWriter


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32).to(torch.float16),
        "b.weight": torch.randn(300).to(torch.bfloat16),
        "c.codes": torch.randint(-(2**31), 2**31 - 1, (16, 8), dtype=torch.int32),
        "d.flag": torch.tensor([True, False, True]),
        "e.big": torch.randn(128, 128),
    }


@pytest.mark.parametrize("max_bytes", [10**9, 5000])
def test_planned_shards_read_back_by_safetensors_in_any_write_order(tmp_path: Path, max_bytes: int):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], max_bytes)
    for name in reversed(list(tensors)):  # the writer seeks: order does not matter
        writer.add(name, tensors[name])
    files = writer.close()
    read = {}
    for file in files:
        with safe_open(tmp_path / file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            read.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    if max_bytes == 5000:
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for file in files:  # each shard within the limit, unless it holds one tensor larger than the limit
            held = [tensors[k] for k, f in index["weight_map"].items() if f == file]
            assert sum(t.numel() * t.element_size() for t in held) <= 5000 or len(held) == 1
    else:
        assert files == ["model.safetensors"] and not (tmp_path / INDEX_FILE).exists()
    reader = CheckpointReader(tmp_path)
    assert set(reader.keys()) == set(tensors)
    assert reader.dtype("b.weight") == torch.bfloat16 and reader.shape("a.weight") == (64, 32)
    assert torch.equal(reader.get("c.codes"), tensors["c.codes"])


def test_the_writer_refuses_what_was_not_planned_and_a_missing_tensor(tmp_path: Path):
    writer = ShardedWriter(tmp_path, [("x", torch.float32, (2, 2)), ("y", torch.float32, (3,))], 10**6)
    with pytest.raises(ValueError, match="not planned"):
        writer.add("z", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="planned torch.float32 \\[2, 2\\]"):
        writer.add("x", torch.zeros(2, 3))
    writer.add("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="already written"):
        writer.add("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written, e.g. y"):
        writer.close()


def test_the_reader_reads_files_written_by_safetensors_itself(tmp_path: Path):
    tensors = _tensors()
    save_file(dict(list(tensors.items())[:2]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(list(tensors.items())[2:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert set(reader.keys()) == set(tensors) and reader.numel() == sum(t.numel() for t in tensors.values())
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())


@pytest.mark.parametrize(
    "text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000), (1234, 1234), ("1.5 GB", 1_500_000_000)]
)
def test_sizes_parse_as_transformers_reads_them(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "5 XB", "-1GB", "0", ""])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)
