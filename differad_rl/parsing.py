"""Model output -> boxes, for every model family's grounding format.

The parser never raises on any string and runs in linear time: the answer span is found with
``str.find`` and every box pattern starts on a literal or at the start of a digit run, so a failed
attempt costs at most the length of the run it started on (no catastrophic backtracking).

Accepted box formats (whitespace allowed anywhere, integers or decimals, optional sign):

=============  ========================================================  ====================
``fmt``        written                                                   families
=============  ========================================================  ====================
``qwen``       ``(x1,y1),(x2,y2)``                                       Qwen-VL, reasoning
``qwen_tokens````<|box_start|>(x1,y1),(x2,y2)<|box_end|>``               Qwen-VL
``bracket``    ``[x1, y1, x2, y2]``                                      Mantis, mPLUG-Owl3
``internvl``   ``<box>[[x1, y1, x2, y2]]</box>``                         InternVL
``minicpm``    ``<box>x1 y1 x2 y2</box>`` (or the bare four numbers)     MiniCPM-V
``cogvlm``     ``[[x0,y0,x1,y1]]``                                       CogVLM
``json``       ``{"bbox_2d": [x1, y1, x2, y2]}``                         Qwen2.5-VL JSON
=============  ========================================================  ====================

A four-number parenthesised tuple ``(x1, y1, x2, y2)`` is accepted too.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]

BOX_FORMATS: tuple[str, ...] = ("qwen", "qwen_tokens", "bracket", "internvl", "minicpm", "cogvlm", "json")

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_OPEN_LEN = len(ANSWER_OPEN)

# Python >= 3.11 has possessive quantifiers: a number or a whitespace run, once read, is never
# re-read on failure. They match exactly what the greedy forms match here (what follows each
# quantified run can never start with what the run consumes), only without backtracking.
_P = "+" if sys.version_info >= (3, 11) else ""
_N = rf"([-+]?(?:\d+{_P}(?:\.\d*{_P})?{_P}|\.\d+{_P})(?:[eE][-+]?\d+{_P})?{_P})"
_S = rf"\s*{_P}"
_PAIRS = rf"\({_S}{_N}{_S},{_S}{_N}{_S}\){_S},?{_S}\({_S}{_N}{_S},{_S}{_N}{_S}\)"
_TUPLE4 = rf"\({_S}{_N}{_S},{_S}{_N}{_S},{_S}{_N}{_S},{_S}{_N}{_S}\)"
_LIST4 = rf"\[{_S}{_N}{_S},{_S}{_N}{_S},{_S}{_N}{_S},{_S}{_N}{_S}\]"
# MiniCPM's four bare numbers count inside <box>…</box>, or as the whole answer (bare numbers in
# prose are not boxes); every pattern starts on a literal, so the search is a fast scan.
_SPACED = rf"{_N}\s+{_P}{_N}\s+{_P}{_N}\s+{_P}{_N}"
_BOXTAG4 = rf"<box>{_S}{_SPACED}{_S}</box>"
_BARE4 = re.compile(rf"{_S}{_SPACED}{_S}")
_OTHER_NUMBER = re.compile(r"(?<!\w)[-+]?\.?\d")
_BOX_RE = re.compile("|".join((_PAIRS, _TUPLE4, _LIST4, _BOXTAG4)))


def completion_text(completion: Any) -> str:
    """Text of a completion: a plain string, or TRL's conversational ``[{"role", "content"}]``.

    For a message list the last assistant message counts; content given as a list of parts
    (``[{"type": "text", "text": ...}]``) is joined. Anything else becomes ``""`` (never raises).
    """
    if isinstance(completion, str):
        return completion
    try:
        if isinstance(completion, dict):
            completion = [completion]
        if isinstance(completion, Sequence) and completion:
            message = completion[-1]
            content = message.get("content", "") if isinstance(message, dict) else message
            if isinstance(content, str):
                return content
            if isinstance(content, Sequence):
                return "".join(
                    part.get("text", "") if isinstance(part, dict) else str(part) for part in content
                )
    except Exception:  # a model's output never raises
        return ""
    return ""


def answer_span(text: str) -> str | None:
    """Content of the first complete ``<answer>…</answer>``, or ``None`` when there is none."""
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    if end < 0:
        return None
    return text[start:end]


def _segment(text: Any, require_answer: bool) -> str | None:
    if not isinstance(text, str):
        text = completion_text(text)
    span = answer_span(text)
    if span is not None:
        return span
    return None if require_answer else text


def _to_box(groups: Iterable[str | None]) -> Box | None:
    vals = [float(g) for g in groups if g is not None]
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        return None
    return (vals[0], vals[1], vals[2], vals[3])


def parse_box(text: Any, *, require_answer: bool = True) -> Box | None:
    """First box in the first ``<answer>…</answer>`` of ``text``, or ``None``.

    Args:
        text: a model completion (a string, or TRL's conversational message list).
        require_answer: when ``True`` (training), text outside a complete answer span is ignored
            and a completion without one has no box. When ``False`` (evaluation of non-reasoning
            models), a completion without an answer span is searched whole.

    Returns:
        ``(x1, y1, x2, y2)`` as floats in the order written (no reordering, no validation of
        ``x2 > x1``: the reward decides), or ``None`` when nothing parses or a value is not finite.
    """
    try:
        seg = _segment(text, require_answer)
        if seg is None:
            return None
        m = _BOX_RE.search(seg) or _BARE4.fullmatch(seg)
        return None if m is None else _to_box(m.groups())
    except Exception:  # pragma: no cover - defensive: a model's output never raises
        return None


def parse_boxes(text: Any, *, require_answer: bool = True) -> list[Box]:
    """Every box of the answer span (see :func:`parse_box`), in the order written."""
    try:
        seg = _segment(text, require_answer)
        if seg is None:
            return []
        matches = list(_BOX_RE.finditer(seg))
        if not matches:
            bare = _BARE4.fullmatch(seg)
            matches = [bare] if bare is not None else []
        boxes = (_to_box(m.groups()) for m in matches)
        return [b for b in boxes if b is not None]
    except Exception:  # pragma: no cover
        return []


def parse_boxes_batch(
    texts: Sequence[Any], *, require_answer: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """First box of each text: ``(boxes (N, 4) float64, valid (N,) bool)``; NaN rows where none.

    This is the hot path of every reward: one ``str.find`` pair and one compiled-regex search per
    text, numbers converted once.
    """
    n = len(texts)
    out = np.full((n, 4), np.nan, dtype=np.float64)
    search, bare = _BOX_RE.search, _BARE4.fullmatch
    rows: list[int] = []
    values: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            text = completion_text(text)
        lo, hi = 0, len(text)
        start = text.find(ANSWER_OPEN)
        end = text.find(ANSWER_CLOSE, start + _OPEN_LEN) if start >= 0 else -1
        if end >= 0:
            lo, hi = start + _OPEN_LEN, end
        elif require_answer:
            continue
        m = search(text, lo, hi) or bare(text, lo, hi)
        if m is None:
            continue
        # The matched alternative's four numbers are the last four groups it set.
        last = m.lastindex
        rows.append(i)
        values.extend(m.group(last - 3, last - 2, last - 1, last))
    if rows:
        vals = np.array(values, dtype=np.float64).reshape(-1, 4)
        out[rows] = vals
    valid = np.isfinite(out).all(axis=1)
    out[~valid] = np.nan
    return out, valid


def is_well_formatted(text: Any) -> bool:
    """``<think>…</think>`` then (whitespace allowed) ``<answer>`` holding exactly one box ``</answer>``.

    Nothing may come before ``<think>`` or after ``</answer>`` except whitespace; the think span may
    not contain answer or think tags; the answer span holds exactly one box (in any accepted format,
    e.g. inside ``<|box_start|>…<|box_end|>``) and no other number.
    """
    try:
        if not isinstance(text, str):
            text = completion_text(text)
        s = text.strip()
        if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
            return False
        think_end = s.find(THINK_CLOSE)
        if think_end < 0:
            return False
        think = s[len(THINK_OPEN) : think_end]
        if any(tag in think for tag in (THINK_OPEN, ANSWER_OPEN, ANSWER_CLOSE)):
            return False
        rest = s[think_end + len(THINK_CLOSE) :].lstrip()
        if not rest.startswith(ANSWER_OPEN):
            return False
        answer = rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
        if any(tag in answer for tag in (ANSWER_OPEN, ANSWER_CLOSE, THINK_OPEN, THINK_CLOSE)):
            return False
        matches = list(_BOX_RE.finditer(answer))
        if len(matches) != 1 or _to_box(matches[0].groups()) is None:
            return False
        rest = answer[: matches[0].start()] + answer[matches[0].end() :]
        return _OTHER_NUMBER.search(rest) is None
    except Exception:  # pragma: no cover
        return False


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render_box(box: Sequence[float], fmt: str = "qwen") -> str:
    """Write ``box`` the way a model family does (see the module table); inverse of parsing.

    Raises:
        ValueError: unknown ``fmt`` or a box without exactly four values.
    """
    if fmt not in BOX_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a known box format; expected one of {BOX_FORMATS}")
    if len(box) != 4:
        raise ValueError(f"box must have 4 values (x1, y1, x2, y2), got {list(box)!r}")
    if not all(math.isfinite(float(v)) for v in box):
        raise ValueError(f"box values must be finite, got {list(box)!r}")
    x1, y1, x2, y2 = (_num(v) for v in box)
    if fmt == "qwen":
        return f"({x1},{y1}),({x2},{y2})"
    if fmt == "qwen_tokens":
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    if fmt == "bracket":
        return f"[{x1}, {y1}, {x2}, {y2}]"
    if fmt == "internvl":
        return f"<box>[[{x1}, {y1}, {x2}, {y2}]]</box>"
    if fmt == "minicpm":
        return f"<box>{x1} {y1} {x2} {y2}</box>"
    if fmt == "cogvlm":
        return f"[[{x1},{y1},{x2},{y2}]]"
    return json.dumps({"bbox_2d": [json.loads(v) for v in (x1, y1, x2, y2)]})
