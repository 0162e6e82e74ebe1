"""The documentation cannot drift from the API: the code of Getting started, Concepts, every
sampler guide and the backend guide runs here (on the embedded model and the tiny models), and
the README and the docs link only to files that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import smcdecode as sd

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docs_examples", ROOT / "tools" / "docs_examples.py")
assert _spec is not None and _spec.loader is not None
docs_examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_examples)


@pytest.fixture(scope="module")
def shared_engine():
    """Pages each call ``sd.Engine.embedded()``; they share one loaded engine here."""
    return sd.Engine.embedded()


@pytest.mark.integration
@pytest.mark.parametrize("page", docs_examples.PAGES)
def test_page_code_runs(page, shared_engine, monkeypatch, tmp_path, capsys):
    assert any(runs for runs, _ in docs_examples.blocks(ROOT / page)), f"{page} has no runnable example"
    monkeypatch.setattr(sd.Engine, "embedded", staticmethod(lambda **kw: shared_engine))
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    docs_examples.run(ROOT / page)
    assert capsys.readouterr().out.strip(), f"{page}'s examples printed nothing"


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages == set(re.findall(r"([\w/-]+\.md)", nav)), "every page in docs/ is in mkdocs.yml's nav and back"


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "make demo" in readme and "make test" in readme
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to missing {target}"


def test_no_reference_to_absent_documents_or_issue_numbers():
    design, shared = "DESIGN" + ".md", "../" + "shared"
    issue = re.compile(r"\b[Ii]ssue\s*#?\d+|#\d{2,}\b")
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")]
    files += [*(ROOT / "smcdecode").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    for f in files:
        text = f.read_text()
        assert design not in text and shared not in text, f
        assert not issue.search(text), (f, issue.search(text))


def test_readme_example_is_getting_started_first_example():
    readme = [code for runs, code in docs_examples.blocks(ROOT / "README.md") if runs]
    first = next(code for runs, code in docs_examples.blocks(ROOT / "docs/getting-started.md") if runs)
    assert readme == [first], "the README's example is Getting started's first one (which runs in the tests)"
