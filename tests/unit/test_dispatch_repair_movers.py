"""Local repair's movers (large feeders): the most sensitive DERs of each row still
violated, in every interval, and every DER in the interval of a row those cannot move by
its excess (a substation-bus row every DER acts on alike)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from derms.dispatch.network import DerSensitivity, SensitivitySet
from derms.dispatch.verify import repair_movers


def _planner(T: int, n_der: int, hv_p: np.ndarray):
    part = DerSensitivity(hv_p, np.zeros_like(hv_p), np.zeros((1, n_der)),
                          np.zeros((1, n_der)))
    sset = SensitivitySet((part,), np.zeros(T, dtype=np.int64))
    box = (np.zeros((T, n_der)), np.full((T, n_der), 10.0), np.zeros((T, n_der)),
           np.zeros((T, n_der)))
    return SimpleNamespace(net=SimpleNamespace(box=box, sset=sset),
                           lay=SimpleNamespace(T=T),
                           fleet=SimpleNamespace(ders=[None] * n_der))


def test_every_der_moves_where_the_top_ones_cannot_fix_a_row(monkeypatch):
    """With ``REPAIR_WIDE`` (off by default: see its docstring) every DER moves in the
    interval of a row the top 10 cannot fix; without it only the top ones do."""
    from derms.dispatch import verify

    T, n = 4, 30
    hv = np.full((2, n), 1e-5)        # node 0: every DER alike (10 x 10 kW x 1e-5 = 1e-3)
    hv[1, :3] = 1e-3                  # node 1: three DERs act on it
    pl = _planner(T, n, hv)
    v = np.full((T, 2), 1.0)
    v[1, 0] = 1.06                    # 0.01 pu over at node 0, interval 1: beyond the top 10
    v[2, 1] = 1.051                   # 0.001 pu over at node 1, interval 2: the 3 can fix it
    lim = SimpleNamespace(v_max=np.full((T, 2), 1.05), v_min=np.full((T, 2), 0.95))
    over = {"v_max": v > lim.v_max, "v_min": np.zeros((T, 2), dtype=bool),
            "i_max": np.zeros((T, 1), dtype=bool)}
    res = SimpleNamespace(v_pu=v, i_a=np.zeros((T, 1)))
    monkeypatch.setattr(verify, "REPAIR_WIDE", False)
    narrow = repair_movers(pl, over, res, lim)
    assert not narrow[1].all() and narrow[1].sum() == narrow[0].sum()
    monkeypatch.setattr(verify, "REPAIR_WIDE", True)
    m = repair_movers(pl, over, res, lim)
    assert m[1].all()                 # the substation-like row: every DER in its interval
    assert m[[0, 2, 3]][:, :3].all()  # the local ones in every interval
    assert m[[0, 2, 3]].sum(axis=1).tolist() == [m[0].sum()] * 3  # the same DERs
    assert m[0].sum() <= 20            # at most the top 10 of each of the two rows
