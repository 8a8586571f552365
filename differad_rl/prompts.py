"""The method's text: the reasoning system prompt, the instruction pool and per-family format hints.

Training (docs/method.md §1) uses the R1-style system prompt, the reference image first, the target second
and an instruction drawn from :data:`INSTRUCTIONS`. Evaluation (docs/method.md §8) gives every model the
same instruction; only the output-format constraint (:data:`FORMAT_HINTS`) changes per family.
"""

from __future__ import annotations

import random
from typing import Literal

from differad_rl.parsing import BoxFormat

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>"
    "<answer> answer here </answer>"
)

INSTRUCTIONS: tuple[str, ...] = (
    "The first image is a normal reference sample and the second image is the target to inspect. "
    "Find the region where the target differs from the reference and give its bounding box.",
    "Compare the two images: the first is defect-free, the second may contain an anomaly. "
    "Locate the anomalous region in the second image with a bounding box.",
    "Image 1 shows a good product, image 2 shows the product under inspection. "
    "Where is the defect in image 2? Answer with its bounding box.",
    "Spot the difference between the reference (first image) and the target (second image) "
    "and output the bounding box of the differing region in the target.",
    "Using the first image as a normal template, detect and localize any anomaly in the second image.",
    "The second image may have a defect that the first image does not. Output the box around it.",
)

NORMAL_HINT = "If the target has no anomaly, answer the zero box."

PromptFamily = Literal["qwen", "reasoning", "internvl", "minicpm", "mantis", "mplug_owl3", "cogvlm"]

FORMAT_HINTS: dict[PromptFamily, str] = {
    "qwen": "Answer with the box as (x1,y1),(x2,y2); answer (0,0),(0,0) if there is no anomaly.",
    "reasoning": (
        "Think inside <think> </think>, then give only the box inside <answer> </answer> as "
        "(x1,y1),(x2,y2); answer (0,0),(0,0) if there is no anomaly."
    ),
    "internvl": "Answer with the box as <box>[[x1, y1, x2, y2]]</box>; answer <box>[[0, 0, 0, 0]]</box> if there is no anomaly.",
    "minicpm": "Answer with the box as <box>x1 y1 x2 y2</box>; answer <box>0 0 0 0</box> if there is no anomaly.",
    "mantis": "Answer with the box as [x1, y1, x2, y2]; answer [0, 0, 0, 0] if there is no anomaly.",
    "mplug_owl3": "Answer with the box as [x1, y1, x2, y2]; answer [0, 0, 0, 0] if there is no anomaly.",
    "cogvlm": "Answer with the box as [[x0,y0,x1,y1]]; answer [[0,0,0,0]] if there is no anomaly.",
}


FAMILY_BOX_FORMATS: dict[PromptFamily, BoxFormat] = {
    "qwen": "qwen",
    "reasoning": "qwen",
    "internvl": "internvl",
    "minicpm": "minicpm",
    "mantis": "bracket",
    "mplug_owl3": "bracket",
    "cogvlm": "cogvlm",
}
"""The box format (:data:`differad_rl.parsing.BOX_FORMATS`) each family's hint asks for.

The training rewards parse, and the format reward accepts, exactly this format of the family the
model is prompted with (``family=`` of the reward factories; the Qwen pair ``(x1,y1),(x2,y2)`` may sit
inside ``<|box_start|>…<|box_end|>``). Evaluation stays lenient (``fmt=None``: every format)."""


def box_format(family: str | None) -> BoxFormat | None:
    """The box format of ``family`` (:data:`FAMILY_BOX_FORMATS`); ``None`` → ``None`` (any format).

    Raises:
        ValueError: unknown ``family``.
    """
    if family is None:
        return None
    if family not in FAMILY_BOX_FORMATS:
        raise ValueError(f"family={family!r} is not known; expected None (any format) or one of {tuple(FAMILY_BOX_FORMATS)}")
    return FAMILY_BOX_FORMATS[family]


def build_prompt(family: str = "reasoning", rng: random.Random | int | None = None) -> str:
    """The user text of one sample: an instruction plus the family's format hint.

    Args:
        family: a key of :data:`FORMAT_HINTS` (``"reasoning"`` for the method's training format).
        rng: ``None`` takes the first instruction (evaluation: the same for every model); a
            ``random.Random`` or an int seed draws one from the pool (training, as in the paper).

    Raises:
        ValueError: unknown ``family``.
    """
    if family not in FORMAT_HINTS:
        raise ValueError(f"family={family!r} is not known; expected one of {tuple(FORMAT_HINTS)}")
    if rng is None:
        instruction = INSTRUCTIONS[0]
    else:
        r = rng if isinstance(rng, random.Random) else random.Random(rng)
        instruction = r.choice(INSTRUCTIONS)
    return f"{instruction} {FORMAT_HINTS[family]}"
