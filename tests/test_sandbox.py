"""The sandbox holds against hostile programs (each attack of the issue is tried)."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import textwrap
import uuid
from pathlib import Path

import pytest

from smcdecode import sandbox
from smcdecode.sandbox import SandboxError, execute, live_processes

PROJECT = Path(__file__).resolve().parent.parent
NO_VIEW = (
    "no private filesystem view on this system: it allows neither mount namespaces (root with "
    "CAP_SYS_ADMIN) nor unprivileged user namespaces, so the fallback protections apply"
)


def run(src: str, **kw):
    return execute(textwrap.dedent(src), **kw)


def test_statuses():
    assert run("print('hi')").status == "passed"
    assert run("print('hi')").stdout == "hi\n"
    assert run("assert 1 == 2").status == "failed"
    assert run("def f(:\n  pass").status == "error"
    assert run("raise SystemExit(3)").status == "error"


def test_infinite_loop_and_sleep_time_out():
    # "timeout" is only reported when the wall-clock or CPU limit killed the program
    assert run("while True: pass", timeout=1.0).status == "timeout"
    assert run("import time; time.sleep(60)", timeout=1.0).status == "timeout"


def test_unbounded_allocation_hits_the_memory_limit():
    r = run("x = []\nwhile True: x.append(bytearray(10**7))", memory_mb=256, timeout=20)
    assert r.status == "memory", r


def test_repeated_forks_are_bounded_and_cleaned_up():
    src = """
        import os, time
        made = 0
        for _ in range(500):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            made += 1
        print(made)
    """
    r = run(src, max_processes=8, timeout=5)
    assert r.status == "passed" and int(r.stdout) < 8
    uid = [p for p in r.protections if p.startswith("uid-")]
    if uid:  # every process of the per-call uid is gone
        assert live_processes(int(uid[0][4:])) == []


def test_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "owned.txt"
    os.chmod(tmp_path, 0o755)
    r = run(f"open({str(target)!r}, 'w').write('x')")
    assert r.status == "error" and not target.exists()
    r = run("import os; open('inside.txt', 'w').write('ok'); print(os.listdir('.'))")
    assert r.status == "passed" and "inside.txt" in r.stdout


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("SMCDECODE_TEST_SECRET", "hunter2")
    r = run("import os; print(dict(os.environ))")
    assert r.status == "passed" and "hunter2" not in r.stdout


def test_cannot_kill_its_parent():
    me = os.getpid()
    r = run(f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({me}, signal.SIGKILL)")
    assert r.status == "error"  # PermissionError; and we are still here


def test_no_network_even_to_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert r.status == "error"
        try:
            conn, _ = server.accept()
            conn.close()
            raise AssertionError("the sandboxed program reached the loopback server")
        except TimeoutError:
            pass
    finally:
        server.close()


# ---- the private filesystem view -------------------------------------------------------------


@functools.cache
def kernel_allows_a_view() -> bool:
    """Asked independently of the sandbox: can a child here make a mount namespace (through a
    user namespace when not root) and mount a tmpfs in it?"""
    pid = os.fork()
    if pid == 0:  # child: report through the exit code
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            flags = 0x20000 | (0 if os.geteuid() == 0 else 0x10000000)  # CLONE_NEWNS, CLONE_NEWUSER
            ok = libc.unshare(flags) == 0 and libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None) == 0
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def has_view(protections) -> bool:
    """Whether the sandbox gave a private view; a test needing one skips where the kernel does
    not allow it, and fails where it does but the sandbox fell back anyway."""
    if "private-fs" in protections:
        return True
    assert not kernel_allows_a_view(), f"namespaces work here, yet the sandbox fell back: {protections}"
    return False


def private_run(src: str, **kw):
    """``run``, skipping the test where the system cannot give a private view."""
    r = run(src, **kw)
    if not has_view(r.protections):
        pytest.skip(NO_VIEW)
    return r


@pytest.fixture
def name():
    """A fresh file name; wherever a broken sandbox let a program leave it, it is removed."""
    name = f"smcdecode-test-{uuid.uuid4().hex}"
    yield name
    for place in ("/tmp", "/dev/shm", "/var/tmp", Path.home(), PROJECT):
        Path(place, name).unlink(missing_ok=True)


def test_writes_to_tmp_and_dev_shm_stay_inside_and_are_gone_afterwards(name):
    src = f"""
        for d in ("/tmp", "/dev/shm"):
            open(d + "/{name}", "w").write("x")
            print(open(d + "/{name}").read())
    """
    r = private_run(src)
    assert r.status == "passed" and r.stdout == "x\nx\n", r
    assert not os.path.exists(f"/tmp/{name}") and not os.path.exists(f"/dev/shm/{name}")


def test_a_file_written_by_one_execution_is_invisible_to_the_next(name):
    places = ["/tmp", "/dev/shm", ".", "os.environ['HOME']", "os.environ['TMPDIR']"]
    paths = "[" + ", ".join(f"{p if p.startswith('os.') else repr(p)} + '/{name}'" for p in places) + "]"
    write = f"import os\nfor p in {paths}:\n    open(p, 'w').write('x')\nprint('written')"
    assert private_run(write).stdout == "written\n"
    look = f"import os\nprint([os.path.exists(p) for p in {paths}])"
    r = run(look)
    assert r.status == "passed" and r.stdout == f"{[False] * len(places)}\n", r


def test_home_project_and_other_world_writable_places_cannot_be_written(name):
    targets = [Path.home() / name, PROJECT / name, Path("/var/tmp") / name]
    src = f"""
        for p in {[str(t) for t in targets]!r}:
            try:
                open(p, "w").write("x")
                print("wrote", p)
            except OSError as e:
                print("refused", type(e).__name__)
    """
    r = private_run(src)
    assert r.status == "passed" and r.stdout.count("refused") == len(targets), r
    assert not any(t.exists() for t in targets)


def test_the_program_cannot_undo_its_view(name):
    # a file in the real /tmp, which each trick below would reveal, and a write to /var/tmp
    marker = Path("/tmp") / name
    marker.write_text("secret")
    src = f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        MS_REMOUNT, MS_BIND, MS_REC, MNT_DETACH = 0x20, 0x1000, 0x4000, 2
        CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
        escaped = []
        def attempt():
            for p in ("/tmp/{marker.name}", "/tmp/root/tmp/{marker.name}"):
                if os.path.exists(p):
                    escaped.append(p)
            for p in ("/var/tmp/{marker.name}", "/tmp/root/var/tmp/{marker.name}"):
                try:
                    open(p, "w").close()
                    escaped.append(p)
                except OSError:
                    pass
        print("umount", libc.umount2(b"/tmp", MNT_DETACH))
        print("remount-rw", libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None))
        attempt()
        # a user namespace of its own gives capabilities over a copy of the view
        print("unshare", libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
        libc.umount2(b"/tmp", MNT_DETACH)
        libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None)
        attempt()
        os.makedirs("/tmp/root", exist_ok=True)
        libc.mount(b"/", b"/tmp/root", None, MS_BIND, None)  # / without what is mounted on it
        attempt()
        libc.mount(b"/", b"/tmp/root", None, MS_BIND | MS_REC, None)
        libc.mount(None, b"/tmp/root", None, MS_REMOUNT | MS_BIND, None)
        attempt()
        print("escaped", escaped)
    """
    r = private_run(src)
    assert r.status == "passed" and "umount -1" in r.stdout and "remount-rw -1" in r.stdout, r
    assert "escaped []" in r.stdout and not (Path("/var/tmp") / name).exists(), r


def test_system_v_shared_memory_is_private_to_one_execution():
    key = int.from_bytes(os.urandom(3), "big") + 1
    make = f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.shmget({key}, 4096, 0o1000 | 0o666) >= 0)  # IPC_CREAT, and never removed
    """
    find = f"import ctypes\nprint(ctypes.CDLL(None).shmget({key}, 0, 0))"
    try:
        assert private_run(make).stdout == "True\n"
        assert run(find).stdout == "-1\n"
    finally:
        libc = ctypes.CDLL(None)
        if (shmid := libc.shmget(key, 0, 0)) >= 0:  # only where the segment leaked out
            libc.shmctl(shmid, 0, None)  # IPC_RMID
    assert shmid == -1


def test_a_view_that_cannot_be_built_stops_the_call_instead_of_running_unprotected(monkeypatch):
    if not has_view(run("pass").protections):
        pytest.skip(NO_VIEW)
    monkeypatch.setattr(sandbox, "PRIVATE_DIR", "/nonexistent/sandbox")
    with pytest.raises(SandboxError, match="nonexistent"):
        execute("print('ran')")


def test_no_new_privileges():
    r = run("print(open('/proc/self/status').read())")
    assert r.status == "passed" and "NoNewPrivs:\t1" in r.stdout


def test_without_namespaces_the_fallback_runs_and_says_so(monkeypatch):
    monkeypatch.setattr(sandbox, "namespace_mode", lambda: "")
    r = run("import os; open('inside.txt', 'w').write('ok'); print(os.listdir('.'))")
    assert r.status == "passed" and "inside.txt" in r.stdout
    assert "private-fs" not in r.protections and "tempdir" in r.protections
    assert run("assert 1 == 2").status == "failed"


def test_unprivileged_user_namespace_mode(name):
    """What a non-root user gets (CI runs as root: drop to uid 65534 in a child to see it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to drop to an unprivileged uid in a child process")
    python = sandbox._python_for(True)
    if not python:
        pytest.skip("no world-executable Python interpreter for an unprivileged uid")
    src = f"""
        import os, time
        open("/tmp/{name}", "w").write("x")
        if os.fork() == 0:  # a straggler outside the process group
            os.setsid()
            time.sleep(60)
            os._exit(0)
        print(os.getuid())
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the result (or what went wrong) as JSON through the pipe
        report = {}
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sandbox._python_for = lambda _: python
            r = execute(textwrap.dedent(src))
            mine = [p for p in sandbox.live_processes(65534) if p != os.getpid()]
            stragglers = [(p, Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")) for p in mine]
            allowed = kernel_allows_a_view.__wrapped__()  # asked again: as uid 65534
            report = {"r": [r.status, r.stdout, r.stderr, list(r.protections)], "left": stragglers, "allowed": allowed}
        except BaseException as e:
            report = {"error": repr(e)}
        finally:
            os.write(write, json.dumps(report).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    report = json.loads(text)
    assert "error" not in report, report
    for straggler, _ in report["left"]:  # (only if the sandbox failed to)
        os.kill(straggler, signal.SIGKILL)
    status, stdout, stderr, protections = report["r"]
    if "private-fs" not in protections:
        assert not report["allowed"], f"user namespaces work here, yet the sandbox fell back: {protections}"
        pytest.skip(NO_VIEW + " (for uid 65534)")
    assert status == "passed" and stdout == "65534\n", (stdout, stderr)
    assert "user-namespace" in protections and "no-network" in protections
    assert not os.path.exists(f"/tmp/{name}")
    assert report["left"] == []
