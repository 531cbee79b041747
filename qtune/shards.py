"""Safetensors checkpoints one tensor at a time: a reader over a checkpoint's shards and a writer that
streams tensors into shards planned in advance, so neither side ever holds more than one tensor.

The reader opens a shard for each read, so the memory map (and the file pages it touched) is dropped
as soon as the tensor is copied out. The writer lays out every shard's header from the planned names,
dtypes and shapes, writes it first, then writes each tensor's bytes at its offset as it arrives:
nothing is buffered.
The layout is safetensors' own (8-byte little-endian header length, JSON header, raw little-endian
data), and sharded checkpoints get transformers' index file and shard names.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _shard_files(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name."""
    index = folder / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    names: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for key in _header(path):
            names[key] = path.name
    return names


def _header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


class CheckpointReader:
    """The tensors of an HF checkpoint folder (one safetensors file or an index of shards), by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._files = _shard_files(self.folder)
        self._entries: dict[str, dict] = {}
        for file in sorted(set(self._files.values())):
            header = _header(self.folder / file)
            self._entries.update({k: v for k, v in header.items() if self._files.get(k) == file})

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        """A copy of one tensor; the shard's memory map is closed again before returning."""
        from safetensors import safe_open

        with safe_open(self.folder / self._files[name], framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def numel(self) -> int:
        return sum(math.prod(entry["shape"]) for entry in self._entries.values())


@dataclass
class _Shard:
    file: str
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    nbytes: int = 0


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[_Shard]:
    """Consecutive tensors packed into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[_Shard] = []
    for name, dtype, shape in entries:
        size = _nbytes(dtype, shape)
        if not shards or (shards[-1].entries and shards[-1].nbytes + size > max_shard_bytes):
            shards.append(_Shard(""))
        shards[-1].entries.append((name, dtype, tuple(shape)))
        shards[-1].nbytes += size
    for number, shard in enumerate(shards, start=1):
        shard.file = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    return shards


def _encode_header(shard: _Shard, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in shard.entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as safetensors itself does
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedWriter:
    """Writes a planned set of tensors into ``folder`` as safetensors shards, in any order.

    Each shard's header is laid out from the plan and written when the shard is first touched; every
    tensor then goes straight to its planned offset, so nothing is buffered. ``add`` checks each tensor
    against its planned dtype and shape; ``close`` checks that every planned tensor came, and writes
    the index when there is more than one shard.
    """

    def __init__(
        self, folder: Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int, metadata: dict[str, str] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._where: dict[str, tuple[_Shard, torch.dtype, tuple[int, ...], int]] = {}
        for shard in self.shards:
            offset = 0
            for name, dtype, shape in shard.entries:
                if name in self._where:
                    raise ValueError(f"{name} is planned twice")
                self._where[name] = (shard, dtype, shape, offset)
                offset += _nbytes(dtype, shape)
        self._header_bytes: dict[str, int] = {}
        self._written: set[str] = set()

    def _open(self, shard: _Shard):
        path = self.folder / shard.file
        if shard.file not in self._header_bytes:
            header = _encode_header(shard, self.metadata)
            with open(path, "wb") as handle:
                handle.write(header)
                handle.truncate(len(header) + shard.nbytes)
            self._header_bytes[shard.file] = len(header)
        return open(path, "r+b")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise ValueError(f"{name} was not planned")
        if name in self._written:
            raise ValueError(f"{name} was already written")
        shard, dtype, shape, offset = self._where[name]
        if (tensor.dtype, tuple(tensor.shape)) != (dtype, shape):
            raise ValueError(f"{name}: planned {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous()
        with self._open(shard) as handle:
            handle.seek(self._header_bytes[shard.file] + offset)
            handle.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._written.add(name)

    def close(self) -> list[str]:
        """Check that every planned tensor was written and write the index; returns the shard file names."""
        left = [name for name in self._where if name not in self._written]
        if left:
            raise ValueError(f"{len(left)} planned tensor(s) were never written, e.g. {left[0]}")
        if len(self.shards) > 1:
            weight_map = {name: shard.file for shard in self.shards for name, _, _ in shard.entries}
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.shards)}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [shard.file for shard in self.shards]
