"""Head registry: ``build_head(spec, hidden_size, vocab_size)`` turns a recipe's head section
into a module. Each head lives in its own file; the registry maps its name to where it lives so
that importing one head never imports the others."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from pydantic import ValidationError

from llmtrain.heads.base import IGNORE_INDEX, Head, HeadOptions, HeadOutput

__all__ = ["HEADS", "IGNORE_INDEX", "Head", "HeadOptions", "HeadOutput", "build_head", "head_class"]

HEADS: dict[str, str] = {
    "softmax": "llmtrain.heads.softmax:SoftmaxHead",
    "cce": "llmtrain.heads.cce:CCEHead",
    "hsm": "llmtrain.heads.hsm:HsmHead",
    "zloss": "llmtrain.heads.zloss:ZLossHead",
}


def head_class(name: str) -> type[Head]:
    if name not in HEADS:
        raise ValueError(f"unknown head type {name!r}; choose one of {', '.join(sorted(HEADS))}")
    module_name, class_name = HEADS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_head_options(spec: Mapping[str, Any]) -> tuple[type[Head], HeadOptions]:
    """Validate a head spec ({"type": ..., **options}); raises ValueError / ValidationError."""
    spec = dict(spec)
    cls = head_class(spec.pop("type", "softmax"))
    return cls, cls.Options.model_validate(spec)


def build_head(spec: Mapping[str, Any], hidden_size: int, vocab_size: int) -> Head:
    """Build a head from {"type": name, **options}."""
    try:
        cls, options = parse_head_options(spec)
    except ValidationError as e:
        raise ValueError(f"bad options for head {dict(spec).get('type', 'softmax')!r}: {e}") from None
    return cls(options, hidden_size=hidden_size, vocab_size=vocab_size)
