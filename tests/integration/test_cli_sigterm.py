"""A CLI command stopped by SIGTERM (a scheduler ending the job) leaves no half-written
output: the default handler killed the process before the temporary folder was removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time


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
