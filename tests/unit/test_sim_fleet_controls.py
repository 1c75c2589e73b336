"""What a simulated device applies: its active event, the default for what the event
leaves unset (an empty event -- the DERMS's release after a block -- is the default)."""

from __future__ import annotations

import numpy as np

from derms.sim.fleet import Controls, effective_controls


def test_an_event_without_modes_is_the_default_control():
    default = Controls.none(3)
    default.exp_lim_kw[:] = 1.5                      # the fail-safe export limit
    event = Controls.none(3)
    event.exp_lim_kw[1] = 4.0                        # device 1: its event's own limit
    active = np.array([True, True, False])           # device 0: an empty event (release)
    eff = effective_controls(event, active, default, np.zeros(3), comm_timeout_s=60)
    np.testing.assert_allclose(eff.exp_lim_kw, [1.5, 4.0, 1.5])
    lost = effective_controls(event, active, default, np.array([0, 120, 0]), 60)
    np.testing.assert_allclose(lost.exp_lim_kw, [1.5, 1.5, 1.5])   # no contact: fail-safe
