"""Run untrusted Python (HumanEval completions, reward checks) outside the sampling process.

``execute(program, timeout, memory_mb) -> Execution`` writes the program into a fresh temporary
directory and runs it with a separate interpreter that:

* starts in its own session (the whole process group is killed afterwards),
* has CPU-time, address-space, process-count, file-size and open-file limits,
* sees an empty environment (no secrets, no proxies) with HOME/TMPDIR in its directory,
* has no network: a new network namespace with no interfaces up (when the kernel allows it),
* when we are root, runs as a fresh unprivileged uid chosen per call, so it cannot write outside
  its directory (other than world-writable places), cannot signal its parent, and the process
  limit counts only its own processes; every process left with that uid is killed at the end.

A program passes when it exits 0. ``status`` is "passed", "failed" (an AssertionError), "timeout"
(wall clock or CPU limit), "memory" (MemoryError or killed growing its address space) or "error"
(anything else). ``protections`` lists the measures that were actually in force.
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from smcdecode.errors import ArgumentError

CLONE_NEWNET = 0x40000000
OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr kept (RLIMIT_FSIZE also caps the files)


@dataclass
class Execution:
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_time: float
    protections: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _world_executable(path: str) -> bool:
    """True when every directory on the way to ``path`` and the file itself are o+x."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _python_for(uid_switch: bool) -> str:
    if not uid_switch or _world_executable(sys.executable):
        return sys.executable
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(cand) and _world_executable(cand):
            return cand
    return ""


_NET_OK: bool | None = None


def _can_unshare_net() -> bool:
    """Probe once (in a child) whether a new network namespace can be created."""
    global _NET_OK
    if _NET_OK is None:
        pid = os.fork()
        if pid == 0:  # child: try and report through the exit code
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                os._exit(0 if libc.unshare(CLONE_NEWNET) == 0 else 1)
            except Exception:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        _NET_OK = os.waitstatus_to_exitcode(status) == 0
    return _NET_OK


def live_processes(uid: int) -> list[int]:
    """Pids owned by ``uid`` that are not zombies."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(int(entry))
    return out


def _kill_uid(uid: int, patience: float = 2.0) -> None:
    """SIGKILL every process owned by ``uid`` (a per-call sandbox uid nobody else uses) and wait
    until none is left running."""
    deadline = time.monotonic() + patience
    while (pids := live_processes(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


def execute(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 16) -> Execution:
    """Run ``program`` (Python source) in the sandbox described in the module docstring."""
    if not isinstance(program, str):
        raise ArgumentError("program", "must be Python source text")
    if not timeout > 0:
        raise ArgumentError("timeout", f"must be > 0, got {timeout}")
    if not memory_mb >= 32:
        raise ArgumentError("memory_mb", f"must be >= 32, got {memory_mb}")
    is_root = os.geteuid() == 0
    python = _python_for(is_root)
    switch_uid = is_root and bool(python)
    python = python or sys.executable
    uid = random.SystemRandom().randint(200_000, 900_000) if switch_uid else os.getuid()
    net = _can_unshare_net()
    protections = ["session", "rlimits", "clean-env", "tempdir"]
    if net:
        protections.append("no-network")
    if switch_uid:
        protections.append(f"uid-{uid}")
    elif is_root:
        protections.append("WARNING-root-without-uid-switch")
    work = tempfile.mkdtemp(prefix="smcdecode-sandbox-")
    try:
        path = os.path.join(work, "program.py")
        with open(path, "w") as f:
            f.write(program)
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        if switch_uid:
            os.chown(work, uid, uid)
            os.chmod(work, 0o700)
            os.chmod(path, 0o644)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        cpu = int(timeout) + 1
        mem = memory_mb * 1024 * 1024
        nproc = max_processes if switch_uid else max_processes + _count_own_processes()

        def limit() -> None:  # runs in the child between fork and exec
            os.setsid()
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT * 4, OUTPUT_LIMIT * 4))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if net:
                ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
            if switch_uid:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

        t0 = time.perf_counter()
        status, code = "error", None
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [python, "-I", "-B", path],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=limit,
                close_fds=True,
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if switch_uid:
                    _kill_uid(uid)
                proc.wait()
        wall = time.perf_counter() - t0
        stdout, stderr = _read(out_path), _read(err_path)
        if status != "timeout":
            status = _classify(code, stderr)
        return Execution(status, code, stdout, stderr, wall, tuple(protections))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(OUTPUT_LIMIT).decode("utf-8", "replace")
    except OSError:
        return ""


def _classify(code: int | None, stderr: str) -> str:
    if code == 0:
        return "passed"
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in stderr:
        return "timeout" if code == -signal.SIGXCPU else "memory"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    if "AssertionError" in stderr:
        return "failed"
    return "error"


def _count_own_processes() -> int:
    uid = os.getuid()
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                n += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return n
