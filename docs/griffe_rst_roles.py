"""Griffe extension for the docs build: Sphinx roles render as code, and overrides inherit
their docstrings.

The docstrings name other objects with Sphinx roles (``:class:`~smcdecode.samplers.SMC```). The
site renders them with mkdocstrings, where such a role would print literally; this turns each into
a code span (``SMC`` for a ``~``-prefixed target, the full dotted path otherwise). A method that
overrides a documented one without a docstring of its own (``Product.token_log_factor``) shows the
base method's, as ``help()`` does. Only the docs build loads it; the source is unchanged.
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

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _inherit(pkg)


def _inherit(obj: griffe.Object) -> None:
    """Give undocumented methods of the classes under ``obj`` their nearest base's docstring."""
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_class:
            for name, method in member.members.items():
                if method.is_alias or not method.is_function or method.docstring is not None:
                    continue
                for base in _mro(member):
                    found = base.members.get(name)
                    if found is not None and not found.is_alias and found.docstring is not None:
                        method.docstring = griffe.Docstring(found.docstring.value, parent=method)
                        break
        if member.is_module or member.is_class:
            _inherit(member)


def _mro(cls: Any) -> list[Any]:
    try:
        return list(cls.mro())
    except Exception:  # a base outside the loaded packages
        return []
