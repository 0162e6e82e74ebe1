"""The runnable code of the documentation pages.

A page's ```python blocks run in order in one namespace, as a reader would paste them; a block
whose preceding line is ``<!-- not-run: REASON -->`` is skipped (it needs a GPU, a hub model or an
optional extra). Used by ``tests/test_docs.py`` and by the wheel check (``make wheel-check``):

    python tools/docs_examples.py docs/getting-started.md [--first]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The pages whose code must run: Getting started, each sampler guide, the backend guide, Concepts.
PAGES = [
    "docs/getting-started.md",
    "docs/concepts.md",
    "docs/samplers/ancestral.md",
    "docs/samplers/suffix-mh.md",
    "docs/samplers/block-mh.md",
    "docs/samplers/smc.md",
    "docs/samplers/lookahead.md",
    "docs/samplers/eglr.md",
    "docs/backends.md",
]
BLOCK = re.compile(r"^(<!-- not-run:[^>]*-->\n)?```python\n(.*?)^```$", re.S | re.M)


def blocks(page: str | Path) -> list[tuple[bool, str]]:
    """(runs, code) of every python block of ``page``, in order."""
    return [(not skip, code) for skip, code in BLOCK.findall(Path(page).read_text())]


def run(page: str | Path, first: bool = False) -> dict:
    """Run the page's runnable blocks (only the first with ``first``) in one namespace; returns it."""
    ns: dict = {"__name__": "__docs__"}
    for i, code in enumerate(code for runs, code in blocks(page) if runs):
        exec(compile(code, f"{page}[block {i}]", "exec"), ns)
        if first:
            break
    return ns


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--first"]
    for page in args:
        run(page, first="--first" in sys.argv)
