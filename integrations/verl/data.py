"""Pair records → veRL's multimodal RL parquet (the layout of veRL's geo3k example, two images).

One row per reference/target pair (:class:`differad_rl.data.records.PairRecord`)::

    data_source   "differad"
    prompt        [{"role": "system", "content": SYSTEM_PROMPT},
                   {"role": "user", "content": "<image><image>" + instruction}]
    images        [{"bytes": <reference file>, "path": ..., "min_pixels": .., "max_pixels": ..},
                   {"bytes": <target file>, "path": ..., "min_pixels": .., "max_pixels": ..}]
                  (REFERENCE first, TARGET second, one ``<image>`` tag per image, in order)
    ability       "anomaly_localization"
    reward_model  {"style": "rule", "ground_truth": [[x1, y1, x2, y2], ...]}   # original target pixels,
                                                                              # largest first; [] = normal
    extra_info    {index, id, category, defect, source, split, width, height, space, gt_space,
                   min_pixels, max_pixels}                                    # same keys on every row

Why the pixel budget rides on each image: veRL resizes images with ``qwen_vl_utils.fetch_image``,
which reads ``min_pixels``/``max_pixels`` from the image entry and otherwise allows up to
16384·28² ≈ 12.8 M pixels. For Qwen2.5-VL the coordinates the model writes are pixels of that
resized image, so the budget the reward converts with (``extra_info``) must be the one the images
are resized with; writing it on both keeps them equal (docs/method.md §1: max 1,003,520). veRL's
``RLHFDataset`` opens the ``bytes`` and passes the whole entry on, so the keys reach the resize.

``extra_info`` carries what :func:`differad_rl.integrations.verl.reward.compute_score` needs to
put the ground truth into the model's coordinate space (veRL passes no images to rewards): the
target image size, the model's ``space`` and the processor's pixel budget. The instruction of row
``i`` is drawn from ``random.Random(seed)`` exactly as the TRL dataset draws it
(:func:`differad_rl.prompts.build_prompt`), so both frameworks train on the same prompts.

The parquet is written atomically (a temporary sibling, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from differad_rl import prompts as _prompts
from differad_rl.coords import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, SPACES
from differad_rl.data.records import PairRecord, as_records

__all__ = [
    "EXTRA_INFO_KEYS",
    "ParquetOptions",
    "pair_to_row",
    "pairs_to_rows",
    "verl_features",
    "write_verl_parquet",
]

EXTRA_INFO_KEYS = (
    "index",
    "id",
    "category",
    "defect",
    "source",
    "split",
    "width",
    "height",
    "space",
    "gt_space",
    "min_pixels",
    "max_pixels",
)
"""Keys of every row's ``extra_info``, in this order."""


@dataclasses.dataclass(frozen=True)
class ParquetOptions:
    """How pair records become rows.

    Attributes:
        space: the coordinate space of the model to train (``differad_rl.coords.SPACES``; e.g.
            ``"qwen2_5_vl"`` for Qwen2.5-VL, ``"qwen2_vl"``/``"qwen3_vl"`` for the 0..1000 families).
        min_pixels, max_pixels: the processor's pixel budget (Qwen2.5-VL's coordinates depend on
            it; docs/method.md §1: max 1,003,520). Must match ``data.mm_processor_kwargs`` / the processor.
        seed: seeds the per-row instruction draw.
        prompt_family: key of :data:`differad_rl.prompts.FORMAT_HINTS` (``"reasoning"``: the
            ``<think>``/``<answer>`` training format).
        system_prompt: the system message (default: the method's R1-style prompt).
        data_source: the ``data_source`` column (veRL groups validation metrics by it).
        ability: the ``ability`` column.
    """

    space: str = "qwen2_5_vl"
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0
    prompt_family: str = "reasoning"
    system_prompt: str = _prompts.SYSTEM_PROMPT
    data_source: str = "differad"
    ability: str = "anomaly_localization"

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.prompt_family not in _prompts.FORMAT_HINTS:
            raise ValueError(f"prompt_family must be one of {', '.join(_prompts.FORMAT_HINTS)}, got {self.prompt_family!r}")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} must be <= max_pixels={self.max_pixels}")
        if not isinstance(self.data_source, str) or not self.data_source:
            raise ValueError(f"data_source must be a non-empty string, got {self.data_source!r}")


def _read_image(path: str, rid: str, field: str, options: ParquetOptions) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        return {
            "bytes": data,
            "path": os.path.basename(path),
            "min_pixels": int(options.min_pixels),
            "max_pixels": int(options.max_pixels),
        }
    except OSError as err:
        raise ValueError(f"record {rid!r}: field {field!r} image {path!r} cannot be read: {err}") from err


def pair_to_row(record: PairRecord, index: int, instruction: str, options: ParquetOptions) -> dict[str, Any]:
    """One parquet row (module docstring) for ``record``; reads both image files."""
    return {
        "data_source": options.data_source,
        "prompt": [
            {"role": "system", "content": options.system_prompt},
            {"role": "user", "content": "<image><image>" + instruction},
        ],
        "images": [
            _read_image(record.reference, record.id, "reference", options),
            _read_image(record.target, record.id, "target", options),
        ],
        "ability": options.ability,
        "reward_model": {"style": "rule", "ground_truth": [[float(v) for v in b] for b in record.boxes]},
        "extra_info": {
            "index": int(index),
            "id": record.id,
            "category": record.category,
            "defect": record.defect,
            "source": record.source,
            "split": record.split,
            "width": int(record.width),
            "height": int(record.height),
            "space": options.space,
            "gt_space": "pixel",
            "min_pixels": int(options.min_pixels),
            "max_pixels": int(options.max_pixels),
        },
    }



def pairs_to_rows(
    source: str | os.PathLike[str] | Iterable[PairRecord | Mapping[str, Any]],
    options: ParquetOptions | None = None,
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Rows for a pairs JSONL path or records; row ``i``'s instruction is the ``i``-th draw of
    ``random.Random(options.seed)``. Raises ``ValueError`` naming the record for an unreadable image."""
    options = options or ParquetOptions()
    records = as_records(source)
    rng = random.Random(options.seed)
    it: Iterable[tuple[int, PairRecord]] = enumerate(records)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(records), desc="verl parquet", unit="pair")
    return [pair_to_row(r, i, _prompts.build_prompt(options.prompt_family, rng), options) for i, r in it]


def verl_features() -> Any:
    """The ``datasets.Features`` of the rows (module docstring)."""
    from datasets import Features, List, Value

    return Features(
        {
            "data_source": Value("string"),
            "prompt": List({"role": Value("string"), "content": Value("string")}),
            "images": List(
                {
                    "bytes": Value("binary"),
                    "path": Value("string"),
                    "min_pixels": Value("int64"),
                    "max_pixels": Value("int64"),
                }
            ),
            "ability": Value("string"),
            "reward_model": {"style": Value("string"), "ground_truth": List(List(Value("float64")))},
            "extra_info": {
                "index": Value("int64"),
                "id": Value("string"),
                "category": Value("string"),
                "defect": Value("string"),
                "source": Value("string"),
                "split": Value("string"),
                "width": Value("int64"),
                "height": Value("int64"),
                "space": Value("string"),
                "gt_space": Value("string"),
                "min_pixels": Value("int64"),
                "max_pixels": Value("int64"),
            },
        }
    )


def write_verl_parquet(
    source: str | os.PathLike[str] | Iterable[PairRecord | Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    options: ParquetOptions | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Write pairs (a JSONL path, records, or rows from :func:`pairs_to_rows`) as a veRL parquet.

    Returns the parquet path. Written to a temporary sibling and moved into place with
    ``os.replace``, so readers never see a partial file.

    Raises:
        ValueError: no records, an invalid record or option, an unreadable image.
    """
    from datasets import Dataset

    items = source if isinstance(source, (str, os.PathLike)) else list(source)
    if not isinstance(items, (str, os.PathLike)) and items and isinstance(items[0], Mapping) and "prompt" in items[0]:
        rows = list(items)
    else:
        rows = pairs_to_rows(items, options, progress=progress)
    if not rows:
        raise ValueError("no pair records to write")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_list(rows, features=verl_features())
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        ds.to_parquet(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
