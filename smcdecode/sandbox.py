"""Run untrusted Python (HumanEval completions, reward checks) outside the sampling process.

``execute(program, timeout, memory_mb) -> Execution`` runs the program with a separate interpreter
(``-I -B``) under the measures below. ``protections`` lists those actually in force for that call;
what the system allows is found out at run time, once per process and effective uid, by building
a real view in a throw-away child.

Always (every Linux system):

* ``session``: its own session; the whole process group is SIGKILLed at the end;
* ``rlimits``: CPU time (timeout + 1 s), address space (memory_mb), processes (max_processes),
  file size (4 MiB), open files (64), no core files;
* ``clean-env``: an empty environment (no secrets, no proxies) but PATH, LANG, HOME and TMPDIR;
* ``tempdir``: it starts in a directory of its own, which HOME and TMPDIR point to and which is
  gone at the end (``/tmp/sandbox`` in its private ``/tmp`` with ``private-fs``, else a fresh
  temporary directory deleted afterwards);
* ``no-new-privs``: exec never grants privileges (set-user-ID bits and file capabilities are
  ignored: prctl(2) PR_SET_NO_NEW_PRIVS), for it and every process it starts.

As root, ``uid-N``: the program runs as a fresh unprivileged uid N chosen per call, so it cannot
signal its parent, the process limit counts only its own processes, and every process left with
that uid is killed at the end. (Without a world-executable interpreter root would have to run
the program as root: it reports ``WARNING-root-without-uid-switch`` and gets no private view,
which a root program could undo.)

With namespaces, new mount, network and IPC namespaces give:

* ``private-fs``: a private filesystem view. Every mount is remounted read-only (one the setup
  itself cannot reach is left alone: the program cannot reach it either); ``/tmp`` and
  ``/dev/shm`` are new tmpfs of at most memory_mb MiB and 4096 inodes each (files take at most
  2 x memory_mb MiB of RAM, besides each process's address space), which vanish with the
  namespace when its last process ends. Nothing the program writes outlives it or is seen by the next call, and
  nothing outside its view (``/var/tmp``, ``$HOME``, the project) can be written. It keeps no
  capabilities, and a user namespace of its own only gets a copy of the view whose mounts the
  kernel locks: it cannot unmount, uncover or remount anything.
* ``hidden:PATH``: PATH, the caller's home or temporary directory or a directory the caller
  asks to hide (``running(hide=...)``, e.g. where a benchmark's tests are stored), is covered by
  an empty read-only tmpfs (not when the interpreter lives under it: then it is only read-only);
* ``no-network``: no interfaces up, not even loopback;
* ``private-ipc``: its own System V IPC objects and POSIX message queues, destroyed at the end.

Which systems get what:

* root with CAP_SYS_ADMIN (a plain root, or root in a container allowed to make namespaces):
  everything above; the namespaces are made directly, then the uid switch drops every
  capability.
* non-root where the kernel lets it make a user namespace and mount in it: everything above but
  ``uid-N``, plus ``user-namespace``: the namespaces are entered through a new user namespace
  that maps the caller's uid and gid to themselves (not to 0, so exec drops its capabilities),
  and every process left in the program's mount namespace is killed at the end. The program
  runs as the caller's uid: it can still signal the caller's processes. Root without
  CAP_SYS_ADMIN takes this route too, after the uid switch, so it keeps ``uid-N``.
* no namespaces (user namespaces disabled by a sysctl or a security module, or a container that
  forbids them): the always-on measures, ``uid-N`` as root, and ``no-network`` when a network
  namespace alone can be made. The program CAN then write wherever its uid can: as root's fresh
  uid, world-writable places (``/tmp``, ``/dev/shm``, ``/var/tmp``); as a non-root caller's
  uid, all the caller's files. ``private-fs`` is absent from ``protections`` to say so.

Not covered anywhere: there is no PID namespace (``/proc`` lists every process, with details for
its own uid only), and Unix sockets on the filesystem are not network: one its uid may write
to (e.g. a world-writable system bus socket) can still be connected to.

A program passes when it exits 0. ``status`` is "passed", "failed" (an AssertionError), "timeout"
(wall clock or CPU limit), "memory" (MemoryError or killed growing its address space) or "error"
(anything else).
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from smcdecode.errors import ArgumentError, SmcdecodeError

# linux/sched.h, linux/mount.h
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38  # linux/prctl.h
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}  # locked in a user ns

OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr kept (RLIMIT_FSIZE also caps the files)
PRIVATE_DIR = "/tmp/sandbox"  # the program's directory inside its private /tmp
TMPFS_INODES = 4096


class SandboxError(SmcdecodeError, RuntimeError):
    """The sandbox could not be set up for a call (the program was not run)."""


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
_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _check(result: int, what: str) -> None:
    """Raise the OSError of a failed libc call (one that returned -1)."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _can_unshare_net() -> bool:
    """Probe once (in a child) whether a new network namespace can be created."""
    global _NET_OK
    if _NET_OK is None:
        pid = os.fork()
        if pid == 0:  # child: try and report through the exit code
            try:
                os._exit(0 if _libc().unshare(CLONE_NEWNET) == 0 else 1)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        _NET_OK = os.waitstatus_to_exitcode(status) == 0
    return _NET_OK


def _fresh_uid() -> int:
    return random.SystemRandom().randint(200_000, 900_000)


def _switch_uid(uid: int) -> None:
    """Become ``uid`` (group ``uid``, no supplementary groups); this drops every capability."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# ---- the private filesystem view ----------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What a child needs to build its private view, all computed in the parent (between fork
    and exec the child should allocate little)."""

    user_ns: bool  # enter through a new user namespace (no CAP_SYS_ADMIN of our own)
    writable_mounts: tuple[tuple[bytes, int], ...]  # (mount point, flags a remount must keep)
    hidden: tuple[str, ...]  # covered by an empty read-only tmpfs
    size_mb: int  # of /tmp and of /dev/shm
    program: bytes  # written to PRIVATE_DIR/program.py
    owner: int  # uid given PRIVATE_DIR (the per-call uid as root), -1 to keep the creator


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\040 is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def writable_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[bytes, int]]:
    """Mount points not already read-only, each with the flags (nosuid, nodev, noexec) that a
    read-only remount must repeat: in a user namespace they are locked. proc(5): field 5 of a
    mountinfo line is the mount point, field 6 its per-mount options."""
    out: dict[bytes, int] = {}
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            options = fields[5].split(",")
            if "ro" not in options:
                point = os.fsencode(_unescape(fields[4]))
                out[point] = sum(KEPT_FLAGS.get(o, 0) for o in options)
    return list(out.items())


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def hidden_paths(python: str) -> tuple[str, ...]:
    """The caller's home and temporary directories, to be made invisible; a directory is kept
    visible (read-only) when it holds the interpreter or its prefix (it must still start), or
    /tmp, /dev/shm or "/" (replaced or needed anyway), or lies in /tmp."""
    real = os.path.realpath(python)
    needed = {python, real, os.path.dirname(os.path.dirname(real)), "/tmp", "/dev/shm"}
    if python == sys.executable:
        needed |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    out: list[str] = []
    for path in (os.path.expanduser("~"), tempfile.gettempdir()):
        path = os.path.realpath(path)
        if path in out or _within(path, "/tmp") or not os.path.isdir(path):
            continue
        if not any(_within(n, path) for n in needed):
            out.append(path)
    return tuple(out)


def _view(user_ns: bool, program: str, memory_mb: int, owner: int, python: str, hide: Sequence[str] = ()) -> View:
    hidden = list(hidden_paths(python))
    for path in map(os.path.realpath, hide):
        if os.path.isdir(path) and path not in hidden and not _within(os.path.realpath(python), path):
            hidden.append(path)
    return View(user_ns, tuple(writable_mounts()), tuple(hidden), memory_mb, program.encode(), owner)


def _mount(source: bytes | None, target: bytes | str, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    target = os.fsencode(target)
    _check(_libc().mount(source, target, fstype, ctypes.c_ulong(flags), data), f"mount {target!r}")


def _write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _map_ids(uid: int, gid: int) -> None:
    """Map ``uid`` and ``gid`` to themselves in the new user namespace. user_namespaces(7): an
    unprivileged process may map only its own ids, and must deny setgroups first. The ids are
    not 0 inside, so exec drops the namespace's capabilities: the program cannot undo the view.
    A process that changed its uid is not dumpable and its /proc/self belongs to root (proc(5)),
    so dumpable is set first (exec sets it again from the program's credentials)."""
    _check(_libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl")
    _write_once("/proc/self/setgroups", b"deny")
    _write_once("/proc/self/uid_map", f"{uid} {uid} 1".encode())
    _write_once("/proc/self/gid_map", f"{gid} {gid} 1".encode())


def _write_once(path: str, data: bytes) -> None:
    """One write(2) call, as the id map files of proc(5) require."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, f"short write to {path}")
    finally:
        os.close(fd)


def _remount_read_only(point: bytes, kept: int) -> None:
    """Bind-remount one mount read-only (mount(2): MS_REMOUNT|MS_BIND changes only per-mount
    flags). A mount point the setup cannot reach (EACCES, ENOENT) is left alone: the program,
    with the same uid or a fresh one and no capabilities, cannot reach it either."""
    if _libc().mount(None, point, None, ctypes.c_ulong(MS_REMOUNT | MS_BIND | MS_RDONLY | kept), None) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EACCES, errno.ENOENT):
            raise OSError(err, f"remount {point!r} read-only: {os.strerror(err)}")


def enter_view(view: View) -> None:
    """In the child, between fork and exec: new mount, network and IPC namespaces (and user
    namespace when ``view.user_ns``), every mount read-only, ``view.hidden`` covered, fresh
    tmpfs on /tmp and /dev/shm, the program in PRIVATE_DIR, which becomes the working directory.
    Raises OSError (and the program must not run) when any step fails."""
    uid, gid = os.getuid(), os.getgid()  # read before: in a new user namespace they are unmapped
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | (CLONE_NEWUSER if view.user_ns else 0)
    _check(_libc().unshare(flags), "unshare")
    if view.user_ns:
        _map_ids(uid, gid)
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates back out
    for point, kept in view.writable_mounts:
        _remount_read_only(point, kept)
    for path in view.hidden:
        _mount(b"tmpfs", path, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=555")
    tmpfs = f"size={view.size_mb}m,nr_inodes={TMPFS_INODES},mode=1777".encode()
    _mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    if os.path.isdir("/dev/shm"):
        _mount(b"tmpfs", "/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    os.mkdir(PRIVATE_DIR, 0o700)
    _write_file(os.path.join(PRIVATE_DIR, "program.py"), view.program)
    if view.owner >= 0:
        os.chown(PRIVATE_DIR, view.owner, view.owner)
    os.chdir(PRIVATE_DIR)


_MODES: dict[int, str] = {}  # euid -> namespace mode


def namespace_mode() -> str:
    """How this process can give a program a private view: "direct" (it may create mount
    namespaces itself: root with CAP_SYS_ADMIN), "user" (through a new user namespace) or ""
    (not at all). Found once per euid by building a real view in a child."""
    euid = os.geteuid()
    if euid not in _MODES:
        modes = ("direct", "user") if euid == 0 else ("user",)
        _MODES[euid] = next((m for m in modes if _probe(m)), "")
    return _MODES[euid]


def _probe(mode: str) -> bool:
    view = _view(mode == "user", "pass\n", 32, -1, sys.executable)
    pid = os.fork()
    if pid == 0:  # child: try and report through the exit code
        try:
            if mode == "user" and os.geteuid() == 0:
                _switch_uid(_fresh_uid())  # root enters a user namespace only without its rights
            enter_view(view)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


# ---- cleaning up ----------------------------------------------------------------------------


def _state(pid: int | str) -> str:
    """The state letter of ``pid`` (proc(5): "R", "S", "Z" for a zombie, ...), "" when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def live_processes(uid: int) -> list[int]:
    """Pids owned by ``uid`` that are not zombies."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
        except OSError:
            continue
        if _state(entry) not in ("", "Z"):
            out.append(int(entry))
    return out


def mount_namespace(pid: int) -> str:
    """The mount namespace of ``pid`` ("mnt:[inode]"), "" when it is gone or not ours to read."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def _kill_all(find: Callable[[], list[int]], patience: float = 2.0) -> None:
    """SIGKILL every process ``find`` returns, again, until it returns none and each process
    killed is gone or a zombie (a dying process may leave its namespaces, so ``find`` can miss
    it before it is gone), or ``patience`` s pass."""
    deadline = time.monotonic() + patience
    dying: set[int] = set()
    while time.monotonic() < deadline:
        pids = find()
        dying = {p for p in dying if _state(p) not in ("", "Z")} | set(pids)
        if not dying:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


def _in_namespace(uid: int, namespace: str) -> list[int]:
    return [p for p in live_processes(uid) if mount_namespace(p) == namespace]


# ---- running a program ----------------------------------------------------------------------


def execute(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 16) -> Execution:
    """Run ``program`` (Python source) in the sandbox described in the module docstring, until it
    ends or ``timeout`` seconds pass.

    Raises ArgumentError for a bad argument and SandboxError when the sandbox that was found
    available could not be set up for this call (the program did not run)."""
    with running(program, timeout, memory_mb, max_processes) as run:
        try:
            run.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
    assert run.execution is not None
    return run.execution


@dataclass
class Running:
    """A sandboxed program while it runs (see :func:`running`)."""

    proc: subprocess.Popen[bytes]
    started: float  # time.perf_counter() at the start
    protections: tuple[str, ...]
    timed_out: bool = False  # set by the caller when it gave up waiting
    execution: Execution | None = None  # filled in when the program has been cleaned up


@contextmanager
def running(
    program: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 16,
    pass_fds: Sequence[int] = (),
    hide: Sequence[str] = (),
) -> Iterator[Running]:
    """Start ``program`` in the sandbox and yield it running; on leaving, kill it and every process
    it left (whether or not it ended), and set ``execution`` (status "timeout" when the caller set
    ``timed_out``). ``pass_fds``: descriptors of the caller the program inherits, at the same
    numbers (e.g. pipes to talk to it). ``hide``: directories to cover like the caller's home
    (``hidden:PATH``; only with ``private-fs``). ``timeout`` sets the CPU-time limit; waiting is
    the caller's business."""
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
    uid = _fresh_uid() if switch_uid else os.getuid()
    # root that keeps its uid would keep its capabilities, and could undo the view
    mode = namespace_mode() if switch_uid or not is_root else ""
    owner = uid if mode == "direct" else -1
    view = _view(mode == "user", program, memory_mb, owner, python, hide) if mode else None
    net = bool(mode) or _can_unshare_net()
    protections = ["session", "rlimits", "clean-env", "tempdir", "no-new-privs"]
    if view is not None:
        protections += ["private-fs", *(f"hidden:{p}" for p in view.hidden), "private-ipc"]
    if net:
        protections.append("no-network")
    if mode == "user":
        protections.append("user-namespace")
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
        home = PRIVATE_DIR if view is not None else work
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": home,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        cpu = int(timeout) + 1
        mem = memory_mb * 1024 * 1024
        nproc = max_processes if switch_uid else max_processes + _count_own_processes()

        def limit() -> None:  # runs in the child between fork and exec, stderr already redirected
            try:
                setup()
            except BaseException as e:
                os.write(2, f"{type(e).__name__}: {e}".encode())
                raise

        def setup() -> None:
            os.setsid()
            if switch_uid and mode == "user":
                _switch_uid(uid)
            if view is not None:
                enter_view(view)
            elif net:
                _check(_libc().unshare(CLONE_NEWNET), "unshare")
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT * 4, OUTPUT_LIMIT * 4))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if switch_uid and mode != "user":
                _switch_uid(uid)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")

        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-B", os.path.join(home, "program.py")],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    preexec_fn=limit,
                    close_fds=True,
                    pass_fds=tuple(pass_fds),
                )
            except subprocess.SubprocessError as e:
                why = _read(err_path) or str(e)
                raise SandboxError(f"could not set up the sandbox ({', '.join(protections)}): {why}") from e
            # a program in a user namespace may leave processes outside its group: find them later
            namespace = mount_namespace(proc.pid) if mode == "user" and not switch_uid else ""
            run = Running(proc, t0, tuple(protections))
            try:
                yield run
            finally:
                code = proc.poll()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if switch_uid:
                    _kill_all(lambda: live_processes(uid))
                elif namespace:
                    _kill_all(lambda: _in_namespace(uid, namespace))
                proc.wait()
                code = proc.returncode if code is None and not run.timed_out else code
                wall = time.perf_counter() - t0
                stdout, stderr = _read(out_path), _read(err_path)
                status = "timeout" if run.timed_out else _classify(code, stderr)
                run.execution = Execution(status, code, stdout, stderr, wall, run.protections)
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
