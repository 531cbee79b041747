"""Importance matrices: per-input-column mean of x² for each linear layer, as llama.cpp's imatrix tool.

``collect_imatrix`` runs an HF model over calibration batches and accumulates, for every
``nn.Linear`` inside the decoder layers, the sum of squared inputs per input channel and the number
of tokens. The importance of a column is sum / count (llama.cpp's quantize divides the same way).
Like llama.cpp's tool (without --process-output), ``lm_head`` is left out.

Files: llama.cpp (the one bundled with llama-cpp-python 0.3.36) writes GGUF imatrix files
(``<tensor>.in_sum2`` and ``<tensor>.counts`` F32 tensors, ``imatrix.*`` keys); ``write_imatrix`` writes
that format and ``read_imatrix`` reads it and the legacy ``.dat`` format.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from qtune.cpu import fit_threads
from qtune.errors import QtuneError


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


def _accumulate(stats: Imatrix, name: str):
    def hook(_module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
        total = stats.sums.get(name)
        squares = (x * x).sum(dim=0).cpu()
        stats.sums[name] = squares if total is None else total + squares
        stats.counts[name] = stats.counts.get(name, 0) + x.shape[0]

    return hook


def _hook_linears(module: torch.nn.Module, prefix: str, stats: Imatrix) -> list:
    return [child.register_forward_hook(_accumulate(stats, prefix + name)) for name, child in module.named_modules()
            if isinstance(child, torch.nn.Linear) and ".layers." in f".{prefix}{name}"]


@torch.no_grad()
def collect_imatrix(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    chunk_size: int = 512,
    dataset: str = "qtune-calibration",
) -> Imatrix:
    """Accumulate x² per input column of every decoder-layer linear over ``batches`` (input_ids [B, T])."""
    stats = Imatrix(chunk_size=chunk_size, datasets=[dataset])
    hooks = _hook_linears(model, "", stats)
    if not hooks:
        raise QtuneError("collect_imatrix found no linear layers inside decoder layers ('.layers.') of the model")
    device = next(model.parameters()).device
    try:
        n_batches = 0
        for input_ids in batches:
            fit_threads()
            input_ids = torch.as_tensor(input_ids)
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            model(input_ids=input_ids.to(device))
            n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise QtuneError("collect_imatrix got no calibration batches")
    return stats


@torch.no_grad()
def collect_imatrix_streamed(streamed, batches: list[torch.Tensor], chunk_size: int = 512,
                             dataset: str = "qtune-calibration") -> Imatrix:
    """``collect_imatrix`` for a ``blockwise.StreamedModel``: the same sums, one decoder block in memory at a time."""
    from qtune.blockwise import release

    if not batches:
        raise QtuneError("collect_imatrix got no calibration batches")
    stats = Imatrix(chunk_size=chunk_size, datasets=[dataset])
    carried = streamed.embed([(ids, torch.ones_like(ids, dtype=torch.bool)) for ids in batches])
    for index in range(len(streamed.layers)):
        fit_threads()
        layer = streamed.load_block(index)
        hooks = _hook_linears(layer, f"model.layers.{index}.", stats)
        try:
            for batch in carried:
                batch.hidden = layer(batch.hidden, **batch.layer_kwargs[index])
                batch.hidden = batch.hidden[0] if isinstance(batch.hidden, tuple) else batch.hidden
        finally:
            for h in hooks:
                h.remove()
            release(layer)
    return stats


def to_gguf_names(stats: Imatrix, model_type: str = "llama") -> Imatrix:
    """The same statistics keyed by GGUF tensor names (``blk.0.attn_q.weight``)."""
    from qtune.formats.gguf import hf_to_gguf_name

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
    for name in sorted(stats.sums):
        writer.add_tensor(f"{name}.in_sum2", stats.sums[name].to(torch.float32).numpy().reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[stats.counts[name]]], dtype=np.float32))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
