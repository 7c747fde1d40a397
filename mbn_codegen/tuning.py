"""MetaSchedule tuning with our schedules as the design space for depthwise/pointwise kernels
(TVM's generic space for the rest), resumable per-target databases (layout, location and lock:
mbn_codegen.database), local or over an RPC tracker.

How a tune proceeds, and what an interruption costs. Tasks take turns (TVM's round-robin task
scheduler); each turn builds and measures a batch of `trials_per_iter` candidates (default 8), and
only then MetaSchedule's AddToDatabase callback appends one JSON line per candidate to
database_tuning_record.json (TVM's JSONDatabase opens, writes, flushes and closes the file per
record). The runner is waited for inside each turn, so at most one batch is ever uncommitted and
building never competes with a measurement for the CPU; a batch's progress line follows its records.
- SIGKILL (or a crash, or a power cut after the OS flushed its cache) loses the batch in flight: at
  most `trials_per_iter` candidates, never one whose progress line was printed. A line cut in half
  is set aside as *.corrupt-<time> by the next tune or build; the kernel releases the lock.
- Ctrl-C (SIGINT) starts no new batch; the batch in flight is committed as MetaSchedule records it
  (a terminal's Ctrl-C also stops the build/measure workers, so usually as failed trials, which do
  not count as tuned); then provenance marked "interrupted" is written, the lock released, and the
  CLI exits 130. A flag, not a KeyboardInterrupt: one raised inside TVM's C++ (from a Python
  callback) ends in std::terminate. A second Ctrl-C exits at once (130), losing what a SIGKILL loses.
- --time-limit stops between batches: the running batch is finished and kept, provenance says
  "time limit".
A resumed tune counts each kernel's measured records and tunes only the kernels short of
`trials_per_task`, seeded from their records.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import targets
# RECORDS: kept importable from here for the tests
from .database import (LOGS, RECORDS, DatabaseLock, measured, open_database, sanitize_database,  # noqa: F401
                       summary, user_dir, write_provenance)
from .errors import ForeignDatabaseError, TuningError, UnknownKernelError
from .model_spec import ModelSpec, with_model_fields


@with_model_fields
@dataclass
class TuneConfig:
    """One tune: a model, a target, the search's budget. Also takes ModelSpec's fields flat:
    TuneConfig(alpha=0.25, resolution=32, target="x86_64")."""
    model: ModelSpec = field(default_factory=ModelSpec)
    target: str = "x86_64"
    space: str = "ours"                  # "ours" | "generic" (TVM's own space, for comparison)
    work_dir: str | None = None          # None: the user's database, mbn_codegen.database.user_dir
    max_trials: int = 1000               # all tasks together
    trials_per_task: int = 64
    trials_per_iter: int = 8             # the most a SIGKILL can lose
    time_limit_s: float | None = None
    rpc_tracker: str | None = None       # "host:port"
    rpc_key: str | None = None
    rpc_workers: int = 1                 # boards measuring in parallel under the key
    seed: int = 0
    only: list[str] = field(default_factory=list)     # tune only kernels whose name contains these
    wait: bool = False                   # queue behind another tune of the same database


def _fast_build(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin` (~28 s of CPU per
    fresh builder worker here, which made every candidate time out)."""
    from ._tvm import RemoveWeightLayoutRewriteBlock, tir_build

    return tir_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_aarch64(mod) -> str:
    """Boards load a shared object linked here by the cross compiler (no compiler on the board)."""
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, cc="aarch64-linux-gnu-g++")
    return path


def prepare_module(cfg: TuneConfig, spec):
    """(target, the fused module the build's schedule phase sees): the database is keyed by its kernels."""
    from .lower import PHASES, LowerContext, import_onnx

    with tempfile.TemporaryDirectory() as d:
        prepared = cfg.model.write_onnx(Path(d) / "model.onnx", log=lambda s: None)
    onnx_model, name, shape = prepared.onnx_model, prepared.input_name, prepared.shape
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
    return target, mark_layout_free(mod, ctx)


def _runner(cfg: TuneConfig, spec, log):
    from ._tvm import ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)
    if cfg.rpc_tracker:
        from . import rpc as _rpc
        from ._tvm import PopenPoolExecutor

        try:   # fail now, not after every candidate has waited for a board that is not there
            if not cfg.rpc_key:
                raise _rpc.RPCError("give the key the board's rpc_server registered with")
            host, port = _rpc.parse_address(cfg.rpc_tracker)
            n = _rpc.check_tracker(host, port, cfg.rpc_key)
        except _rpc.RPCError as e:
            raise TuningError(f"RPC_TRACKER={cfg.rpc_tracker} RPC_KEY={cfg.rpc_key}: {e}") from None
        if n < cfg.rpc_workers:
            log(f"note: {n} server(s) under key {cfg.rpc_key!r}, {cfg.rpc_workers} RPC workers: "
                  "sessions will queue for a free board")
        session_s = 120
        rpc = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=cfg.rpc_key,
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


def _measure_now(runner):
    """The runner, waited for inside each turn: the task scheduler then commits a batch before the
    next one is built (TVM otherwise measures in the background and commits later)."""
    from ._tvm import derived_object, ms

    @derived_object
    class MeasureNow(ms.runner.PyRunner):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def run(self, runner_inputs):
            futures = self.inner.run(runner_inputs)
            while not all(f.done() for f in futures):
                time.sleep(0.02)
            return futures

    return MeasureNow(runner)


def _default_candidate(context, target):
    """Our rule's default schedule of the context's kernel as a measure candidate (postprocessed
    like the sampled ones), or None. Random initial samples alone can miss it: a 48-trial tune of
    a 1.0-224 v1 started 2-4x slower than the defaults on several kernels, and a database record
    wins over the defaults in a build, so a tune could make a build slower."""
    from ._tvm import Schedule, ms
    from . import schedules

    sch = Schedule(context.mod)
    if not schedules.apply_default(sch, target):
        return None
    sch.enter_postproc()        # as the search does: replays from the database strip what follows
    for p in context.space_generator.postprocs:
        if not p.apply(sch):
            return None
    return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))


def _forward(name: str):
    return lambda self, *args: getattr(self.inner, name)(*args)


def _stoppable(strategy, state: dict, seed_default=None):
    """A search strategy that proposes no further batch once the time limit has passed (the task
    scheduler then ends each task itself: terminating tasks from a callback trips its checks) and,
    given a target in `seed_default`, puts our default schedule into the first batch of a run."""
    from ._tvm import derived_object, ms

    @derived_object
    class Stoppable(ms.search_strategy.PySearchStrategy):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.context = None
            self.seeded = seed_default is None

        def _initialize_with_tune_context(self, context):
            self.context = context
            self.inner._initialize_with_tune_context(context)

        pre_tuning, post_tuning = _forward("pre_tuning"), _forward("post_tuning")
        notify_runner_results = _forward("notify_runner_results")

        def generate_measure_candidates(self):
            if _time_is_up(state):
                return None
            cands = self.inner.generate_measure_candidates()
            if not self.seeded and cands:
                self.seeded = True
                default = _default_candidate(self.context, seed_default)
                if default is not None:
                    cands = [default, *list(cands)[:-1]]
            return cands

        def clone(self):
            return _stoppable(self.inner.clone(), state, seed_default)

    return Stoppable(strategy)


def _time_is_up(state: dict) -> bool:
    if state.get("stopped") or state.get("interrupted"):
        return True
    if state["limit"] is not None and time.time() - state["t0"] > state["limit"]:
        state["stopped"] = True
        state["log"](f"time limit {state['limit'] / 60:g} min reached: no new batch is started")
        return True
    return False


def _progress_callback(state: dict):
    """One line per committed batch (it runs after AddToDatabase)."""
    from ._tvm import derived_object, ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            st = state["tasks"][task_id]
            means = [sum(map(float, rr.run_secs)) / len(rr.run_secs) for br, rr in zip(builder_results, runner_results)
                     if br.error_msg is None and rr.error_msg is None and rr.run_secs]
            st["trials"] += len(runner_results)
            st["failed"] += len(runner_results) - len(means)
            st["best"] = min([*means, st["best"]] if st["best"] else means, default=None)
            state["done"] += len(runner_results)
            done, total = state["done"], state["budget"]
            elapsed = time.time() - state["t0"]
            eta = elapsed / max(done, 1) * max(total - done, 0)
            best = f"{st['best'] * 1e6:9.1f} us" if st.get("best") else "      n/a"
            state["log"](f"[{elapsed:6.0f}s] {st['name'][:38]:<38} {st['trials']:4d}/{st['budget']} trials "
                         f"({st['failed']} failed)  best {best}   all {done}/{total}  ETA {eta / 60:5.1f} min")

    return Progress()


def _tune_contexts(group, cfg: TuneConfig, target, work_dir: Path, state: dict):
    """Our kernels get our rule as their whole design space (ScheduleFn: only our primitives, no
    generic rules on top); the rest get TVM's generic space. Same order as `group`."""
    from ._tvm import ms, preload_tensor_intrinsics, target_has_features, tensor_intrinsics_skipped
    from . import schedules

    # TVM's default rules for Arm (built by every tune context, even around our ScheduleFn) name
    # NEON/dot-product intrinsics, and x86 ones VNNI's: only x86 without VNNI can skip the import
    x86_plain = target.kind.name == "llvm" and target_has_features("sse2", target) and not any(
        target_has_features(f, target) for f in ("avx512vnni", "avxvnni"))
    if cfg.space == "ours" and x86_plain:
        intrinsics = tensor_intrinsics_skipped()       # nothing here tensorizes: skip minutes of import
    else:
        preload_tensor_intrinsics()
        intrinsics = contextlib.nullcontext()
    ctxs, weights = [], []
    with intrinsics:
        for t in group:
            fn = schedules.space_fn(t.dispatched[0]["main"], target) if cfg.space == "ours" else None
            _quiet_tvm_console()           # each call configures MetaSchedule's logging again
            c, w = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [t], work_dir=str(work_dir), space=ms.space_generator.ScheduleFn(fn) if fn else "post-order-apply",
                seed=cfg.seed, strategy=_stoppable(ms.search_strategy.EvolutionarySearch(
                    population_size=64, init_min_unmeasured=16, genetic_num_iters=2), state,
                    seed_default=target if fn else None))
            ctxs += list(c)
            weights += list(w)
    return ctxs, weights


def _measured_per_task(db, tasks) -> list[int]:
    """Measured records per task: failed ones (a board that went away) do not count as done."""
    recs = [r for r in db.get_all_tuning_records() if measured(r.run_secs)]
    wls = [db.commit_workload(t.dispatched[0]) if db.has_workload(t.dispatched[0]) else None for t in tasks]
    return [0 if wl is None else sum(r.workload.same_as(wl) for r in recs) for wl in wls]


def _select(tasks, only: list[str]):
    if not only:
        return tasks
    names = [t.task_name for t in tasks]
    unknown = [s for s in only if not any(s in n for n in names)]
    if unknown:
        close = {s: difflib.get_close_matches(s, names, n=3, cutoff=0.6) for s in unknown}
        hints = [f"{s!r}" + (f" (did you mean {', '.join(c)}?)" if c else "") for s, c in close.items()]
        raise UnknownKernelError(f"--only {', '.join(hints)}: no such kernel in this model. Its kernels are: "
                                 f"{', '.join(names)}")
    return [t for t in tasks if any(s in t.task_name for s in only)]


def _quiet_tvm_console() -> None:
    """MetaSchedule's dictConfig (run per tune context) gives its logger a console handler at the
    logger's level (then DEBUG): its file handler (logs/) keeps everything, the console nothing."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.ERROR)     # the level the next dictConfig's console handler takes
    for h in list(ms_logger.handlers):
        if h.get_name() and h.get_name().endswith(".console"):
            ms_logger.removeHandler(h)
    # its dictConfig names every handler of this logger; an unnamed one (pytest's capture, a
    # user's) makes the next tune in this process crash
    ms_logger.handlers = [h for h in ms_logger.handlers if h.get_name()]
    ms_logger.propagate = False


@contextlib.contextmanager
def _sigint_stops(state: dict):
    """Ctrl-C sets a flag that ends the tune between batches (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(_signum, _frame):
        if state.get("interrupted"):
            os.write(2, b"interrupted again: exiting now\n")
            os._exit(130)
        state["interrupted"] = True
        state["log"]("Ctrl-C: stopping after the batch in flight (Ctrl-C again to exit at once)")

    prev = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)


def _is_interrupt(e: BaseException) -> bool:
    # a KeyboardInterrupt raised inside a Python callback reaches us through TVM's C++ as an error
    # whose text names it
    return isinstance(e, KeyboardInterrupt) or "KeyboardInterrupt" in str(e)


def tune(cfg: TuneConfig, log: Callable[[str], None] = print) -> Path:
    if cfg.space not in ("ours", "generic"):
        raise TuningError(f"space {cfg.space!r}: use 'ours' or 'generic'")
    if cfg.time_limit_s is not None and cfg.time_limit_s <= 0:
        raise TuningError(f"time limit {cfg.time_limit_s} s: give a positive limit, or none")
    spec = targets.load(cfg.target)
    runner = _runner(cfg, spec, log)      # an absent board or tracker fails before anything is written
    if spec.cross_compiler:
        spec.compiler()
    work_dir = Path(cfg.work_dir) if cfg.work_dir else user_dir(spec.name, cfg.space)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=work_dir).close()
    except OSError as e:
        raise TuningError(f"cannot write the tuning database {work_dir} ({e.strerror}); pass "
                          "--database DIR with a folder you can write") from None
    foreign = summary(work_dir).targets() - {spec.name}
    if foreign:
        raise ForeignDatabaseError(
            f"{work_dir} holds records tuned for {', '.join(sorted(foreign))}; tuning {spec.name} into "
            f"it would mix targets. Tune into another --database, or delete {work_dir} to start again")
    with DatabaseLock(work_dir, wait=cfg.wait, log=log):
        return _tune_locked(cfg, spec, work_dir, runner, log)


def _tune_locked(cfg: TuneConfig, spec, work_dir: Path, runner, log) -> Path:
    from ._tvm import ms

    sanitize_database(work_dir, log)
    target, mod = prepare_module(cfg, spec)
    tasks = _select(ms.relax_integration.extract_tasks(mod, target), cfg.only)
    db = open_database(work_dir, log)
    todo = [(t, cfg.trials_per_task - d) for t, d in zip(tasks, _measured_per_task(db, tasks))
            if d < cfg.trials_per_task]
    if len(todo) < len(tasks):
        log(f"{len(tasks) - len(todo)} kernel(s) already tuned to {cfg.trials_per_task} trials: skipped")
    budget = min(cfg.max_trials, sum(r for _, r in todo))
    log(f"tuning {len(todo)} of {len(tasks)} kernels for {spec.name} ({cfg.space} space), {budget} trials, "
        f"batches of {cfg.trials_per_iter}, into {work_dir} (TVM's logs: {work_dir / LOGS})")
    state = {"t0": time.time(), "budget": budget, "limit": cfg.time_limit_s, "tasks": [], "done": 0,
             "log": log}
    status = "completed"
    try:
        if todo and budget > 0:
            with _sigint_stops(state):
                _run_groups(cfg, spec, target, work_dir, todo, budget, runner, db, state)
        if state.get("interrupted"):
            raise KeyboardInterrupt
        if state.get("stopped"):
            status = "time limit"
    except BaseException as e:
        interrupted = state.get("interrupted") or _is_interrupt(e)
        status = "interrupted" if interrupted else f"failed: {type(e).__name__}"
        if not interrupted or isinstance(e, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from None
    finally:
        entry = _provenance(work_dir, cfg, spec, budget, state, status)
        if status == "interrupted":
            log(f"interrupted: {state['done']} trials this run, records kept in {work_dir}")
    log(f"{status} in {entry['seconds'] / 60:.1f} min: {state['done']} trials this run, "
        f"{entry['measured_total']} measured records in {work_dir}")
    return work_dir


def _run_groups(cfg, spec, target, work_dir, todo, budget, runner, db, state) -> None:
    from ._tvm import ms

    builder = ms.builder.LocalBuilder(
        f_build=_fast_build, f_export=_export_aarch64 if spec.arch == "aarch64" else None, timeout_sec=120)
    runner = _measure_now(runner)
    groups: dict[int, list] = {}
    for t, r in todo:
        groups.setdefault(r, []).append(t)
    left = budget
    for per_task, group in sorted(groups.items(), reverse=True):
        if left <= 0 or _time_is_up(state):
            break
        ctxs, weights = _tune_contexts(group, cfg, target, work_dir, state)
        _quiet_tvm_console()                # the last tune context configured MetaSchedule's logging
        state["tasks"] = [{"name": t.task_name, "trials": 0, "failed": 0, "best": None, "budget": per_task}
                          for t in group]
        callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [_progress_callback(state)]
        before = state["done"]
        ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(work_dir),
                      max_trials_global=min(left, per_task * len(group)), max_trials_per_task=per_task,
                      num_trials_per_iter=min(cfg.trials_per_iter, per_task), builder=builder, runner=runner,
                      database=db, measure_callbacks=callbacks, task_scheduler="round-robin")
        left -= state["done"] - before


def _provenance(work_dir, cfg: TuneConfig, spec, budget, state, status) -> dict:
    from ._tvm import TVM_FFI_VERSION, TVM_VERSION

    return write_provenance(work_dir, {
        "model": cfg.model.onnx or cfg.model.stem(),
        "space": cfg.space, "target": spec.name,
        "required_cpu_flags": list(spec.required_cpu_flags),
        "rpc": f"tracker {cfg.rpc_tracker} key {cfg.rpc_key}" if cfg.rpc_tracker else None,
        "measured_on": (f"rpc {cfg.rpc_tracker} key {cfg.rpc_key}" if cfg.rpc_tracker
                        else f"this host, {os.cpu_count()} cores"),
        "budget": {"max_trials": cfg.max_trials, "trials_per_task": cfg.trials_per_task,
                   "trials_per_iter": cfg.trials_per_iter, "time_limit_s": cfg.time_limit_s,
                   "trials_this_run": budget},
        "only": cfg.only or None,
        "status": status, "trials_done": state["done"],
        "seconds": round(time.time() - state["t0"], 1),
        "tvm": TVM_VERSION, "tvm_ffi": TVM_FFI_VERSION,
    })
