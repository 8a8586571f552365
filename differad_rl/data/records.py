"""Pair records: the JSONL / Hugging Face ``datasets`` schema every builder writes and every
trainer and evaluator reads.

One record = one reference/target pair::

    {"id": "bottle/broken_large/000", "reference": "ref.png", "target": "tgt.png",
     "boxes": [[x1, y1, x2, y2], ...], "width": 900, "height": 900,
     "category": "bottle", "defect": "broken_large", "source": "mvtec_ad", "split": "train"}

* ``boxes`` are in original *target* pixels with exclusive right/bottom edges (a box covering
  columns ``c0..c1`` inclusive is ``x1=c0, x2=c1+1``), sorted by area, largest first. ``[]`` means
  a normal target (the zero box ``(0, 0, 0, 0)``).
* ``width``/``height`` are the target image's size in pixels.
* Relative image paths in a JSONL file are relative to that file's folder; :func:`load_pairs`
  resolves them to absolute paths and :func:`write_pairs` writes paths under the file's folder
  relative again, so a folder of pairs can be moved as a whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING as _MISSING
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from differad_rl.data.atomic import atomic_write_text

__all__ = [
    "PairRecord",
    "ZERO_BOX",
    "as_records",
    "iter_jsonl",
    "load_pairs",
    "write_pairs",
    "to_hf_dataset",
    "from_hf_dataset",
    "hf_features",
]

ZERO_BOX: tuple[int, int, int, int] = (0, 0, 0, 0)

Number = int | float


def _as_coord(value: Any, rid: str, fname: str) -> Number:
    """One box coordinate as ``int`` when integral (JSON round trips stay equal), else ``float``."""
    if type(value) is int:  # fast path: the common case
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"record {rid!r}: field {fname!r} has a non-numeric coordinate {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"record {rid!r}: field {fname!r} has a non-finite coordinate {value!r}")
    if float(value).is_integer():
        return int(value)
    return float(value)


@dataclass
class PairRecord:
    """One reference/target pair with its ground-truth boxes (see the module docstring).

    Validation (``__post_init__``) raises ``ValueError`` naming the record id and the field:
    non-empty ``id``; positive integer ``width``/``height``; every box has 4 finite numbers with
    ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``. Boxes are normalised to lists of
    ``int`` (``float`` where not integral) and sorted by area, largest first (stable).
    """

    id: str
    reference: str
    target: str
    boxes: Sequence[Sequence[Number]]
    width: int
    height: int
    category: str
    defect: str = "good"
    source: str = ""
    split: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"record {self.id!r}: field 'id' must be a non-empty string")
        rid = self.id
        for name in ("reference", "target"):
            value = getattr(self, name)
            if type(value) is not str and isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if not isinstance(value, str) or not value:
                raise ValueError(f"record {rid!r}: field {name!r} must be a non-empty path, got {value!r}")
        for name in ("category", "defect", "source", "split"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"record {rid!r}: field {name!r} must be a string, got {value!r}")
        if not self.category:
            raise ValueError(f"record {rid!r}: field 'category' must be non-empty")
        for name in ("width", "height"):
            value = getattr(self, name)
            if type(value) is int and value > 0:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
                setattr(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"record {rid!r}: field {name!r} must be a positive integer, got {value!r}")
        if self.boxes is None:
            self.boxes = []
        if type(self.boxes) is not list and (isinstance(self.boxes, (str, bytes)) or not isinstance(self.boxes, Iterable)):
            raise ValueError(f"record {rid!r}: field 'boxes' must be a list of [x1, y1, x2, y2], got {self.boxes!r}")
        norm: list[list[Number]] = []
        w, h = self.width, self.height
        for i, box in enumerate(list(self.boxes)):
            fname = f"boxes[{i}]"
            try:
                coords = list(box)
            except TypeError:
                raise ValueError(f"record {rid!r}: field {fname!r} must be [x1, y1, x2, y2], got {box!r}") from None
            if len(coords) != 4:
                raise ValueError(f"record {rid!r}: field {fname!r} must have 4 numbers, got {len(coords)}: {box!r}")
            x1, y1, x2, y2 = (_as_coord(c, rid, fname) for c in coords)
            if not x2 > x1:
                raise ValueError(f"record {rid!r}: field {fname!r} needs x2 > x1, got {coords!r}")
            if not y2 > y1:
                raise ValueError(f"record {rid!r}: field {fname!r} needs y2 > y1, got {coords!r}")
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                raise ValueError(
                    f"record {rid!r}: field {fname!r} = {coords!r} lies outside the "
                    f"{self.width}x{self.height} image (need 0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height)"
                )
            norm.append([x1, y1, x2, y2])
        if len(norm) > 1:
            norm.sort(key=lambda b: -((b[2] - b[0]) * (b[3] - b[1])))
        self.boxes = norm

    # ------------------------------------------------------------------ views
    @property
    def box(self) -> tuple[Number, Number, Number, Number]:
        """The largest box, or the zero box ``(0, 0, 0, 0)`` for a normal target (single-box training)."""
        if not self.boxes:
            return ZERO_BOX
        x1, y1, x2, y2 = self.boxes[0]
        return (x1, y1, x2, y2)

    @property
    def is_normal(self) -> bool:
        """``True`` when the target has no anomaly (``boxes == []``)."""
        return not self.boxes

    @property
    def image_size(self) -> tuple[int, int]:
        """``(width, height)`` of the target image (the ``image_size`` kwarg of pixel-space rewards)."""
        return (self.width, self.height)

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict with exactly the schema's keys, in schema order."""
        return {
            "id": self.id,
            "reference": self.reference,
            "target": self.target,
            "boxes": [list(b) for b in self.boxes],
            "width": self.width,
            "height": self.height,
            "category": self.category,
            "defect": self.defect,
            "source": self.source,
            "split": self.split,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairRecord:
        """Build from a mapping; unknown keys raise ``ValueError`` (typos must not pass silently)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a pair record must be a JSON object, got {type(data).__name__}")
        keys = data.keys()
        if not (_REQUIRED <= keys and keys <= _FIELDS):
            rid = data.get("id", "<no id>")
            unknown = sorted(set(keys) - _FIELDS)
            if unknown:
                raise ValueError(f"record {rid!r}: unknown field(s) {unknown}; expected {sorted(_FIELDS)}")
            raise ValueError(f"record {rid!r}: missing field(s) {sorted(_REQUIRED - set(keys))}")
        return cls(**data)

    def with_paths(self, reference: str, target: str) -> PairRecord:
        """A copy with other image paths (validation is re-run)."""
        d = self.to_dict()
        d["reference"], d["target"] = reference, target
        return PairRecord(**d)



_FIELDS = frozenset(f.name for f in fields(PairRecord))
_REQUIRED = frozenset(f.name for f in fields(PairRecord) if f.default is _MISSING and f.default_factory is _MISSING)


def _resolve(path_str: str, base: str) -> str:
    return path_str if os.path.isabs(path_str) else os.path.join(base, path_str)


def load_pairs(path: str | os.PathLike[str]) -> list[PairRecord]:
    """Read a pairs JSONL file (one record per line; blank lines skipped).

    Relative image paths are resolved against the JSONL file's folder (the returned records hold
    absolute paths when the file path is absolute). Image files are not opened here.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad JSON or an invalid record; the message starts with ``<file>:<line>:``.
    """
    p = Path(path)
    base = str(p.resolve().parent)
    records: list[PairRecord] = []
    for lineno, obj in iter_jsonl(p, what="pairs file"):
        try:
            rec = PairRecord.from_dict(obj)
        except ValueError as exc:
            raise ValueError(f"{p}:{lineno}: {exc}") from None
        rec.reference = _resolve(rec.reference, base)
        rec.target = _resolve(rec.target, base)
        records.append(rec)
    return records


def as_records(source: str | os.PathLike[str] | Iterable[PairRecord | Mapping[str, Any]]) -> list[PairRecord]:
    """Pair records from a JSONL path (:func:`load_pairs`) or an iterable of records / dicts
    (dicts are validated by :meth:`PairRecord.from_dict`)."""
    if isinstance(source, (str, os.PathLike)):
        return load_pairs(source)
    return [r if isinstance(r, PairRecord) else PairRecord.from_dict(r) for r in source]


def iter_jsonl(path: str | os.PathLike[str], *, what: str = "file") -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises:
        FileNotFoundError: the file does not exist (the message names it as ``what``).
        ValueError: a line is not valid JSON; the message starts with ``<file>:<line>:``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    with p.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _relativize(path_str: str, bases: tuple[str, ...]) -> str:
    """``path_str`` relative to the first of ``bases`` (absolute, normalised, with a trailing
    separator) that contains it — as written, else with its symlinks resolved; relative or outside
    paths are returned unchanged."""
    if not os.path.isabs(path_str):
        return path_str
    norm = os.path.normpath(path_str)
    for candidate in (norm, None):
        if candidate is None:  # slow path: resolve symlinks in the path itself
            candidate = os.path.realpath(norm)
        for b in bases:
            if candidate.startswith(b):
                return Path(candidate[len(b) :]).as_posix()
    return path_str


def write_pairs(
    records: Iterable[PairRecord | Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    relative: bool = True,
) -> Path:
    """Write records as JSONL atomically (temp file + ``os.replace``); returns the path.

    With ``relative=True`` absolute image paths that lie under the JSONL's folder are written
    relative to it (the folder stays relocatable); other paths are written unchanged. Mappings are
    validated through :class:`PairRecord`. Duplicate ids raise ``ValueError`` naming the id.
    """
    dest = Path(path)
    # the folder as written and with symlinks resolved: a path under either becomes relative
    folders = (dest.parent.absolute(), dest.parent.resolve())
    bases = tuple(dict.fromkeys(os.path.join(os.path.normpath(str(b)), "") for b in folders))
    lines: list[str] = []
    seen: set[str] = set()
    for rec in records:
        if not isinstance(rec, PairRecord):
            rec = PairRecord.from_dict(rec)
        if rec.id in seen:
            raise ValueError(f"record {rec.id!r}: duplicate id (writing {dest})")
        seen.add(rec.id)
        d = rec.to_dict()
        if relative:
            d["reference"] = _relativize(d["reference"], bases)
            d["target"] = _relativize(d["target"], bases)
        lines.append(json.dumps(d, ensure_ascii=False, separators=(", ", ": ")))
    return atomic_write_text(dest, "".join(line + "\n" for line in lines))


def hf_features() -> Any:
    """The ``datasets.Features`` of the pair schema (boxes as float64 lists, sizes as int64)."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "reference": datasets.Value("string"),
            "target": datasets.Value("string"),
            "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
            "width": datasets.Value("int64"),
            "height": datasets.Value("int64"),
            "category": datasets.Value("string"),
            "defect": datasets.Value("string"),
            "source": datasets.Value("string"),
            "split": datasets.Value("string"),
        }
    )


def to_hf_dataset(records: Sequence[PairRecord]) -> Any:
    """Records → ``datasets.Dataset`` with :func:`hf_features` (image paths kept as strings)."""
    import datasets

    rows: dict[str, list[Any]] = {f.name: [] for f in fields(PairRecord)}
    for rec in records:
        d = rec.to_dict()
        d["boxes"] = [[float(c) for c in b] for b in d["boxes"]]
        for k, v in d.items():
            rows[k].append(v)
    return datasets.Dataset.from_dict(rows, features=hf_features())


def from_hf_dataset(ds: Any) -> list[PairRecord]:
    """``datasets.Dataset`` (or any iterable of row mappings) → validated records.

    Columns outside the schema (e.g. a ``prompt`` added for training) are ignored.
    """
    names = {f.name for f in fields(PairRecord)}
    out: list[PairRecord] = []
    for row in ds:
        out.append(PairRecord.from_dict({k: v for k, v in row.items() if k in names}))
    return out

