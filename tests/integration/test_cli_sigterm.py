"""A CLI command stopped by SIGTERM (a scheduler ending the job) leaves no half-written
output: the default handler killed the process before the temporary folder was removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time


def _transport_lp(m: int) -> str:
    """Child-process code that builds ``h``: an m x m transport LP in HiGHS with presolve
    off (1,200: 10-20 s to its optimum here; 900: about 2 s), a solve to interrupt."""
    return textwrap.dedent("""
        import highspy
        import numpy as np
        import scipy.sparse as sp

        from derms.dispatch.lp import quiet_highs, run_interruptible

        m = n = M_SIZE
        rng = np.random.default_rng(0)
        supply = rng.uniform(50, 100, m)
        col = np.arange(m * n)
        a = sp.vstack([sp.csr_matrix((np.ones(m * n), (np.repeat(np.arange(m), n), col))),
                       sp.csr_matrix((np.ones(m * n), (np.tile(np.arange(n), m), col)))
                       ]).tocsr()
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = m * n, m + n
        lp.col_cost_ = rng.uniform(1, 10, m * n)
        lp.col_lower_, lp.col_upper_ = np.zeros(m * n), np.full(m * n, highspy.kHighsInf)
        lp.row_lower_ = np.r_[np.full(m, -highspy.kHighsInf), np.full(n, supply.sum() / n * 0.95)]
        lp.row_upper_ = np.r_[supply, np.full(n, highspy.kHighsInf)]
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
        h = quiet_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("presolve", "off")
        h.passModel(lp)
    """).replace("M_SIZE", str(m))


def test_sigterm_during_a_command_removes_its_temporary_output(tmp_path):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from derms.cli.common import handle_errors, output_folder

        @handle_errors
        def long_job():
            with output_folder(Path({str(out)!r})) as tmp:
                (tmp / "part.csv").write_text("half")
                print("writing", flush=True)
                time.sleep(60)

        long_job()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == [], os.listdir(tmp_path)


def test_sigterm_during_a_solve_cancels_it_and_exits(tmp_path):
    """A SIGTERM while HiGHS solves a long LP (minutes on a large feeder) reaches the
    handler during the solve (:func:`derms.dispatch.lp.run_interruptible`): the solve
    is cancelled (status kInterrupt, not run to its optimum as before, when the handler
    waited for it), the output's ``finally`` blocks run, the exit code is 143. The LP is a
    1,200 x 1,200 transport problem with presolve off (≈ 10-20 s to its optimum here)."""
    out = tmp_path / "out"
    code = _transport_lp(1200) + textwrap.dedent(f"""
        from pathlib import Path

        from derms.cli.common import handle_errors, output_folder

        @handle_errors
        def long_job():
            with output_folder(Path({str(out)!r})) as tmp:
                (tmp / "part.csv").write_text("half")
                print("solving", flush=True)
                try:
                    run_interruptible(h)
                finally:
                    print(h.getModelStatus().name, flush=True)

        long_job()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "solving"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        assert proc.stdout.read().split() == ["kInterrupt"]
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == [], os.listdir(tmp_path)


def test_an_interrupted_solve_leaves_the_model_usable_and_errors_surface():
    """After Ctrl-C cancelled a solve, the same HiGHS object solves again to its optimum
    (HiGHS kept the interrupt set: every later run stopped at once); an exception raised
    by the solve itself reaches the caller (highspy's solve thread only printed it, and the
    status read 'Not Set', taken for an infeasibility)."""
    code = _transport_lp(900) + textwrap.dedent("""
        import signal, threading
        threading.Timer(0.3, lambda: signal.raise_signal(signal.SIGINT)).start()
        try:
            run_interruptible(h)
            print("finished before the signal")
        except KeyboardInterrupt:
            print(h.getModelStatus().name)
        run_interruptible(h)
        print(h.getModelStatus().name)

        def broken(self):
            raise MemoryError("from the solve")
        highspy._core._Highs.run = broken
        try:
            run_interruptible(h)
        except MemoryError as exc:
            print("raised", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["kInterrupt", "kOptimal", "raised from the solve"]
