"""The package carries its version, and the sdist and wheel hold targets and proposals only as
smcdecode.targets / smcdecode.proposals."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
from pathlib import Path

import pytest

import smcdecode
from smcdecode.cli import main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_dist", ROOT / "tools" / "check_dist.py")
assert _spec is not None and _spec.loader is not None
check_dist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_dist)

# The modules the API reference renders; every public object in them has a docstring.
RENDERED = [
    "smcdecode",
    "smcdecode.targets",
    "smcdecode.proposals",
    "smcdecode.samplers",
    "smcdecode.backends",
    "smcdecode.readouts",
    "smcdecode.testing",
    "smcdecode.evaluate",
    "smcdecode.models",
    "smcdecode.report",
    "smcdecode.diagnostics",
    "smcdecode.errors",
]


def test_version():
    assert smcdecode.__version__ == importlib.metadata.version("smcdecode")


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"smcdecode {smcdecode.__version__}"


def test_layout_has_no_top_level_targets_or_proposals():
    assert not (ROOT / "targets").exists() and not (ROOT / "proposals").exists()
    good = ["smcdecode/__init__.py", "smcdecode/targets/__init__.py", "smcdecode/proposals/__init__.py"]
    assert check_dist.problems(good) == []
    assert check_dist.problems([*good, "targets/lm.py"]) != []
    assert check_dist.problems(good[:1]) != []


def _public(module):
    names = getattr(module, "__all__", None)
    if names is None:
        own = [n for n, v in vars(module).items() if getattr(v, "__module__", "") == module.__name__]
        names = [n for n in own if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    kinds = (classmethod, staticmethod, property)
                    if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, kinds)):
                        yield f"{module.__name__}.{name}.{attr}", member


def test_every_rendered_public_object_has_a_docstring():
    missing = []
    for modname in RENDERED:
        module = importlib.import_module(modname)
        for path, obj in _public(module):
            if isinstance(obj, (classmethod, staticmethod)):
                obj = obj.__func__
            if not (inspect.getdoc(obj) or "").strip():  # inherited from a base's method as help() does
                missing.append(path)
    assert not missing, "no docstring: " + ", ".join(sorted(set(missing)))


def _parameters(fn) -> list[str]:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []
    return [n for n in names if n not in ("self", "cls")]


def test_every_rendered_function_with_parameters_documents_them():
    # The API reference renders an ``Args:`` section from the docstring (Google style); a function
    # or method of the rendered modules that takes parameters must have one. Classes are not
    # checked here: their constructor arguments may be documented as ``Args:`` or ``Attributes:``.
    from smcdecode.backends.llamacpp import LlamaCppBackend  # rendered on the backends page

    members = [(f"{LlamaCppBackend.__module__}.LlamaCppBackend", LlamaCppBackend)]
    members += [(f"{LlamaCppBackend.__module__}.LlamaCppBackend.{a}", m) for a, m in vars(LlamaCppBackend).items()]
    for modname in RENDERED:
        members += list(_public(importlib.import_module(modname)))
    missing = []
    for path, obj in members:
        if path.rsplit(".", 1)[-1].startswith("_"):
            continue
        if isinstance(obj, (classmethod, staticmethod)):
            obj = obj.__func__
        if inspect.isfunction(obj) and _parameters(obj) and "Args:" not in (inspect.getdoc(obj) or ""):
            missing.append(path)
    assert not missing, "no Args: section: " + ", ".join(sorted(set(missing)))
