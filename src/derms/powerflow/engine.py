"""One OpenDSS engine context per model, compiled from a private copy of the feeder folder.

The OpenDSS engine (dss-python) is used through a *new context* per engine, never the
process-wide singleton, so several models can live in one process. The feeder folder is
copied to a temporary directory before ``compile`` because some feeders write files when
solved (e.g. debug traces of regulators) and must never write into shared or bundled data.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from derms.errors import ConvergenceError, InputError, ModelError

log = logging.getLogger(__name__)

ControlMode = Literal["static", "time", "off"]
_CWD_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class SolveSettings:
    """Solver settings applied after compiling a feeder.

    ``max_iterations`` is the Newton/fixed-point iteration cap of one power flow;
    ``max_control_iterations`` the cap on control (regulator/capacitor) rounds;
    ``control_mode`` is OpenDSS's ``controlmode`` ("off" freezes taps and capacitor states).
    """

    max_iterations: int = 100
    max_control_iterations: int = 100
    tolerance: float = 1e-4
    control_mode: ControlMode = "static"


def _dss_module():
    from dss import DSS  # imported lazily: importing dss loads a native library

    return DSS


def compact_dss_error(text: str) -> str:
    """OpenDSS's error text on one line: its code, the error description, the command and
    where it stands (``[file: …, line: N]``), without the "Probable Cause" boilerplate
    (the CLI printed eight lines for one bad value)."""
    lines = [ln.strip() for ln in text.splitlines()]
    m = re.match(r"\(#\d+\)", lines[0]) if lines else None
    code = m.group(0) if m else ""

    def after(label: str) -> str:
        for k, ln in enumerate(lines[:-1]):
            if ln.endswith(label):
                return next((x for x in lines[k + 1:] if x), "")
        return ""

    desc, cmd = after("Error Description:"), after("Processing DSS Command:")
    where = [ln for ln in lines if ln.startswith("[file:")]
    if not desc:
        return " ".join(ln for ln in lines if ln)
    return " ".join(x for x in (code, desc, f"in `{cmd}`" if cmd else "", *where[-1:]) if x)


class OpenDSSEngine:
    """An OpenDSS engine context holding one compiled feeder.

    Parameters
    ----------
    master:
        Path of the feeder's master ``.dss`` file. Its folder is copied to a private
        temporary folder, which is compiled instead (see module docstring).
    settings:
        Solve settings applied after compile (the master's own ``set`` commands run first).
    """

    def __init__(self, master: str | Path, settings: SolveSettings | None = None) -> None:
        self.source_master = _check_master(master)
        self.settings = settings or SolveSettings()
        self._tmp = Path(tempfile.mkdtemp(prefix="derms-dss-"))
        # quantities derived from the solved circuit that are costly to rebuild (e.g. the
        # state estimator's measurement Jacobian), each stored with a digest of every
        # input it depends on and used only when a fresh digest matches
        self.derived: dict[str, object] = {}
        self.ctx = _dss_module().NewContext()
        self.ctx.AllowForms = False
        try:
            self.master = stage_copy(self.source_master, self._tmp)
            self._compile()
        except ModelError as exc:
            self.close()
            raise ModelError(f"{self.source_master}: cannot compile: "
                             f"{compact_dss_error(self._user_paths(str(exc)))}") from None
        if self.ctx.ActiveCircuit is None or self.ctx.NumCircuits == 0:
            self.close()
            raise ModelError(f"{self.source_master}: no circuit defined (no 'New Circuit' line)")
        self.apply_settings(self.settings)

    def _compile(self) -> None:
        """Compile the staged copy. OpenDSS resolves some relative paths (e.g. ``uuids``)
        against the working directory, so it may change directory into the copy while
        compiling; the process's directory is restored afterwards, under a lock."""
        with _CWD_LOCK:
            cwd = os.getcwd()
            self.ctx.AllowChangeDir = True
            try:
                self.command(f'compile "{self.master}"')
            finally:
                self.ctx.AllowChangeDir = False
                os.chdir(cwd)

    def _user_paths(self, text: str) -> str:
        """Engine messages name files of the private copy: say the user's files instead."""
        staged = getattr(self, "master", None)
        if staged is None:
            return text
        return text.replace(str(staged.parent), str(self.source_master.parent))

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the engine's circuit and delete the private feeder copy."""
        try:
            self.ctx.ClearAll()
        except Exception:  # noqa: BLE001 - closing must never raise
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> OpenDSSEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --------------------------------------------------------------------------
    @property
    def circuit(self):
        """The engine's active circuit (dss-python ``ICircuit``)."""
        return self.ctx.ActiveCircuit

    def command(self, text: str) -> str:
        """Run one OpenDSS text command; engine errors become :class:`ModelError`."""
        from dss import DSSException

        verb = text.lstrip()[:8].lower()
        if verb.startswith(_TOPOLOGY_VERBS):  # open/close/enable/... may (un)ground an area
            pairs = getattr(self, "_pairs", None)
            # a new element can only ground an area: a feeder with none ungrounded stays so
            # (hosting-capacity probes add one load per site: no re-walk of 10k elements)
            if not (verb.startswith("new") and pairs is not None and not (pairs[1] >= 0).any()):
                self._pairs = None
        try:
            self.ctx.Text.Command = text
            return self.ctx.Text.Result
        except DSSException as exc:
            raise ModelError(str(exc)) from None

    def apply_settings(self, settings: SolveSettings) -> None:
        """Apply solver settings (iteration caps, tolerance, control mode)."""
        self.settings = settings
        sol = self.circuit.Solution
        sol.MaxIterations = settings.max_iterations
        sol.MaxControlIterations = settings.max_control_iterations
        sol.Tolerance = settings.tolerance
        self.command(f"set controlmode={settings.control_mode}")

    def set_control_mode(self, mode: ControlMode) -> None:
        """Switch regulator/capacitor controls: "static", "time" or "off" (frozen)."""
        self.apply_settings(
            SolveSettings(
                self.settings.max_iterations,
                self.settings.max_control_iterations,
                self.settings.tolerance,
                mode,
            )
        )

    def solve_snapshot(self) -> None:
        """Solve one snapshot power flow; raise :class:`ConvergenceError` if it fails."""
        self.command("set mode=snapshot")
        self.solve()

    def solve(self) -> None:
        """Solve in the current mode; raise :class:`ConvergenceError` if not converged."""
        sol = self.circuit.Solution
        try:
            sol.Solve()
        except Exception as exc:  # noqa: BLE001 - engine errors carry the reason in text
            raise ConvergenceError(f"{self.source_master.name}: solve failed: {exc}") from None
        if not sol.Converged:
            raise ConvergenceError(
                f"{self.source_master.name}: power flow did not converge after "
                f"{sol.Iterations} iterations (max_iterations={sol.MaxIterations}); "
                "try a larger max_iterations or check the model"
            )

    def start_voltages(self, v_y: np.ndarray) -> None:
        """Start the next solve from the node voltages ``v_y`` [V] (complex, Y-node order as
        ``YNodeVarray``) instead of the present solution. OpenDSS's fixed-point iteration
        converges linearly: a start close to the solution (a prediction) saves iterations
        (IEEE 8500 at a 1e-8 tolerance: 30 from the last solution of a +-30 % load change,
        15 from a start 0.1 % of the change off); the solution is the same to the
        solve's tolerance. Call after writing the loads (a change that adds nodes
        reallocates the voltages)."""
        v_y = np.asarray(v_y, dtype=complex)
        n = int(self.circuit.NumNodes)
        if v_y.shape != (n,) or not np.isfinite(v_y).all():
            raise ValueError(f"start voltages: {n} finite complex values expected")
        ym = self.ctx.YMatrix
        try:  # dss-python's cffi buffer (not public API): without it, the usual start
            ptr = ym.GetVPointer()  # the solver's node voltages, ground first
            buf = ym._api_util.ffi.buffer(ptr, 16 * (n + 1))
        except (AttributeError, TypeError) as exc:
            if not getattr(self, "_start_warned", False):
                log.warning("opendss_start_voltages_unavailable: %s; solving from the last "
                            "solution", exc)
                self._start_warned = True
            return
        np.frombuffer(buf, dtype=complex)[1:] = v_y

    # -- vectorised getters ----------------------------------------------------------------
    def node_names(self) -> list[str]:
        """Node names "bus.node" in the engine's node order (lower case)."""
        return [n.lower() for n in self.circuit.AllNodeNames]

    def node_voltages_v(self) -> np.ndarray:
        """Complex node voltages [V] (line-to-ground) in :meth:`node_names` order."""
        return _complex(self.circuit.AllBusVolts)

    def node_voltages_pu(self) -> np.ndarray:
        """Node voltage magnitudes [pu of each bus's base] in :meth:`node_names` order;
        line to line (on the same base x sqrt(3)) for nodes of ungrounded areas, where the
        limits apply (:meth:`voltage_pairs`)."""
        vpu = np.asarray(self.circuit.AllBusVmagPu, dtype=float)
        pair = self.voltage_pairs()
        if not (pair >= 0).any():
            return vpu
        from derms.powerflow.voltage_measure import measure_pu

        return measure_pu(self.node_voltages_v(), 1000.0 * self._pairs[2], pair, v_pu=vpu)

    def voltage_pairs(self) -> np.ndarray:
        """(n_nodes,) line-to-line partner node of each node on an ungrounded (3-wire) area,
        -1 elsewhere (:func:`derms.powerflow.voltage_measure.ungrounded_pairs`); cached
        until the circuit's element or node count changes or a :meth:`command` opens,
        closes, enables, disables, edits or adds an element."""
        ckt = self.circuit
        key = (int(ckt.NumCktElements), int(ckt.NumNodes))
        cached = getattr(self, "_pairs", None)
        if cached is not None and cached[0][1] == key[1] and not (cached[1] >= 0).any():
            return cached[1]  # added elements can ground an area, never unground one
        if cached is None or cached[0] != key:
            from derms.powerflow.voltage_measure import ungrounded_pairs

            pairs = ungrounded_pairs(self)
            kv = np.zeros(pairs.size)
            if (pairs >= 0).any():  # the nodes' bus kVBase: the base of a dead node too
                bus_kv = {}
                for i, b in enumerate(ckt.AllBusNames):
                    ckt.SetActiveBusi(i)
                    bus_kv[b.lower()] = ckt.ActiveBus.kVBase
                kv = np.array([bus_kv[n.split(".")[0]] for n in self.node_names()])
            cached = (key, pairs, kv)
            self._pairs = cached
        return cached[1]


# commands after which the ungrounded areas are found again (voltage_pairs)
_TOPOLOGY_VERBS = ("open", "close", "enable", "disable", "edit", "new", "batchedi",
                   "redirect", "compile", "remove", "~", "more", "clear")


def _complex(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[0::2] + 1j * arr[1::2]


_UP_REF = re.compile(r"(?:\.\.[/\\])+")
_SCRIPT_SUFFIXES = {".dss", ".txt"}
_MAX_FILE_BYTES = 200_000_000


def stage_copy(master: Path, tmp: Path) -> Path:
    """Copy what the feeder's scripts can reach below ``tmp``; return the master's copy.

    Copied: the top-level files of the master's folder and of each folder its scripts reach
    with ``../``, plus the sub-folders that the scripts name (``name/``). Never a whole
    unrelated tree (a master in a crowded folder such as /tmp stays cheap).
    """
    texts = []
    for f in master.parent.iterdir():
        if f.is_file() and f.suffix.lower() in _SCRIPT_SUFFIXES and \
                f.stat().st_size < 20_000_000:
            texts.append(f.read_text(errors="replace").lower())
    blob = "\n".join(texts)
    depth = max((m.group(0).count("..") for m in _UP_REF.finditer(blob)), default=0)
    root = master.parent
    for _ in range(depth):
        root = root.parent
    rel = master.parent.relative_to(root)
    work = tmp / "feeder"
    level, dest = root, work
    for part in (*rel.parts, None):
        dest.mkdir(parents=True, exist_ok=True)
        for f in level.iterdir():
            if f.is_file() and f.stat().st_size < _MAX_FILE_BYTES:
                shutil.copy2(f, dest / f.name)
            elif f.is_dir() and f.name != part and (
                    f"{f.name.lower()}/" in blob or f"{f.name.lower()}\\" in blob):
                shutil.copytree(f, dest / f.name, dirs_exist_ok=True)
        if part is None:
            break
        level, dest = level / part, dest / part
    return work / rel / master.name


def _check_master(master: str | Path) -> Path:
    path = Path(master).expanduser()
    if not path.exists():
        raise InputError(f"feeder file not found: {path}")
    if not path.is_file():
        raise InputError(f"feeder path is not a file: {path}")
    try:
        head = path.read_bytes()[:4096]
    except OSError as exc:
        raise InputError(f"cannot read feeder file {path}: {exc.strerror}") from None
    if b"\x00" in head:
        raise InputError(f"feeder file {path} is binary, not an OpenDSS script")
    return path.resolve()
