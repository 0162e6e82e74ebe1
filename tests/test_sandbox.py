"""The sandbox holds against hostile programs (each attack of the issue is tried)."""

from __future__ import annotations

import os
import socket
import textwrap

from smcdecode.sandbox import execute, live_processes


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
