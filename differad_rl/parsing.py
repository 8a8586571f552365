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
from math import isfinite
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

Box = tuple[float, float, float, float]

BoxFormat = Literal["qwen", "qwen_tokens", "bracket", "internvl", "minicpm", "cogvlm", "json"]
BOX_FORMATS: tuple[BoxFormat, ...] = ("qwen", "qwen_tokens", "bracket", "internvl", "minicpm", "cogvlm", "json")

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

# One family's format only (``fmt=``): what the prompt of that family asks for (docs/method.md §8). Each
# pattern has exactly four groups, the numbers in the order written.
_FORMAT_PATTERNS: dict[str, str] = {
    "qwen": _PAIRS,  # also inside <|box_start|>…<|box_end|>
    "qwen_tokens": rf"<\|box_start\|>{_S}{_PAIRS}{_S}<\|box_end\|>",
    "bracket": _LIST4,
    "internvl": rf"<box>{_S}\[{_S}{_LIST4}{_S}\]{_S}</box>",
    "minicpm": _BOXTAG4,
    "cogvlm": rf"\[{_S}{_LIST4}{_S}\]",
    "json": rf'"bbox_2d"{_S}:{_S}{_LIST4}',
}
_FORMAT_RE: dict[str | None, re.Pattern[str]] = {k: re.compile(v) for k, v in _FORMAT_PATTERNS.items()}
_FORMAT_RE[None] = _BOX_RE
# Fast path of the common case: the answer is exactly one box (whitespace around it). Matched at the
# start of the answer span it is, by construction, the span's first box (every box pattern starts on
# a literal, no two alternatives match at one position, and no box contains "</answer>").
_WHOLE_ANSWER_RE: dict[str | None, re.Pattern[str]] = {
    k: re.compile(rf"{_S}(?:{v.pattern}){_S}</answer>") for k, v in _FORMAT_RE.items()
}
_ONLY_BOX_RE: dict[str | None, re.Pattern[str]] = {
    k: re.compile(rf"{_S}(?:{v.pattern}){_S}") for k, v in _FORMAT_RE.items()
}
# Faster still: the answer exactly "(int,int),(int,int)" — a subset of the Qwen pattern with the same
# four groups (only used where the Qwen pair is the first alternative: fmt "qwen" or None).
_INT_PAIRS_ANSWER = re.compile(rf"\((\d+{_P}),(\d+{_P})\),\((\d+{_P}),(\d+{_P})\)</answer>")
_INT_FAST: dict[str | None, re.Pattern[str] | None] = {k: None for k in _FORMAT_RE}
_INT_FAST["qwen"] = _INT_FAST[None] = _INT_PAIRS_ANSWER


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


def check_format(fmt: str | None) -> BoxFormat | None:
    """Return ``fmt`` if it is ``None`` (every format) or one of :data:`BOX_FORMATS`, else raise."""
    if fmt is None:
        return None
    if fmt not in BOX_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a known box format; expected None (any) or one of {BOX_FORMATS}")
    return fmt


def _bounds(text: str, require_answer: bool) -> tuple[int, int] | None:
    """``(lo, hi)`` of the part of ``text`` a box is read from, or ``None`` when there is none.

    The first complete answer span. Without one: nothing when ``require_answer``; otherwise
    (lenient evaluation) never the reasoning — the content of an unclosed ``<answer>``, else what
    follows ``</think>``, else what precedes an unclosed ``<think>``, else the whole text.
    """
    start = text.find(ANSWER_OPEN)
    if start >= 0:
        end = text.find(ANSWER_CLOSE, start + _OPEN_LEN)
        if end >= 0:
            return start + _OPEN_LEN, end
    if require_answer:
        return None
    if start >= 0:
        return start + _OPEN_LEN, len(text)
    think_end = text.find(THINK_CLOSE)
    if think_end >= 0:
        return think_end + len(THINK_CLOSE), len(text)
    think_start = text.find(THINK_OPEN)
    return (0, think_start) if think_start >= 0 else (0, len(text))


def _segment(text: Any, require_answer: bool) -> str | None:
    if not isinstance(text, str):
        text = completion_text(text)
    b = _bounds(text, require_answer)
    return None if b is None else text[b[0] : b[1]]


def _to_box(groups: Iterable[str | None]) -> Box | None:
    vals = [float(g) for g in groups if g is not None]
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        return None
    return (vals[0], vals[1], vals[2], vals[3])


def parse_box(text: Any, *, require_answer: bool = True, fmt: BoxFormat | None = None) -> Box | None:
    """First box in the first ``<answer>…</answer>`` of ``text``, or ``None``.

    Args:
        text: a model completion (a string, or TRL's conversational message list).
        require_answer: when ``True`` (training), text outside a complete answer span is ignored
            and a completion without one has no box. When ``False`` (evaluation of non-reasoning
            models), a completion without a complete answer span is searched outside its reasoning:
            the content of an unclosed ``<answer>``, else the text after ``</think>``, else the
            text before an unclosed ``<think>``, else the whole text.
        fmt: ``None`` (evaluation, lenient): any format of the module table, and four bare numbers
            as the whole answer. A :data:`BOX_FORMATS` name (training): only that format counts —
            the one the prompt family asks for (:data:`differad_rl.prompts.PROMPT_BOX_FORMATS`),
            the same rule the format reward applies.

    Returns:
        ``(x1, y1, x2, y2)`` as floats in the order written (no reordering, no validation of
        ``x2 > x1``: the reward decides), or ``None`` when nothing parses or a value is not finite.

    Raises:
        ValueError: unknown ``fmt`` (never because of ``text``).
    """
    return first_box(text, require_answer, check_format(fmt))


def first_box(text: Any, require_answer: bool = True, fmt: BoxFormat | None = None) -> Box | None:
    """:func:`parse_box` without the check of ``fmt`` (the rewards' per-sample hot path)."""
    try:
        if text.__class__ is not str:
            text = completion_text(text)
        start = text.find(ANSWER_OPEN)
        m = None
        if start >= 0:
            fast = _INT_FAST[fmt]
            m = fast.match(text, start + _OPEN_LEN) if fast is not None else None
            if m is None:
                m = _WHOLE_ANSWER_RE[fmt].match(text, start + _OPEN_LEN)
        if m is None:
            b = _bounds(text, require_answer)
            if b is None:
                return None
            m = _FORMAT_RE[fmt].search(text, b[0], b[1])
            if m is None and fmt is None:
                m = _BARE4.fullmatch(text, b[0], b[1])
            if m is None:
                return None
        last = m.lastindex or 4  # every box pattern has four groups or more
        x1, y1, x2, y2 = float(m.group(last - 3)), float(m.group(last - 2)), float(m.group(last - 1)), float(m.group(last))
        if isfinite(x1) and isfinite(y1) and isfinite(x2) and isfinite(y2):
            return (x1, y1, x2, y2)
        return None
    except Exception:  # pragma: no cover - defensive: a model's output never raises
        return None


def parse_boxes(text: Any, *, require_answer: bool = True, fmt: BoxFormat | None = None) -> list[Box]:
    """Every box of the answer span (see :func:`parse_box`), in the order written."""
    pattern = _FORMAT_RE[check_format(fmt)]
    try:
        seg = _segment(text, require_answer)
        if seg is None:
            return []
        matches = list(pattern.finditer(seg))
        if not matches and fmt is None:
            bare = _BARE4.fullmatch(seg)
            matches = [bare] if bare is not None else []
        boxes = (_to_box(m.group(k - 3, k - 2, k - 1, k)) for m in matches for k in (m.lastindex or 4,))
        return [b for b in boxes if b is not None]
    except Exception:  # pragma: no cover
        return []


def answer_boxes(text: Any, *, require_answer: bool = True, fmt: BoxFormat | None = None) -> list[Box] | None:
    """The boxes of the answer for the several-box reward, or ``None`` when there is no answer.

    ``None``: no answer span (with ``require_answer``), or an answer that is not empty but holds no
    parsable box (prose, ``"12,30,200,180"``, five numbers): it is no answer of a box. ``[]``: an
    empty (whitespace-only) answer, which on a normal target means "nothing there" (docs/method.md §3).
    """
    check_format(fmt)
    seg = _segment(text, require_answer)
    if seg is None:
        return None
    boxes = parse_boxes(seg, require_answer=False, fmt=fmt) if seg.strip() else []
    return boxes if boxes or not seg.strip() else None


def parse_boxes_batch(
    texts: Sequence[Any], *, require_answer: bool = True, fmt: BoxFormat | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """First box of each text: ``(boxes (N, 4) float64, valid (N,) bool)``; NaN rows where none.

    Equal to :func:`parse_box` text by text. This is the hot path of every reward: one ``str.find``
    and, in the common case of an answer that is just one box, one anchored regex match per text;
    the numbers are converted once for the whole batch.
    """
    pattern = _FORMAT_RE[check_format(fmt)]
    whole = _WHOLE_ANSWER_RE[fmt].match
    int_fast = _INT_FAST[fmt]
    fast = int_fast.match if int_fast is not None else whole
    search, bare = pattern.search, (_BARE4.fullmatch if fmt is None else None)
    n = len(texts)
    rows: list[int] = []
    values: list[str] = []
    add_row, add_values = rows.append, values.extend
    i = -1
    for text in texts:
        i += 1
        if text.__class__ is not str:
            text = completion_text(text)
        start = text.find(ANSWER_OPEN)
        if start >= 0:
            m = fast(text, start + _OPEN_LEN)
            if m is not None:
                add_row(i)
                add_values(m.groups())
                continue
            m = whole(text, start + _OPEN_LEN)
            if m is not None:
                last = m.lastindex or 4
                add_row(i)
                add_values(m.group(last - 3, last - 2, last - 1, last))
                continue
        b = _bounds(text, require_answer)
        if b is None:
            continue
        m = search(text, b[0], b[1])
        if m is None and bare is not None:
            m = bare(text, b[0], b[1])
        if m is None:
            continue
        last = m.lastindex or 4
        add_row(i)
        add_values(m.group(last - 3, last - 2, last - 1, last))
    out = np.full((n, 4), np.nan, dtype=np.float64)
    if rows:
        out[rows] = np.array(values, dtype=np.float64).reshape(-1, 4)
    valid = np.asarray(np.isfinite(out).all(axis=1))
    out[~valid] = np.nan
    return out, valid


def is_well_formatted(text: Any, *, fmt: BoxFormat | None = None) -> bool:
    """``<think>…</think>`` then (whitespace allowed) ``<answer>`` holding exactly one box ``</answer>``.

    Nothing may come before ``<think>`` or after ``</answer>`` except whitespace; the think span may
    not contain answer or think tags; the answer span holds exactly one box and no other number. The
    box may be in any accepted format (``fmt=None``, e.g. inside ``<|box_start|>…<|box_end|>``) or
    must be in format ``fmt`` (the family's, as the training rewards parse it).

    Raises:
        ValueError: unknown ``fmt`` (never because of ``text``).
    """
    pattern = _FORMAT_RE[check_format(fmt)]
    try:
        if not isinstance(text, str):
            text = completion_text(text)
        s = text.strip()
        if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
            return False
        think_end = s.find(THINK_CLOSE)
        if think_end < 0:
            return False
        lo = len(THINK_OPEN)
        if s.find(THINK_OPEN, lo, think_end) >= 0 or s.find(ANSWER_OPEN, lo, think_end) >= 0 or s.find(
                ANSWER_CLOSE, lo, think_end) >= 0:
            return False
        rest = s[think_end + len(THINK_CLOSE) :].lstrip()
        if not rest.startswith(ANSWER_OPEN):
            return False
        answer = rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
        only = _ONLY_BOX_RE[fmt].fullmatch(answer)
        if only is not None:  # the common case: the answer is one box and whitespace
            return _to_box(only.groups()) is not None
        if ANSWER_OPEN in answer or ANSWER_CLOSE in answer or THINK_OPEN in answer or THINK_CLOSE in answer:
            return False
        matches = list(pattern.finditer(answer))
        if len(matches) != 1 or _to_box(matches[0].groups()) is None:
            return False
        rest = answer[: matches[0].start()] + answer[matches[0].end() :]
        return _OTHER_NUMBER.search(rest) is None
    except Exception:  # pragma: no cover
        return False


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render_box(box: Sequence[float], fmt: BoxFormat = "qwen") -> str:
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
