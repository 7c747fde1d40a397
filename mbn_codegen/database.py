"""Tuning databases: where they live, what they hold, which one a build applies, and who may write.

A database is a folder: database_workload.json + database_tuning_record.json (MetaSchedule's JSON
lines: one workload per kernel, one record per measured candidate pointing at its workload by line
number), provenance.json (one entry per tune: target, CPU, budget, how it ended), logs/ (TVM's own
logs) and, while a tune writes to it, tune.lock.

Shipped databases come with the package (mbn_codegen/targets/databases/<target>[-generic]) and are
only read. Tunes write user databases: `--database DIR`, by default
$XDG_DATA_HOME/mbn-codegen/databases/<target>[-generic] (~/.local/share/... without XDG_DATA_HOME).
A build applies --database if given (kind "explicit"), else the user's database for its target if
it has records ("user"), else the shipped one ("shipped").

MetaSchedule's JSONDatabase reads and appends the two JSON files; what it lacks is here: a corrupt
line stops it (sanitize_database sets such lines aside), it has no notion of which target or CPU
its records came from (provenance, select) and nothing stops two tunes appending at once (the lock).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import targets
from .errors import CorruptDatabaseError, DatabaseLockedError, ForeignDatabaseError

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
PROVENANCE, LOCK, LOGS = "provenance.json", "tune.lock", "logs"
SHIPPED_ROOT = Path(targets.HERE) / "databases"
FAILED_RUN_SECS = 1e9       # MetaSchedule stores a failed build/run as 1e10 s
SIMD_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "asimd", "sve", "neon", "dotprod", "i8mm",
                 "bf16", "fphp", "asimdhp")


def folder_name(target: str, space: str = "ours") -> str:
    name = Path(str(target)).stem
    return name if space == "ours" else f"{name}-{space}"


def user_dir(target: str, space: str = "ours") -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mbn-codegen" / "databases" / folder_name(target, space)


def shipped_dir(target: str, space: str = "ours") -> Path:
    return SHIPPED_ROOT / folder_name(target, space)


def database_dir(target: str, space: str = "ours") -> Path:
    """The database a build applies by default: the user's if it has records, else the shipped."""
    user = user_dir(target, space)
    return user if summary(user).records else shipped_dir(target, space)


def measured(run_secs) -> bool:
    """A record that timed its candidate (a failed build or run is stored with 1e10 s)."""
    return bool(run_secs) and min(float(x) for x in run_secs) < FAILED_RUN_SECS


@dataclass
class Summary:
    """What a database folder holds, counted from its files (the one place records are counted)."""
    path: Path
    workloads: int = 0
    records: int = 0
    measured: int = 0
    runs: list[dict] = field(default_factory=list)

    @property
    def provenance(self) -> dict | None:
        return self.runs[-1] if self.runs else None

    def targets(self) -> set[str]:
        return {r["target"] for r in self.runs if r.get("target")}


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.is_file() else []


def summary(path: str | os.PathLike) -> Summary:
    p = Path(path)
    lines = _lines(p / RECORDS)
    s = Summary(p, workloads=len(_lines(p / WORKLOADS)), records=len(lines))
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, IndexError, KeyError):
            s.measured += measured(json.loads(line)[1][1])
    with contextlib.suppress(OSError, ValueError):
        s.runs = json.loads((p / PROVENANCE).read_text()).get("runs", [])
    return s


def _check_workloads_present(work_dir: Path) -> None:
    wl, rec = work_dir / WORKLOADS, work_dir / RECORDS
    if _lines(rec) and not _lines(wl):
        raise CorruptDatabaseError(
            f"{work_dir}: {RECORDS} has records but {WORKLOADS} is "
            f"{'empty' if wl.exists() else 'missing'}; the records point at workloads by line number, so "
            f"without that file none of them can be used. Restore {wl} (e.g. `git checkout -- {wl}` for a "
            f"shipped database, or from a backup), or delete {work_dir} to start again. Nothing was changed")


def sanitize_database(work_dir: str | os.PathLike, log: Callable[[str], None] = print) -> int:
    """Check every JSON line; a corrupt or truncated line (a run killed mid-write, a bad merge) is
    reported and dropped, the original kept beside it as *.corrupt-<time>. Returns lines dropped."""
    work_dir = Path(work_dir)
    _check_workloads_present(work_dir)
    wl_path, rec_path = work_dir / WORKLOADS, work_dir / RECORDS
    dropped = 0
    n_workloads = None
    for path in (p for p in (wl_path, rec_path) if p.exists()):
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
        where = ", ".join(str(i) for i, _ in bad[:10]) + ("..." if len(bad) > 10 else "")
        if path is wl_path:
            if bad:
                raise CorruptDatabaseError(
                    f"{path}: line(s) {where} are not valid workload "
                    "entries; the records that point at them cannot be trusted. Restore the file from "
                    "git (`git checkout -- <file>`) or delete the database folder to start again")
            n_workloads = len(good)
        if bad:
            aside = path.with_name(path.name + time.strftime(".corrupt-%Y%m%d-%H%M%S"))
            shutil.copyfile(path, aside)
            path.write_text("".join(line + "\n" for _, line in good))
            log(f"warning: {path}: skipped {len(bad)} corrupt line(s) ({where}); original kept as {aside.name}")
            dropped += len(bad)
    return dropped


def open_database(work_dir: str | os.PathLike, log: Callable[[str], None] = print, writable: bool = True):
    """MetaSchedule's JSONDatabase over a folder. writable=False (builds): the folder is never
    changed; corrupt lines are dropped in a temporary copy instead."""
    from ._tvm import ms

    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise CorruptDatabaseError(f"tuning database {work_dir} does not exist; tune first "
                                   "(`mbn-codegen tune --target ...`) or leave --database out")
    _check_workloads_present(work_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = work_dir
        if not writable:
            src = Path(tmp)
            for name in (WORKLOADS, RECORDS):
                (src / name).write_bytes((work_dir / name).read_bytes() if (work_dir / name).is_file() else b"")
            if sanitize_database(src, log=lambda s: None):
                log(f"warning: {work_dir}: corrupt line(s) skipped for this build (the database was "
                    "not changed; a tune into it sets them aside)")
        else:
            sanitize_database(src, log)
        try:
            return ms.database.JSONDatabase(work_dir=str(src), module_equality="structural")
        except Exception as e:
            raise CorruptDatabaseError(f"cannot read tuning database {work_dir}: {str(e).splitlines()[-1]}; "
                                       "restore it from git or a backup, or delete it to start again") from None


# ------------------------------------------------------------------------------------------------
# which database a build applies

@dataclass
class Selected:
    path: Path
    kind: str                     # "explicit" | "user" | "shipped"
    summary: Summary
    warnings: list[str] = field(default_factory=list)

    def manifest(self) -> dict:
        s = self.summary
        return {"path": str(self.path), "kind": self.kind, "records": s.records, "measured": s.measured,
                "workloads": s.workloads, "provenance": s.provenance, "warnings": self.warnings}


def this_cpu() -> dict:
    import platform

    from .runtime import cpu_flags, cpuinfo
    info = cpuinfo()
    return {"cpu_model": info.get("model name") or info.get("Model") or platform.processor()
            or platform.machine(), "simd_flags": sorted(f for f in cpu_flags() if f.startswith(SIMD_PREFIXES))}


def compatibility(s: Summary, spec) -> tuple[list[str], list[str]]:
    """(warnings, refusals) for applying these records to a build for `spec`."""
    warnings, refusals = [], []
    if s.records and not s.runs:
        warnings.append(f"{s.path} has no provenance.json: the target and CPU its records were tuned "
                        "for are unknown")
    for name in sorted(s.targets() - {spec.name}):
        try:
            missing = sorted(set(targets.load(name).required_cpu_flags) - set(spec.required_cpu_flags))
        except Exception:
            missing = []
        if missing:
            refusals.append(f"{s.path} was tuned for {name}, whose code needs CPU flags "
                            f"{', '.join(missing)} that {spec.name} does not require")
        else:
            warnings.append(f"{s.path} was tuned for target {name}, not {spec.name}")
    if spec.run == "native":
        here = this_cpu()["cpu_model"]
        models = {r["cpu_model"] for r in s.runs if r.get("cpu_model") and not r.get("rpc")}
        if models and here not in models:
            warnings.append(f"{s.path}: records were timed on {', '.join(sorted(models))}, this machine is "
                            f"{here} (the best schedules there may not be the best here)")
    return warnings, refusals


def select(spec, explicit: str | None, automatic: bool, log: Callable[[str], None] = print,
           space: str = "ours") -> Selected | None:
    """--database if given; else the user's database for the target if it has records; else the
    shipped one if it has records; else None. Logs which, and why it may not fit."""
    if explicit:
        sel = Selected(Path(explicit), "explicit", summary(explicit))
    elif not automatic:
        return None
    else:
        for kind, path in (("user", user_dir(spec.name, space)), ("shipped", shipped_dir(spec.name, space))):
            s = summary(path)
            if s.records:
                sel = Selected(path, kind, s)
                break
        else:
            return None
    sel.warnings, refusals = compatibility(sel.summary, spec)
    if refusals and sel.kind != "explicit":
        raise ForeignDatabaseError(
            "; ".join(refusals) + f". Applying them to a {spec.name} build could emit instructions its CPUs "
            f"lack. Pass --database {sel.path} to apply them anyway, --no-database to build untuned, or "
            f"tune for {spec.name} (`mbn-codegen tune --target {spec.name}`)")
    sel.warnings += refusals
    s = sel.summary
    log(f"tuning database ({sel.kind}): {sel.path}  [{s.records} records, {s.workloads} kernels]")
    for w in sel.warnings:
        log(f"warning: {w}")
    return sel


# ------------------------------------------------------------------------------------------------
# provenance and the lock

def write_provenance(work_dir: str | os.PathLike, run: dict) -> dict:
    """Append one run (the caller's fields + date, CPU and record counts) to provenance.json,
    atomically: an interrupted write leaves the previous file."""
    p = Path(work_dir) / PROVENANCE
    s = summary(work_dir)
    entry = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **run}
    if not run.get("rpc"):
        entry.update(this_cpu())
    entry.update(records_total=s.records, measured_total=s.measured)
    tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"runs": [*s.runs, entry]}, indent=2) + "\n")
    os.replace(tmp, p)
    return entry


class DatabaseLock:
    """tune.lock in the database folder, holding {pid, host, started}: one tune writes at a time.
    An flock on it, so the kernel releases it however its owner dies (no pid liveness guesses);
    the file a killed tune leaves behind is taken over with a warning."""

    def __init__(self, work_dir: str | os.PathLike, wait: bool = False, log: Callable[[str], None] = print,
                 poll_s: float = 2.0):
        self.path = Path(work_dir) / LOCK
        self.wait, self.log, self.poll_s = wait, log, poll_s
        self.fd: int | None = None

    def owner(self) -> dict:
        try:
            o = json.loads(self.path.read_text())
        except (OSError, ValueError):
            o = {}
        return o if isinstance(o, dict) else {}         # gone, being written, or garbage

    def acquire(self) -> "DatabaseLock":
        waited = False
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                o = self.owner()
                who = f"pid {o.get('pid', '?')} on {o.get('host', '?')} (since {_when(o.get('started'))})"
                if not self.wait:
                    raise DatabaseLockedError(
                        f"{self.path.parent} is being tuned by {who}; two tunes into one database corrupt "
                        f"it. Wait for it to finish, pass --wait to queue behind it, or tune into another "
                        f"--database (the lock: {self.path})") from None
                if not waited:
                    self.log(f"waiting for {who}, which is tuning {self.path.parent}")
                    waited = True
                time.sleep(self.poll_s)
                continue
            if os.fstat(fd).st_nlink == 0:     # unlinked by the releaser meanwhile: lock the new file
                os.close(fd)
                continue
            if os.fstat(fd).st_size:            # left behind by a tune that died holding it
                o = self.owner()
                self.log(f"warning: stale lock {self.path}: pid {o.get('pid', '?')} (started "
                         f"{_when(o.get('started'))}) is no longer running; taking the lock over")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)       # before unlocking: see acquire
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "an unknown time"
