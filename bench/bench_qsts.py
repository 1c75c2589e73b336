"""QSTS benchmarks: derms' ``run_qsts`` against the same study driven directly in OpenDSS.

Two figures (definitions in /work/shared/DESIGN.md, "Definitions behind the acceptance
figures"; see bench/README.md):

1. **QSTS overhead, IEEE 8500** -- one week at 15 min (672 steps), controls static, every
   load with a profile. (a) derms: ``Profiles`` + ``run_qsts(engine, profiles,
   control_mode="static")`` on an already compiled :class:`OpenDSSEngine`; (b) the same
   study driven directly in OpenDSS's yearly mode in a fresh dss-python context, collecting
   the same per-step results (node voltages, branch currents, source powers, losses) into
   numpy arrays. Compile time is excluded from both and reported separately. Figure: a/b.
2. **Year of hourly QSTS, IEEE 123** -- 8760 steps, controls static, per-load profiles;
   time through derms including profile construction/loading and result collection, feeder
   already compiled, with the native-OpenDSS equivalent as in-run reference.

Each case is repeated (``--repeats``, default 3), alternating which side runs first, on a
freshly compiled feeder each time; the median is reported. Both sides must give the same
node voltages (the max abs difference is reported).

Run: ``.venv/bin/python bench/bench_qsts.py [--json out.json] [--repeats 3] [--only 8500]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/feeders")
BUNDLED = REPO / "src" / "derms" / "data" / "feeders"

FEEDER_8500 = [SHARED / "IEEETestCases/8500-Node/Master.dss", BUNDLED / "ieee8500/Master.dss"]
FEEDER_123 = [
    SHARED / "IEEETestCases/123Bus/IEEE123Master.dss",
    BUNDLED / "ieee123/IEEE123Master.dss",
]
SHAPES_DIR = SHARED / "Examples/Loadshapes"
SHAPE_FILES = ("LoadShape1.CSV", "LoadShape2.CSV", "LoadShape3.CSV")

# derms' default solve settings (derms.powerflow.engine.SolveSettings); the native side uses
# the same so that both solve the same problem to the same tolerance.
MAX_ITER, MAX_CONTROL_ITER, TOLERANCE = 100, 100, 1e-4
SEED = 20260701

TARGET_OVERHEAD = 1.2
TARGET_123_YEAR_S = 5.0


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def first_existing(paths: list[Path]) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise SystemExit(f"feeder not found: tried {', '.join(map(str, paths))}")


def base_shapes(step: timedelta, n_steps: int) -> np.ndarray:
    """The hourly 8760-point example shapes, resampled to ``step``: (n_steps, n_shapes).

    Point ``h`` of an hourly shape is taken as the value at hour ``h``; finer steps are
    linearly interpolated (wrapping around the end of the year).
    """
    hourly = []
    for name in SHAPE_FILES:
        path = SHAPES_DIR / name
        if not path.exists():
            raise SystemExit(f"load shape not found: {path}")
        hourly.append(np.loadtxt(path, delimiter=",", usecols=0, ndmin=1))
    hourly = np.column_stack(hourly)  # (8760, 3)
    hours = np.arange(n_steps) * (step.total_seconds() / 3600.0)
    xp = np.arange(hourly.shape[0] + 1, dtype=float)
    out = np.empty((n_steps, hourly.shape[1]))
    for j in range(hourly.shape[1]):
        fp = np.append(hourly[:, j], hourly[0, j])
        out[:, j] = np.interp(hours % hourly.shape[0], xp, fp)
    return out


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    master: Path
    step: timedelta
    n_steps: int


# --------------------------------------------------------------------------------------
# (a) through derms
# --------------------------------------------------------------------------------------
def import_derms() -> None:
    """Import the derms modules used below, so that import time is not in any timing."""
    import derms.powerflow.engine  # noqa: F401
    import derms.powerflow.profiles  # noqa: F401
    import derms.powerflow.qsts  # noqa: F401


def derms_compile(master: Path):
    from derms.powerflow.engine import OpenDSSEngine

    return OpenDSSEngine(master)


def derms_run(engine, shapes: np.ndarray, assign: dict[str, int], step: timedelta) -> dict:
    """Timed part of (a): build ``Profiles`` and run ``run_qsts``; returns results."""
    from derms.powerflow.profiles import Profiles
    from derms.powerflow.qsts import run_qsts

    elements = tuple(f"load.{name}" for name in assign)
    cols = np.fromiter(assign.values(), dtype=np.int64, count=len(assign))
    profiles = Profiles(
        start=datetime(2026, 1, 1, tzinfo=UTC), step=step, elements=elements,
        p_mult=shapes[:, cols],
    )
    res = run_qsts(engine, profiles, control_mode="static")
    return {
        "v_pu": res.v_pu, "i_a": res.i_a, "head_p_kw": res.head_p_kw,
        "losses_kw": res.losses_kw, "converged": res.converged,
        "node_names": engine.node_names(),
    }


# --------------------------------------------------------------------------------------
# (b) directly in OpenDSS (no derms code)
# --------------------------------------------------------------------------------------
_UP = re.compile(r"(?:\.\.[/\\])+")


def stage_feeder(master: Path, tmp: Path) -> Path:
    """Copy the feeder folder below ``tmp`` plus the top-level files of the ancestor folders
    its scripts reach with ``../`` (e.g. IEEE 123's ``redirect ../IEEELineCodes.DSS``)."""
    depth = 0
    for f in master.parent.iterdir():
        if f.is_file() and f.suffix.lower() == ".dss":
            for m in _UP.finditer(f.read_text(errors="replace")):
                depth = max(depth, m.group(0).count(".."))
    ancestors = [master.parent.parents[i] for i in range(depth)][::-1]  # outermost first
    dest = tmp
    for anc in ancestors:
        dest = dest / anc.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in anc.iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)
    dest = dest / master.parent.name
    shutil.copytree(master.parent, dest)
    return dest / master.name


class NativeFeeder:
    """A fresh dss-python context with a temp copy of the feeder compiled."""

    def __init__(self, master: Path) -> None:
        import dss

        self.tmp = Path(tempfile.mkdtemp(prefix="bench-dss-"))
        self.ctx = dss.DSS.NewContext()
        self.ctx.AllowChangeDir = False
        self.ctx.AllowForms = False
        staged = stage_feeder(master, self.tmp)
        self.ctx.Text.Command = f'compile "{staged}"'

    def close(self) -> None:
        try:
            self.ctx.ClearAll()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def native_run(nf: NativeFeeder, shapes: np.ndarray, assign: dict[str, int],
               step: timedelta) -> dict:
    """Timed part of (b): load shapes, yearly mode, solve loop and per-step collection."""
    ctx = nf.ctx
    text = ctx.Text
    c = ctx.ActiveCircuit
    sol = c.Solution
    sol.MaxIterations = MAX_ITER
    sol.MaxControlIterations = MAX_CONTROL_ITER
    sol.Tolerance = TOLERANCE
    text.Command = "set controlmode=static"

    # one load shape per distinct profile, assigned through the Loads API
    sec = step.total_seconds()
    n_steps = shapes.shape[0]
    ls = c.LoadShapes
    for j in range(shapes.shape[1]):
        text.Command = f"new loadshape.bench{j} npts={n_steps} sinterval={sec}"
        ls.Name = f"bench{j}"
        col = np.ascontiguousarray(shapes[:, j])
        ls.Pmult = col
        ls.Qmult = col
    loads = c.Loads
    i = loads.First
    while i:
        loads.Yearly = f"bench{assign[loads.Name.lower()]}"
        i = loads.Next

    # index: terminal-1 phase conductors of every series PD element, in AllCurrents order
    pd = c.PDElements
    ckt = c.ActiveCktElement
    names = list(pd.AllNames)
    n_vals = 2 * np.asarray(pd.AllNumTerminals) * np.asarray(pd.AllNumConductors)
    offsets = np.concatenate([[0], np.cumsum(n_vals)])
    pos = []
    for e, full in enumerate(names):
        # SetActiveElement is a hashed lookup; ``pd.Name = full`` scans the PD list (O(n))
        c.SetActiveElement(full)
        if ckt.NumTerminals < 2 or pd.IsShunt:
            continue
        pos.extend(int(offsets[e]) + 2 * k for k in range(ckt.NumPhases))
    pos = np.asarray(pos, dtype=np.int64)
    vs = c.Vsources
    vs.First
    source = f"vsource.{vs.Name}"
    c.SetActiveElement(source)
    nph = ckt.NumPhases
    node_names = [n.lower() for n in c.AllNodeNames]

    v_pu = np.empty((n_steps, len(node_names)))
    i_a = np.empty((n_steps, len(pos)), dtype=np.float32)
    head_p = np.empty((n_steps, nph))
    head_q = np.empty((n_steps, nph))
    losses = np.empty((n_steps, 2))
    conv = np.zeros(n_steps, dtype=bool)

    text.Command = f"set mode=yearly stepsize={sec}s number=1"
    text.Command = "set time=(0,0)"
    for k in range(n_steps):
        sol.Solve()
        v_pu[k] = c.AllBusVmagPu
        cur = pd.AllCurrents
        i_a[k] = np.hypot(cur[pos], cur[pos + 1])
        c.SetActiveElement(source)
        pw = ckt.Powers
        head_p[k] = -pw[0 : 2 * nph : 2]
        head_q[k] = -pw[1 : 2 * nph : 2]
        losses[k] = c.Losses
        conv[k] = sol.Converged
    return {
        "v_pu": v_pu, "i_a": i_a, "head_p_kw": head_p, "losses_kw": losses[:, 0] / 1e3,
        "converged": conv, "node_names": node_names,
    }


# --------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    key: str
    title: str
    feeder: str
    steps: int
    step_s: float
    nodes: int
    loads: int
    branch_conductors: int
    distinct_shapes: int
    derms_s: list[float] = field(default_factory=list)
    native_s: list[float] = field(default_factory=list)
    derms_cpu_s: list[float] = field(default_factory=list)
    native_cpu_s: list[float] = field(default_factory=list)
    derms_compile_s: list[float] = field(default_factory=list)
    native_compile_s: list[float] = field(default_factory=list)
    max_dv_pu: float = 0.0
    max_di_a: float = 0.0
    max_dp_kw: float = 0.0
    max_dloss_kw: float = 0.0
    nonconverged_steps: int = 0

    @property
    def derms_median_s(self) -> float:
        return statistics.median(self.derms_s)

    @property
    def native_median_s(self) -> float:
        return statistics.median(self.native_s)

    @property
    def ratio(self) -> float:
        return self.derms_median_s / self.native_median_s

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.derms_cpu_s) / statistics.median(self.native_cpu_s)

    def summary(self) -> dict:
        d = asdict(self)
        d.update(
            derms_median_s=self.derms_median_s, native_median_s=self.native_median_s,
            ratio=self.ratio, cpu_ratio=self.cpu_ratio,
            derms_cpu_median_s=statistics.median(self.derms_cpu_s),
            native_cpu_median_s=statistics.median(self.native_cpu_s),
            derms_compile_median_s=statistics.median(self.derms_compile_s),
            native_compile_median_s=statistics.median(self.native_compile_s),
        )
        return d


def _timed(fn: Callable[[], dict]) -> tuple[float, float, dict]:
    """Wall-clock and process CPU seconds of ``fn()``, and its result."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def import_time_s() -> float:
    """Seconds to import derms' QSTS module (pulls in pandas) in a fresh interpreter.

    Not part of the timed study (the benchmark imports derms before timing); reported so
    that the cost of a cold ``derms`` command is visible.
    """
    code = ("import time; t=time.perf_counter(); import derms.powerflow.qsts; "
            "print(time.perf_counter()-t)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=120).stdout
        return float(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return float("nan")


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"result shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(float) - b.astype(float)))) if a.size else 0.0


def run_case(case: Case, repeats: int, log: Callable[[str], None]) -> CaseResult:
    shapes = base_shapes(case.step, case.n_steps)
    res: CaseResult | None = None
    for rep in range(repeats):
        # compile both (untimed for the study figure, timed separately)
        t0 = time.perf_counter()
        engine = derms_compile(case.master)
        t_dc = time.perf_counter() - t0
        t0 = time.perf_counter()
        nf = NativeFeeder(case.master)
        t_nc = time.perf_counter() - t0
        try:
            load_names = [n.lower() for n in nf.ctx.ActiveCircuit.Loads.AllNames]
            rng = np.random.default_rng(SEED)
            picks = rng.integers(0, shapes.shape[1], size=len(load_names))
            assign = dict(zip(load_names, picks.tolist(), strict=True))
            runs = {
                "derms": lambda: derms_run(engine, shapes, assign, case.step),
                "native": lambda: native_run(nf, shapes, assign, case.step),
            }
            order = ("derms", "native") if rep % 2 == 0 else ("native", "derms")
            out, secs, cpu = {}, {}, {}
            for side in order:
                secs[side], cpu[side], out[side] = _timed(runs[side])
                log(f"  {case.key} rep {rep + 1}/{repeats}: {side:6s} {secs[side]:7.3f} s "
                    f"(cpu {cpu[side]:.3f} s)")
        finally:
            engine.close()
            nf.close()
        a, b = out["derms"], out["native"]
        if a["node_names"] != b["node_names"]:
            raise AssertionError("node order differs between derms and native OpenDSS")
        if res is None:
            res = CaseResult(
                key=case.key, title=case.title, feeder=str(case.master), steps=case.n_steps,
                step_s=case.step.total_seconds(), nodes=a["v_pu"].shape[1],
                loads=len(load_names), branch_conductors=a["i_a"].shape[1],
                distinct_shapes=int(len(set(assign.values()))),
            )
        res.derms_s.append(secs["derms"])
        res.native_s.append(secs["native"])
        res.derms_cpu_s.append(cpu["derms"])
        res.native_cpu_s.append(cpu["native"])
        res.derms_compile_s.append(t_dc)
        res.native_compile_s.append(t_nc)
        res.max_dv_pu = max(res.max_dv_pu, _maxdiff(a["v_pu"], b["v_pu"]))
        res.max_di_a = max(res.max_di_a, _maxdiff(a["i_a"], b["i_a"]))
        res.max_dp_kw = max(res.max_dp_kw, _maxdiff(a["head_p_kw"], b["head_p_kw"]))
        res.max_dloss_kw = max(res.max_dloss_kw, _maxdiff(a["losses_kw"], b["losses_kw"]))
        res.nonconverged_steps = max(res.nonconverged_steps, int((~a["converged"]).sum()))
        del out, a, b
    assert res is not None
    return res


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import dss

    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "dss_python": dss.__version__, "engine": dss.DSS.Version.split(";")[0],
        "numpy": np.__version__,
    }


def uptime() -> dict:
    try:
        text = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    return {"uptime": text.strip(), "loadavg": list(os.getloadavg())}


def print_table(results: list[CaseResult], meta: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        Console = None  # noqa: N806

    header = ["case", "steps", "nodes", "derms (a) s", "native (b) s", "a/b", "a/b cpu",
              "target", "max |dV| pu", "compile a / b s"]
    rows = []
    for r in results:
        if r.key == "ieee8500_week":
            target = f"a/b <= {TARGET_OVERHEAD}"
            ok = r.ratio <= TARGET_OVERHEAD
        else:
            target = f"a <= {TARGET_123_YEAR_S:.0f} s"
            ok = r.derms_median_s <= TARGET_123_YEAR_S
        rows.append([
            r.title, str(r.steps), str(r.nodes), f"{r.derms_median_s:.3f}",
            f"{r.native_median_s:.3f}", f"{r.ratio:.3f}", f"{r.cpu_ratio:.3f}",
            f"{target} {'ok' if ok else 'MISSED'}", _diff(r.max_dv_pu),
            f"{statistics.median(r.derms_compile_s):.2f} / "
            f"{statistics.median(r.native_compile_s):.2f}",
        ])
    foot = [
        f"date {meta['date']}; CPU {meta['machine']['cpu']} ({meta['machine']['cores']} cores); "
        f"Python {meta['machine']['python']}, dss-python {meta['machine']['dss_python']}",
        f"median of {meta['repeats']} runs each, alternating order, feeder compiled beforehand "
        "(compile excluded, shown separately); wall-clock seconds, 'a/b cpu' = ratio of "
        "process CPU seconds",
        f"derms import (cold, not in the timings): {meta['derms_import_s']:.2f} s",
        f"load average at start {_la(meta['start'])}, at end {_la(meta['end'])}",
    ]
    cores = meta["machine"]["cores"] or 1
    if max(meta["start"]["loadavg"][0], meta["end"]["loadavg"][0]) > cores - 0.5:
        foot.append(
            f"NOTE: 1-min load average near or above the {cores} cores -- other processes "
            "competed for the CPU; wall-clock figures are inflated and noisy, compare "
            "'a/b cpu'."
        )
    for r in results:
        foot.append(
            f"{r.key}: {r.loads} loads, {r.distinct_shapes} shapes, {r.branch_conductors} "
            f"branch conductors; max |dI| {_diff(r.max_di_a)} A, |dP head| {_diff(r.max_dp_kw)} "
            f"kW, |dLoss| {_diff(r.max_dloss_kw)} kW; non-converged steps "
            f"{r.nonconverged_steps}; "
            f"runs a {_fmt(r.derms_s)} b {_fmt(r.native_s)}; "
            f"per step a {r.derms_median_s / r.steps * 1e3:.2f} ms, "
            f"b {r.native_median_s / r.steps * 1e3:.2f} ms"
        )
    if Console is not None:
        table = Table(title="derms QSTS benchmarks", show_lines=False)
        for h in header:
            table.add_column(h, justify="left" if h == "case" else "right")
        for row in rows:
            table.add_row(*row)
        con = Console(width=max(140, shutil.get_terminal_size().columns))
        con.print(table)
        for line in foot:
            con.print(line, highlight=False, soft_wrap=True)
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        print("-+-".join("-" * w for w in widths))
        for row in rows:
            print(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        print("\n".join(foot))


def _diff(x: float) -> str:
    return "0 (exact)" if x == 0 else f"{x:.1e}"


def _la(u: dict) -> str:
    return " ".join(f"{x:.2f}" for x in u["loadavg"])


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and case (default 3)")
    ap.add_argument("--only", choices=["8500", "123"], help="run one case only")
    ap.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    cases = []
    if args.only in (None, "8500"):
        cases.append(Case("ieee8500_week", "IEEE 8500, 1 week @ 15 min, QSTS overhead",
                          first_existing(FEEDER_8500), timedelta(minutes=15), 7 * 96))
    if args.only in (None, "123"):
        cases.append(Case("ieee123_year", "IEEE 123, 1 year @ 1 h",
                          first_existing(FEEDER_123), timedelta(hours=1), 8760))

    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(), "repeats": args.repeats, "start": uptime()}
    log(f"start: {meta['start']['uptime']}")
    meta["derms_import_s"] = import_time_s()
    import_derms()
    results = [run_case(c, args.repeats, log) for c in cases]
    meta["end"] = uptime()
    log(f"end:   {meta['end']['uptime']}")

    print_table(results, meta)
    if args.json:
        payload = {**meta, "targets": {"ieee8500_overhead_ratio": TARGET_OVERHEAD,
                                       "ieee123_year_s": TARGET_123_YEAR_S},
                   "cases": {r.key: r.summary() for r in results}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
