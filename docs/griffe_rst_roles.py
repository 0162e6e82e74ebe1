"""Griffe extension for the docs build: Sphinx roles in docstrings render as code.

The docstrings name other objects with Sphinx roles (``:class:`~smcdecode.samplers.SMC```). The
site renders them with mkdocstrings, where such a role would print literally; this turns each into
a code span (``SMC`` for a ``~``-prefixed target, the full dotted path otherwise). Only the docs
build loads it; the source is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`")


def _span(m: re.Match[str]) -> str:
    tilde, text, target = m.group(1), m.group(2).strip(), m.group(3)
    if target is not None:
        return f"`{text}`"
    return f"`{text.rsplit('.', 1)[-1] if tilde else text}`"


def convert(text: str) -> str:
    """``text`` with every Sphinx role replaced by a code span."""
    return ROLE.sub(_span, text)


class RstRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every loaded docstring (see the module docstring)."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
