"""MetaSchedule tuning with our schedules as the design space for depthwise/pointwise kernels
(TVM's generic space for the rest), resumable per-target databases, local or over an RPC tracker.

Databases live in `targets/databases/<target>/` (installed with the package; `--database DIR`
elsewhere): database_workload.json + database_tuning_record.json (MetaSchedule's JSON lines,
appended one record per measured candidate, so a killed run keeps every finished measurement)
and provenance.json (who tuned what, where, with which budget).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import targets
from .errors import MbnError

DB_ROOT = Path(targets.HERE) / "databases"
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


class TuningError(MbnError):
    pass


class CorruptDatabaseError(MbnError):
    pass


def database_dir(target: str, space: str = "ours") -> Path:
    name = Path(str(target)).stem
    return DB_ROOT / (name if space == "ours" else f"{name}-{space}")


def sanitize_database(work_dir: str | os.PathLike, log: Callable[[str], None] = print) -> int:
    """Check every JSON line; a corrupt or truncated line (a run killed mid-write, a bad merge) is
    reported and dropped, the original kept beside it as *.corrupt. Returns lines dropped."""
    work_dir = Path(work_dir)
    wl_path, rec_path = work_dir / WORKLOADS, work_dir / RECORDS
    dropped = 0
    n_workloads = None
    for path in (wl_path, rec_path):
        if not path.exists():
            continue
        good, bad = [], []
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = isinstance(item, list) and len(item) == 2
                if ok and path is rec_path:
                    ok = isinstance(item[0], int) and (n_workloads is None or 0 <= item[0] < n_workloads)
                    ok = ok and isinstance(item[1], list) and len(item[1]) >= 2
            except json.JSONDecodeError:
                ok = False
            (good if ok else bad).append((i, line))
        if path is wl_path:
            if bad:
                raise CorruptDatabaseError(
                    f"{path}: line(s) {', '.join(str(i) for i, _ in bad[:10])} are not valid workload "
                    "entries; the records that point at them cannot be trusted. Restore the file from "
                    "git (`git checkout -- <file>`) or delete the database folder to start again")
            n_workloads = len(good)
        if bad:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            shutil.copyfile(path, path.with_name(path.name + f".corrupt-{stamp}"))
            path.write_text("".join(line + "\n" for _, line in good))
            log(f"warning: {path}: skipped {len(bad)} corrupt line(s) "
                f"({', '.join(str(i) for i, _ in bad[:10])}{'...' if len(bad) > 10 else ''}); "
                f"original kept as {path.name}.corrupt-{stamp}")
            dropped += len(bad)
    return dropped


def open_database(work_dir: str | os.PathLike, log: Callable[[str], None] = print):
    from ._tvm import ms

    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise TuningError(f"tuning database {work_dir} does not exist; tune first "
                          "(`make tune TARGET=...`) or leave --database out")
    sanitize_database(work_dir, log)
    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    except Exception as e:
        raise CorruptDatabaseError(f"cannot read tuning database {work_dir}: {str(e).splitlines()[-1]}; "
                                   "delete it or restore it from git") from None


@dataclass
class TuneConfig:
    model: str = "mobilenet_v1"
    alpha: float = 1.0
    resolution: int = 224
    num_classes: int = 1000
    onnx: str | None = None
    target: str = "x86_64"
    space: str = "ours"                  # "ours" | "generic" (TVM's own space, for comparison)
    work_dir: str | None = None
    max_trials: int = 1000               # all tasks together
    trials_per_task: int = 64
    trials_per_iter: int = 16
    time_limit_s: float | None = None
    rpc_tracker: str | None = None       # "host:port"
    rpc_key: str | None = None
    rpc_workers: int = 1                 # boards measuring in parallel under the key
    seed: int = 0
    only: list[str] = field(default_factory=list)     # tune only kernels whose name contains these


def _fast_build(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin` (~28 s of CPU per
    fresh builder worker here, which made every candidate time out)."""
    from ._tvm import RemoveWeightLayoutRewriteBlock, tir_build

    return tir_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_aarch64(mod) -> str:
    """Boards load a shared object linked here by the cross compiler (no compiler on the board)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, cc="aarch64-linux-gnu-g++")
    return path


def prepare_module(cfg: TuneConfig, log: Callable[[str], None] = print):
    """The fused module the build's schedule phase sees (the database is keyed by its kernels)."""
    import tempfile

    import onnx

    from .build import BuildConfig, _zoo_onnx
    from .export import fix_input_shape, load_onnx
    from .lower import PHASES, LowerContext, import_onnx

    spec = targets.load(cfg.target)
    if cfg.onnx:
        onnx_model = load_onnx(cfg.onnx)
    else:
        with tempfile.TemporaryDirectory() as d:
            _zoo_onnx(BuildConfig(model=cfg.model, alpha=cfg.alpha, resolution=cfg.resolution,
                                  num_classes=cfg.num_classes), Path(d) / "m.onnx")
            onnx_model = onnx.load(str(Path(d) / "m.onnx"))
    name, shape = fix_input_shape(onnx_model)
    target = spec.tvm_target()
    ctx = LowerContext(target, spec.device, name, shape,
                       schedules="ours" if cfg.space == "ours" else "stock", layout="NHWC")
    mod = import_onnx(onnx_model, ctx)
    for phase, fn in PHASES:
        if phase == "schedule":
            break
        mod = fn(mod, ctx)
    from .kernels import mark_layout_free
    ctx.prepack_weights = True          # both spaces: the builds that apply their records do
    return spec, target, mark_layout_free(mod, ctx)


def _runner(cfg: TuneConfig, spec):
    from ._tvm import ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)
    if cfg.rpc_tracker:
        from . import rpc as _rpc
        from ._tvm import PopenPoolExecutor

        host, _, port = cfg.rpc_tracker.rpartition(":")
        if not host or not port.isdigit() or not cfg.rpc_key:
            raise TuningError(f"RPC_TRACKER={cfg.rpc_tracker!r} RPC_KEY={cfg.rpc_key!r}: give host:port and "
                              "the key the board's rpc_server registered with")
        try:   # fail now, not after every candidate has waited for a board that is not there
            n = _rpc.check_tracker(host, int(port), cfg.rpc_key)
        except _rpc.RPCError as e:
            raise TuningError(f"RPC_TRACKER={cfg.rpc_tracker} RPC_KEY={cfg.rpc_key}: {e}") from None
        if n < cfg.rpc_workers:
            print(f"note: {n} server(s) under key {cfg.rpc_key!r}, {cfg.rpc_workers} RPC workers: "
                  "sessions will queue for a free board")
        session_s = 120
        rpc = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=cfg.rpc_key,
                                  session_timeout_sec=session_s, session_priority=1)
        # create_session: TVM's tracker request waits forever once the key has no server left (a
        # board dies mid-tune); ours gives up, so the candidate is recorded as failed.
        runner = ms.runner.RPCRunner(rpc_config=rpc, evaluator_config=evaluator, max_workers=cfg.rpc_workers,
                                     f_create_session=_rpc.create_session)
        # RPCRunner's pool has no timeout: a board that vanishes without closing its socket (power
        # loss) would block a measurement forever. Backstop: waiting for a busy board + a session.
        runner.pool.shutdown()
        runner.pool = PopenPoolExecutor(max_workers=cfg.rpc_workers, timeout=2 * session_s + 30)
        return runner
    if spec.run != "native":
        raise TuningError(
            f"target {spec.name!r} runs on a {spec.arch} {spec.device} board; tuning needs timings "
            "from that board (timings under emulation mean nothing). Start `make rpc-server` on the "
            "board and pass RPC_TRACKER=host:port RPC_KEY=key")
    return ms.runner.LocalRunner(evaluator_config=evaluator)


def _progress_callback(state: dict, log):
    from ._tvm import ms
    from ._tvm import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if not runner_results:
                return
            st = state["tasks"][task_id]
            for br, rr in zip(builder_results, runner_results):
                st["trials"] += 1
                if br.error_msg is None and rr.error_msg is None and rr.run_secs:
                    t = sum(float(s) for s in rr.run_secs) / len(rr.run_secs)
                    st["best"] = min(st.get("best") or 1e30, t)
                else:
                    st["failed"] += 1
            done = sum(s["trials"] for s in state["tasks"])
            elapsed = time.time() - state["t0"]
            total = state["budget"]
            eta = elapsed / max(done, 1) * max(total - done, 0)
            best = f"{st['best'] * 1e6:9.1f} us" if st.get("best") else "      n/a"
            log(f"[{elapsed:6.0f}s] task {task_id:2d} {st['name'][:38]:<38} {st['trials']:4d} trials "
                f"({st['failed']} failed)  best {best}   all: {done}/{total}  ETA {eta / 60:5.1f} min")
            if state["limit"] and elapsed > state["limit"]:
                if not state.get("stopped"):
                    log(f"time limit {state['limit']:.0f} s reached: finishing the running batch")
                    state["stopped"] = True
                for i in range(len(state["tasks"])):
                    task_scheduler.terminate_task(i)

    return Progress()


def _tune_contexts(group, cfg: TuneConfig, target, work_dir: Path):
    """Our kernels get our rule as their whole design space (ScheduleFn: only our primitives, no
    generic rules on top); the rest get TVM's generic space. Same order as `group`."""
    from ._tvm import ms
    from . import schedules

    ctxs, weights = [], []
    for t in group:
        space = "post-order-apply"
        if cfg.space == "ours":
            fn = schedules.space_fn(t.dispatched[0]["main"], target)
            if fn is not None:
                space = ms.space_generator.ScheduleFn(fn)
        c, w = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t], work_dir=str(work_dir), space=space, seed=cfg.seed,
            strategy=ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=16,
                                                           genetic_num_iters=2))
        ctxs += list(c)
        weights += list(w)
    return ctxs, weights


def _records_per_task(db, tasks) -> list[int]:
    counts = []
    all_recs = db.get_all_tuning_records()
    for t in tasks:
        mod = t.dispatched[0]
        if not db.has_workload(mod):
            counts.append(0)
            continue
        wl = db.commit_workload(mod)
        # failed measurements (run_secs 1e10: a board that went away) do not count as done
        counts.append(sum(1 for r in all_recs if r.workload.same_as(wl) and r.run_secs
                          and min(float(x) for x in r.run_secs) < 1e9))
    return counts


def tune(cfg: TuneConfig, log: Callable[[str], None] = print) -> Path:
    from ._tvm import TVM_FFI_VERSION, TVM_VERSION, ms
    if cfg.space not in ("ours", "generic"):
        raise TuningError(f"space {cfg.space!r}: use 'ours' or 'generic'")
    spec = targets.load(cfg.target)
    runner = _runner(cfg, spec)
    if spec.cross_compiler:
        spec.compiler()
    work_dir = Path(cfg.work_dir) if cfg.work_dir else database_dir(spec.name, cfg.space)
    work_dir.mkdir(parents=True, exist_ok=True)
    sanitize_database(work_dir, log)
    spec, target, mod = prepare_module(cfg, log)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    if cfg.only:
        tasks = [t for t in tasks if any(s in t.task_name for s in cfg.only)]
    db = open_database(work_dir, log)
    done = _records_per_task(db, tasks)
    todo = [(t, max(cfg.trials_per_task - d, 0)) for t, d in zip(tasks, done)]
    skipped = [t.task_name for t, r in todo if r == 0]
    if skipped:
        log(f"{len(skipped)} task(s) already tuned to {cfg.trials_per_task} trials: skipped")
    todo = [(t, r) for t, r in todo if r > 0]
    budget = min(cfg.max_trials, sum(r for _, r in todo))
    log(f"tuning {len(todo)} of {len(tasks)} kernels for {spec.name} ({cfg.space} space), "
        f"{budget} trials, into {work_dir}")
    import logging
    # MetaSchedule's console handler takes this logger's level; per-trial details stay in logs/
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.WARNING)
    # MetaSchedule's dictConfig names every handler of this logger; an unnamed one (pytest's
    # capture, a user's) makes it crash on a second tune in the same process
    ms_logger.handlers = [h for h in ms_logger.handlers if h.get_name()]
    t0 = time.time()
    state = {"t0": t0, "budget": budget, "limit": cfg.time_limit_s, "tasks": []}
    if todo and budget > 0:
        builder = ms.builder.LocalBuilder(
            f_build=_fast_build, f_export=_export_aarch64 if spec.arch == "aarch64" else None,
            timeout_sec=120)
        groups: dict[int, list] = {}
        for t, r in todo:
            groups.setdefault(r, []).append(t)
        left = budget
        for per_task, group in sorted(groups.items(), reverse=True):
            if left <= 0 or state.get("stopped"):
                break
            ctxs, weights = _tune_contexts(group, cfg, target, work_dir)
            state["tasks"] = [{"name": t.task_name, "trials": 0, "failed": 0, "best": None} for t in group]
            callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + \
                [_progress_callback(state, log)]
            n = min(left, per_task * len(group))
            ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(work_dir), max_trials_global=n,
                          max_trials_per_task=per_task, num_trials_per_iter=min(cfg.trials_per_iter, per_task),
                          builder=builder, runner=runner, database=db, measure_callbacks=callbacks)
            left -= sum(s["trials"] for s in state["tasks"])
    elapsed = time.time() - t0
    _write_provenance(work_dir, cfg, spec, budget, elapsed, TVM_VERSION, TVM_FFI_VERSION)
    log(f"done in {elapsed / 60:.1f} min: {work_dir}")
    return work_dir


def cpu_model() -> str:
    from .runtime import cpuinfo
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def _write_provenance(work_dir: Path, cfg: TuneConfig, spec, budget, elapsed, tvm_v, ffi_v) -> None:
    p = work_dir / "provenance.json"
    runs = json.loads(p.read_text())["runs"] if p.exists() else []
    n_records = sum(1 for line in (work_dir / RECORDS).read_text().splitlines() if line.strip()) \
        if (work_dir / RECORDS).exists() else 0
    runs.append({
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.onnx or f"{cfg.model}-{cfg.alpha:g}-{cfg.resolution}",
        "space": cfg.space, "target": spec.name,
        "measured_on": (f"rpc {cfg.rpc_tracker} key {cfg.rpc_key}" if cfg.rpc_tracker
                        else f"{cpu_model()}, {os.cpu_count()} cores"),
        "budget": {"max_trials": cfg.max_trials, "trials_per_task": cfg.trials_per_task,
                   "time_limit_s": cfg.time_limit_s, "trials_this_run": budget},
        "seconds": round(elapsed, 1), "records_total": n_records,
        "tvm": tvm_v, "tvm_ffi": ffi_v,
    })
    p.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
