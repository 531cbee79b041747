"""What a checkpoint folder must hold, checked before anything loads it, so that a damaged file is named
instead of surfacing as a library's traceback: safetensors whose header parses and whose data is all
there, the shards an index names, and JSON files (config, tokenizer) that parse."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from qtune.errors import QtuneError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "adapter_config.json", "generation_config.json")


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file; None when its header and data are whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                return "its header length is impossible for this file (not safetensors, or truncated)"
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON (not safetensors, or damaged)"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry.get("data_offsets", [0, 0])[1] for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"truncated: its header describes {needed:,} bytes, the file holds {size:,}"
    return None


def check_checkpoint(folder: Path) -> None:
    """Raise a QtuneError naming the first damaged or missing file of a checkpoint or adapter folder."""
    folder = Path(folder)
    for name in JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise QtuneError(f"{path} is damaged ({type(exc).__name__}: {exc}); write it again or restore it") from None
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise QtuneError(f"{index} is damaged ({type(exc).__name__}); write it again or restore it") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise QtuneError(f"{folder} lacks the shard(s) {', '.join(missing)} that {index.name} names")
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise QtuneError(f"{path} is damaged: {problem}; write it again or restore it")


def copy_generation_config(checkpoint: Path, folder: Path, config=None) -> None:
    """``checkpoint``'s generation config into ``folder``; without one, the one transformers builds from
    ``config`` (nothing when no config is given)."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(checkpoint)
    except OSError:  # the checkpoint has none
        if config is None:
            return
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
