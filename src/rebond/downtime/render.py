"""A pack's data laid out as a PDF by Typst, in process.

Typst compiles a 24-bed ward (about a hundred pages) in a fraction of a second and needs no
system library; the data goes in as JSON through `sys.inputs`, so a patient's name is always
shown as text, never read as markup.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import orjson
import typst

TEMPLATE = Path(__file__).with_name("pack.typ")
_lock = threading.Lock()  # one compiler, its fonts loaded once, used by one thread at a time


class RenderError(RuntimeError):
    """The template could not lay out the pack (a defect of Rebond, never of the data)."""


@functools.cache
def _compiler() -> typst.Compiler:
    return typst.Compiler(TEMPLATE, root=TEMPLATE.parent)


def render_pdf(data: dict[str, Any]) -> bytes:
    payload = orjson.dumps(data).decode()
    with _lock:
        try:
            pdf = _compiler().compile(format="pdf", sys_inputs={"pack": payload}, pdf_tags=False)
        except typst.TypstError as err:
            raise RenderError(f"the pack could not be laid out: {err.message}") from None
    assert isinstance(pdf, bytes)
    return pdf
