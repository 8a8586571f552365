"""Atomic writers: write to a temporary sibling, then ``os.replace`` into place.

An interrupted run (crash, Ctrl-C, full disk) therefore leaves either the previous file/folder or
nothing at the destination, never a half-written one. Temporary names start with ``.tmp-`` (folders
being swapped out ``.old-``), carry the writing process's id and live in the destination's folder
so the final ``os.replace`` is a same-filesystem rename. A run killed before it could clean up
(``SIGKILL``, power loss, a second Ctrl-C during clean-up) leaves its temporary behind; the next
write to the same destination removes every such leftover whose process is gone.

Outputs get the permissions of a normally created file or folder (``0o666`` / ``0o777`` minus the
umask), not the private ``0o600`` / ``0o700`` that :mod:`tempfile` uses.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it: restore at once
    os.umask(mask)
    return mask


def _prefix(kind: str, name: str) -> str:
    return f".{kind}-{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def clean_stale_temporaries(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``.tmp-<name>.<pid>.*`` / ``.old-<name>.<pid>.*`` leftovers of ``dest`` whose
    process no longer runs (an interrupted earlier write); returns what was removed. Leftovers of
    live processes (a concurrent write) are kept."""
    d = Path(dest)
    removed: list[Path] = []
    if not d.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        head = f".{kind}-{d.name}."
        for p in d.parent.glob(f"{glob.escape(head)}*"):
            pid_text = p.name[len(head) :].split(".", 1)[0]
            if not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    Parent folders are created; the file gets mode ``0o666 & ~umask`` like a normally created one.
    Returns the destination as a ``Path``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dest)
    fd, tmp = tempfile.mkstemp(prefix=_prefix("tmp", dest.name), dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``path`` as a whole.

    On an exception (``KeyboardInterrupt`` included) the temporary folder is removed and ``path`` is
    untouched; leftovers of earlier interrupted runs are removed first
    (:func:`clean_stale_temporaries`). An existing ``path`` is moved aside first and deleted only
    after the new folder is in place (``os.replace`` cannot replace a non-empty folder), so at every
    instant ``path`` is either the old or the new set. The folder gets mode ``0o777 & ~umask``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix("tmp", dest.name), dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=_prefix("old", dest.name), dir=dest.parent))
        os.replace(dest, old / "x")
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
