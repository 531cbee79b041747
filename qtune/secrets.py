"""Secrets come from the environment only, and are scrubbed from everything qtune writes."""

from __future__ import annotations

import logging
import os

SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
MASK = "***"


def secret_values() -> list[str]:
    # Very short values would mask ordinary words; real keys and tokens are long.
    return [v for name in SECRET_ENV_VARS if len(v := os.environ.get(name, "")) >= 8]


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def redact_data(value):
    """``redact`` applied to every string inside nested lists and dicts."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_data(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    return value


class RedactingFilter(logging.Filter):
    """Masks secret values in every log record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
