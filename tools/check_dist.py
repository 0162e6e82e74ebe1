"""Check what the built sdist and wheel contain: the package ``smcdecode`` with ``targets`` and
``proposals`` inside it, and no other top-level package.

    python tools/check_dist.py dist/
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

REQUIRED = ["smcdecode/__init__.py", "smcdecode/targets/__init__.py", "smcdecode/proposals/__init__.py"]


def problems(names: list[str], sdist: bool = False) -> list[str]:
    """What is wrong with an archive holding ``names`` (paths relative to its root): a top-level
    module besides ``smcdecode`` (and ``tests`` in an sdist), or a missing package file."""
    top = {n.split("/")[0] if "/" in n else n.removesuffix(".py") for n in names if n.endswith(".py")}
    allowed = {"smcdecode", "tests", "setup"} if sdist else {"smcdecode"}
    out = [f"top-level modules besides smcdecode: {sorted(top - allowed)}"] if top - allowed else []
    return out + [f"missing {r}" for r in REQUIRED if r not in names]


def main(dist: str) -> int:
    wheels = list(Path(dist).glob("smcdecode-*.whl"))
    sdists = list(Path(dist).glob("smcdecode-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
        return 1
    with zipfile.ZipFile(wheels[0]) as z:
        wheel = [n for n in z.namelist() if ".dist-info/" not in n]
    with tarfile.open(sdists[0]) as t:
        sdist = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    bad = [f"wheel: {p}" for p in problems(wheel)] + [f"sdist: {p}" for p in problems(sdist, sdist=True)]
    if "smcdecode/py.typed" not in wheel:
        bad.append("wheel: missing smcdecode/py.typed")
    print("\n".join(bad) or f"{wheels[0].name} and {sdists[0].name}: smcdecode only, targets and proposals inside it")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "dist"))
