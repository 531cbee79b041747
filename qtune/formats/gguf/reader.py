"""The one GGUF header reader: KV metadata and tensor infos, without reading tensor data."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType

from qtune.errors import QtuneError
from qtune.formats.gguf.layout import tensor_nbytes

Q = GGMLQuantizationType


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: [rows, n_per_row]
    offset: int  # absolute file offset of the data
    nbytes: int


def read_gguf_header(path: Path) -> tuple[dict[str, object], list[GGUFTensorInfo]]:
    """The KV metadata and tensor infos of a GGUF file (fast: gguf.GGUFReader takes seconds on a vocabulary)."""
    with open(path, "rb") as f:
        buf = f.read(1 << 20)
        while True:
            try:
                return _parse_header(buf)
            except (struct.error, IndexError):
                more = f.read(len(buf))
                if not more:
                    raise QtuneError(f"{path} is not a complete GGUF file") from None
                buf += more


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _parse_header(buf: bytes) -> tuple[dict[str, object], list[GGUFTensorInfo]]:
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != 0x46554747 or version not in (2, 3):
        raise QtuneError(f"not a GGUF v2/v3 file (magic {magic:#x}, version {version})")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise IndexError
        pos += 8 + n
        return buf[pos - n : pos].decode("utf-8", errors="replace")

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            item_type, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            return [value(item_type) for _ in range(n)]
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    kv: dict[str, object] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        kv[key] = value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        qtype = GGMLQuantizationType(qtype)
        shape = tuple(int(x) for x in reversed(ne))
        infos.append(GGUFTensorInfo(name, qtype, shape, offset, tensor_nbytes(qtype, shape)))
    align = int(kv.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    return kv, [GGUFTensorInfo(t.name, t.qtype, t.shape, data_start + t.offset, t.nbytes) for t in infos]
