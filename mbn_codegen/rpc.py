"""TVM RPC for tuning on boards: a tracker, RPC servers (on a board, on this host, or an emulated
arm64 "board" under qemu-aarch64), a tracker query, and clean shutdown.

The remote flow (`make tune TARGET=arm64 RPC_TRACKER=host:9190 RPC_KEY=rpi4`):

    host:   python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190      (make rpc-tracker)
    board:  python3 -m tvm.exec.rpc_server --tracker HOST:9190 --key rpi4  (make rpc-server)
    host:   mbn-codegen tune --target arm64 --rpc-tracker HOST:9190 --rpc-key rpi4 [--rpc-workers N]

Every board registered under one key takes measurements; `--rpc-workers N` keeps N sessions in
flight, so N boards under the key measure in parallel.

Why an own server entry point (``python -m mbn_codegen.rpc serve``): TVM's
``tvm.exec.rpc_server`` starts its server in a ``tvm.exec.popen_worker`` child (needs
``cloudpickle``, and re-executes ``sys.executable``). Under qemu user-mode emulation without
binfmt_misc that exec fails ("Exec format error: .../python3.11"), so the emulated server runs
TVM's server loop in-process instead (``tvm.rpc.server.PopenRPCServerState``: the same listen loop,
a forked child per session). It also runs on a real board, with nothing but the apache-tvm wheel.

Processes are started in their own session (process group); :meth:`RPCProcess.stop` kills the
whole group, so the tracker's popen_worker child and a server's forked session child go with it
(killing only the CLI's pid leaves them running).

Import-light on purpose (standard library only at module level): this module runs under emulation.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .errors import MbnError

__all__ = [
    "RPCError", "RPCProcess", "DEFAULT_TRACKER_PORT", "free_port", "parse_address",
    "start_tracker", "start_server", "wait_for_servers", "query_tracker", "count_servers",
    "format_summary", "check_tracker", "request_session", "create_session", "kill_process_group",
]

DEFAULT_TRACKER_PORT = 9190
LOOPBACK = "127.0.0.1"

# tvm.rpc.base (kept here so that this module needs no TVM import)
_TRACKER_MAGIC = 0x2F271
_SUCCESS, _REQUEST, _SUMMARY = 0, 4, 6


class RPCError(MbnError):
    """A tracker or server that cannot be started or reached; the message says what to do."""


# ------------------------------------------------------------------------------------------------
# tracker protocol (stdlib only): [int32 length][json]


def parse_address(addr: str | tuple[str, int] | "RPCProcess", default_port: int | None = None
                  ) -> tuple[str, int]:
    """'host:port' (or (host, port), or a started tracker) -> (host, port)."""
    if isinstance(addr, RPCProcess):
        return addr.host, addr.port
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    host, sep, port = str(addr).rpartition(":")
    if not sep and default_port is not None:
        host, port = str(addr), str(default_port)
    if not host or not port.isdigit():
        raise RPCError(f"RPC tracker address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def _recvall(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the RPC tracker")
        buf += chunk
    return buf


def _sendjson(sock: socket.socket, data) -> None:
    raw = json.dumps(data).encode()
    sock.sendall(struct.pack("<i", len(raw)) + raw)


def _recvjson(sock: socket.socket):
    (n,) = struct.unpack("<i", _recvall(sock, 4))
    return json.loads(_recvall(sock, n).decode())


def _tracker_socket(host: str, port: int, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise RPCError(f"cannot reach the RPC tracker at {host}:{port} ({e.strerror or e}); start one "
                       f"with `make rpc-tracker` (python -m tvm.exec.rpc_tracker --host 0.0.0.0 "
                       f"--port {port}) or fix RPC_TRACKER") from None
    try:
        sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
        (magic,) = struct.unpack("<i", _recvall(sock, 4))
    except (OSError, ConnectionError) as e:
        sock.close()
        raise RPCError(f"{host}:{port} accepted a connection but did not answer as an RPC tracker "
                       f"({e})") from None
    if magic != _TRACKER_MAGIC:
        sock.close()
        raise RPCError(f"{host}:{port} is not a TVM RPC tracker (wrong magic {magic:#x})")
    return sock


def query_tracker(host: str, port: int | None = None, timeout: float = 5.0) -> dict:
    """The tracker's state:
    ``{"tracker": "h:p", "servers": [{"key": k, "addr": "h:p"}, ...],
    "queue": {key: {"total": registered servers, "free": idle servers, "pending": waiting requests}}}``.
    ``host`` may be "host:port". Raises RPCError when no tracker answers."""
    if port is None:
        host, port = parse_address(host)
    sock = _tracker_socket(host, port, timeout)
    try:
        _sendjson(sock, [_SUMMARY])
        code, data = _recvjson(sock)
    finally:
        sock.close()
    if code != _SUCCESS:
        raise RPCError(f"RPC tracker {host}:{port} refused the summary request: {data!r}")
    servers = []
    for item in data.get("server_info", []):
        key = str(item.get("key", "")).split(":", 1)[-1]          # "server:rpi4" -> "rpi4"
        addr = item.get("addr") or [None, None]
        servers.append({"key": key, "addr": f"{addr[0]}:{addr[1]}"})
    queue = {}
    for key, q in data.get("queue_info", {}).items():
        queue[key] = {"total": sum(1 for s in servers if s["key"] == key),
                      "free": int(q.get("free", 0)), "pending": int(q.get("pending", 0))}
    for s in servers:
        queue.setdefault(s["key"], {"total": sum(1 for t in servers if t["key"] == s["key"]),
                                    "free": 0, "pending": 0})
    return {"tracker": f"{host}:{port}", "servers": servers, "queue": queue}


def count_servers(summary: dict, key: str) -> int:
    """Servers registered under ``key`` (busy or idle) in a :func:`query_tracker` summary."""
    return sum(1 for s in summary["servers"] if s["key"] == key)


def format_summary(summary: dict) -> str:
    lines = [f"RPC tracker {summary['tracker']}", "servers:"]
    lines += [f"  {s['addr']:<24} {s['key']}" for s in sorted(summary["servers"], key=lambda s: s["key"])]
    if not summary["servers"]:
        lines.append("  (none)")
    lines.append("queue:   key                      total  free  pending")
    for key, q in sorted(summary["queue"].items()):
        if q["total"] or q["pending"]:
            lines.append(f"         {key:<24} {q['total']:5d} {q['free']:5d} {q['pending']:8d}")
    return "\n".join(lines)


def check_tracker(host: str, port: int, key: str, timeout: float = 5.0) -> int:
    """Before tuning: the tracker answers and at least one server is registered under ``key``.
    Returns the number of servers; raises RPCError naming what is missing."""
    summary = query_tracker(host, port, timeout)
    n = count_servers(summary, key)
    if n == 0:
        seen = sorted({s["key"] for s in summary["servers"]})
        raise RPCError(
            f"RPC tracker {host}:{port} has no server under key {key!r}"
            + (f" (keys registered: {', '.join(seen)})" if seen else " (no servers registered)")
            + f". On the board run: python3 -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
            "  (see `make rpc-server`), then check with "
            f"`python -m mbn_codegen.rpc query {host}:{port}`")
    return n


# ------------------------------------------------------------------------------------------------
# sessions for MetaSchedule's RPCRunner (runs in the runner's host-side popen worker)


def request_session(host: str, port: int, key: str, session_timeout: float = 0, priority: int = 1,
                    *, poll_s: float = 2.0, gone_grace_s: float = 6.0):
    """tvm.rpc.TrackerSession.request, except that it gives up (RPCError) when no server is
    registered under ``key`` for ``gone_grace_s`` while it waits. TVM's own request waits forever
    in that case, so a board that dies mid-tune would hang the whole tune. Closing our request
    socket withdraws the request from the tracker's queue."""
    from tvm import rpc

    where = (host, port, key)

    def boards_gone() -> bool:
        try:
            n = count_servers(query_tracker(host, port), key)
        except RPCError:
            n = 0                                           # tracker gone: same outcome
        if n:
            _MISSING_SINCE.pop(where, None)
            return False
        since = _MISSING_SINCE.setdefault(where, time.monotonic())
        return time.monotonic() - since >= gone_grace_s

    def gone_error() -> RPCError:
        return RPCError(f"no RPC server under key {key!r} at tracker {host}:{port} for "
                        f"{gone_grace_s:g} s: the board went away")

    if where in _MISSING_SINCE and boards_gone():           # known gone: fail without waiting again
        raise gone_error()
    sock = _tracker_socket(host, port, timeout=10.0)
    try:
        sock.settimeout(None)
        _sendjson(sock, [_REQUEST, key, "", priority])
        while True:
            readable, _, _ = select.select([sock], [], [], poll_s)
            if readable:
                code, value = _recvjson(sock)
                if code != _SUCCESS:
                    raise RPCError(f"RPC tracker {host}:{port} refused the request for {key!r}: {value!r}")
                url, server_port, matchkey = value
                break
            if boards_gone():
                raise gone_error()
    finally:
        sock.close()
    return rpc.connect(url, server_port, matchkey, session_timeout)


# (host, port, key) -> when the tracker was first seen without a server under key (per process)
_MISSING_SINCE: dict[tuple[str, int, str], float] = {}


def create_session(rpc_config):
    """``f_create_session`` for ``ms.runner.RPCRunner``: :func:`request_session` with the runner's
    RPCConfig."""
    return request_session(rpc_config.tracker_host, int(rpc_config.tracker_port),
                           rpc_config.tracker_key, rpc_config.session_timeout_sec,
                           rpc_config.session_priority)


# ------------------------------------------------------------------------------------------------
# processes


_STARTED: list["RPCProcess"] = []


def kill_process_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session=True), SIGKILL what
    is left after ``timeout`` s (always, so children of a leader that exited die too), reap."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    if pgid != proc.pid or pgid == os.getpgid(0):
        # not a group leader of its own (or ours): never signal a group we did not create
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


class RPCProcess:
    """A started tracker or server: ``host``, ``port`` (the server's own port; for a tracker the
    port clients use), ``key``, ``log_path``; :meth:`stop` kills its process group."""

    def __init__(self, role: str, popen: subprocess.Popen, host: str, port: int,
                 key: str | None, log_path: Path, emulated: bool = False, own_log: bool = False):
        self.role, self.popen, self.host, self.port = role, popen, host, port
        self.key, self.log_path, self.emulated = key, log_path, emulated
        self._own_log = own_log                  # a temporary log file we made: removed by stop()
        _STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        kill_process_group(self.popen, timeout)
        if self in _STARTED:
            _STARTED.remove(self)
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "RPCProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        what = f" key={self.key!r}" + (" (qemu-aarch64)" if self.emulated else "") if self.key else ""
        return f"<rpc {self.role} {self.address}{what} pid {self.pid} {state}>"


@atexit.register
def _stop_all() -> None:
    for p in list(_STARTED):
        try:
            p.stop(timeout=2.0)
        except Exception:  # pragma: no cover
            pass



def free_port(host: str = LOOPBACK) -> int:
    """A port that ``host`` can bind right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_file(role: str, log_path) -> Path:
    if log_path is not None:
        p = Path(log_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    fd, name = tempfile.mkstemp(prefix=f"mbn-rpc-{role}-", suffix=".log")
    os.close(fd)
    return Path(name)


def _spawn(argv: Sequence[str], env, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_tracker(host: str = LOOPBACK, port: int | None = None, *, log_path=None,
                  timeout: float = 60.0) -> RPCProcess:
    """``python -m tvm.exec.rpc_tracker`` on ``host`` (loopback by default) at ``port`` (a free
    one when None), started in its own process group; returns once it answers queries."""
    tries = 1 if port is not None else 3
    last = ""
    for _ in range(tries):
        p = port if port is not None else free_port(host)
        log = _log_file("tracker", log_path)
        # --port-end p+1: exactly this port (the CLI's default end 9199 breaks ports >= 9199)
        argv = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(p),
                "--port-end", str(p + 1)]
        proc = RPCProcess("tracker", _spawn(argv, None, log), host, p, None, log, own_log=log_path is None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.alive():
            try:
                query_tracker(host, p, timeout=2.0)
                return proc
            except RPCError:
                time.sleep(0.3)
        last = proc.log_tail()
        proc.stop()
    raise RPCError(f"RPC tracker did not come up on {host}:{p} within {timeout:g} s; its log:\n{last}")


def server_command(tracker: str, key: str, *, emulated: bool = False, host: str = LOOPBACK,
                   port: int = 9090, port_end: int | None = None) -> list[str]:
    """argv of an RPC server registering under ``key``: TVM's CLI with this host's Python, or our
    in-process server under qemu-aarch64 (``emulated``; use with emulation.arm64_env())."""
    args = ["--tracker", tracker, "--key", key, "--host", host, "--port", str(port),
            "--port-end", str(port_end or port + 1)]
    if emulated:
        from .emulation import arm64_python_command
        return arm64_python_command(["-m", "mbn_codegen.rpc", "serve", *args])
    return [sys.executable, "-m", "tvm.exec.rpc_server", *args]


def start_server(tracker, key: str, *, emulated: bool = False, host: str = LOOPBACK,
                 port: int | None = None, log_path=None, wait: bool = True,
                 timeout: float | None = None) -> RPCProcess:
    """An RPC server registering under ``key`` with ``tracker`` ("host:port" or a started tracker),
    listening on ``host``:``port`` (a free port when None), in its own process group.

    ``emulated``: an arm64 "board" (qemu-aarch64 + the arm64 sysroot's python with TVM's aarch64
    wheels; raises emulation.EmulationUnavailableError when missing). ``wait``: return once the
    tracker lists it (about 10-30 s under emulation: a full ``import tvm``)."""
    th, tp = parse_address(tracker)
    p = port if port is not None else free_port(host)
    argv = server_command(f"{th}:{tp}", key, emulated=emulated, host=host, port=p)
    env = None
    if emulated:
        from .emulation import arm64_env
        env = arm64_env({"PYTHONUNBUFFERED": "1"})
    log = _log_file(f"server-{key}", log_path)
    proc = RPCProcess("server", _spawn(argv, env, log), host, p, key, log, emulated, own_log=log_path is None)
    if wait:
        try:
            wait_for_servers((th, tp), key, ports=[p], procs=[proc],
                             timeout=timeout if timeout is not None else (180.0 if emulated else 60.0))
        except RPCError:
            proc.stop()
            raise
    return proc


def wait_for_servers(tracker, key: str, count: int = 1, *, ports: Sequence[int] = (),
                     procs: Sequence[RPCProcess] = (), timeout: float = 120.0) -> dict:
    """Wait until the tracker lists ``count`` servers under ``key`` (and, if given, ones on each of
    ``ports``). Fails early, with the log, if one of ``procs`` exits. Returns the summary."""
    th, tp = parse_address(tracker)
    deadline = time.monotonic() + timeout
    summary = None
    while True:
        for pr in procs:
            if not pr.alive():
                raise RPCError(f"RPC server {pr.key!r} exited with {pr.popen.returncode} before "
                               f"registering; its log:\n{pr.log_tail()}")
        try:
            summary = query_tracker(th, tp, timeout=2.0)
            mine = [s for s in summary["servers"] if s["key"] == key]
            have_ports = {int(s["addr"].rsplit(":", 1)[1]) for s in mine if s["addr"][-1:].isdigit()}
            if len(mine) >= count and all(p in have_ports for p in ports):
                return summary
        except RPCError:
            pass
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {pr!r}:\n{pr.log_tail(1500)}" for pr in procs)
            raise RPCError(f"no {count} server(s) under key {key!r} at tracker {th}:{tp} after "
                           f"{timeout:g} s; tracker state: {summary}{logs}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------
# command line: python -m mbn_codegen.rpc {tracker,serve,qemu-server,query}


def _serve(args) -> int:
    """TVM's RPC server loop in this process (no popen_worker, no cloudpickle): works under qemu."""
    import logging

    logging.basicConfig(level=logging.INFO)
    from tvm.rpc.server import PopenRPCServerState

    th, tp = parse_address(args.tracker, DEFAULT_TRACKER_PORT) if args.tracker else (None, None)
    state = PopenRPCServerState(args.host, port=args.port, port_end=args.port_end,
                                tracker_addr=(th, tp) if th else None, key=args.key,
                                load_library=args.load_library, custom_addr=args.custom_addr,
                                silent=args.silent)
    print(f"rpc server key={args.key!r} listening on {args.host}:{state.port}"
          + (f", registered with tracker {th}:{tp}" if th else ""), flush=True)
    state.thread.join()
    return 1                                   # the listen loop only ends on an error


class _Stop(Exception):
    pass


def _foreground(start) -> int:
    """Run ``start()`` (-> list of RPCProcess) and wait until Ctrl-C, SIGTERM or SIGHUP, or until
    one of them exits; stop them all (whole process groups) in every case."""
    def _raise(signum, _frame):
        raise _Stop(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    procs: list[RPCProcess] = []
    try:
        procs += start()
        print("Ctrl-C stops " + ("it" if len(procs) == 1 else "them"), flush=True)
        while all(p.alive() for p in procs):
            time.sleep(0.5)
        dead = next(p for p in procs if not p.alive())
        print(f"{dead!r} exited; its log ({dead.log_path}):\n{dead.log_tail()}", file=sys.stderr)
        return 1
    except _Stop:
        return 0
    finally:
        for p in procs:
            p.stop()


def _tracker_fg(args) -> int:
    def start():
        tr = start_tracker(args.host, args.port, log_path=args.log)
        print(f"RPC tracker on {tr.address} (log {tr.log_path}); boards: python3 -m "
              f"tvm.exec.rpc_server --tracker THIS_HOST_IP:{tr.port} --key KEY", flush=True)
        return [tr]
    return _foreground(start)


def _qemu_servers(args) -> int:
    def start():
        procs = [start_server(args.tracker, args.key, emulated=True, host=args.host, wait=False)
                 for _ in range(args.count)]
        try:
            wait_for_servers(args.tracker, args.key, ports=[p.port for p in procs], procs=procs,
                             timeout=180)
        except BaseException:
            for p in procs:
                p.stop()
            raise
        for p in procs:
            print(f"started {p!r}, log {p.log_path}", flush=True)
        print(format_summary(query_tracker(*parse_address(args.tracker))), flush=True)
        return procs
    return _foreground(start)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mbn_codegen.rpc", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tracker", help="TVM's tracker at exactly --port, in the foreground")
    t.add_argument("--host", default="0.0.0.0", help="0.0.0.0 (default): boards on the network reach it")
    t.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT)
    t.add_argument("--log", help="tracker log file (default: a temporary file)")
    s = sub.add_parser("serve", help="TVM's RPC server loop in-process (runs under qemu, or on a board)")
    s.add_argument("--tracker", metavar="HOST:PORT")
    s.add_argument("--key", default="")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--port-end", type=int, default=9199)
    s.add_argument("--custom-addr", help="address to report to the tracker (NAT, several NICs)")
    s.add_argument("--load-library")
    s.add_argument("--silent", action="store_true")
    q = sub.add_parser("qemu-server", help="emulated arm64 RPC server(s) on this host, in the foreground")
    q.add_argument("--tracker", default=f"{LOOPBACK}:{DEFAULT_TRACKER_PORT}", metavar="HOST:PORT")
    q.add_argument("--key", default="qemu-a72")
    q.add_argument("--host", default=LOOPBACK)
    q.add_argument("--count", type=int, default=1, help="servers under the key (default 1)")
    r = sub.add_parser("query", help="print a tracker's servers and queues")
    r.add_argument("tracker", nargs="?", default=f"{LOOPBACK}:{DEFAULT_TRACKER_PORT}", metavar="HOST:PORT")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "tracker":
            return _tracker_fg(args)
        if args.cmd == "serve":
            if args.tracker and not args.key:
                ap.error("--tracker needs --key (the name the tuner asks the tracker for)")
            return _serve(args)
        if args.cmd == "qemu-server":
            return _qemu_servers(args)
        print(format_summary(query_tracker(*parse_address(args.tracker, DEFAULT_TRACKER_PORT))))
        return 0
    except MbnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
