"""Ray executor on a local 2-CPU Ray instance (one per module): every record exactly once with two
workers, after a worker's process is killed mid-run, and after the driver is stopped (Ctrl-C, then
SIGKILL) and restarted; a problem that keeps killing workers becomes an error record; the records
of a 2-worker run equal those of a single-process run, sample by sample."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
import ray

from smcdecode.evaluate import run_eval
from smcdecode.executors import RayExecutor, WorkerError
from smcdecode.records import read_jsonl
from smcdecode.testing import toy_eval

TOKENS = 4


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance shared by the module (start-up costs seconds); yields its address."""
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Records of the same evaluation in one process: uid -> record."""
    task, engine, sampler = toy_eval()
    out = str(tmp_path_factory.mktemp("single"))
    path = run_eval(task, engine, sampler, "smc", out, max_new_tokens=TOKENS, progress=False)
    return {r["uid"]: r for r in read_jsonl(path)}


def records(path: str) -> list[dict]:
    return list(read_jsonl(path))


def assert_once_each(recs: list[dict], n: int = 12) -> None:
    counts = Counter(r["uid"] for r in recs)
    assert counts == Counter(f"toy-{i}" for i in range(n)), counts


def assert_same_as(recs: list[dict], reference: dict[str, dict]) -> None:
    """The same samples, answers and verdicts; floats to the rounding of forwards run with another
    thread count (a Ray worker has one thread, the driver as many as the machine)."""
    for r in recs:
        ref = reference[r["uid"]]
        assert [(s["text"], s["tokens"]) for s in r["samples"]] == [(s["text"], s["tokens"]) for s in ref["samples"]]
        assert (r["answer"], r["correct"]) == (ref["answer"], ref["correct"]), r["uid"]
        for a, b in zip(r["samples"], ref["samples"]):
            assert a.keys() == b.keys(), r["uid"]
            for key in a.keys() - {"text", "tokens"}:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (r["uid"], key)
        assert r["log_evidence"] == pytest.approx(ref["log_evidence"], abs=1e-4), r["uid"]


def test_two_workers_record_every_problem_once_equal_to_a_single_process_run(cluster, reference, tmp_path):
    task, _, _ = toy_eval()
    ex = RayExecutor(functools.partial(toy_eval, delay=0.05), workers=2)
    path = run_eval(task, None, None, "smc", str(tmp_path), max_new_tokens=TOKENS, progress=False, executor=ex)
    recs = records(path)
    assert_once_each(recs)
    assert_same_as(recs, reference)
    assert len({len(r["samples"]) for r in recs}) == 1 and recs[0]["samples"][0]["tokens"] >= 1
    assert len(ex.pids) == 2 and len(set(ex.pids.values())) == 2  # both workers ran problems
    assert ex.restarts == 0
    # samples differ between problems with the same prompt: the seed follows the problem id
    same_prompt = [r for r in recs if r["uid"] in ("toy-0", "toy-4", "toy-8")]  # prompts aa, ab, ac
    assert len({str(r["samples"]) for r in same_prompt}) > 1
    # resume: everything is recorded, a second run adds nothing
    run_eval(task, None, None, "smc", str(tmp_path), max_new_tokens=TOKENS, progress=False, executor=ex)
    assert len(records(path)) == 12


def test_a_killed_worker_loses_nothing(cluster, reference, tmp_path):
    task, _, _ = toy_eval()
    ex = RayExecutor(functools.partial(toy_eval, delay=0.2), workers=2)
    path = str(tmp_path / "results.jsonl")
    killed: list[int] = []
    finished = threading.Event()

    def kill_one_worker_mid_run() -> None:
        # no wall-clock deadline: on a loaded machine the workers' start-up alone can take minutes
        while not finished.is_set() and not killed:
            n = len(records(path)) if os.path.exists(path) else 0
            if ex.pids and 1 <= n <= 8:
                pid = next(iter(ex.pids.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker_mid_run)
    killer.start()
    try:
        run_eval(task, None, None, "smc", str(tmp_path), max_new_tokens=TOKENS, progress=False, executor=ex)
    finally:
        finished.set()
        killer.join()
    assert killed, "the run ended before a worker could be killed"
    recs = records(path)
    assert_once_each(recs)
    assert not any("error" in r for r in recs)
    assert_same_as(recs, reference)  # the retried problem's samples are those of a first try
    assert ex.restarts == 1  # the death was seen (an in-flight call failed) and the worker replaced


def test_a_problem_that_keeps_killing_workers_is_recorded_as_an_error(cluster, tmp_path):
    task, _, _ = toy_eval()
    ex = RayExecutor(functools.partial(toy_eval, poison="toy-5"), workers=2, max_failures=2)
    path = run_eval(task, None, None, "smc", str(tmp_path), max_new_tokens=TOKENS, progress=False, executor=ex)
    recs = records(path)
    assert_once_each(recs)
    errors = {r["uid"]: r["error"] for r in recs if "error" in r}
    assert list(errors) == ["toy-5"] and errors["toy-5"].startswith("WorkerDied (2 times)")
    assert ex.restarts == 2


def test_a_recipe_that_raises_aborts_the_run_with_a_typed_error(cluster, tmp_path):
    task, _, _ = toy_eval()
    ex = RayExecutor(functools.partial(toy_eval, problems="twelve"), workers=1)  # type: ignore[arg-type]
    with pytest.raises(WorkerError, match="failed to start"):
        run_eval(task, None, None, "smc", str(tmp_path), max_new_tokens=TOKENS, progress=False, executor=ex)
    assert records(str(tmp_path / "results.jsonl")) == []


DRIVER = textwrap.dedent(
    """
    import functools, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background child inherits SIGINT ignored
    from smcdecode.evaluate import run_eval
    from smcdecode.executors import RayExecutor
    from smcdecode.testing import toy_eval
    task, _, _ = toy_eval()
    ex = RayExecutor(functools.partial(toy_eval, delay=0.3), workers=2, address=sys.argv[2],
                     init_kwargs={"log_to_driver": False})
    run_eval(task, None, None, "smc", sys.argv[1], max_new_tokens=int(sys.argv[3]), progress=False, executor=ex)
    """
)


def test_a_driver_stopped_by_ctrl_c_or_sigkill_resumes_without_duplicates(cluster, reference, tmp_path):
    out = str(tmp_path)
    path = os.path.join(out, "results.jsonl")
    driver = [sys.executable, "-c", DRIVER, out, cluster, str(TOKENS)]

    def stop_after(n: int, sig: int) -> list[dict]:
        proc = subprocess.Popen(driver, stderr=subprocess.PIPE)
        deadline = time.time() + 900  # generous: on a loaded machine Ray's start-up alone takes minutes
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(path) and len(records(path)) >= n:
                break
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, "the driver finished before it was stopped"
        if sig == signal.SIGINT:
            assert b"KeyboardInterrupt" in err
        return records(path)

    after_ctrl_c = stop_after(2, signal.SIGINT)
    assert 2 <= len(after_ctrl_c) < 12
    after_kill = stop_after(len(after_ctrl_c) + 2, signal.SIGKILL)
    assert len(after_ctrl_c) + 2 <= len(after_kill) < 12
    subprocess.run(driver, check=True, timeout=180)
    recs = records(path)
    assert_once_each(recs)
    assert_same_as(recs, reference)


def test_cli_ray_options_need_ray_and_gpus_need_gpus_per_worker(capsys):
    from smcdecode.cli import main

    base = ["eval", "humaneval", "--method", "ancestral:n=1", "--out", "unused"]
    assert main([*base, "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert main([*base, "--ray", "--device", "cuda"]) == 2
    assert "--gpus-per-worker" in capsys.readouterr().err


def test_a_problems_samples_do_not_depend_on_its_position_or_on_resumes(reference, tmp_path):
    """In one process too: a run over a reordered subset (what a resume sees) reproduces the
    samples of the full run, problem by problem."""
    task, engine, sampler = toy_eval()
    task.problems = [task.problems[7], task.problems[2], task.problems[11]]
    path = run_eval(task, engine, sampler, "smc", str(tmp_path), max_new_tokens=TOKENS, progress=False)
    recs = records(path)
    assert [r["uid"] for r in recs] == ["toy-7", "toy-2", "toy-11"]
    assert_same_as(recs, reference)


def test_in_process_runs_need_an_engine_and_batch_size_is_checked(tmp_path):
    task, engine, sampler = toy_eval(problems=2)
    with pytest.raises(ValueError, match="engine"):
        run_eval(task, None, None, "smc", str(tmp_path), max_new_tokens=TOKENS, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(task, engine, sampler, "smc", str(tmp_path), max_new_tokens=TOKENS, batch_size=0, progress=False)


METHODS = [
    "ancestral:n=2",
    "mh:chains=2,block_size=4,steps=2;target=power:alpha=2",
    "smc:particles=3;target=power:alpha=2",
]


@pytest.mark.parametrize("method", METHODS)
def test_the_embedded_model_gives_the_same_samples_in_process_and_on_ray_workers(cluster, tmp_path, method):
    """A problem's samples depend only on (seed, problem id, method): the same in one process and
    on two Ray workers, each streaming its own problems, whichever worker takes which problem."""
    from smcdecode.cli import main

    base = ["eval", "humaneval", "--method", method, "--limit", "4", "--max-new-tokens", "5", "--batch-size", "2"]
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    local = {r["uid"]: r for r in records(str(tmp_path / "local" / "results.jsonl"))}
    on_ray = records(str(tmp_path / "ray" / "results.jsonl"))
    assert sorted(r["uid"] for r in on_ray) == sorted(local) and len(local) == 4
    assert_same_as(on_ray, local)
    for r in on_ray:
        assert r["streamed"] and not any("error" in x for x in (r, local[r["uid"]]))
