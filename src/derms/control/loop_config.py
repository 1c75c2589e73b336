"""Settings of the control loop and its IEEE 2030.5 program: the fail-safe default
control, :class:`LoopConfig`, and the program/FSA every DER's end device is assigned to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from derms.control.fast_cycle import FastCycleConfig
from derms.control.replan import ReplanConfig
from derms.control.tracking import TrackingConfig
from derms.errors import InputError
from derms.monitoring.feeder_monitor import MonitorConfig
from derms.protocols.ieee2030_5.model import DerLimits


@dataclass(frozen=True)
class DefaultControlConfig:
    """The fail-safe DefaultDERControl of the "derms control" program: what a device does
    when no DERControl of ours is in force (it lost the DERMS, or a command ended).
    ``export_limit_w``: CSIP-AUS opModExpLimW at the device's site (default 1.5 kW, the
    usual fixed fallback export limit); ``import_limit_w`` opModImpLimW, ``gen_limit_w``
    opModGenLimW (None: not set); ``set_grad_w``: ramp rate in hundredths of a percent of
    the rating per second (default 27 ≈ 16.7 %/min, the AS/NZS 4777.2 soft ramp)."""

    export_limit_w: float | None = 1500.0
    import_limit_w: float | None = None
    gen_limit_w: float | None = None
    set_grad_w: int | None = 27

    def limits(self) -> DerLimits:
        return DerLimits(exp_lim_w=self.export_limit_w, imp_lim_w=self.import_limit_w,
                         gen_lim_w=self.gen_limit_w)


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the loop (module docstring); units in the names."""

    period_s: float = 5.0
    stale_after_s: float = 60.0
    lookback_s: float = 3600.0  # how far back the last value of a stale DER is looked for
    fast: FastCycleConfig = field(default_factory=FastCycleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig(alarms=False))
    pre_existing: str = "interval"
    program_description: str = "derms control"
    program_primacy: int = 1
    defaults: DefaultControlConfig | None = field(default_factory=DefaultControlConfig)
    replan: ReplanConfig | None = None  # the slow re-plan (derms.control.replan); None: off

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.stale_after_s <= 0 or self.lookback_s <= 0:
            raise InputError(f"control loop: period_s, stale_after_s and lookback_s must be "
                             f"positive, got {self.period_s}, {self.stale_after_s}, "
                             f"{self.lookback_s}")


def ensure_control_program(repo, cfg: LoopConfig) -> tuple[int, int]:
    """The loop's DER program and FSA in an IEEE 2030.5 repository (created once, found by
    description after), every end device with a ``der_id`` assigned to the FSA, and the
    fail-safe default control set when the program has none (an operator's later change
    through the management API is kept across restarts); returns ``(program_id,
    fsa_id)``."""
    desc = cfg.program_description[:32]
    prog = next((p for p in repo.programs() if p.description == desc), None)
    if prog is None:
        prog = repo.add_program(desc, cfg.program_primacy)
    fsa = next((f for f in repo.fsas() if f.description == desc
                and prog.program_id in f.program_ids), None)
    if fsa is None:
        fsa = repo.add_fsa(desc, [prog.program_id])
    assign_end_devices(repo, fsa.fsa_id)
    if cfg.defaults is not None:
        want, grad = cfg.defaults.limits(), cfg.defaults.set_grad_w
        old = repo.default_control(prog.program_id)
        if old is None:
            repo.set_default_control(prog.program_id, want, description=f"{desc} fail-safe",
                                     set_grad_w=grad)
    return prog.program_id, fsa.fsa_id


def assign_end_devices(repo, fsa_id: int) -> int:
    """Assign every end device with a ``der_id`` to ``fsa_id``; returns how many changed."""
    n = 0
    for e in repo.end_devices():
        if e.der_id is not None and fsa_id not in e.fsa_ids:
            repo.assign_fsa(e.edev_id, fsa_id)
            n += 1
    return n


