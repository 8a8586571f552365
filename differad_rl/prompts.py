"""The method's text: the reasoning system prompt, the instruction pool and the format hint of each prompt family.

Training (docs/method.md §1) uses the R1-style system prompt, the reference image first, the target second
and an instruction drawn from :data:`INSTRUCTIONS`. Evaluation (docs/method.md §8) gives every model the
same instruction; only the output-format constraint (:data:`FORMAT_HINTS`) changes per prompt family.

Vocabulary: a *prompt family* (:data:`PromptFamily`, the ``prompt_family=`` of the prompts and of every reward)
names the answer format a prompt asks for (``"reasoning"``, ``"qwen"``, ``"internvl"``...). The *model
family* (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``; the evaluation's ``family``, also ``internvl``...,
``pixel``) names the model that writes the boxes and so their coordinate space; it is simply ``family``
in loading, predict and evaluation (and in the predictions JSONL).
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


PROMPT_BOX_FORMATS: dict[PromptFamily, BoxFormat] = {
    "qwen": "qwen",
    "reasoning": "qwen",
    "internvl": "internvl",
    "minicpm": "minicpm",
    "mantis": "bracket",
    "mplug_owl3": "bracket",
    "cogvlm": "cogvlm",
}
"""The box format (:data:`differad_rl.parsing.BOX_FORMATS`) each prompt family's hint asks for.

The training rewards parse, and the format reward accepts, exactly this format of the prompt family
the model is prompted with (``prompt_family=`` of the reward factories; the Qwen pair ``(x1,y1),(x2,y2)`` may sit
inside ``<|box_start|>…<|box_end|>``). Evaluation stays lenient (``fmt=None``: every format)."""


def box_format(prompt_family: str | None) -> BoxFormat | None:
    """The box format of ``prompt_family`` (:data:`PROMPT_BOX_FORMATS`); ``None`` → ``None`` (any format).

    Raises:
        ValueError: unknown ``prompt_family``.
    """
    if prompt_family is None:
        return None
    if prompt_family not in PROMPT_BOX_FORMATS:
        raise ValueError(f"prompt_family={prompt_family!r} is not known; "
                         f"expected None (any format) or one of {tuple(PROMPT_BOX_FORMATS)}")
    return PROMPT_BOX_FORMATS[prompt_family]


def build_prompt(prompt_family: str = "reasoning", rng: random.Random | int | None = None) -> str:
    """The user text of one sample: an instruction plus the prompt family's format hint.

    Args:
        prompt_family: a key of :data:`FORMAT_HINTS` (``"reasoning"`` for the method's training format).
        rng: ``None`` takes the first instruction (evaluation: the same for every model); a
            ``random.Random`` or an int seed draws one from the pool (training, as in the paper).

    Raises:
        ValueError: unknown ``prompt_family``.
    """
    if prompt_family not in FORMAT_HINTS:
        raise ValueError(f"prompt_family={prompt_family!r} is not known; expected one of {tuple(FORMAT_HINTS)}")
    if rng is None:
        instruction = INSTRUCTIONS[0]
    else:
        r = rng if isinstance(rng, random.Random) else random.Random(rng)
        instruction = r.choice(INSTRUCTIONS)
    return f"{instruction} {FORMAT_HINTS[prompt_family]}"
