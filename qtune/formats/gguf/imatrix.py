"""llama.cpp's importance-matrix files: the GGUF format its imatrix tool writes (``<tensor>.in_sum2`` and
``<tensor>.counts`` F32 tensors, ``imatrix.*`` keys; the llama.cpp bundled with llama-cpp-python 0.3.36)
and the legacy ``.dat`` format, read only. ``qtune.imatrix`` collects the statistics."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from qtune.errors import QtuneError
from qtune.formats.gguf.names import hf_to_gguf_name
from qtune.formats.gguf.writer import write_atomically


@dataclass
class Imatrix:
    """Raw statistics: per module, the column sums of x² and the number of rows (tokens) seen."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 [in_features]
    counts: dict[str, int] = field(default_factory=dict)
    chunk_size: int = 512
    datasets: list[str] = field(default_factory=list)

    def means(self) -> dict[str, torch.Tensor]:
        """Importance per column (float32), computed as llama.cpp does from the float32 file values."""
        out = {}
        for name, total in self.sums.items():
            count = self.counts[name]
            sums = total.to(torch.float32)
            out[name] = sums / np.float32(count) if count > 0 else torch.ones_like(sums)
        return out


def to_gguf_names(stats: Imatrix, model_type: str = "llama") -> Imatrix:
    """The same statistics keyed by GGUF tensor names (``blk.0.attn_q.weight``)."""
    return Imatrix(
        sums={hf_to_gguf_name(k, model_type): v for k, v in stats.sums.items()},
        counts={hf_to_gguf_name(k, model_type): v for k, v in stats.counts.items()},
        chunk_size=stats.chunk_size,
        datasets=list(stats.datasets),
    )


def write_imatrix(path: Path, stats: Imatrix) -> None:
    """Write llama.cpp's GGUF imatrix file (keys must already be GGUF tensor names)."""
    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch="imatrix")
    writer.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files carry no architecture
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", stats.datasets or ["unknown"])
    n_chunks = max(stats.counts.values(), default=0) // max(1, stats.chunk_size)
    writer.add_uint32("imatrix.chunk_count", n_chunks)
    writer.add_uint32("imatrix.chunk_size", stats.chunk_size)
    tensors = {}
    for name in sorted(stats.sums):
        tensors[f"{name}.in_sum2"] = stats.sums[name].to(torch.float32).numpy().reshape(1, -1)
        tensors[f"{name}.counts"] = np.array([[stats.counts[name]]], dtype=np.float32)
    for name, array in tensors.items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
    write_atomically(writer, path, iter(tensors.values()))


def read_imatrix(path: Path) -> Imatrix:
    """Read a llama.cpp imatrix file, GGUF or legacy ``.dat``."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf_imatrix(path)
    return _read_legacy_imatrix(path)


def _read_gguf_imatrix(path: Path) -> Imatrix:
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    stats = Imatrix(datasets=list(fields["imatrix.datasets"].contents()) if "imatrix.datasets" in fields else [])
    if "imatrix.chunk_size" in fields:
        stats.chunk_size = int(fields["imatrix.chunk_size"].contents())
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float32)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.array(t.data, dtype=np.float32)
    for name, values in sums.items():
        if name not in counts:
            raise QtuneError(f"{path}: {name} has in_sum2 but no counts")
        if counts[name].size != 1:
            raise QtuneError(f"{path}: {name} is a mixture-of-experts entry ({counts[name].size} counts); not supported")
        stats.sums[name] = torch.from_numpy(values.reshape(-1).copy())
        stats.counts[name] = int(round(float(counts[name].reshape(-1)[0])))
    if not stats.sums:
        raise QtuneError(f"{path}: no imatrix entries")
    return stats


def _read_legacy_imatrix(path: Path) -> Imatrix:
    """Legacy .dat: n_entries, then per entry (name, ncall, nval, sums pre-divided and times ncall)."""
    data = path.read_bytes()
    try:
        (n_entries,), pos = struct.unpack_from("<i", data, 0), 4
        if n_entries < 1:
            raise ValueError("no entries")
        stats = Imatrix(chunk_size=0)
        for _ in range(n_entries):
            (length,) = struct.unpack_from("<i", data, pos)
            name = data[pos + 4 : pos + 4 + length].decode()
            pos += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, pos)
            pos += 8
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).copy()
            pos += 4 * nval
            stats.sums[name] = torch.from_numpy(values)
            stats.counts[name] = ncall  # sums / ncall is the importance, as in llama.cpp
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise QtuneError(f"{path} is neither a GGUF nor a legacy llama.cpp imatrix file ({exc})") from None
    return stats
