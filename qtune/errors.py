"""The exceptions the CLI turns into one clear message and an exit code, and the translation of known
library failures (out of memory, a full disk, a damaged file) into what the user should do."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("qtune.stage")

# Exit codes: 1 is reserved for "an artifact failed its gates" (qtune run / report).
USER_ERROR_EXIT = 2
NON_FINITE_LOSS_EXIT = 3
INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE: a bug, in qtune or in a library it calls
INTERRUPTED_EXIT = 130

# What to change when a stage runs out of memory, by stage.
MEMORY_ADVICE = {
    "train": "lower training.micro_batch_size (raise gradient_accumulation_steps to keep the batch), "
    "set training.gradient_checkpointing: true, or lower data.max_length",
    "merge": "the merge holds the whole model in float32; run qtune merge on a machine with more memory",
    "export": "lower the export's samples or seq_len (calibration activations are held for one block at a time)",
    "eval": "lower evaluation.batch_size, or evaluation.max_samples",
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class QtuneError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it."""

    exit_code = USER_ERROR_EXIT


class NonFiniteLossError(QtuneError):
    """Training produced a NaN or infinite loss."""

    exit_code = NON_FINITE_LOSS_EXIT


@contextlib.contextmanager
def stage(name: str, run_dir: Path | None = None) -> Iterator[None]:
    """Mark an exception that escapes this block with the stage it came from (the innermost one wins),
    so the CLI can name it and put the traceback in that run's log folder."""
    log.debug("stage %s: started", name)
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "qtune_stage", None) is None:
            with contextlib.suppress(AttributeError):  # a few C-level exceptions take no attributes
                exc.qtune_stage = name
                exc.qtune_run_dir = run_dir
        raise


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library messages can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def stage_of(exc: BaseException) -> str | None:
    return getattr(exc, "qtune_stage", None)


def _stage_kind(name: str | None) -> str:
    return (name or "").split()[0] if name else ""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    # safetensors and torch report a full disk from Rust or C++ as a RuntimeError-like message
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def explain(exc: BaseException) -> QtuneError | None:
    """A known failure of the machine or a library restated as what to do; None when it is a bug."""
    where = stage_of(exc)
    during = f" during {where}" if where else ""
    advice = MEMORY_ADVICE.get(_stage_kind(where), "")
    if _is_gpu_out_of_memory(exc):
        return QtuneError(f"out of GPU memory{during}{': ' + advice if advice else ''}")
    if isinstance(exc, MemoryError):
        return QtuneError(f"out of host memory{during}{': ' + advice if advice else ''}")
    if is_disk_full(exc):
        name = getattr(exc, "filename", None)
        target = f" writing {name}" if name else ""
        return QtuneError(
            f"the disk is full{during}{target}. Nothing was left half-written under a final name and "
            "earlier outputs are intact: free some space and run the same command again"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and exc.filename:
        return QtuneError(f"cannot write or read {exc.filename}{during}: {exc.strerror}")
    if type(exc).__name__ == "SafetensorError":
        return QtuneError(f"a safetensors file is damaged or truncated{during}: {exc}; rebuild it (delete it and run the stage that writes it again)")
    return None


def _is_gpu_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not imported yet: then nothing could have raised its error
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
