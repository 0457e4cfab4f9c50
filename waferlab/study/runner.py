"""``study run``: every cell is a ``waferlab train`` subprocess into ``OUT/runs/<cell>``; resumable, parallel.

Study folder layout (:data:`STUDY_LAYOUT`). A finished cell is skipped, a cell with a checkpoint continues
with ``--resume``, a failed cell is recorded with its one-line error and the others go on. Subprocesses
isolate failures and make ``--emit-commands`` honest: the runner executes exactly the printed commands.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waferlab.errors import WaferlabError
from waferlab.study.spec import Cell, StudySpec, parse_spec, train_arguments

STUDY_LAYOUT = {
    "study.yaml": "the study spec, with the data it ran on",
    "cells.json": "per cell: status (finished/failed), one-line error, training wall time, attempts",
    "runs/": "one ordinary run directory per cell, named from its axis values (a finished cell's "
             "checkpoints/ dropped unless --keep-checkpoints: model.safetensors holds its weights)",
    "logs/": "stdout/stderr of every cell's training (and of the explanations)",
    "explain/": "`waferlab explain --json` of one seed of every group (CAM grids, scores.json)",
    "predictions/": "per-map test predictions and inference speed of each run (report cache)",
    "report/": "report.html, report.md, runs.csv, summary.csv",
}


@dataclass
class StudyOptions:
    """How to run a study: output folder, data override, parallel workers, what to do."""

    out: Path
    data: str | None = None
    workers: int = 1
    dry_run: bool = False
    emit_commands: bool = False
    progress: bool = True
    report: bool = True
    only: list[str] | None = None  # shell-style patterns of cell names (``--only``): run just those
    keep_checkpoints: bool = False  # keep a finished cell's Lightning checkpoints (only --resume reads them)


@dataclass
class PlannedCell:
    """A cell, its run directory, what the runner will do with it, and its train arguments."""

    cell: Cell
    run_dir: Path
    action: str  # "skip" (finished), "resume" (has a checkpoint) or "new"
    args: list[str]


class StudyState:
    """``cells.json``: read once, updated by worker threads under a lock, written atomically."""

    def __init__(self, out: Path) -> None:
        import json

        self.path = out / "cells.json"
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"cells": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise WaferlabError(f"{self.path}: unreadable JSON ({exc})") from None

    def update(self, name: str, **values: Any) -> None:
        from waferlab.io import write_json

        with self.lock:
            entry = self.data.setdefault("cells", {}).setdefault(name, {})
            if "add_seconds" in values:
                entry["train_seconds"] = entry.get("train_seconds", 0.0) + values.pop("add_seconds")
                entry["attempts"] = entry.get("attempts", 0) + 1
            if values.get("add_cpu") is not None:  # CPU time: what the wall time would be alone on one core
                entry["cpu_seconds"] = entry.get("cpu_seconds", 0.0) + values["add_cpu"]
            values.pop("add_cpu", None)
            entry.update(values)
            write_json(self.path, self.data)

    def set(self, key: str, value: Any) -> None:
        from waferlab.io import write_json

        with self.lock:
            self.data[key] = value
            write_json(self.path, self.data)


def study_data(spec: StudySpec, data: str | None, required: bool = True) -> str | None:
    """The data the cells train on: ``--data``, else the spec's; absolute, and it must exist."""
    src = data or spec.data
    if not src:
        if required:
            raise WaferlabError(
                f"{spec.source}: the spec names no data; pass --data SRC (e.g. your "
                "LSWMD.pkl or a prepared cache)"
            )
        return None
    path = Path(src).expanduser()
    if not path.exists():
        raise WaferlabError(f"data not found: {src}")
    return str(path.resolve())


def cell_action(run_dir: Path) -> str:
    """``skip`` for a finished run, ``resume`` when it has a last checkpoint, else ``new``."""
    from waferlab.engine.run import Run

    run = Run(run_dir)
    if run.path.is_dir() and run.is_finished():
        return "skip"
    return "resume" if run.last_checkpoint.is_file() else "new"


def plan(spec: StudySpec, out: Path, data: str | None, only: list[str] | None = None) -> list[PlannedCell]:
    """Every cell of the spec (or those ``only`` matches) with its run directory, action and exact
    ``waferlab train`` arguments."""
    from waferlab.study.spec import select_cells

    planned = []
    for cell in select_cells(spec.cells(), only):
        run_dir = (out / "runs" / cell.name).resolve()
        action = cell_action(run_dir)
        args = train_arguments(cell, data, run_dir) + (["--resume"] if action == "resume" else [])
        planned.append(PlannedCell(cell, run_dir, action, args))
    return planned


def write_study_file(spec: StudySpec, out: Path, data: str | None) -> None:
    """``OUT/study.yaml``; refuses a folder that holds a different study (same cell name, other settings)."""
    import yaml

    from waferlab.io import write_text

    path = out / "study.yaml"
    doc = {**spec.to_dict(), "data": data, "name": spec.name}
    if path.is_file():
        old = load_study_spec(out)
        new = {c.name: c for c in spec.cells()}
        for cell in old.cells():
            if cell.name in new and (new[cell.name].settings, new[cell.name].config) != (
                cell.settings,
                cell.config,
            ):
                raise WaferlabError(
                    f"{out}: holds a different study (cell {cell.name} has other settings); use another --out"
                )
        if old.data and data and Path(old.data) != Path(data):
            raise WaferlabError(f"{out}: the study ran on {old.data}, not {data}; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(doc, sort_keys=False))


def load_study_spec(out: Path) -> StudySpec:
    """The spec a study folder was run with (``OUT/study.yaml``)."""
    import yaml

    path = out / "study.yaml"
    if not path.is_file():
        raise WaferlabError(
            f"{out}: not a study folder (study.yaml missing; run 'waferlab study run' "
            "or '--emit-commands' first)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise WaferlabError(f"{path}: invalid YAML ({exc})") from None
    name = raw.pop("name", out.name) if isinstance(raw, dict) else out.name
    spec = parse_spec(raw, str(path))
    spec.source = str(Path(str(name) + ".yaml"))
    return spec


def gpu_ids() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else those ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in listing.splitlines() if ln.startswith("GPU "))]


def worker_envs(workers: int) -> list[dict[str, str]]:
    """Per worker: CUDA_VISIBLE_DEVICES (one GPU each, round robin) or an equal share of the CPU threads."""
    if workers == 1:
        return [{}]  # one cell at a time: it may use every device (e.g. DDP over all GPUs), as configured
    gpus = gpu_ids()
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(workers)]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cpus // workers))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(workers)]


def error_line(log_tail: str, rc: int) -> str:
    """The one-line reason a cell failed: waferlab's error line, else the exception, else the exit code."""
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("waferlab: error:"):
            return line.removeprefix("waferlab: error:").strip()
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line
    if rc < 0:
        return f"killed by signal {-rc}"
    return lines[-1] if lines else f"exit code {rc}"


class _Runner:
    """Runs planned cells on a pool of worker slots; each slot has its own environment (GPU or threads)."""

    def __init__(self, out: Path, state: StudyState, workers: int, progress: bool,
                 keep_checkpoints: bool = False) -> None:
        self.out, self.state, self.progress, self.keep = out, state, progress, keep_checkpoints
        self.slots: list[dict[str, str]] = worker_envs(workers)
        self.free = list(range(len(self.slots)))
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.done = 0
        self.total = 0

    def run(self, cells: list[PlannedCell]) -> dict[str, str]:
        self.total = len(cells)
        results: dict[str, str] = {}
        pool = ThreadPoolExecutor(max_workers=len(self.slots))
        try:
            for pc, status in zip(cells, pool.map(self._one, cells)):
                results[pc.cell.name] = status
        except BaseException:
            with self.lock:
                for proc in self.procs:
                    proc.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def _one(self, pc: PlannedCell) -> str:
        with self.lock:
            slot = self.free.pop(0)
        try:
            return self._train(pc, slot)
        finally:
            with self.lock:
                self.free.append(slot)

    def _train(self, pc: PlannedCell, slot: int) -> str:
        if pc.action == "new" and pc.run_dir.exists():
            shutil.rmtree(pc.run_dir)  # the study's own unfinished cell with no checkpoint: nothing to keep
        log = self.out / "logs" / f"{pc.cell.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.slots[slot]}
        cmd = [sys.executable, "-m", "waferlab.cli", *pc.args]
        start = time.perf_counter()
        with log.open("a", encoding="utf-8") as fh:
            fh.write(
                f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(shlex.quote, cmd))} "
                f"{self.slots[slot]}\n"
            )
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.procs.add(proc)
            rc, cpu = _wait(proc)
            with self.lock:
                self.procs.discard(proc)
        seconds = time.perf_counter() - start
        error = None if rc == 0 else error_line(_tail(log), rc)
        status = "finished" if rc == 0 else "failed"
        if rc == 0 and not self.keep:
            from waferlab.engine.run import Run

            run = Run(pc.run_dir)
            if run.is_finished():  # a demo's eight cells kept 2 GB of optimizer state
                run.drop_checkpoints()
        self.state.update(pc.cell.name, status=status, error=error, add_seconds=seconds, add_cpu=cpu)
        with self.lock:
            self.done += 1
            done = self.done
        from waferlab.study.report import format_seconds

        extra = "" if rc == 0 else f": {self.state.data['cells'][pc.cell.name]['error']}"
        print(
            f"waferlab study: [{done}/{self.total}] {pc.cell.name} {status} in {format_seconds(seconds)}"
            f"{extra}",
            file=sys.stderr,
            flush=True,
        )
        return status


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-20000:]


def _wait(proc: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for a child; its exit code and CPU seconds (user + system; None where wait4 is missing)."""
    if not hasattr(os, "wait4"):
        return proc.wait(), None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def emit_commands(planned: list[PlannedCell], spec: StudySpec) -> str:
    """One self-contained ``waferlab train`` line per unfinished cell (comments say what was skipped)."""
    todo = [p for p in planned if p.action != "skip"]
    lines = [
        f"# waferlab study {spec.name}: {len(planned)} cells, {len(planned) - len(todo)} finished "
        f"(skipped), {len(todo)} to run; then: waferlab study report "
        f"{shlex.quote(str(planned[0].run_dir.parent.parent)) if planned else 'DIR'}"
    ]
    lines += ["waferlab " + " ".join(shlex.quote(a) for a in p.args) for p in todo]
    return "\n".join(lines) + "\n"


def build_models(planned: list[PlannedCell]) -> dict[str, int]:
    """Build every cell's model once (random init, no weights loaded) and count its parameters: a dry run
    catches a misspelt or inapplicable model option before any training. Cell name -> parameters."""
    from waferlab.data.encode import num_channels
    from waferlab.data.splits import CLASS_SETS
    from waferlab.models import create_model
    from waferlab.models.profile import count_params
    from waferlab.study.spec import cell_config, yaml_value

    built: dict[str, int] = {}
    out: dict[str, int] = {}
    for p in planned:
        cfg = cell_config(p.cell)
        key = yaml_value([cfg.model, cfg.head, cfg.class_set, cfg.encoding, cfg.model_options])
        if key not in built:
            try:
                model = create_model(cfg.model, num_classes=len(CLASS_SETS.get(cfg.class_set, range(9))),
                                     in_chans=num_channels(cfg.encoding), pretrained=None, head=cfg.head,
                                     **cfg.model_options)
            except WaferlabError as exc:
                hint = "" if p.cell.variant is None else (
                    f" (if factor {p.cell.variant[0]!r} does not apply to row {p.cell.row!r}, list the "
                    f"row in the spec's vary.{p.cell.variant[0]}.not_for)")
                raise WaferlabError(f"cell {p.cell.name}: {exc}{hint}") from None
            built[key] = count_params(model)
        out[p.cell.name] = built[key]
    return out


def dry_run_table(planned: list[PlannedCell], params: dict[str, int] | None = None) -> str:
    """A plain-text list of the cells: name, group, seed, what the runner would do, model parameters."""
    what = {"skip": "finished (skip)", "resume": "resume from checkpoint", "new": "train"}
    params = params or {}
    rows = [("cell", "group", "seed", "action", "params")] + [
        (p.cell.name, p.cell.group, str(p.cell.seed), what[p.action],
         f"{params[p.cell.name]:,}" if p.cell.name in params else "-")
        for p in planned
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def explain_runs_of(planned: list[PlannedCell], spec: StudySpec) -> list[Path]:
    """One finished run per group, all of one seed (the seed with the most finished groups)."""
    finished = [p for p in planned if cell_action(p.run_dir) == "skip"]
    if not finished:
        return []
    seeds = list(dict.fromkeys(p.cell.seed for p in planned))
    best = max(seeds, key=lambda s: (sum(p.cell.seed == s for p in finished), -seeds.index(s)))
    return [p.run_dir for p in finished if p.cell.seed == best]


def run_explain(spec: StudySpec, planned: list[PlannedCell], out: Path, data: str, state: StudyState) -> None:
    """``waferlab explain RUNS --json --test-part`` into OUT/explain (skipped when done for the same runs)."""
    settings = spec.explain
    runs = explain_runs_of(planned, spec)
    if not settings or not runs:
        return
    previous = state.data.get("explain") or {}
    names = [r.name for r in runs]
    if (
        previous.get("status") == "finished"
        and previous.get("runs") == names
        and (out / "explain" / "scores.json").is_file()
    ):
        return
    args = [
        "explain",
        *map(str, runs),
        "--data",
        data,
        "--out",
        str(out / "explain"),
        "--json",
        "--test-part",
        "--methods",
        ",".join(settings["methods"]),
        "--per-class",
        str(settings["per_class"]),
        "--score-per-class",
        str(settings["score_per_class"]),
        "--steps",
        str(settings["steps"]),
        "--no-progress",
    ]
    if not settings["road"]:
        args.append("--no-road")
    log = out / "logs" / "explain.log"
    print(f"waferlab study: explaining {len(runs)} runs ({', '.join(names)})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} waferlab {' '.join(map(shlex.quote, args))}\n")
        fh.flush()
        rc = subprocess.run(
            [sys.executable, "-m", "waferlab.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **worker_envs(1)[0]},
        ).returncode
    error = None if rc == 0 else error_line(_tail(log), rc)
    state.set(
        "explain",
        {
            "status": "finished" if rc == 0 else "failed",
            "runs": names,
            "error": error,
            "seconds": time.perf_counter() - start,
        },
    )
    if error:
        print(f"waferlab study: explanations failed: {error}", file=sys.stderr)


def run_study(spec: StudySpec, opts: StudyOptions) -> dict[str, Any]:
    """Run (or list, or print commands for) every cell; then explanations and the report."""
    if opts.workers < 1:
        raise WaferlabError(f"--workers must be >= 1, got {opts.workers}")
    out = opts.out.resolve()
    data = study_data(spec, opts.data, required=not opts.dry_run)
    planned = plan(spec, out, data, opts.only)
    if opts.dry_run:
        return {"text": dry_run_table(planned, build_models(planned)), "planned": planned}
    write_study_file(spec, out, data)
    if opts.emit_commands:
        return {"text": emit_commands(planned, spec), "planned": planned}
    state = StudyState(out)
    todo = [p for p in planned if p.action != "skip"]
    print(
        f"waferlab study: {spec.name}: {len(planned)} cells, {len(planned) - len(todo)} already finished, "
        f"{len(todo)} to run with {opts.workers} worker(s) -> {out}",
        file=sys.stderr,
        flush=True,
    )
    results = _Runner(out, state, opts.workers, opts.progress, opts.keep_checkpoints).run(todo)
    failed = sorted(n for n, s in results.items() if s == "failed")
    assert data is not None
    if spec.explain:
        run_explain(spec, planned, out, data, state)
    summary: dict[str, Any] = {"planned": planned, "failed": failed, "out": out}
    if opts.report:
        from waferlab.study.report import write_report

        summary["report"] = write_report(out, out / "report", progress=opts.progress)
    return summary
