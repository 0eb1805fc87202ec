"""Safe outputs: every directory a command writes goes through here.

* :func:`check_out` runs before any work: ``--out`` may not be a file, may not equal, contain or
  lie inside anything the command reads (a run, a model, a data file), must lie in a writable
  place, and replaces an existing directory only with ``--overwrite`` and only when this project
  wrote it (:data:`MARKER`, naming the command) or it is empty.
* :func:`staged_dir` writes into a fresh temporary sibling (``.NAME.lte-tmp-PID-XXXXXX``) and
  renames it into place, so an interrupted command never leaves a half-written output; the
  previous output is moved aside under a name of the same form and removed only after the swap.
* :func:`clean_stale` removes such temporary siblings whose process is gone (and puts back a
  previous output that a killed swap had moved aside).
* :func:`run_lock` keeps a second process from writing into a directory in use.
* :func:`disk_guard` turns a full disk into one message naming the path.

Directories are made with ``os.mkdir``, so their permissions follow the user's umask.
Nothing here touches a path whose name it did not make.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from .errors import UsageError

logger = logging.getLogger("lte")

MARKER = ".lte-output.json"
LOCK = ".lte-lock"
_TEMP = re.compile(r"^\.(?P<name>.+)\.lte-(?P<kind>tmp|old|trash)-(?P<pid>\d+)-[0-9a-f]{6}$")


def resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def inside(path: Path, parent: Path) -> bool:
    """Whether ``path`` lies strictly inside ``parent`` (both resolved)."""
    return path != parent and path.is_relative_to(parent)


def read_marker(directory: str | os.PathLike) -> dict | None:
    """The marker of a directory this project wrote, or None."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def written_by(directory: str | os.PathLike, command: str) -> bool:
    return (read_marker(directory) or {}).get("command") == command


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_out(
    out: str | os.PathLike,
    command: str,
    *,
    flag: str = "--out",
    inputs: dict[str, str | os.PathLike] | None = None,
    runs: dict[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
    overwrite_hint: str = "pass --overwrite to replace it",
) -> Path:
    """Check an output directory before any work; returns it resolved.

    ``inputs``: what the command reads (description -> path); ``out`` may not equal, contain or lie
    inside any of them. ``runs``: directories whose content the command reads or owns (a training
    run); ``out`` may not equal or contain one, and inside one it may only be a new entry or one
    this command wrote earlier.
    """
    target = resolve(out)
    shown = f"{flag} {out}" if flag.startswith("-") else f"{flag}={out}"  # a CLI flag, or a recipe key
    if target.exists() and not target.is_dir():
        raise UsageError(f"{shown} is an existing file, not a directory; choose another {flag} (a directory path)")
    check_apart(target, shown, inputs, runs, command)
    if target.is_dir() and not _is_empty_dir(target):
        if not overwrite:
            raise UsageError(f"{shown} already exists; {overwrite_hint}, or choose another {flag}")
        if not written_by(target, command):
            raise UsageError(
                f"{shown} exists and was not written by `lte {command}` (it has no {MARKER}), so it "
                f"is not replaced; choose another {flag}, or remove it yourself"
            )
    check_writable(target.parent, shown)
    clean_stale(target.parent)
    return target


def check_apart(
    target: Path, shown: str, inputs: dict | None = None, runs: dict | None = None, command: str = ""
) -> None:
    """``target`` may not equal, contain or lie inside an input; nor equal or contain a run, nor lie
    inside one except as a new entry (or one ``command`` wrote)."""
    target = resolve(target)
    for what, path in (runs or {}).items():
        if not path or not Path(path).expanduser().is_dir():
            continue
        run = resolve(path)
        if target == run or inside(run, target):
            relation = "is" if target == run else "contains"
            raise UsageError(
                f"{shown} {relation} {what} ({run}); writing there would destroy it. Choose another directory"
            )
        if inside(target, run):
            top = run / target.relative_to(run).parts[0]
            if top.exists() and not written_by(top, command) and not _is_empty_dir(top):
                raise UsageError(
                    f"{shown} lies inside {top}, part of {what} ({run}); choose a new directory "
                    f"(for example {run / 'export-2'}) or one outside the run"
                )
    for what, path in (inputs or {}).items():
        if not path or not Path(path).expanduser().exists():
            continue  # a hub name, or a missing file that is reported elsewhere
        source = resolve(path)
        if target == source or inside(source, target) or inside(target, source):
            relation = "is" if target == source else "contains" if inside(source, target) else "lies inside"
            raise UsageError(
                f"{shown} {relation} {what} ({source}), which this command reads; writing there could "
                f"destroy it. Choose an output directory apart from the inputs"
            )


def check_writable(directory: Path, shown: str) -> None:
    """The nearest existing ancestor of ``directory`` must be a directory we can create entries in."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{shown}: {existing} is a file, so no directory can be made under it; choose another path")
    probe = existing / f".lte-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise UsageError(f"{shown}: cannot write in {existing} ({exc.strerror}); choose a writable location") from None


def _temp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.lte-{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def clean_stale(directory: str | os.PathLike) -> None:
    """Remove temporary siblings left in ``directory`` by processes that are gone. A previous
    output moved aside by a swap that was killed half-way is put back where nothing replaced it."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        match = _TEMP.match(path.name)
        if not match or pid_alive(int(match["pid"])):
            continue
        final = directory / match["name"]
        if match["kind"] == "old" and not final.exists():
            os.replace(path, final)
            logger.warning("restored %s (an interrupted replacement had moved it aside)", final)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by process %s, which is gone", path, match["pid"])


def write_marker(directory: Path, command: str, meta: dict | None = None) -> None:
    """Write ``directory/.lte-output.json`` as a new file (renamed over any copied or hard-linked one,
    which must not be changed in place)."""
    tmp = directory / f"{MARKER}.{os.getpid()}"
    tmp.write_text(
        json.dumps({"command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {})}, indent=2)
        + "\n"
    )
    os.replace(tmp, directory / MARKER)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, command: str, meta: dict | None = None, overwrite: bool = False):
    """Yield a new temporary directory beside ``out``; when the block succeeds, mark it as written
    by ``command`` and rename it to ``out``. On any failure the temporary directory is removed
    and ``out`` is left as it was."""
    out = resolve(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = _temp_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, command, meta)
        replace_dir(tmp, out, command, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, out: Path, command: str, overwrite: bool) -> None:
    """Rename ``new`` to ``out``. An existing ``out`` must be empty or (with ``overwrite``) written by
    ``command``; checked again here, since it may have appeared while the command worked."""
    if out.exists() and not _is_empty_dir(out):
        if not out.is_dir() or not overwrite or not written_by(out, command):
            raise UsageError(
                f"{out} appeared or changed while `lte {command}` ran; it was left as it is. "
                f"Choose another output directory"
            )
        old = _temp_name(out, "old")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(new, out)


def remove_dir(path: Path) -> None:
    """Remove a directory this project owns: renamed aside first (atomic), then deleted, so an
    interruption never leaves it half-deleted under its own name."""
    if not path.exists():
        return
    trash = _temp_name(path, "trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def run_lock(directory: Path, what: str = "training"):
    """Hold ``directory/.lte-lock`` (an advisory ``flock``, released by the kernel when the process
    ends, so a dead process's lock is simply taken over) while the block runs."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(
                f"another process (PID {other}) is {what} into {directory}; wait for it to finish or "
                f"stop it, or choose another output_dir"
            ) from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous.isdigit() and int(previous) != os.getpid():
            logger.info("%s: taking over the lock of process %s, which is gone", directory, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_FULL = ("No space left on device", "Disk quota exceeded")
# How torch reports a failed write of a checkpoint: it names no errno, so the free space decides.
_TORCH_WRITE_FAILED = ("file write failed", "inline_container.cc", "PytorchStreamWriter", "iostream error")
LOW_SPACE = 64 * 2**20


def disk_full_path(exc: BaseException, path: str | os.PathLike | None = None) -> str | None:
    """If ``exc`` (or what caused it) is a full disk, the path it names ("" when it names none), else
    None: ``OSError(ENOSPC)``, the wrapped forms safetensors and the tokenizers raise ("No space left
    on device"), and torch's failed writes when the disk holding ``path`` is (nearly) full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(exc.filename or "")
        if any(marker in text for marker in _FULL):
            return ""
        if path is not None and any(marker in text for marker in _TORCH_WRITE_FAILED) and _free_space(path) < LOW_SPACE:
            return ""
        exc = exc.__cause__ or exc.__context__
    return None


def _free_space(path: str | os.PathLike) -> int:
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return LOW_SPACE


@contextlib.contextmanager
def disk_guard(path: str | os.PathLike, then: str = "then rerun the same command"):
    """Turn a full disk while writing under ``path`` into one message naming the path."""
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:
        where = disk_full_path(exc, path)
        if where is None:
            raise
        raise UsageError(f"no space left on device at {where or path}; free some space, {then}") from None
