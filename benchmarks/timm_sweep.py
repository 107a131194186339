"""Sweep dynconvert.convert over every model of ``timm.list_models()``, in child processes.

Each model is built at random init (``pretrained=False``), at a small input where it allows
(``img_size=SIZE`` if its constructor takes it, else SIZE×SIZE, else its default input size),
and checked as ``timm_coverage.check`` checks a case: BatchNorm statistics randomised, eval-
and train-mode outputs compared before and after conversion (max |after − before| / max
|before| ≤ 1e-4). The stem is converted too (``skip_stem=False``): the sweep measures which
convs *can* be converted, not the default policy. Child processes check up to ``--per-child``
models each, one after another, under a per-model wall-clock timeout and an address-space
limit (a model that times out or kills its child is recorded, and a fresh child goes on); each
model adds one JSON line to OUT:

    {"name", "family", "status", "detail", "converted", "convs", "max_rel_error", "seconds",
     "input_size", "batch", "skip_reasons"}

A model not exact at batch 2 is checked again at batch 16 (``batch`` says which counted):
train-mode BatchNorm over two samples of a tiny map is ill-conditioned. One still not exact is
checked once more in float64 (``max_rel_error_float64``): within 1e-9 there, the float32 error
is rounding that train mode amplifies, and the model counts as exact (``detail`` says so).
``status`` is ``converted-exact``, ``converted-with-skips`` (exact; some convs left static,
see ``skip_reasons``), ``nothing-to-convert`` (no conv at all), ``refused`` (convs, none
convertible; ``detail`` says why), ``failed`` (``detail``: the error's first line, or the
error that was too large) or ``timeout``. Names already in OUT are skipped, so an interrupted
run continues where it stopped.

    HF_HUB_OFFLINE=1 python benchmarks/timm_sweep.py --all --out sweep.jsonl --jobs 4
    HF_HUB_OFFLINE=1 python benchmarks/timm_sweep.py resnet18 nf_resnet26 --out some.jsonl
    python benchmarks/timm_sweep.py --table sweep.jsonl > docs/timm_sweep.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: A child prints this once its imports are done; each model's timeout counts from then on.
READY = "ready"
STARTUP_SECONDS = 300
OUT_OF_MEMORY = "Cannot allocate memory"  # PyTorch's CPU allocator, at the address-space limit
RETRY_BATCH = 16  # for a model not exact at batch 2 (see run_one)
FLOAT64_TOLERANCE = 1e-9  # a model still not exact in float32 is checked in float64 against this
STATUSES = ("converted-exact", "converted-with-skips", "nothing-to-convert", "refused", "failed",
            "timeout")  # fmt: skip


def family_of(name: str) -> str:
    """The timm module a model comes from: ``timm.models.resnetv2`` → ``resnetv2``."""
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# -- one model (in the child process) --------------------------------------------------------


def _build(name: str, size: int):
    """The model and its case, at the smallest input it accepts among the candidates."""
    import timm
    import torch
    from timm_coverage import Case

    attempts = [({"img_size": size}, size), ({}, size), ({}, None)]
    last: Exception | None = None
    for create, side in attempts:
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **create).eval()
        except Exception as exc:  # e.g. no img_size argument: try the next candidate
            last = exc
            continue
        if side is None:
            side = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        channels = model.pretrained_cfg.get("input_size", (3,))[0]
        try:
            with torch.no_grad():
                model(torch.randn(2, channels, side, side))
        except Exception as exc:  # too small for this model: try the next candidate
            last = exc
            continue
        return model, Case(name, family_of(name), side, create, {"skip_stem": False},
                           channels=channels)  # fmt: skip
    raise RuntimeError(f"no input size works: {first_line(last)}")


def run_one(name: str, size: int, tolerance: float) -> dict:
    import timm
    import timm_coverage
    import torch

    import dynconvert

    start = time.perf_counter()
    row = {"name": name, "family": family_of(name), "status": "failed", "detail": None,
           "converted": 0, "convs": None, "max_rel_error": None, "input_size": None,
           "skip_reasons": {}}  # fmt: skip
    try:
        model, case = _build(name, size)
        row["input_size"] = list(case.input_size)
        result = timm_coverage.check_model(model, case)
        if max(result.errors.values()) > tolerance:
            # Train-mode BatchNorm over batch 2 x a tiny map normalises a handful of values
            # (two normalise to ±1): ill-conditioned, not inexact. Once more at batch 16.
            case = dataclasses.replace(case, batch=RETRY_BATCH)
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **case.create)
            result = timm_coverage.check_model(model, case)
        row["batch"] = case.batch
    except dynconvert.DynconvertError as exc:
        message = str(exc)
        if "no convolution to convert" in message:
            row.update(status="nothing-to-convert", convs=0)
        else:
            counts = timm_coverage.skipped_reasons(case)
            row.update(status="refused", detail=message, convs=sum(counts.values()),
                       skip_reasons=counts)  # fmt: skip
    except Exception as exc:
        row["detail"] = first_line(exc)
    else:
        totals, error = result.report.totals, max(result.errors.values())
        reasons = result.report.skip_reasons()
        row.update(converted=totals["converted"], convs=totals["convs"], max_rel_error=error,
                   skip_reasons=reasons)  # fmt: skip
        if error > tolerance:
            # Still over in float32: the same check in float64 tells rounding (train-mode
            # BatchNorm over few values amplifies it) from a conversion that is not exact.
            error64 = _float64_error(name, case)
            row["max_rel_error_float64"] = error64
            if error64 is not None and error64 <= FLOAT64_TOLERANCE:
                row["detail"] = (f"exact in float64 ({error64:.0e}); float32 rounding "
                                 f"{error:.1e} in train mode")  # fmt: skip
                error = 0.0
            else:
                row["detail"] = f"not exact: max rel error {error:.2e} > {tolerance:.0e}"
        if error <= tolerance:
            row["status"] = "converted-with-skips" if reasons else "converted-exact"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _float64_error(name: str, case) -> float | None:
    """The largest relative error of the same check with the model and input in float64."""
    import timm
    import timm_coverage
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **case.create)
        return max(timm_coverage.check_model(model, case).errors.values())
    except Exception:  # no float64 kernel for some op: the float32 figure stands
        return None
    finally:
        torch.set_default_dtype(before)


# -- the sweep (parent) ------------------------------------------------------------------------


def done_names(out: Path) -> set[str]:
    if not out.exists():
        return set()
    names = set()
    for line in out.read_text().splitlines():
        try:
            names.add(json.loads(line)["name"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut off by a kill: that model runs again
    return names


def _limit_memory(gigabytes: float):
    def apply() -> None:
        limit = int(gigabytes * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _row_without_result(name: str, status: str, detail: str, seconds: float) -> dict:
    return {"name": name, "family": None, "status": status, "detail": detail, "converted": 0,
            "convs": None, "max_rel_error": None, "input_size": None, "skip_reasons": {},
            "seconds": round(seconds, 2)}  # fmt: skip


def sweep_chunk(names: list[str], args: argparse.Namespace) -> Iterator[dict]:
    """Rows for ``names``, run one after another in as few child processes as possible.

    A child checks many models (importing torch and timm costs more than most checks); it
    prints one JSON line per model. A model that outlives ``--timeout`` or kills its child
    (memory limit, segfault) gets its own row, and a fresh child goes on with the rest. A model
    that ran out of memory in a child that had checked others before is checked again alone:
    the earlier models' freed memory can stay mapped in that process.
    """
    rows = _run_in_children(names, args)
    alone = []
    for row in rows:
        if OUT_OF_MEMORY in (row.get("detail") or ""):
            alone.append(row["name"])
        else:
            yield row
    for name in alone:
        yield from _run_in_children([name], args)


def _run_in_children(names: list[str], args: argparse.Namespace) -> Iterator[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    pending = list(names)
    while pending:
        command = [sys.executable, __file__, "--children-of", *pending, "--size", str(args.size),
                   "--tolerance", str(args.tolerance)]  # fmt: skip
        # stderr to a file: a pipe nobody reads would block a chatty child
        with tempfile.TemporaryFile("w+") as errors:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                                    env=env, preexec_fn=_limit_memory(args.memory_gb))  # fmt: skip
            yield from _rows_of_child(proc, pending, errors, args)


def _rows_of_child(proc, pending: list[str], errors, args) -> Iterator[dict]:
    """The rows one child prints; the first model it did not finish gets a timeout/failed row."""
    started = time.perf_counter()
    wait = STARTUP_SECONDS + args.timeout  # the first model waits for the imports too
    while pending:
        ready, _, _ = select.select([proc.stdout], [], [], wait)
        line = proc.stdout.readline() if ready else None
        if line == READY + "\n":
            started, wait = time.perf_counter(), args.timeout
            continue
        if line and line.startswith("{"):
            row = json.loads(line)
            pending.remove(row["name"])
            started, wait = time.perf_counter(), args.timeout
            yield row
            continue
        if line:
            continue  # not a row
        if line is None:  # the current model ran past the timeout
            status, detail = "timeout", f"over {args.timeout} s"
            proc.kill()
        proc.wait()
        if line == "":  # the child died on the current model
            errors.seek(0)
            tail = [e for e in errors.read().strip().splitlines() if e.strip()]
            status, detail = "failed", tail[-1][:300] if tail else f"exit {proc.returncode}"
            if proc.returncode < 0:
                detail = f"killed by signal {-proc.returncode} (memory limit {args.memory_gb} GB?)"
        yield _row_without_result(pending.pop(0), status, detail, time.perf_counter() - started)
        break
    proc.wait()
    proc.stdout.close()


def sweep(names: list[str], args: argparse.Namespace) -> None:
    out = Path(args.out)
    skip = done_names(out)
    todo = [n for n in names if n not in skip]
    print(f"{len(names)} models, {len(names) - len(todo)} already in {out}, {len(todo)} to run",
          file=sys.stderr)  # fmt: skip
    chunks = [todo[i : i + args.per_child] for i in range(0, len(todo), args.per_child)]
    lock = threading.Lock()
    finished = 0

    def run(chunk: list[str]) -> None:
        nonlocal finished
        for row in sweep_chunk(chunk, args):
            if row.get("family") is None:
                row["family"] = family_of(row["name"])
            with lock:
                finished += 1
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                print(f"[{finished}/{len(todo)}] {row['name']}: {row['status']}"
                      f"{' (' + row['detail'] + ')' if row.get('detail') else ''} "
                      f"{row['seconds']}s", file=sys.stderr)  # fmt: skip

    with out.open("a") as sink, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run, chunks))


# -- the table -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_family: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_family[row["family"]].append(row)
    counts = Counter(row["status"] for row in rows)
    lines = [f"# dynconvert over timm: {len(rows)} models", "",
             ", ".join(f"{counts[s]} {s}" for s in STATUSES), "",
             "| family | models | exact | exact, some skipped | nothing to convert | refused "
             "| failed | timeout | skip reasons (convs) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for family in sorted(by_family):
        members = by_family[family]
        status = Counter(row["status"] for row in members)
        reasons: Counter = Counter()
        for row in members:
            reasons.update(row.get("skip_reasons") or {})
        shown = "; ".join(f"{n}× {r}" for r, n in reasons.most_common())
        cells = [family, len(members), *(status[s] for s in STATUSES), _cell(shown)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for family in sorted(by_family):
        others = [r for r in by_family[family] if r["status"] != "converted-exact"]
        if not others:
            continue
        lines += ["", f"## {family}", "", "| model | status | converted/convs | detail |",
                  "|---|---|---|---|"]  # fmt: skip
        for row in sorted(others, key=lambda r: r["name"]):
            detail = row.get("detail") or "; ".join(
                f"{n}× {r}" for r, n in (row.get("skip_reasons") or {}).items()
            )
            lines.append(f"| {row['name']} | {row['status']} | {row['converted']}/"
                         f"{row['convs'] if row['convs'] is not None else '?'} | "
                         f"{_cell(detail or '')} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (or --all)")
    parser.add_argument("--all", action="store_true", help="every name in timm.list_models()")
    parser.add_argument("--out", default="timm_sweep.jsonl", help="JSONL file, appended to")
    parser.add_argument("--table", metavar="JSONL", help="print the markdown tables of a sweep")
    parser.add_argument("--size", type=int, default=64, help="input side tried first")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--memory-gb", type=float, default=24, help="address space per model")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per model")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--per-child",
        type=int,
        default=20,
        help="models checked one after another by one child process",
    )
    parser.add_argument(
        "--children-of", nargs="+", metavar="NAME", help=argparse.SUPPRESS
    )  # the child process: check these in turn
    args = parser.parse_args()
    if args.children_of:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import timm_coverage  # noqa: F401  (torch, timm and dynconvert: before the clock runs)

        print(READY, flush=True)
        for name in args.children_of:
            print(json.dumps(run_one(name, args.size, args.tolerance)), flush=True)
        return
    if args.table:
        print(table(Path(args.table)))
        return
    if not args.all and not args.models:
        parser.error("give model names, --all or --table JSONL")
    import timm

    names = sorted(timm.list_models()) if args.all else args.models
    unknown = [n for n in names if n not in set(timm.list_models())]
    if unknown:
        parser.error(f"not timm models: {', '.join(unknown)}")
    if args.threads <= 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    sweep(names, args)


if __name__ == "__main__":
    main()
