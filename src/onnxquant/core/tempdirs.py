"""Private temporary folders that never outlive their process.

Each folder's name carries the owner's process id. A folder whose owner is gone (a process
killed with SIGKILL cannot clean up after itself) is removed by the next run that makes a folder
in the same place, so a crash leaves debris only until then.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["private_dir", "sweep_stale"]


def _owner(name: str, prefix: str) -> int | None:
    pid = name[len(prefix):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove folders ``<prefix><pid>-*`` in ``parent`` whose process no longer runs."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        pid = _owner(entry.name, prefix)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def private_dir(parent: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """A new folder ``<prefix><pid>-XXXX`` in ``parent`` (the system temp folder when None),
    removed on exit whatever happens; stale folders of dead processes are swept first."""
    where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale(where, prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=where))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
