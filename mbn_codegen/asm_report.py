"""What can be said about a board's speed without the board: per kernel, the hot loop of lib.so's
disassembly (vector FMAs, scalar FP ops, register spills) and LLVM's own estimate of its cycles per
iteration on the board's core (llvm-mca), turned into an estimated % of that core's FMA peak and a
compute-bound time for the whole model. Estimates: no cache misses, no memory stalls, no
threading overhead; they compare schedules, they do not replace a measurement on the board.

Runs on any host with the target's objdump (binutils; aarch64-linux-gnu-objdump comes with
g++-aarch64-linux-gnu) and llvm-mca (Debian's `llvm` package).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import MbnError
from .runtime import read_manifest


class AsmReportError(MbnError):
    pass


_OBJDUMP = {"aarch64": ("aarch64-linux-gnu-objdump", "binutils-aarch64-linux-gnu (comes with g++-aarch64-linux-gnu)"),
            "x86_64": ("objdump", "binutils")}
_TRIPLE = {"aarch64": "aarch64-linux-gnu", "x86_64": "x86_64-linux-gnu"}
# vector FMA / scalar FP arithmetic / stack access / comment, per ISA (objdump syntax)
_VFMA = {"aarch64": re.compile(r"^\s*fml[as]\s+v\d+\.(4s|2d|8h)"),
         "x86_64": re.compile(r"^\s*vfn?m(add|sub)\d*p[sd]\s.*%[xyz]mm")}
_SCALAR = {"aarch64": re.compile(r"^\s*f(madd|msub|nmadd|mul|add|sub|div|max|min)\s+s\d+"),
           "x86_64": re.compile(r"^\s*v?(fn?m(add|sub)\d*s[sd]|(add|sub|mul|div|max|min)s[sd])\s")}
_STACK = {"aarch64": re.compile(r"\[sp(,|\])"), "x86_64": re.compile(r"\(%rsp\)")}
_COMMENT = {"aarch64": re.compile(r"//"), "x86_64": re.compile(r"//|#")}
_BRANCH = re.compile(r"^\s*(j\w+|b\.\w+|b|cbn?z|tbn?z)\s+([0-9a-f]+)\s+<")
_FUNC = re.compile(r"^([0-9a-f]+) <([^>]+)>:$")
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(.*)$")


@dataclass
class KernelEstimate:
    name: str
    kind: str
    source: str
    macs: int
    calls: int
    vector_fmas: int             # in the hot loop, per iteration
    scalar_fp: int
    spills: int                  # stack loads/stores in the hot loop
    instructions: int
    cycles_per_iter: float       # llvm-mca, steady state
    est_pct_of_peak: float       # FMA throughput of the hot loop / the core's, per LLVM's model
    est_ms: float                # macs * calls at that throughput and the board's clock, one core


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AsmReportError(f"{name} is not on PATH: install {package} (apt-get install ...), "
                             "or run `make apt-deps`")
    return path


def llvm_mca() -> str:
    versioned = filter(None, map(shutil.which, ("llvm-mca-19", "llvm-mca-16", "llvm-mca-15", "llvm-mca-14")))
    return shutil.which("llvm-mca") or next(versioned, None) or _tool("llvm-mca", "Debian's `llvm` package")


def disassemble(lib: Path, arch: str) -> dict[str, list[tuple[int, str]]]:
    """{function symbol: [(address, instruction text)]} of lib.so."""
    tool, package = _OBJDUMP[arch]
    out = subprocess.run([_tool(tool, package), "-d", "--no-show-raw-insn", str(lib)],
                         capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in out.splitlines():
        if m := _FUNC.match(line):
            cur = funcs.setdefault(m.group(2), [])
        elif cur is not None and (m := _INSN.match(line)):
            cur.append((int(m.group(1), 16), _COMMENT[arch].split(m.group(2), maxsplit=1)[0].strip()))
    return funcs


def _count(pattern: re.Pattern, body) -> int:
    return sum(1 for t in body if pattern.search(t))


def hot_loop(insns: list[tuple[int, str]], arch: str) -> list[str]:
    """The innermost loop (a backward branch's body containing no other loop) with the most vector
    FMAs, else the most scalar FP ops; its instructions without the closing branch."""
    index = {a: j for j, (a, _) in enumerate(insns)}
    branches = [(i, int(m.group(2), 16)) for i, (_, t) in enumerate(insns) if (m := _BRANCH.match(t))]
    loops = [(index[to], i) for i, to in branches if to <= insns[i][0] and to in index]
    inner = [(s, e) for s, e in loops if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]

    def weight(se):
        body = [t for _, t in insns[se[0]:se[1]]]
        return _count(_VFMA[arch], body), _count(_SCALAR[arch], body)

    if not inner:
        return []
    s, e = max(inner, key=weight)
    if weight((s, e)) == (0, 0):
        # a small kernel whose compute is unrolled straight-line code: the tightest loop around its
        # FMAs (the parallel chunk loop), or the whole function if none encloses them
        with_fp = [se for se in loops if weight(se) != (0, 0)]
        s, e = min(with_fp, key=lambda se: se[1] - se[0]) if with_fp else (0, len(insns))
    return [t for _, t in insns[s:e] if t and not t.startswith(("nop", "data16", "cs nop"))]


def mca_cycles(body: list[str], arch: str, mcpu: str, iterations: int = 200) -> float:
    r = subprocess.run([llvm_mca(), f"-mtriple={_TRIPLE[arch]}", f"-mcpu={mcpu}", f"-iterations={iterations}"],
                       input="\n".join(body) + "\n", capture_output=True, text=True)
    m = re.search(r"Total Cycles:\s+(\d+)", r.stdout)
    if r.returncode != 0 or m is None:
        raise AsmReportError(f"llvm-mca -mcpu={mcpu} could not read a loop: {r.stderr.strip().splitlines()[:1]}")
    return int(m.group(1)) / iterations


def peak_fmas_per_cycle(arch: str, mcpu: str) -> float:
    """The core's vector FMA throughput in LLVM's model: 16 independent FMAs, no loads."""
    body = ([f"fmla v{i}.4s, v30.4s, v31.4s" for i in range(16)] if arch == "aarch64"
            else [f"vfmadd231ps %ymm14, %ymm15, %ymm{i}" for i in range(14)])
    return len(body) / mca_cycles(body, arch, mcpu)


def report(artifact: str | Path, mcpu: str | None = None, clock_ghz: float | None = None) -> dict:
    art = Path(artifact)
    m = read_manifest(art)
    arch = m["arch"]
    if m.get("device") != "cpu" or arch not in _OBJDUMP:
        raise AsmReportError(f"{art}: the static report reads CPU libraries (x86_64, aarch64), this one is "
                             f"{arch}/{m.get('device')}")
    tvm_target = m["target"]["tvm_target"]
    mcpu = mcpu or tvm_target.get("mcpu")
    if not mcpu:
        raise AsmReportError(f"{art}: the target names no mcpu; pass --mcpu (e.g. cortex-a72)")
    clock = clock_ghz or m["target"].get("clock_ghz")
    if not clock:
        raise AsmReportError(f"{art}: the target file gives no clock_ghz; pass --clock-ghz")
    from ._tvm import Target
    from .schedules import simd

    lanes = simd(Target(tvm_target))[0]          # the width our schedules vectorised the kernels with
    funcs = disassemble(art / m["library"]["file"], arch)
    peak = peak_fmas_per_cycle(arch, mcpu)
    rows = []
    for k in m["kernels"]:
        if not k.get("macs"):
            continue
        insns = funcs.get(f"{k['symbol']}_compute_") or funcs.get(k["symbol"]) or []
        body = hot_loop(insns, arch)
        n_fma = _count(_VFMA[arch], body)
        if not body or not n_fma:
            cycles = pct = est = 0.0
        else:
            cycles = mca_cycles(body, arch, mcpu)
            pct = 100.0 * n_fma / cycles / peak
            est = k["macs"] * k.get("calls", 1) / (n_fma * lanes) * cycles / (clock * 1e6)
        rows.append(KernelEstimate(
            name=k["name"], kind=k["kind"], source=k["source"], macs=k["macs"], calls=k.get("calls", 1),
            vector_fmas=n_fma, scalar_fp=_count(_SCALAR[arch], body), spills=_count(_STACK[arch], body),
            instructions=len(body), cycles_per_iter=round(cycles, 2), est_pct_of_peak=round(pct, 1),
            est_ms=round(est, 3)))
    est_ms = sum(r.est_ms for r in rows)
    return {
        "artifact": str(art), "model": m["model"], "target": m["target"]["name"], "arch": arch, "mcpu": mcpu,
        "clock_ghz": clock, "lanes": lanes, "llvm_mca": llvm_mca(),
        "peak_vector_fmas_per_cycle": round(peak, 2),
        "peak_gflops_one_core": round(peak * lanes * 2 * clock, 1),
        "kernels": [asdict(r) for r in rows],
        "total_macs": sum(r.macs * r.calls for r in rows),
        "est_compute_ms_one_core": round(est_ms, 2),
        "est_compute_ms_all_cores": round(est_ms / int(tvm_target.get("num-cores", 1)), 2),
        "kernels_without_vector_fma": [r.name for r in rows if r.vector_fmas == 0],
        "note": ("estimates from LLVM's scheduling model of the hot loop of each kernel: no cache misses, "
                 "memory stalls or threading overhead; only the convolution and dense kernels are counted"),
    }


def render(r: dict) -> str:
    lines = [f"static report: {r['target']} ({r['mcpu']} @ {r['clock_ghz']} GHz, {r['lanes']} fp32 lanes), "
             f"peak {r['peak_vector_fmas_per_cycle']} vector FMA/cycle = {r['peak_gflops_one_core']} GFLOP/s "
             "per core (LLVM's model)",
             f"{'kernel':34s} {'kind':9s} {'calls':>5s} {'MMACs':>7s} {'vFMA':>4s} {'scal':>4s} {'spill':>5s} "
             f"{'cyc/it':>6s} {'%peak':>5s} {'est ms':>7s}"]
    for k in r["kernels"]:
        lines.append(f"{k['name'][:34]:34s} {k['kind']:9s} {k['calls']:5d} {k['macs'] / 1e6:7.2f} {k['vector_fmas']:4d} "
                     f"{k['scalar_fp']:4d} {k['spills']:5d} {k['cycles_per_iter']:6.1f} {k['est_pct_of_peak']:5.1f} "
                     f"{k['est_ms']:7.2f}")
    lines.append(f"estimated compute-bound time: {r['est_compute_ms_one_core']} ms on one core, "
                 f"{r['est_compute_ms_all_cores']} ms on all cores ({r['total_macs'] / 1e6:.0f} M mult-adds); "
                 "an estimate, not a measurement")
    if r["kernels_without_vector_fma"]:
        lines.append("no vector FMA in the hot loop of: " + ", ".join(r["kernels_without_vector_fma"]))
    return "\n".join(lines)


def write(r: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_report.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "static_report.txt").write_text(render(r) + "\n")
    return out
