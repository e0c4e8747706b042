"""Pickling what crosses processes (an HL7 draft to the intake writer, its answer back) from the modules
compiled with mypyc (setup.py): a compiled frozen dataclass, or one with its own compiled `__init__` (which mypyc
runs as the class is called, so that it cannot be made empty first), cannot be restored attribute by attribute as
plain Python restores it, so each rebuilds itself from its fields, through its constructor."""
from __future__ import annotations

from dataclasses import fields
from typing import Any


def by_fields(obj: Any) -> tuple[type, tuple[Any, ...]]:
    """`__reduce__` of such a dataclass: its class and its fields in order."""
    return type(obj), tuple(getattr(obj, f.name) for f in fields(obj))
