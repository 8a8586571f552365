"""Pair records → TRL's conversational vision-language dataset format, validated before training.

One row per reference/target pair (:class:`differad_rl.data.records.PairRecord`)::

    {"prompt": [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": <instruction>}]}],
     "images": [<reference PIL>, <target PIL>],     # REFERENCE first, TARGET second
     "solution": [x1, y1, x2, y2],                  # largest box, original target pixels; [0,0,0,0] normal
     "boxes": [[x1, y1, x2, y2], ...],              # every box ([] normal), for the multi-box reward
     "image_size": [width, height],                 # of the target image
     "id": ..., "category": ...}

The instruction is drawn per row, seeded, from the method's pool (:mod:`differad_rl.prompts`), as
in the paper; the system prompt is the method's. System content is a list of text blocks (not a
plain string) so the column has one Arrow type in a ``datasets.Dataset``. ``GRPOTrainer`` fills the
``{"type": "image"}`` placeholders with ``images`` in order, and passes every other column to the
reward functions of :mod:`differad_rl.integrations.trl.rewards`.

:func:`validate_trl_rows` raises ``ValueError`` naming the row id for a row without a box or an
image size, with a malformed one, with other than two images, or whose ``image_size`` does not
match its target image — before any training step runs.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from differad_rl import prompts as _prompts
from differad_rl.data.records import PairRecord, as_records

__all__ = [
    "build_messages",
    "draw_instruction",
    "pair_to_row",
    "pairs_to_rows",
    "to_trl_dataset",
    "validate_trl_rows",
    "trl_features",
]


def draw_instruction(rng: random.Random, prompt_family: str = "reasoning") -> str:
    """One instruction drawn from the method's pool plus the format hint
    (:func:`differad_rl.prompts.build_prompt`; ``"reasoning"`` = ``<think>``/``<answer>`` training format)."""
    return _prompts.build_prompt(prompt_family, rng)


def build_messages(instruction: str, *, num_images: int = 2, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The conversational prompt: system prompt, then the user turn ``[image, image, text]``."""
    system = _prompts.SYSTEM_PROMPT if system_prompt is None else system_prompt
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {
            "role": "user",
            "content": [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": instruction}],
        },
    ]


def _open_image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def pair_to_row(record: PairRecord, instruction: str, *, load_images: bool = True) -> dict[str, Any]:
    """One TRL row for ``record`` (see the module docstring).

    With ``load_images=False`` the ``images`` column holds the two file paths instead of PIL images
    (what :func:`to_trl_dataset` stores; ``datasets`` decodes them on access).
    """
    images: list[Any] = [record.reference, record.target]
    if load_images:
        images = [_open_image(p) for p in images]
    return {
        "prompt": build_messages(instruction),
        "images": images,
        "solution": [float(c) for c in record.box],
        "boxes": [[float(c) for c in b] for b in record.boxes],
        "image_size": [int(record.width), int(record.height)],
        "id": record.id,
        "category": record.category,
    }



def pairs_to_rows(
    source: str | os.PathLike[str] | Iterable[PairRecord | Mapping[str, Any]],
    *,
    seed: int = 0,
    prompt_family: str = "reasoning",
    load_images: bool = True,
    validate: bool = True,
) -> list[dict[str, Any]]:
    """Rows for a pairs JSONL path or records; instruction ``i`` is drawn from ``Random(seed)``.

    ``prompt_family`` is a key of :data:`differad_rl.prompts.FORMAT_HINTS` (default ``"reasoning"``,
    the method's training format).
    Raises ``ValueError`` (naming the row id) when ``validate`` and a row is invalid.
    """
    rng = random.Random(seed)
    rows = [pair_to_row(r, draw_instruction(rng, prompt_family), load_images=load_images) for r in as_records(source)]
    if validate:
        validate_trl_rows(rows)
    return rows


def trl_features() -> Any:
    """``datasets.Features`` of the rows (``images`` as a list of ``datasets.Image``)."""
    import datasets

    block = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    return datasets.Features(
        {
            "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.List(block)}),
            "images": datasets.List(datasets.Image()),
            "solution": datasets.List(datasets.Value("float64"), length=4),
            "boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
            "image_size": datasets.List(datasets.Value("int64"), length=2),
            "id": datasets.Value("string"),
            "category": datasets.Value("string"),
        }
    )


def to_trl_dataset(
    source: str | os.PathLike[str] | Iterable[PairRecord | Mapping[str, Any]],
    *,
    seed: int = 0,
    prompt_family: str = "reasoning",
    validate: bool = True,
) -> Any:
    """A ``datasets.Dataset`` of TRL rows (images stored by path, decoded to PIL on access).

    Validated with :func:`validate_trl_rows` (reading only image headers) unless ``validate=False``.
    """
    import datasets

    rows = pairs_to_rows(source, seed=seed, prompt_family=prompt_family, load_images=False, validate=False)
    cols = {k: [r[k] for r in rows] for k in trl_features()}
    ds = datasets.Dataset.from_dict(cols, features=trl_features())
    if validate:
        validate_trl_rows(ds)
    return ds


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _image_size_of(img: Any) -> tuple[int, int] | None:
    """``(width, height)`` of a PIL image, a path, or ``datasets``' undecoded ``{"bytes", "path"}``;
    only the header is read."""
    from PIL import Image

    if img is None:
        return None
    size = getattr(img, "size", None)
    if isinstance(size, tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    src: Any = None
    if isinstance(img, (str, os.PathLike)):
        src = os.fspath(img)
    elif isinstance(img, Mapping):
        src = io.BytesIO(img["bytes"]) if img.get("bytes") else img.get("path")
    if src is None:
        return None
    try:
        with Image.open(src) as im:
            return int(im.size[0]), int(im.size[1])
    except (OSError, ValueError):
        return None


def _iter_rows(rows: Any) -> Iterable[Mapping[str, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None  # type: ignore[assignment]
    if datasets is not None and isinstance(rows, datasets.Dataset):
        # Read image headers only: switch decoding off (a cast; its progress bar is hidden).
        from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        feats = rows.features
        was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            if "images" in feats and isinstance(feats["images"], (datasets.List, datasets.Sequence)):
                inner = feats["images"].feature
                if isinstance(inner, datasets.Image) and inner.decode:
                    rows = rows.cast_column("images", datasets.List(datasets.Image(decode=False)))
            elif "image" in feats and isinstance(feats["image"], datasets.Image) and feats["image"].decode:
                rows = rows.cast_column("image", datasets.Image(decode=False))
        finally:
            if not was_disabled:
                enable_progress_bars()
    return rows


def _number_list(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _check_row(i: int, row: Mapping[str, Any]) -> None:
    rid = row.get("id", None)
    name = f"row {rid!r}" if rid not in (None, "") else f"row #{i}"
    # ground truth
    if row.get("solution") is None:
        raise ValueError(f"{name}: no 'solution' box (use [0, 0, 0, 0] for a normal target)")
    box = _number_list(row["solution"], 4)
    if box is None:
        raise ValueError(f"{name}: solution={row['solution']!r} is not [x1, y1, x2, y2] of finite numbers")
    if row.get("image_size") is None:
        raise ValueError(f"{name}: no 'image_size' ([width, height] of the target image)")
    size = _number_list(row["image_size"], 2)
    if size is None or any(v <= 0 or v != int(v) for v in size):
        raise ValueError(f"{name}: image_size={row['image_size']!r} must be two positive integers [width, height]")
    w, h = int(size[0]), int(size[1])
    x1, y1, x2, y2 = box
    if any(box):
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise ValueError(
                f"{name}: solution={box} is not inside the {w}x{h} target "
                "(need 0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height, or [0, 0, 0, 0] for normal)"
            )
    # images
    if "images" in row:
        images = row["images"]
        if images is None or len(images) != 2:
            n = 0 if images is None else len(images)
            raise ValueError(f"{name}: 'images' must be [reference, target], got {n} image(s)")
        target = images[-1]
    elif "image" in row:
        target = row["image"]
    else:
        raise ValueError(f"{name}: no 'images' column ([reference, target])")
    actual = _image_size_of(target)
    if actual is None:
        raise ValueError(f"{name}: the target image cannot be read ({target!r:.120})")
    if actual != (w, h):
        raise ValueError(f"{name}: image_size=[{w}, {h}] but the target image is {actual[0]}x{actual[1]}")
    # prompt placeholders
    prompt = row.get("prompt")
    if isinstance(prompt, Sequence) and not isinstance(prompt, str) and "images" in row:
        n_ph = sum(
            1
            for m in prompt
            if isinstance(m, Mapping) and isinstance(m.get("content"), Sequence)
            and not isinstance(m.get("content"), str)
            for b in m["content"]
            if isinstance(b, Mapping) and b.get("type") == "image"
        )
        if n_ph != len(row["images"]):
            raise ValueError(f"{name}: the prompt has {n_ph} image placeholder(s) for {len(row['images'])} images")


def validate_trl_rows(rows: Any) -> None:
    """Check every row before training; raise ``ValueError`` naming the first bad row's id.

    A row needs ``solution`` (4 finite numbers; a non-zero box must lie inside the image with
    ``x1 < x2``, ``y1 < y2``), ``image_size`` (two positive integers) equal to the target (second)
    image's actual size, exactly two images, and as many ``{"type": "image"}`` placeholders in the
    prompt as images. Works on a list of dicts or a ``datasets.Dataset`` (only image headers are
    read).
    """
    for i, row in enumerate(_iter_rows(rows)):
        _check_row(i, row)
