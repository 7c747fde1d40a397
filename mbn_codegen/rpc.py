"""Boards over TVM's RPC tracker, on TVM's own pieces: ``tvm.rpc.tracker.Tracker``,
``tvm.rpc.Server``, ``tvm.rpc.connect_tracker`` (and the ``tvm.exec.rpc_tracker / rpc_server /
query_rpc_tracker`` CLIs the Makefile runs).

    host:   make rpc-tracker                          (python -m tvm.exec.rpc_tracker)
    board:  make rpc-server RPC_TRACKER=HOST:9190 RPC_KEY=rpi4   (python3 -m tvm.exec.rpc_server)
    host:   mbn-codegen tune|bench --target arm64 --rpc-tracker HOST:9190 --rpc-key rpi4

What TVM lacks, and is therefore here: a tracker request that gives up when the key's boards went
away (TVM's waits forever), and an RPC server that runs under qemu-aarch64 (``serve``: TVM's Server
re-executes ``sys.executable`` in a popen_worker, which under qemu user-mode is the host's Python).
Stdlib only at module level: ``serve`` runs on a board with nothing but the tvm wheel.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .errors import MbnError

DEFAULT_TRACKER_PORT = 9190
LOOPBACK = "127.0.0.1"
BOARD_INFO = "mbn_codegen.board_info"        # remote global registered by `serve`
EMULATED_ENV = "MBN_RPC_EMULATED"             # set by start_server(emulated=True) for board_info


class RPCError(MbnError):
    """A tracker or server that cannot be started or reached; the message says what to do."""


def parse_address(addr, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', (host, port) or anything with .host/.port (a Tracker) -> (host, port)."""
    if hasattr(addr, "host") and hasattr(addr, "port"):
        return addr.host, int(addr.port)
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    host, sep, port = str(addr).rpartition(":")
    if not sep and default_port is not None:
        host, port = str(addr), str(default_port)
    if not host or not port.isdigit():
        raise RPCError(f"RPC tracker address {addr!r}: expected host:port, e.g. 127.0.0.1:9190")
    return host, int(port)


def connect_tracker(host, port: int | None = None, timeout: float = 5.0):
    """tvm.rpc.connect_tracker, after a plain connect: TVM's connect_with_retry waits 60 s on a
    refused port, and a wrong peer should be a named error. ``host`` may be "host:port"."""
    host, port = parse_address(host if port is None else (host, port))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise RPCError(f"cannot reach the RPC tracker at {host}:{port} ({e.strerror or e}); start one "
                       f"with `make rpc-tracker` (python -m tvm.exec.rpc_tracker --host 0.0.0.0 "
                       f"--port {port}) or fix RPC_TRACKER") from None
    from ._tvm import tvm_rpc

    try:
        return tvm_rpc.connect_tracker(host, port)
    except (RuntimeError, OSError) as e:
        raise RPCError(f"{host}:{port} did not answer as a TVM RPC tracker ({e})") from None


def query_tracker(host, port: int | None = None, timeout: float = 5.0) -> dict:
    """TrackerSession.summary(): {"server_info": [{"key": "server:KEY", "addr": [h, p]}, ...],
    "queue_info": {KEY: {"free", "pending"}}}. ``host`` may be "host:port"."""
    with contextlib.closing(connect_tracker(host, port, timeout)) as sess:
        return sess.summary()


def text_summary(host, port: int | None = None) -> str:
    with contextlib.closing(connect_tracker(host, port)) as sess:
        return sess.text_summary()


def server_ports(summary: dict, key: str) -> list[int]:
    """Ports of the servers registered under ``key`` (busy or idle)."""
    return [int(s["addr"][1]) for s in summary["server_info"] if s["key"].split(":", 1)[-1] == key]


def check_tracker(host: str, port: int, key: str, timeout: float = 5.0) -> int:
    """The tracker answers and has a server under ``key``; returns how many (else RPCError)."""
    summary = query_tracker(host, port, timeout)
    n = len(server_ports(summary, key))
    if n == 0:
        seen = sorted({s["key"].split(":", 1)[-1] for s in summary["server_info"]})
        raise RPCError(
            f"RPC tracker {host}:{port} has no server under key {key!r}"
            + (f" (keys registered: {', '.join(seen)})" if seen else " (no servers registered)")
            + f". On the board run: python3 -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
            f"  (see `make rpc-server`), then check with `make rpc-query RPC_TRACKER={host}:{port}`")
    return n


# (host, port, key) -> when the tracker was first seen without a server under key (per process)
_MISSING_SINCE: dict[tuple[str, int, str], float] = {}


def request_session(host: str, port: int, key: str, session_timeout: float = 0, priority: int = 1,
                    *, poll_s: float = 2.0, gone_grace_s: float = 6.0):
    """TrackerSession.request, except that it gives up (RPCError) once no server has been
    registered under ``key`` for ``gone_grace_s``: TVM's waits forever, so a board that dies
    mid-tune would hang the tune. Closing the tracker session withdraws the queued request."""
    from ._tvm import rpc_base, tvm_rpc

    where = (host, port, key)

    def boards_gone() -> bool:
        try:
            n = len(server_ports(query_tracker(host, port), key))
        except RPCError:
            n = 0                                           # tracker gone: same outcome
        if n:
            _MISSING_SINCE.pop(where, None)
            return False
        return time.monotonic() - _MISSING_SINCE.setdefault(where, time.monotonic()) >= gone_grace_s

    gone = RPCError(f"no RPC server under key {key!r} at tracker {host}:{port} for {gone_grace_s:g} s: "
                    "the board went away")
    if where in _MISSING_SINCE and boards_gone():           # known gone: fail without waiting again
        raise gone
    with contextlib.closing(connect_tracker(host, port, timeout=10.0)) as sess:
        rpc_base.sendjson(sess._sock, [rpc_base.TrackerCode.REQUEST, key, "", priority])
        while not select.select([sess._sock], [], [], poll_s)[0]:
            if boards_gone():
                raise gone
        code, value = rpc_base.recvjson(sess._sock)
    if code != rpc_base.TrackerCode.SUCCESS:
        raise RPCError(f"RPC tracker {host}:{port} refused the request for {key!r}: {value!r}")
    url, server_port, matchkey = value
    return tvm_rpc.connect(url, server_port, matchkey, session_timeout)


def create_session(rpc_config):
    """``f_create_session`` for ``ms.runner.RPCRunner``: request_session with its RPCConfig."""
    return request_session(rpc_config.tracker_host, int(rpc_config.tracker_port), rpc_config.tracker_key,
                           rpc_config.session_timeout_sec, rpc_config.session_priority)


# ------------------------------------------------------------------------------------------------
# processes


def start_tracker(host: str = LOOPBACK, port: int = DEFAULT_TRACKER_PORT, port_end: int | None = None):
    """TVM's Tracker (a popen_worker child; binds the first free port in [port, port_end))."""
    from ._tvm import RPCTracker

    try:
        return RPCTracker(host, port=port, port_end=port_end or port + 100, silent=True)
    except Exception as e:
        raise RPCError(f"RPC tracker could not start on {host}:{port}: {e}") from None


def start_host_server(tracker, key: str, host: str = LOOPBACK, port: int = 9090, timeout: float = 60.0):
    """TVM's Server on this host (a popen_worker child), registered under ``key``."""
    from ._tvm import tvm_rpc

    th, tp = parse_address(tracker)
    server = tvm_rpc.Server(host, port=port, port_end=port + 100, key=key, tracker_addr=(th, tp), silent=True)
    try:
        wait_for_servers((th, tp), key, ports=[server.port], timeout=timeout)
    except RPCError:
        server.terminate()
        raise
    return server


_STARTED: list["RPCProcess"] = []


def kill_process_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the process group that ``proc`` leads (start_new_session=True), so a
    server's forked session children go too; reap."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
    proc.wait()


class RPCProcess:
    """An emulated RPC server started by :func:`start_server`; :meth:`stop` kills its group."""

    def __init__(self, popen: subprocess.Popen, host: str, port: int, key: str, log_path: Path, own_log: bool):
        self.popen, self.host, self.port, self.key, self.log_path = popen, host, port, key, log_path
        self._own_log = own_log
        _STARTED.append(self)

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

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        return f"<emulated rpc server {self.host}:{self.port} key={self.key!r} pid {self.popen.pid} {state}>"


atexit.register(lambda: [p.stop(timeout=2.0) for p in list(_STARTED)])


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(tracker, key: str, *, host: str = LOOPBACK, port: int | None = None, log_path=None,
                 wait: bool = True, timeout: float = 180.0) -> RPCProcess:
    """An emulated arm64 "board": ``serve`` under qemu-aarch64 with the arm64 sysroot's Python
    (emulation.EmulationUnavailableError when missing), registered under ``key``, in its own
    process group. ``wait``: return once the tracker lists it (10-30 s: a full ``import tvm``)."""
    from .emulation import arm64_env, arm64_python_command

    th, tp = parse_address(tracker)
    p = port if port is not None else free_port(host)
    argv = arm64_python_command(["-m", "mbn_codegen.rpc", "serve", "--tracker", f"{th}:{tp}", "--key", key,
                                 "--host", host, "--port", str(p), "--port-end", str(p + 1)])
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"mbn-rpc-server-{key}-", suffix=".log")
        os.close(fd)
    log = Path(log_path or name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        popen = subprocess.Popen(argv, env=arm64_env({"PYTHONUNBUFFERED": "1", EMULATED_ENV: "qemu-aarch64"}),
                                 stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc = RPCProcess(popen, host, p, key, log, own_log=log_path is None)
    if wait:
        try:
            wait_for_servers((th, tp), key, ports=[p], procs=[proc], timeout=timeout)
        except RPCError:
            proc.stop()
            raise
    return proc


def wait_for_servers(tracker, key: str, *, ports: Sequence[int], procs: Sequence[RPCProcess] = (),
                     timeout: float = 120.0) -> dict:
    """Until the tracker lists servers under ``key`` on each of ``ports``; fails early, with its
    log, if one of ``procs`` exits. Returns the summary."""
    th, tp = parse_address(tracker)
    deadline, summary = time.monotonic() + timeout, None
    while True:
        for pr in procs:
            if not pr.alive():
                raise RPCError(f"RPC server {pr.key!r} exited with {pr.popen.returncode} before "
                               f"registering; its log:\n{pr.log_tail()}")
        try:
            summary = query_tracker(th, tp, timeout=2.0)
            if set(ports) <= set(server_ports(summary, key)):
                return summary
        except RPCError:
            pass
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {pr!r}:\n{pr.log_tail(1500)}" for pr in procs)
            raise RPCError(f"no server under key {key!r} on port(s) {list(ports)} at tracker {th}:{tp} after "
                           f"{timeout:g} s; tracker state: {summary}{logs}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------
# board side


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def board_info() -> dict:
    """What identifies the board: /proc/cpuinfo, cores, frequency governor, memory; and whether
    this server runs under an emulator."""
    cpu = "/sys/devices/system/cpu"
    return {"cpuinfo": _read("/proc/cpuinfo"), "meminfo": _read("/proc/meminfo"), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "online": _read(f"{cpu}/online"),
            "governor": _read(f"{cpu}/cpu0/cpufreq/scaling_governor"),
            "max_khz": _read(f"{cpu}/cpu0/cpufreq/cpuinfo_max_freq"), "model": _read("/proc/device-tree/model"),
            "machine": os.uname().machine, "emulated": os.environ.get(EMULATED_ENV), "source": BOARD_INFO}


def _serve(args) -> int:
    """TVM's server loop in this process (no popen_worker): runs under qemu and on a board."""
    import json
    import logging

    import tvm_ffi
    from tvm.rpc.server import PopenRPCServerState

    logging.basicConfig(level=logging.INFO)
    tvm_ffi.register_global_func(BOARD_INFO, lambda: json.dumps(board_info()), override=True)
    th, tp = parse_address(args.tracker, DEFAULT_TRACKER_PORT)
    state = PopenRPCServerState(args.host, port=args.port, port_end=args.port_end, tracker_addr=(th, tp),
                                key=args.key, load_library=args.load_library, custom_addr=args.custom_addr)
    print(f"rpc server key={args.key!r} on {args.host}:{state.port}, tracker {th}:{tp}", flush=True)
    state.thread.join()
    return 1                                   # the listen loop only ends on an error


def _qemu_servers(args) -> int:
    """Emulated servers in the foreground until Ctrl-C / SIGTERM / SIGHUP or one exits."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)      # raises KeyboardInterrupt
    procs = []
    try:
        procs = [start_server(args.tracker, args.key, host=args.host, wait=False) for _ in range(args.count)]
        wait_for_servers(args.tracker, args.key, ports=[p.port for p in procs], procs=procs, timeout=180)
        print("\n".join(f"started {p!r}, log {p.log_path}" for p in procs), flush=True)
        print(text_summary(args.tracker) + "Ctrl-C stops them", flush=True)
        while all(p.alive() for p in procs):
            time.sleep(0.5)
        dead = next(p for p in procs if not p.alive())
        print(f"{dead!r} exited; its log ({dead.log_path}):\n{dead.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            p.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mbn_codegen.rpc", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="TVM's RPC server loop in-process (runs under qemu, or on a board)")
    s.add_argument("--tracker", metavar="HOST:PORT", required=True)
    s.add_argument("--key", required=True, help="the name tune/bench ask the tracker for")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--port-end", type=int, default=9199)
    s.add_argument("--custom-addr", help="address to report to the tracker (NAT, several NICs)")
    s.add_argument("--load-library")
    q = sub.add_parser("qemu-server", help="emulated arm64 RPC server(s) on this host, in the foreground")
    q.add_argument("--tracker", default=f"{LOOPBACK}:{DEFAULT_TRACKER_PORT}", metavar="HOST:PORT")
    q.add_argument("--key", default="qemu-a72")
    q.add_argument("--host", default=LOOPBACK)
    q.add_argument("--count", type=int, default=1, help="servers under the key (default 1)")
    args = ap.parse_args(argv)
    try:
        return _serve(args) if args.cmd == "serve" else _qemu_servers(args)
    except MbnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
