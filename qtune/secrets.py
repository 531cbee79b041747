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


class RedactingFilter(logging.Filter):
    """Masks secret values in every log record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
