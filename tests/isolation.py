"""The tests read nothing outside the clone: an audit hook refuses the project's ``../shared`` folder.

This project's CI keeps real data beside the repository (``../shared``); a user's fresh clone has
nothing beside it, so a test that reads there passes in CI and fails for the user. The hook runs on
Python's audit events (PEP 578): opening a file, listing a directory, and starting a subprocess
whose arguments or working directory name such a path. It raises before the access happens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


class OutsideTheClone(PermissionError):
    """A test reached for a file that only this project's CI has."""


_PATH_EVENTS = ("open", "os.listdir", "os.scandir")


def outside_the_clone_guard(forbidden: Path) -> Callable[[str, tuple], None]:
    """An audit hook that raises :class:`OutsideTheClone` for any path under ``forbidden``."""
    root = os.path.realpath(forbidden)

    def is_forbidden(path: object, cwd: str | None = None) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor, or no path at all (os.listdir())
        path = os.fsdecode(path)
        full = os.path.realpath(os.path.join(cwd or os.getcwd(), path))
        return full == root or full.startswith(root + os.sep)

    def refuse(path: str) -> None:
        raise OutsideTheClone(
            f"a test read {path}, under {root}, which a fresh clone does not have; ship the file "
            "under tests/data/ with a SOURCE.md, or let the test generate it"
        )

    def hook(event: str, args: tuple) -> None:
        if event in _PATH_EVENTS and args and is_forbidden(args[0]):
            refuse(os.fsdecode(args[0]))
        elif event == "subprocess.Popen":
            _, argv, cwd, _ = args
            for word in _words(argv):
                if any(is_forbidden(part, cwd) for part in _path_candidates(word)):
                    refuse(word)
            if cwd is not None and is_forbidden(cwd):
                refuse(os.fsdecode(cwd))

    return hook


def _words(argv: object) -> Iterable[str]:
    if isinstance(argv, (str, bytes, os.PathLike)):
        return [os.fsdecode(argv)]
    return [os.fsdecode(a) for a in argv or () if isinstance(a, (str, bytes, os.PathLike))]


def _path_candidates(word: str) -> list[str]:
    """``data.train=../shared/x.json,b.json`` names ``../shared/x.json``: look at every comma-separated value."""
    value = word.split("=", 1)[-1]
    return [part for part in value.split(",") if "shared" in part]
