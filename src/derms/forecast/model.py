"""Global LightGBM quantile model: one booster per quantile, plus conformal offsets.

One booster per quantile (objective ``quantile``), fitted on the feature rows of every
series at once. Quantile boosters are sharp on the rows they were fitted on and too
narrow on new data; the outer quantiles are therefore shifted by offsets (set by
:func:`derms.forecast.forecaster.conformal_offsets` from rows the boosters did not see),
per series where its calibration rows say so (one global band covered a smooth series
90 % of the time and a noisy one 60 %).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from derms.errors import InputError

# LightGBM's OpenMP threads spin while they wait; when another process shares the two
# cores that makes a fit ~3x slower (measured here). Passive waiting must be set before
# the OpenMP runtime loads, i.e. before the first `import lightgbm`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_PARAMS = {
    "learning_rate": 0.08,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 127,
    "verbose": -1,
    "num_threads": 2,
    "deterministic": True,
    "seed": 7,
}


@dataclass
class QuantileModel:
    """Boosters per quantile, a shrink factor and conformal offsets (normalised units).

    Prediction per quantile = ``shrink`` × booster output, then the offset (+ widens the
    band). ``shrink`` in [0, 1] pulls a model whose target is a change from a reference
    (see :mod:`derms.forecast.forecaster`) toward that reference when the change is
    mostly noise.
    """

    quantiles: tuple[float, ...]
    feature_names: tuple[str, ...]
    n_rounds: int = 300
    params: dict = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    boosters: dict = field(default_factory=dict)
    offsets: dict = field(default_factory=dict)
    series_offsets: dict = field(default_factory=dict)  # series id -> {q: offset}
    shrink: float = 1.0
    # "mean": the 0.5 booster minimises squared error (a conditional mean; smoother and
    # less seed-dependent than the quantile objective's median, used as a point forecast
    # by the rolling dispatch); "median": the quantile objective like the others
    point: Literal["median", "mean"] = "median"
    trained_at: str = ""
    n_train_rows: int = 0

    def fit(self, x: np.ndarray, y: np.ndarray) -> QuantileModel:
        """Fit one booster per quantile on the rows of (x, y) that have an actual value."""
        import lightgbm as lgb

        ok = np.isfinite(y)
        if ok.sum() < 50:
            raise InputError(f"only {int(ok.sum())} training rows with an actual value; "
                             "the forecast needs a longer history")
        self.n_train_rows = int(ok.sum())
        data = lgb.Dataset(x[ok], y[ok], feature_name=list(self.feature_names),
                           free_raw_data=False, params={"max_bin": self.params["max_bin"]})
        for q in self.quantiles:
            params = dict(self.params, objective="quantile", alpha=q)
            if q == 0.5 and self.point == "mean":
                params = dict(self.params, objective="regression")
            self.boosters[q] = lgb.train(params, data, num_boost_round=self.n_rounds)
        self.trained_at = datetime.now(UTC).isoformat()
        return self

    def _raw(self, x: np.ndarray) -> dict[float, np.ndarray]:
        if not self.boosters:
            raise InputError("the forecast model is not fitted")
        return {q: self.shrink * b.predict(x, num_threads=self.params.get("num_threads", 2))
                for q, b in self.boosters.items()}

    def predict(self, x: np.ndarray, envelope: np.ndarray | None = None,
                series_ids: np.ndarray | None = None) -> dict[float, np.ndarray]:
        """Quantile predictions (normalised units), monotone in q.

        ``envelope`` (per row, ≥ 0) scales the conformal offsets, e.g. the PV clear-sky
        envelope so that the band is zero at night; without it offsets apply as they are.
        ``series_ids`` (per row): each row takes its series' own offsets where the model
        has them (``series_offsets``), the global ones otherwise.
        """
        raw = self._raw(x)
        groups = (np.unique(np.asarray(series_ids, dtype=str), return_inverse=True)
                  if series_ids is not None and self.series_offsets else None)
        for q, c in self.offsets.items():
            c = self._row_offsets(q, c, groups)
            shift = c * (envelope if envelope is not None else 1.0)
            raw[q] = raw[q] - shift if q < 0.5 else raw[q] + shift
        stacked = np.sort(np.stack([raw[q] for q in self.quantiles]), axis=0)
        return {q: stacked[i] for i, q in enumerate(self.quantiles)}

    def _row_offsets(self, q: float, default: float,
                     groups: tuple[np.ndarray, np.ndarray] | None) -> float | np.ndarray:
        """Offset of quantile ``q`` per row: its series' own (``groups``: the unique series
        ids and each row's index into them), else ``default``."""
        if groups is None:
            return default
        uniq, inv = groups
        per = np.array([self.series_offsets.get(u, {}).get(q, default) for u in uniq], float)
        return per[inv]

    # ---------------------------------------------------------------- persistence
    def save(self, folder: Path, meta: dict | None = None) -> str:
        """Write boosters and metadata to ``folder``; return the model version (content hash
        of the boosters, the conformal offsets and the shrink)."""
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        for q, booster in self.boosters.items():
            text = booster.model_to_string()
            digest.update(text.encode())
            (folder / f"booster_q{round(q * 100):02d}.txt").write_text(text)
        offsets = {str(q): c for q, c in self.offsets.items()}
        # what predict uses beyond the boosters: a re-fit that changes only the conformal
        # offsets or the shrink is another model (it kept the old folder's offsets while
        # the database recorded the new ones)
        by_series = {i: {str(q): c for q, c in d.items()}
                     for i, d in self.series_offsets.items()}
        digest.update(json.dumps({"offsets": offsets, "series_offsets": by_series,
                                  "shrink": self.shrink},
                                 sort_keys=True, default=float).encode())
        version = digest.hexdigest()[:16]
        info = {"version": version, "quantiles": list(self.quantiles),
                "feature_names": list(self.feature_names), "n_rounds": self.n_rounds,
                "params": self.params, "offsets": offsets, "series_offsets": by_series,
                "shrink": self.shrink, "point": self.point,
                "trained_at": self.trained_at, "n_train_rows": self.n_train_rows,
                **(meta or {})}
        (folder / "model.json").write_text(json.dumps(info, indent=2))
        return version

    @classmethod
    def load(cls, folder: Path) -> tuple[QuantileModel, dict]:
        """Read a model written by :meth:`save`; returns (model, metadata)."""
        import lightgbm as lgb

        meta_path = folder / "model.json"
        if not meta_path.exists():
            raise InputError(f"{folder}: no model.json (not a saved derms forecast model)")
        info = json.loads(meta_path.read_text())
        model = cls(quantiles=tuple(info["quantiles"]),
                    feature_names=tuple(info["feature_names"]), n_rounds=info["n_rounds"],
                    params=info["params"], point=info.get("point", "median"))
        for q in model.quantiles:
            path = folder / f"booster_q{round(q * 100):02d}.txt"
            model.boosters[q] = lgb.Booster(model_str=path.read_text())
        model.offsets = {float(q): c for q, c in info["offsets"].items()}
        model.series_offsets = {i: {float(q): c for q, c in d.items()}
                                for i, d in info.get("series_offsets", {}).items()}
        model.shrink = float(info.get("shrink", 1.0))
        model.trained_at = info["trained_at"]
        model.n_train_rows = info["n_train_rows"]
        return model, info
