"""Store benchmark: bulk write of readings, idempotent, on PostgreSQL and SQLite.

Per backend, into a freshly migrated database (PostgreSQL: a new database
``derms_bench_<random>`` on 127.0.0.1:5432, dropped afterwards; SQLite: a file in a
temporary folder, WAL):

* **write**: ``write_readings`` of ``--rows`` readings (``--series`` AMI meters × 15-min
  intervals, one tidy DataFrame, in ``--batches`` calls) into an empty readings table —
  everything the caller waits for: series lookup, sort, PostgreSQL binary COPY into the
  staging table + ``INSERT … SELECT … ON CONFLICT DO NOTHING`` (SQLite ``INSERT OR IGNORE``
  executemany), commit.
* **rewrite**: the same readings again: all dropped as duplicates (counted).
* **half-new**: a batch of the same size, half already stored, half new (late data).
* **read**: one meter's full series back as a DataFrame, and hourly means.

Run: ``.venv/bin/python bench/bench_store.py [--rows 1000000] [--series 1000] [--only sqlite]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from derms.store.db import make_engine, make_session_factory
from derms.store.migrate import upgrade
from derms.store.models import Meter
from derms.store.timeseries import read_readings, write_readings

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _frame(n_series: int, n_t: int, t_offset: int, rng: np.random.Generator) -> pd.DataFrame:
    t = pd.date_range(T0 + timedelta(minutes=15 * t_offset), periods=n_t, freq="15min")
    meters = np.array([f"m{i:05d}" for i in range(n_series)], dtype=object)
    return pd.DataFrame({
        "meter_id": np.repeat(meters, n_t), "t": np.tile(t, n_series),
        "quantity": "p_kw", "source": "ami", "value": rng.normal(1.0, 0.5, n_series * n_t),
    })


def _timed_write(engine, frame: pd.DataFrame, batches: int) -> tuple[float, int, int]:
    ins = dup = 0
    t0 = time.perf_counter()
    for part in np.array_split(np.arange(len(frame)), batches):
        res = write_readings(engine, frame.iloc[part])
        ins, dup = ins + res.inserted, dup + res.duplicates
    return time.perf_counter() - t0, ins, dup


def run(url: str, label: str, n_rows: int, n_series: int, batches: int) -> None:
    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine).begin() as s:
        s.add_all(Meter(meter_id=f"m{i:05d}") for i in range(n_series))
    n_t = n_rows // n_series
    rng = np.random.default_rng(1)
    frame = _frame(n_series, n_t, 0, rng)
    n = len(frame)

    def show(what: str, dt: float, ins: int, dup: int) -> None:
        print(f"{label:10s} {what:10s} {n:>9,d} rows {dt:7.2f} s {n / dt:>10,.0f} rows/s "
              f"inserted {ins:>9,d} duplicates {dup:>9,d}", flush=True)

    show("write", *_timed_write(engine, frame, batches))
    show("rewrite", *_timed_write(engine, frame, batches))
    show("half-new", *_timed_write(engine, _frame(n_series, n_t, n_t // 2, rng), batches))
    end = T0 + timedelta(minutes=15 * 2 * n_t)
    t0 = time.perf_counter()
    df = read_readings(engine, meter_id="m00000", quantity="p_kw", start=T0, end=end)
    t1 = time.perf_counter()
    hourly = read_readings(engine, meter_id="m00000", quantity="p_kw", start=T0, end=end,
                           bucket=timedelta(hours=1))
    t2 = time.perf_counter()
    print(f"{label:10s} read       {len(df):>9,d} rows {t1 - t0:7.3f} s; hourly means "
          f"{len(hourly):,d} buckets {t2 - t1:.3f} s", flush=True)
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=1, help="write calls per pass")
    ap.add_argument("--only", choices=["postgresql", "sqlite"])
    args = ap.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}", file=sys.stderr)
    if args.only != "sqlite":
        import psycopg

        name = f"derms_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        try:
            run(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", "postgresql",
                args.rows, args.series, args.batches)
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.only != "postgresql":
        with tempfile.TemporaryDirectory() as tmp:
            run(f"sqlite:///{tmp}/derms.db", "sqlite", args.rows, args.series, args.batches)
    print(f"uptime: {os.popen('uptime').read().strip()}", file=sys.stderr)


if __name__ == "__main__":
    main()
