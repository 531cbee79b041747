"""Writing a GGUF file atomically with gguf-py's public ``GGUFWriter`` API.

gguf-py packs array values item by item; for a 128k-token vocabulary and its merges that costs about
a second per file, which qtune accepts rather than override the writer's private packing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from qtune.paths import staging_prefix

Q = GGMLQuantizationType


def write_atomically(writer: gguf.GGUFWriter, output: Path, tensors: Iterator[np.ndarray]) -> None:
    """Write header, KVs, tensor infos and tensors to a temporary file, then rename it to ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=staging_prefix(output), dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in tensors:
            writer.write_tensor_data(data)
        for handle in writer.fout or []:
            handle.flush()
            os.fsync(handle.fileno())
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        for handle in writer.fout or []:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                handle.close()
        tmp.unlink(missing_ok=True)
        raise
