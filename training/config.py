"""Run configuration: the trainers' option dataclasses read from dicts, config merging and the
``--set dotted.key=value`` overrides of the command line."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar


class Options:
    """Base of the option dataclasses: ``from_dict`` builds one and names unknown keys (a typo in a
    config must not be ignored silently)."""

    options_name: ClassVar[str] = "training"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None):
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.options_name} options {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def deep_merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(cfg: dict, sets: list[str]) -> dict:
    """``a.b.c=value`` (value parsed as JSON when it parses, else a string)."""
    for s in sets or []:
        key, _, raw = s.partition("=")
        if not key or not _:
            raise ValueError(f"--set expects key=value, got {s!r}")
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return cfg
