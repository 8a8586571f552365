"""The demo pairs as tensors for the stand-in policy.

``build_demo_pairs`` (package) writes reference/target PNGs and a pairs JSONL; here they are read
once, resized to ``res`` × ``res`` and stacked as 9 channels (reference RGB, target RGB,
|target − reference| RGB, in [0, 1]). Ground truth stays in original target pixels: the largest box
of a record (records sort boxes largest first) or the zero box for a normal target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from differad_rl.data import build_demo_pairs, load_pairs


@dataclass
class PairTensors:
    """One split of pairs: ``images`` (N, 9, res, res) float32, ``gt`` (N, 4) float32 pixels,
    ``width``/``height`` (N,) float32, ``normal`` (N,) bool, ``category`` list of N str,
    ``gt_boxes`` every box of every sample (list of N box lists; ``[]`` = normal) for evaluation.
    ``gt`` is the largest box (the single-box training target) or the zero box."""

    images: torch.Tensor
    gt: torch.Tensor
    width: torch.Tensor
    height: torch.Tensor
    normal: torch.Tensor
    category: list[str]
    gt_boxes: list[list[list[float]]]

    def __len__(self) -> int:
        return self.images.shape[0]


def _read(path: str, res: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB").resize((res, res), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0


def pairs_to_tensors(records, res: int = 64) -> PairTensors:
    """Load the images of ``records`` (``PairRecord`` list) into a :class:`PairTensors`."""
    if not records:
        raise ValueError("records must not be empty")
    imgs = np.empty((len(records), 9, res, res), dtype=np.float32)
    for i, r in enumerate(records):  # image decoding: I/O, not a hot path
        ref = _read(r.reference, res)
        tgt = _read(r.target, res)
        imgs[i] = np.concatenate([ref, tgt, np.abs(tgt - ref)], axis=2).transpose(2, 0, 1)
    gt = torch.tensor([list(r.box) for r in records], dtype=torch.float32)
    return PairTensors(
        images=torch.from_numpy(imgs),
        gt=gt,
        width=torch.tensor([r.width for r in records], dtype=torch.float32),
        height=torch.tensor([r.height for r in records], dtype=torch.float32),
        normal=torch.tensor([r.is_normal for r in records], dtype=torch.bool),
        category=[r.category for r in records],
        gt_boxes=[[list(map(float, b)) for b in r.boxes] for r in records],
    )


def load_demo_splits(
    data_dir: str, n_pairs: int, size: int, seed: int, res: int = 64
) -> tuple[PairTensors, PairTensors, str]:
    """Build (or reuse) the demo pairs in ``data_dir`` and return ``(train, test, jsonl_path)``.

    The builder's ``split`` field decides; every split other than ``"train"`` is held out.
    """
    os.makedirs(data_dir, exist_ok=True)
    path = build_demo_pairs(data_dir, n_pairs=n_pairs, size=size, seed=seed)
    records = load_pairs(path)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split != "train"]
    if not train or not test:
        raise ValueError(f"demo pairs in {path} need a train and a held-out split, got {len(train)}/{len(test)}")
    return pairs_to_tensors(train, res), pairs_to_tensors(test, res), str(path)
