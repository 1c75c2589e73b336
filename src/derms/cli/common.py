"""Helpers shared by the ``derms`` sub-command modules: consoles, common options, error handling."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from derms.errors import DermsError, InputError
from derms.timeutil import parse_duration

out_console = Console()
err_console = Console(stderr=True)

MasterArg = Annotated[str, typer.Argument(
    help="OpenDSS master .dss file, or a bundled feeder: ieee13, ieee123, ieee8500.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")]
MaxIterOpt = Annotated[int, typer.Option(
    min=1, max=10000, help="Power-flow iteration cap per solve.")]


def handle_errors(func):
    """Turn derms errors into a clear message and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _exit_on_sigterm()
        try:
            return func(*args, **kwargs)
        except (DermsError, OSError) as exc:
            # one line, never folded at the console's width: a path in the message must
            # survive copy and paste (rich broke a long --out path mid-name)
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                              emoji=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _exit_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job) exits through Python, so ``finally`` blocks
    run: an output folder half-written into its temporary sibling is removed (the default
    handler killed the process and left ``.OUT.xxxx`` behind)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def parse_start(text: str) -> datetime:
    """``--start``: ISO 8601 date or datetime -> aware UTC (UTC when no zone is given)."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"--start {text!r}: expected an ISO 8601 date or datetime") from None
    from derms.timeutil import check_study_start

    check_study_start(dt, "--start")
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def parse_step(text: str) -> timedelta:
    """Parse "15min", "1h", "60s", "5m" into a timedelta (InputError when malformed)."""
    return parse_duration(text, "--step")


ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace an output folder that exists and is not empty.")]


def refuse_non_empty(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> None:
    """InputError unless ``out`` may receive a command's outputs (check early, before long
    work). Always refused: a file (``--force`` replaces output folders, never a file
    someone pointed ``--out`` at by mistake), the current folder or one above it, and a
    folder holding one of the ``protect`` paths (the feeder's master file, the input
    files). An existing non-empty folder needs ``force``, and is replaced only when it
    is a derms output folder (:func:`is_output_folder`: the ``manifest.json`` every command
    writes):
    ``--out . --force`` deleted everything in the current folder, and ``--out`` set to
    the feeder's or the input series' folder deleted the model or the series."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder (give a folder path)")
    where = out.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise InputError(f"--out {out}: is the current folder or one above it (give the "
                         "outputs a folder of their own, e.g. --out results)")
    for path in protect:
        held = Path(path).resolve()
        if where == held or where in held.parents:
            raise InputError(f"--out {out}: holds {path}, an input of this command (give "
                             "the outputs a folder of their own)")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise InputError(f"--out {out}: exists and is not empty (use --force to replace "
                             "it)")
        if not is_output_folder(out):
            raise InputError(f"--out {out}: is not empty and holds no manifest.json derms "
                             "wrote, so it is not a derms output folder; --force replaces "
                             "only those (empty it or give another folder)")


def refuse_early(out: Path, force: bool, master: str | Path | None = None,
                 inputs: tuple[Path | None, ...] = ()) -> None:
    """:func:`refuse_non_empty` before a command's long work, with what
    :func:`output_folder` will protect: the feeder's master file (a bundled name or a
    path; one that does not resolve is the command's own error later) and the inputs."""
    from derms.grid.bundled import resolve_master

    protect = [Path(p) for p in inputs if p is not None]
    if master is not None:
        try:
            protect.append(resolve_master(master))
        except DermsError:
            pass
    refuse_non_empty(out, force, tuple(protect))


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted
    only once the new folder is in place (put back if the rename fails)."""
    if not out.is_dir():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_folder(out: Path, force: bool = False, *, feeder: Path | None = None,
                  seed: int | None = None, inputs: tuple[Path, ...] = (),
                  extra: dict | None = None):
    """Write a command's outputs atomically: yield a temporary sibling folder, then rename.

    ``out`` is checked first (:func:`refuse_non_empty`, with the feeder's master file and
    the ``inputs`` protected; InputError → exit 2); an unwritable parent is a clear error;
    on any failure nothing is left half-written, and an old ``out`` is replaced only once
    the new one is complete. ``manifest.json`` is added (:func:`write_manifest`) unless
    the command wrote one.
    """
    out = Path(out)
    if out.is_symlink():  # write into the folder it points at (the renames moved the link
        out = out.resolve()  # itself aside and left the target's old outputs in place)
    refuse_non_empty(out, force, tuple(p for p in (feeder, *inputs) if p is not None))
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: the folder a plain mkdir makes
    except OSError as exc:
        # a file on the way ("File exists" from mkdir said nothing of which): name it
        blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()),
                       None)
        why = f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc
        raise InputError(f"--out {out}: cannot write there ({why})") from None
    try:
        yield tmp
        if not (tmp / "manifest.json").exists():
            write_manifest(tmp, feeder=feeder, seed=seed, inputs=inputs, settings=extra)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def stage_progress():
    """A rich progress display on stderr; yields ``progress(stage, done, total)``, which
    shows one bar per stage name (the callback the analysis functions take)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err_console) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield progress


def feeder_files(master: Path, out: Path) -> list[Path]:
    """The files of the feeder's folder that its manifest hash covers, in sorted order:
    every file under the master's folder except derms output folders inside it (``out``
    itself, and any :func:`is_output_folder`), so writing ``--out`` inside the feeder's
    folder, or running twice, leaves the feeder's hash unchanged."""
    root = master.parent
    files = [p for p in root.rglob("*") if p.is_file()]
    skip = {p.parent for p in files if p.name == "manifest.json"
            and root in p.parent.parents and is_output_folder(p.parent)}
    skip.add(out.resolve())
    return sorted(p for p in files if not any(s in p.parents for s in skip))


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``manifest.json`` derms wrote (:func:`write_manifest`),
    not merely a file of that name (a vendor's)."""
    import json

    try:
        doc = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"derms_version", "files"} <= doc.keys()


def write_manifest(folder: Path, *, feeder: Path | None = None, seed: int | None = None,
                   inputs: tuple[Path, ...] = (), settings: dict | None = None) -> Path:
    """``manifest.json``: derms version, command line, creation time (UTC), the feeder's
    master file and a SHA-256 over every file of its folder, the seed, the SHA-256 of each
    input file, the files written (docs/data-formats.md) and, where the command gives
    them, its ``settings`` (resolved options)."""
    import hashlib
    import json
    import shlex
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        derms_version = version("derms")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        derms_version = "unknown"

    def file_hash(path: Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    doc: dict = {
        "derms_version": derms_version,
        "command": shlex.join(["derms", *sys.argv[1:]]),
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seed": seed,
        "feeder": None,
        "inputs": [{"path": str(Path(p).resolve()), "sha256": file_hash(p)} for p in inputs],
        "files": sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                        if p.is_file()),
    }
    if settings:
        doc["settings"] = settings
    if feeder is not None:
        master = Path(feeder).resolve()
        h = hashlib.sha256()
        files = feeder_files(master, Path(folder))
        for p in files:
            h.update(str(p.relative_to(master.parent)).encode() + b"\0")
            h.update(p.read_bytes())
        doc["feeder"] = {"master": str(master), "folder_sha256": h.hexdigest(),
                         "master_sha256": file_hash(master), "n_files": len(files)}
    path = Path(folder) / "manifest.json"
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path
