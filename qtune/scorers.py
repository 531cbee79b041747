"""Task scorers: does a generated answer count as correct for its reference?

A recipe names one in ``evaluation.scorer``: a built-in below, or ``package.module:function`` for a
function of the user's own taking ``(answer: str, reference: str) -> bool``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable

Scorer = Callable[[str, str], bool]


def exact_match(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


def normalized_match(answer: str, reference: str) -> bool:
    """Equal after lower-casing and collapsing whitespace."""
    squash = lambda text: re.sub(r"\s+", " ", text.strip().lower())  # noqa: E731
    return squash(answer) == squash(reference)


def json_equal(answer: str, reference: str) -> bool:
    """Both parse as JSON and hold the same value, whatever the key order and spacing."""
    try:
        return json.loads(answer) == json.loads(reference)
    except ValueError:
        return False


def contains(answer: str, reference: str) -> bool:
    return reference.strip() in answer


BUILTIN_SCORERS: dict[str, Scorer] = {f.__name__: f for f in (exact_match, normalized_match, json_equal, contains)}


def check_scorer_name(name: str) -> None:
    if name in BUILTIN_SCORERS:
        return
    if ":" not in name:
        raise ValueError(f"unknown scorer '{name}': use one of {', '.join(BUILTIN_SCORERS)} or 'package.module:function'")


def resolve_scorer(name: str) -> Scorer:
    if name in BUILTIN_SCORERS:
        return BUILTIN_SCORERS[name]
    check_scorer_name(name)
    module_name, _, attribute = name.partition(":")
    try:
        scorer = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"scorer '{name}' cannot be imported: {exc}") from None
    if not callable(scorer):
        raise ValueError(f"scorer '{name}' is not a function")
    return scorer
