"""Atomic writers for the study's outputs (temp file in the same folder, then ``os.replace``)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(path, _w)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG to ``path`` atomically."""
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
