#!/usr/bin/env python
"""A diagnostic ladder for the tiny learner Qwen-VL: which step of the task does it fail at?

Each rung is a short from-scratch SFT run (fp32, TRL ``SFTTrainer`` through ``sft_cold_start.run_sft``,
completion-only loss) on pairs of one kind, scored GREEDILY with the evaluation protocol (the
``differad-rl predict`` prompt and code, ``evaluate_records``) on held-out pairs of the same kind drawn
from seeds the run never trained on, beside the constant predictors:

- R1 ``r1``: one image — a single high-contrast square on a plain background (a random colour); the
  reference is the same all-black image for every pair, so everything is in the target. Can the
  architecture read a position out of its visual tokens and write it as coordinates?
- R2 ``r2``: a pair — the same plain background in both images, the square in the target only.
- R3 ``r3``: R2 on the demo set's photographic backgrounds (``skimage.data`` windows), no shift,
  lighting or noise changes.
- R4 ``r4``: the demo set as the main job uses it (``sft_cold_start.LEARNER_DEMO``; held out = its
  ``test`` split, pairs whose seeds ``[seed, i]`` are never trained on). ``--nuisance`` and
  ``--normal-fraction`` split it into its factors (the same windows and defects with the shift, the lighting
  and noise, or the normal pairs taken away); ``--defect-kinds`` keeps some of the four defect kinds.

A rung passes when the held-out mIoU beats the best constant predictor (zero box, training mean box,
best constant box fitted on the training pairs) by at least 0.1.

Levers (one change at a time): ``--square`` (defect size in pixels, i.e. visual tokens per defect),
``--image-size`` (tokens per image), ``--feed-size`` (the same
images fed larger: more tokens per defect), ``--answer`` (``centre``: the shipped answer with the centre in
``<think>``; ``bare``: no centre), ``--hidden/--layers/--vision-hidden/--vision-depth`` (width, depth),
``--lr``, ``--steps``, ``--schedule``, ``--init`` (curriculum: start from an earlier rung's checkpoint).

    OMP_NUM_THREADS=1 python examples/ladder/ladder.py --rung r1 --name r1_base

writes ``examples/ladder/results/<name>/{results.json,answers.png,comparison.md}`` (data, model and
predictions under ``runs/ladder/<name>/``, not committed). An existing result is never overwritten
(``--force`` does; ``--smoke`` writes under ``runs/ladder/smoke`` only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trl"))  # sft_cold_start: the project's SFT recipe

import sft_cold_start

from differad_rl.data.atomic import atomic_write_bytes, atomic_write_text
from differad_rl.data.demo import NO_GEOMETRIC_NUISANCE, NO_PHOTOMETRIC_NUISANCE
from differad_rl.data.records import PairRecord, load_pairs, write_pairs

RUNGS = ("r1", "r2", "r3", "r4")
PASS_MARGIN = 0.1


# ------------------------------------------------------------------------------- data
def _png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), mode="RGB").save(path)


def _photo_window(rng: np.random.Generator, size: int, category: str) -> np.ndarray:
    """A random square window of a demo category's photograph, resized to ``size`` (bilinear)."""
    from PIL import Image

    from differad_rl.data.demo import load_source_image

    src = load_source_image(category)
    h, w = src.shape[:2]
    side = int(min(h, w) / rng.uniform(1.15, 2.0))  # the demo set's zoom range
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(np.round(src[y0:y0 + side, x0:x0 + side] * 255).astype(np.uint8))
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def square_pairs(out: Path, rung: str, *, n: int, seed: int, split: str, size: int,
                 square: tuple[int, int], background: str = "random") -> list[PairRecord]:
    """R1-R3 pairs: one axis-aligned high-contrast square of side ``square`` px in the target
    (``background`` of R1/R2, two factors: is the background's colour fixed, is the square's?
    ``random`` — a plain random colour, the square dark on bright and bright on dark (both vary);
    ``grey`` — always mid grey with a white square (neither varies: the square is known by its colour);
    ``dark-white`` — a random dark colour (each channel in [0, 0.6]) with a white square (the background
    varies, the square does not); ``grey-bw`` — mid grey with a square drawn like ``random``'s, near black or
    near white with a tint, each half the time (the square varies, the background does not)).

    Pair ``i`` draws from ``default_rng([seed, i])`` (train and held-out sets use different seeds)."""
    from tqdm.auto import tqdm

    from differad_rl.data.demo import DEFAULT_CATEGORIES, contrast_color

    out = out.absolute()  # write_pairs stores paths relative to the JSONL's folder
    done = out / "pairs.jsonl"
    if done.is_file():
        return load_pairs(done)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    blank = img_dir / "blank.png"
    _png(np.zeros((size, size, 3)), blank)
    records = []
    for i in tqdm(range(n), desc=f"{rung} {split} pairs", unit="pair"):
        rng = np.random.default_rng([seed, i])
        if rung == "r3":
            category = DEFAULT_CATEGORIES[i % len(DEFAULT_CATEGORIES)]
            bg = _photo_window(rng, size, category)
        else:
            category = "plain"
            colour = (np.full(3, 0.5) if background in ("grey", "grey-bw") else
                      rng.uniform(0, 0.6, size=3) if background == "dark-white" else rng.uniform(0, 1, size=3))
            bg = np.broadcast_to(colour, (size, size, 3)).copy()
        s = int(rng.integers(square[0], square[1] + 1))
        x1, y1 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
        mask = np.zeros((size, size), dtype=bool)
        mask[y1:y1 + s, x1:x1 + s] = True
        tgt = bg.copy()
        if background in ("grey", "dark-white"):
            tgt[mask] = 1.0
        elif background == "grey-bw":  # contrast_color's two modes, chosen by a coin instead of the background
            base = rng.uniform(0.0, 0.2) if rng.random() < 0.5 else rng.uniform(0.8, 1.0)
            tgt[mask] = np.clip(base + rng.uniform(-0.15, 0.15, size=3), 0.0, 1.0)
        else:
            tgt[mask] = contrast_color(bg, mask, rng)
        ref_path, tgt_path = img_dir / f"{i:05d}_ref.png", img_dir / f"{i:05d}_tgt.png"
        if rung != "r1":
            _png(bg, ref_path)
        _png(tgt, tgt_path)
        records.append(PairRecord(id=f"{category}/square/{i:05d}", reference=str(blank if rung == "r1" else ref_path),
                                  target=str(tgt_path), boxes=[[x1, y1, x1 + s, y1 + s]], width=size, height=size,
                                  category=category, defect="square", source=f"ladder_{rung}", split=split))
    write_pairs(records, done)
    return load_pairs(done)


def rung_data(args: argparse.Namespace, work: Path) -> tuple[list[PairRecord], list[PairRecord]]:
    """``(train, held_out)`` records of the rung."""
    if args.rung == "r4":
        demo = dict(sft_cold_start.LEARNER_DEMO, size=args.image_size, seed=args.data_seed)
        if args.n_train:
            demo["n_pairs"] = args.n_train + args.n_test
            demo["test_fraction"] = args.n_test / demo["n_pairs"]
        tag = ""
        if args.nuisance in ("none", "photometric"):  # R4 split into its factors: the same windows and defects
            demo.update(NO_GEOMETRIC_NUISANCE)
        if args.nuisance in ("none", "geometric"):
            demo.update(NO_PHOTOMETRIC_NUISANCE)
        if args.nuisance != "all":
            tag += f"_{args.nuisance}"
        if args.normal_fraction is not None:
            demo["normal_fraction"] = args.normal_fraction
            tag += f"_normal{args.normal_fraction:g}"
        if args.defect_kinds:
            demo["defect_kinds"] = tuple(args.defect_kinds)
            tag += "_" + "-".join(args.defect_kinds)
        root = Path(args.data_root) / f"r4_s{demo['seed']}_n{demo['n_pairs']}_px{demo['size']}{tag}"
        train = sft_cold_start.demo_or_data(None, root, split="train", **demo)
        test = sft_cold_start.demo_or_data(None, root, split="test", **demo)
        return train, test
    sq = tuple(args.square)
    tag = f"{args.rung}_px{args.image_size}_sq{sq[0]}-{sq[1]}" + ("" if args.background == "random" else
                                                                  f"_{args.background}")
    root = Path(args.data_root)
    train = square_pairs(root / f"{tag}_train_s{args.data_seed}_n{args.n_train}", args.rung, n=args.n_train,
                         seed=args.data_seed, split="train", size=args.image_size, square=sq,
                         background=args.background)
    test = square_pairs(root / f"{tag}_test_s{args.data_seed + 1000}_n{args.n_test}", args.rung, n=args.n_test,
                        seed=args.data_seed + 1000, split="test", size=args.image_size, square=sq,
                        background=args.background)
    return train, test


# ------------------------------------------------------------------------------- answers
def bare_answer_text(record: PairRecord, spec: Any) -> str:
    """The shipped answer without the centre in ``<think>`` (the box digits must come from the images)."""
    text = _SHIPPED_ANSWER(record, spec)
    return "<think>No difference.</think>" + text.split("</think>", 1)[1] if record.is_normal else (
        "<think>A difference.</think>" + text.split("</think>", 1)[1])


_SHIPPED_ANSWER = sft_cold_start.answer_text


# ------------------------------------------------------------------------------- constants
def best_constant_box(train: list[PairRecord], max_candidates: int = 400) -> np.ndarray:
    """The relative box (``(4,)``, [0, 1]) with the best mean IoU on ``train`` among the zero box, the
    mean box, the median box and up to ``max_candidates`` training boxes (the protocol's IoU)."""
    from differad_rl.eval.metrics import sample_ious

    scale = np.array([[r.width, r.height, r.width, r.height] for r in train], dtype=np.float64)
    rel = np.array([r.box for r in train], dtype=np.float64) / scale
    anomalous = rel[[not r.is_normal for r in train]]
    cands = [np.zeros(4), anomalous.mean(axis=0), np.median(anomalous, axis=0)]
    pick = np.random.default_rng(0).permutation(len(anomalous))[:max_candidates]
    cands += list(anomalous[pick])
    gts = [r.boxes for r in train]
    scores = [sample_ious(np.broadcast_to(c, scale.shape) * scale, None, gts).mean() for c in cands]
    return np.asarray(cands[int(np.argmax(scores))], dtype=np.float64)


def constant_results(train: list[PairRecord], test: list[PairRecord]) -> dict[str, Any]:
    from differad_rl.eval.comparison import constant_predictions
    from differad_rl.eval.protocol import EvalConfig, Predictions, evaluate_records

    pixel = EvalConfig(family="pixel")
    out = {label: evaluate_records(constant_predictions(kind, test, train), test, pixel)
           for kind, label in (("zero_box", "always zero box"), ("mean_box", "always train mean box"))}
    rel = best_constant_box(train)
    size = np.array([[r.width, r.height, r.width, r.height] for r in test], dtype=np.float64)
    n = len(test)
    out["best constant box (train fit)"] = evaluate_records(
        Predictions(ids=[r.id for r in test], outputs=[None] * n, boxes=rel[None] * size, given=np.ones(n, bool)),
        test, pixel)
    return out


# ------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, work: Path) -> str:
    """The untrained tiny Qwen3-VL of the run (``--init``: a checkpoint to continue from)."""
    if args.init:
        return args.init
    from differad_rl.integrations.qwen_vl.tiny import (
        LEARNER_ARCH,
        TinyArch,
        tiny_model_for,
    )

    arch = TinyArch(hidden_size=args.hidden or LEARNER_ARCH.hidden_size,
                    num_layers=args.layers or LEARNER_ARCH.num_layers,
                    num_heads=LEARNER_ARCH.num_heads, num_kv_heads=LEARNER_ARCH.num_kv_heads,
                    vision_hidden_size=args.vision_hidden or LEARNER_ARCH.vision_hidden_size,
                    vision_depth=args.vision_depth or LEARNER_ARCH.vision_depth,
                    vision_heads=LEARNER_ARCH.vision_heads,
                    vision_positions=args.vision_positions or LEARNER_ARCH.vision_positions)
    px = (args.feed_size or args.image_size) ** 2
    return str(tiny_model_for(sft_cold_start.LEARNER_FAMILY, cache_dir=Path(args.data_root) / "tiny_models",
                              seed=args.seed, min_pixels=px, max_pixels=px, arch=arch))


def visual_features(model: Any, processor: Any, records: list[PairRecord], tokens: str = "all",
                    batch: int = 50) -> np.ndarray:
    """``(N, F)`` features of the vision tower's output tokens (what the language model receives in place
    of the ``<|image_pad|>`` tokens). ``tokens="all"``: the target's then the reference's tokens, flattened
    (a token's slot says where it is); ``"odd"``: only the content of the target token farthest from the
    target's mean token (no slot index: is *where* in the token's content, as attention would read it?)."""
    import torch
    from PIL import Image

    feats = []
    with torch.inference_mode():
        for start in range(0, len(records), batch):
            imgs = []
            for r in records[start:start + batch]:
                imgs += [Image.open(r.target).convert("RGB"), Image.open(r.reference).convert("RGB")]
            enc = processor.image_processor(images=imgs, return_tensors="pt")
            out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
            for k in range(len(imgs) // 2):
                tgt = out[2 * k]
                if tokens == "odd":
                    feats.append(tgt[int((tgt - tgt.mean(0)).norm(dim=1).argmax())].numpy())
                else:
                    feats.append(torch.cat([tgt, out[2 * k + 1]]).flatten().numpy())
    return np.asarray(feats, dtype=np.float64)


def _ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mu) / sd
    ym = y.mean(axis=0)
    a = np.linalg.solve(z @ z.T + ridge * len(z) * np.eye(len(z)), y - ym)  # dual form (F may exceed N)
    return mu, sd, z.T @ a, ym


def _ridge_predict(fit: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mu, sd, w, ym = fit
    return ((x - mu) / sd) @ w + ym


def probe_predictions(model: Any, processor: Any, train: list[PairRecord], test: list[PairRecord],
                      tokens: str = "all", ridges: tuple[float, ...] = (0.01, 0.1, 1.0)) -> tuple[Any, float]:
    """A ridge-regression readout of the relative box from :func:`visual_features`: does the position reach
    the visual tokens? See :func:`ridge_box_predictions`."""
    xtr, xte = visual_features(model, processor, train, tokens), visual_features(model, processor, test, tokens)
    return ridge_box_predictions(xtr, train, xte, test, ridges)


def ridge_box_predictions(xtr: np.ndarray, train: list[PairRecord], xte: np.ndarray, test: list[PairRecord],
                          ridges: tuple[float, ...] = (0.01, 0.1, 1.0)) -> tuple[Any, float]:
    """A ridge-regression readout of the relative box (x1, y1, x2, y2; the zero box for a normal pair) from
    features ``xtr`` (``(len(train), F)``) and ``xte``. The ridge strength is chosen on the last fifth of
    ``train`` (never on ``test``), then refitted on all of ``train``.
    Returns ``(pixel predictions for test, chosen ridge)``."""
    from differad_rl.eval.metrics import sample_ious
    from differad_rl.eval.protocol import Predictions

    def rel(rs: list[PairRecord]) -> np.ndarray:
        return np.array([np.asarray(r.box, dtype=np.float64) / [r.width, r.height, r.width, r.height] for r in rs])

    def to_boxes(pred: np.ndarray, rs: list[PairRecord]) -> np.ndarray:
        pred = np.clip(pred, 0.0, 1.0)
        lo, hi = np.minimum(pred[:, :2], pred[:, 2:]), np.maximum(pred[:, :2], pred[:, 2:])
        size = np.array([[r.width, r.height] for r in rs], dtype=np.float64)
        return np.concatenate([lo * size, hi * size], axis=1)

    ytr = rel(train)
    cut = len(train) * 4 // 5
    val = train[cut:]
    scores = [sample_ious(to_boxes(_ridge_predict(_ridge_fit(xtr[:cut], ytr[:cut], lam), xtr[cut:]), val), None,
                          [r.boxes for r in val]).mean() for lam in ridges]
    ridge = ridges[int(np.argmax(scores))]
    boxes = to_boxes(_ridge_predict(_ridge_fit(xtr, ytr, ridge), xte), test)
    n = len(test)
    return Predictions(ids=[r.id for r in test], outputs=[None] * n, boxes=boxes, given=np.ones(n, bool)), ridge


def sincos_positions(model: Any, scale: float) -> None:
    """Overwrite the vision tower's learned position embedding (a ``g × g`` grid, interpolated to the
    image's patch grid) with a fixed-form 2-D sine/cosine code times ``scale``: half the channels code the
    row, half the column, at geometric frequencies (the ViT / MAE form). A lever on how *where* enters a
    visual token's content; the embedding stays trainable."""
    import torch

    emb = model.model.visual.pos_embed
    n, dim = emb.weight.shape
    g = round(n ** 0.5)
    quarter = dim // 4
    freq = 1.0 / (10.0 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter)))
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        ang = coord[:, None] * freq[None, :] * (torch.pi / g)
        parts += [ang.sin(), ang.cos()]
    code = torch.cat(parts, dim=1)
    code = torch.nn.functional.pad(code, (0, dim - code.shape[1]))
    with torch.no_grad():
        emb.weight.copy_((scale * code).to(emb.weight.dtype))


def contrast_patches(model: Any) -> None:
    """A diagnostic lever, not Qwen-VL's architecture: subtract each image's mean patch embedding from its
    patches (before the position code is added), so that a token's content says how its patch *differs* from
    the rest of its image. On a plain background the background's patches become 0 and the square's patch
    its contrast ``W (c_square - c_background)`` times the square's share of the patch: the background's
    colour no longer enters any token. Two forward hooks on the vision tower (they live with ``model``; a
    reloaded checkpoint needs them again)."""
    visual = model.model.visual
    sizes: list[int] = []

    def grid(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        sizes[:] = [int(v) for v in thw.prod(-1).tolist()]

    def centre(module: Any, args: tuple[Any, ...], out: Any) -> Any:
        import torch

        return torch.cat([part - part.mean(0, keepdim=True) for part in out.split(sizes)])

    visual.register_forward_pre_hook(grid, with_kwargs=True)
    visual.patch_embed.register_forward_hook(centre)


def pretrain_tower(model: Any, processor: Any, train: list[PairRecord], test: list[PairRecord], *, steps: int,
                   batch: int = 32, lr: float = 1e-3, seed: int = 0, pairs: bool | str = False) -> dict[str, Any]:
    """A lever on the vision side: train the vision tower, before SFT, to make the square findable and its
    position readable by *one attention head*, which is what the language model must do with it. On each
    target image's visual tokens ``T`` (``n × d``) a throw-away head reads ``v = softmax(T W_k q / √d)ᵀ T W_v``
    and predicts the relative box ``sigmoid(W_o v)``; tower and head are trained with AdamW on the L1 box
    error over the training pairs' targets (``steps`` steps of ``batch`` images). The head is then dropped;
    the tower keeps its weights for SFT. Returns the head's held-out mIoU (the protocol's, pixel boxes): can the
    tower, given a direct signal, put the square's position where one head can read it?

    ``pairs="slot"`` (or ``True``): the head compares the two images slot by slot, ``T ← T + R W_r`` (``R`` the
    reference's tokens at the same slots; ``W_r`` can learn ``-I``, i.e. a difference), for rungs whose defect is
    defined only against the reference. ``pairs="match"``: each target token is compared with its best-matching
    reference tokens instead, ``T ← T + softmax(T W_m (R W_m)ᵀ / √d) R W_r`` (robust to a shift between the two)."""
    import torch
    from PIL import Image

    from differad_rl.eval.protocol import EvalConfig, Predictions, evaluate_records

    def encode(rs: list[PairRecord]) -> tuple[list[Any], list[Any]]:
        """Per record, the target's (``pairs``: the target's then the reference's) patches and grid rows."""
        paths = [q for r in rs for q in ((r.target, r.reference) if pairs else (r.target,))]
        enc = processor.image_processor(images=[Image.open(q).convert("RGB") for q in paths], return_tensors="pt")
        grid = enc["image_grid_thw"]
        px = enc["pixel_values"].split(grid.prod(-1).tolist())
        per = 2 if pairs else 1
        return ([torch.cat(px[per * i:per * i + per]) for i in range(len(rs))],
                [grid[per * i:per * i + per] for i in range(len(rs))])

    def rel(rs: list[PairRecord]) -> Any:
        return torch.tensor(np.array([np.asarray(r.box, dtype=np.float64) / np.tile([r.width, r.height], 2)
                                      for r in rs]), dtype=torch.float32)

    visual = model.model.visual
    dim = int(model.config.text_config.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.ModuleDict({"k": torch.nn.Linear(dim, dim), "v": torch.nn.Linear(dim, dim),
                                "o": torch.nn.Linear(dim, 4), "r": torch.nn.Linear(dim, dim, bias=False),
                                "m": torch.nn.Linear(dim, dim, bias=False)})
    query = torch.nn.Parameter(torch.randn(dim, generator=gen) / dim ** 0.5)
    params = [*visual.parameters(), *head.parameters(), query]
    opt = torch.optim.AdamW(params, lr=lr)
    y_tr = rel(train)

    def predict(px: list[Any], grid: list[Any]) -> Any:
        toks = model.model.get_image_features(torch.cat(px), torch.cat(grid)).pooler_output
        if pairs:  # target, reference, target, reference, ...
            compared = []
            for t, r in zip(toks[0::2], toks[1::2]):
                if pairs == "match":
                    r = torch.softmax(head["m"](t) @ head["m"](r).T / dim ** 0.5, dim=-1) @ r
                compared.append(t + head["r"](r))
            toks = compared
        out = []
        for t in toks:
            a = torch.softmax(head["k"](t) @ query / dim ** 0.5, dim=0)
            out.append(torch.sigmoid(head["o"](a @ head["v"](t))))
        return torch.stack(out)

    model.train()
    from tqdm.auto import trange

    losses = []
    for _ in trange(steps, desc="tower pretraining", unit="step"):
        idx = torch.randint(len(train), (batch,), generator=gen).tolist()
        loss = (predict(*encode([train[i] for i in idx])) - y_tr[idx]).abs().mean()  # encoded per batch: ~0 memory
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        px_te, grid_te = encode(test)
        pred = predict(px_te, grid_te).double().numpy()
    lo, hi = np.minimum(pred[:, :2], pred[:, 2:]), np.maximum(pred[:, :2], pred[:, 2:])
    size = np.array([[r.width, r.height] for r in test], dtype=np.float64)
    n = len(test)
    boxes = np.concatenate([lo * size, hi * size], axis=1)
    res = evaluate_records(Predictions(ids=[r.id for r in test], outputs=[None] * n, boxes=boxes,
                                       given=np.ones(n, bool)), test, EvalConfig(family="pixel"))
    return {"head_miou": float(res.metrics["overall"]["miou"]), "loss_first": losses[0], "loss_last": losses[-1],
            "steps": steps, "batch": batch, "lr": lr}


def square_cells(record: PairRecord, rows: int, cols: int) -> np.ndarray:
    """``(rows * cols,)`` bool, raster order: which of the target's visual tokens (a ``rows × cols`` grid over
    the image) overlap the record's box."""
    x1, y1, x2, y2 = np.asarray(record.box, dtype=np.float64) / np.tile([record.width, record.height], 2)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return (c / cols < x2) & ((c + 1) / cols > x1) & (r / rows < y2) & ((r + 1) / rows > y1)


def teacher_forced(model: Any, processor: Any, records: list[PairRecord], **outputs: bool) -> Iterator[
        tuple[PairRecord, Any, list[int], Any]]:
    """For each record: the protocol's prompt plus the shipped answer, one forward pass (``outputs``: e.g.
    ``output_attentions=True``). Yields ``(record, processor inputs, digit positions, model outputs)``; the digit
    positions are the query positions whose *next* token is a digit of the answer."""
    import torch
    from PIL import Image

    from differad_rl.integrations.qwen_vl.predict import PredictConfig, protocol_messages
    from differad_rl.integrations.trl import coordinate_spec

    spec = coordinate_spec(processor)
    tok = processor.tokenizer
    digits = {i for i in range(len(tok)) if tok.decode([i]).strip().isdigit()}
    prompt = processor.apply_chat_template(protocol_messages(PredictConfig().prompt), tokenize=False,
                                           add_generation_prompt=True)
    model.eval()
    with torch.inference_mode():
        for r in records:
            imgs = [Image.open(r.reference).convert("RGB"), Image.open(r.target).convert("RGB")]
            n_prompt = processor(text=[prompt], images=imgs, return_tensors="pt")["input_ids"].shape[1]
            enc = processor(text=[prompt + sft_cold_start.answer_text(r, spec)], images=imgs, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            qs = [q for q in range(n_prompt - 1, len(ids) - 1) if ids[q + 1] in digits]
            yield r, enc, qs, model(**enc.to(model.device), **outputs)


def square_attention(model: Any, processor: Any, records: list[PairRecord]) -> dict[str, Any]:
    """Where the language model looks when it writes a coordinate digit (:func:`teacher_forced`, eager
    attention): for every digit position, each layer's and head's attention over the *target's* visual
    tokens is split into the share on the tokens that overlap the square and the rest.

    Returns ``share[l][h]`` (mean over records and digit positions of square-token mass / target-token
    mass), ``chance`` (the mean fraction of target tokens that overlap the square: what a head that
    ignores content gets), ``target_mass[l][h]`` (mass on the target's tokens at all), the best
    ``(layer, head)`` by share (both from 0; the README and pictures count layers from 1), and ``maps``
    (``(N, rows, cols)`` of that head, for the picture)."""
    import torch

    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = int(processor.image_processor.merge_size)
    model.set_attn_implementation("eager")
    shares, masses, chances, per_head_maps = [], [], [], []
    for r, enc, qs, out in teacher_forced(model, processor, records, output_attentions=True):
        vis = (enc["input_ids"][0] == pad_id).nonzero()[:, 0]
        tgt = vis[len(vis) // 2:]
        _, gh, gw = (int(v) for v in enc["image_grid_thw"][1])
        rows, cols = gh // merge, gw // merge
        on = torch.from_numpy(square_cells(r, rows, cols))
        a = torch.stack([layer[0][:, qs][:, :, tgt] for layer in out.attentions]).double().cpu()  # (L, H, Q, tokens)
        mass = a.sum(-1)
        shares.append((a[..., on].sum(-1) / mass.clamp_min(1e-12)).mean(-1).numpy())
        masses.append(mass.mean(-1).numpy())
        chances.append(float(on.double().mean()))
        per_head_maps.append((a / mass[..., None].clamp_min(1e-12)).mean(2).reshape(*a.shape[:2], rows, cols).numpy())
    share = np.mean(shares, axis=0)
    layer, head = (int(v) for v in np.unravel_index(int(np.argmax(share)), share.shape))
    return {"share": share.tolist(), "target_mass": np.mean(masses, axis=0).tolist(),
            "chance": float(np.mean(chances)), "best": [layer, head], "best_share": float(share[layer, head]),
            "maps": np.stack([m[layer, head] for m in per_head_maps])}


def digit_hidden_states(model: Any, processor: Any, records: list[PairRecord]) -> np.ndarray:
    """``(N, layers + 1, hidden)``: the language model's residual stream (embeddings, then every layer's
    output) at the position that predicts the answer's *first* digit (the centre's x in the shipped answer),
    teacher-forced (:func:`teacher_forced`): nothing of the answer's digits is in context yet, so whatever a
    linear readout finds there was read from the images."""
    import torch

    return np.asarray([torch.stack([h[0, qs[0]] for h in out.hidden_states]).double().cpu().numpy()
                       for _, _, qs, out in teacher_forced(model, processor, records, output_hidden_states=True)])


def hidden_probe(model: Any, processor: Any, train: list[PairRecord], test: list[PairRecord]) -> list[float]:
    """Held-out mIoU of a ridge readout of the box from :func:`digit_hidden_states`, one per layer
    (0 = the embeddings): where along the language model the square's position is (still) there."""
    from differad_rl.eval.protocol import EvalConfig, evaluate_records

    htr, hte = digit_hidden_states(model, processor, train), digit_hidden_states(model, processor, test)
    return [float(evaluate_records(ridge_box_predictions(htr[:, layer], train, hte[:, layer], test)[0], test,
                                   EvalConfig(family="pixel")).metrics["overall"]["miou"])
            for layer in range(htr.shape[1])]


def miou_by_defect(ious: Any, records: list[PairRecord]) -> dict[str, float]:
    """Held-out mIoU per defect kind (``good`` = the normal pairs, scored 1 for an empty answer)."""
    kinds = np.array([r.defect or "unknown" for r in records])
    ious = np.asarray(ious, dtype=np.float64)
    return {str(k): float(ious[kinds == k].mean()) for k in sorted(set(kinds))}


def attention_png(records: list[PairRecord], att: dict[str, Any], path: Path, title: str, k: int = 6) -> None:
    """The first ``k`` held-out targets (top row) above the best head's attention over their visual tokens at
    the digit positions (bottom row, one cell a token, 0 black to 1 white); the square in green on both."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    fig = Figure(figsize=(1.7 * k, 3.9))
    for j, r in enumerate(records[:k]):
        x1, y1, x2, y2 = r.box
        for row, img in enumerate((np.asarray(Image.open(r.target).convert("RGB")), att["maps"][j])):
            ax = fig.add_subplot(2, k, row * k + j + 1)
            ax.imshow(img, extent=(0, r.width, r.height, 0), cmap="gray" if row else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.5))
            ax.set_xticks([]), ax.set_yticks([])
            if row:
                on = float(att["maps"][j].ravel()[square_cells(r, *att["maps"][j].shape)].sum())
                ax.set_title(f"{on:.2f} on the square", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(path, buf.getvalue())


def answers_png(result: Any, path: Path, title: str, k: int = 8) -> None:
    """The first ``k`` held-out targets with the ground truth (green) and the greedy answer (red)."""
    from matplotlib.figure import Figure

    from differad_rl.eval.report import draw_case

    fig = Figure(figsize=(2.0 * k / 2, 4.6))
    for j in range(min(k, len(result.ids))):
        draw_case(fig.add_subplot(2, k // 2, j + 1), result, j)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------- run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rung", choices=RUNGS)
    p.add_argument("--name", help="results folder name under examples/ladder/results/")
    p.add_argument("--table", action="store_true", help="print the Markdown table of every committed result and exit")
    p.add_argument("--steps", type=int, default=600, help="SFT steps (batch --batch-size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--schedule", default="cosine", help="transformers lr scheduler (cosine, constant, ...)")
    p.add_argument("--answer", default="centre", choices=("centre", "bare"),
                   help="centre: the shipped answer (centre in <think>); bare: no centre in <think>")
    p.add_argument("--n-train", type=int, default=1000, help="training pairs (r4: 0 = LEARNER_DEMO's 2,000)")
    p.add_argument("--n-test", type=int, default=100, help="held-out pairs")
    p.add_argument("--image-size", type=int, default=128, help="px; fed as is (32 px a visual token)")
    p.add_argument("--feed-size", type=int, default=0,
                   help="px the processor resizes every image to (0 = --image-size): more visual tokens per defect")
    p.add_argument("--square", type=int, nargs=2, default=(16, 40), metavar=("MIN", "MAX"),
                   help="side of the square in px (r1-r3)")
    p.add_argument("--background", default="random", choices=("random", "grey", "dark-white", "grey-bw"),
                   help="r1/r2: a random plain colour with a dark or bright square (default); mid grey with a white "
                        "square; a random dark colour with a white square; mid grey with a dark or bright square")
    p.add_argument("--nuisance", default="all", choices=("all", "geometric", "photometric", "none"),
                   help="r4: which of the demo set's nuisances the pairs keep (the target's shift, rotation and scale; "
                        "its lighting, contrast, gamma, blur and both images' noise); none = the two images are equal "
                        "outside the defects")
    p.add_argument("--normal-fraction", type=float, default=None,
                   help="r4: share of normal pairs (default: LEARNER_DEMO's 0.25)")
    p.add_argument("--defect-kinds", nargs="+", default=None, choices=("scratch", "stain", "texture", "hole"),
                   help="r4: draw only these defect kinds (default: all four)")
    p.add_argument("--hidden", type=int, default=0, help="text width (0 = LEARNER_ARCH)")
    p.add_argument("--layers", type=int, default=0, help="text depth (0 = LEARNER_ARCH)")
    p.add_argument("--vision-hidden", type=int, default=0, help="vision width (0 = LEARNER_ARCH)")
    p.add_argument("--vision-depth", type=int, default=0, help="vision depth (0 = LEARNER_ARCH)")
    p.add_argument("--vision-positions", type=int, default=0, help="learned position grid cells (0 = LEARNER_ARCH)")
    p.add_argument("--pos-init", default="learned", choices=("learned", "sincos"),
                   help="vision position embedding at the start: the build's random init, or a 2-D sin/cos code")
    p.add_argument("--pos-scale", type=float, default=1.0, help="--pos-init sincos: amplitude of the code")
    p.add_argument("--patch-contrast", action="store_true",
                   help="diagnostic lever: subtract each image's mean patch embedding (contrast_patches)")
    p.add_argument("--tower-pretrain", type=int, default=0, metavar="STEPS",
                   help="lever: first train the vision tower through a one-head attention readout of the box "
                        "(pretrain_tower) for STEPS steps, then SFT as usual")
    p.add_argument("--tower-pairs", nargs="?", const="slot", default="", choices=("", "slot", "match"),
                   help="--tower-pretrain: the readout compares target and reference tokens slot by slot (slot, the "
                        "flag alone) or each target token with its best-matching reference tokens (match)")
    p.add_argument("--init", default=None, help="start from this checkpoint (curriculum) instead of a fresh build")
    p.add_argument("--probe", action="store_true",
                   help="no SFT: fit a ridge readout of the box from the (untrained or --init) visual tokens")
    p.add_argument("--probe-tokens", default="all", choices=("all", "odd"),
                   help="--probe: all tokens by slot, or the content of the odd target token alone")
    p.add_argument("--attention", action="store_true",
                   help="no SFT: where the trained run --name (its checkpoint under runs/ladder/work/) looks when it "
                        "writes a digit, and a ridge readout of the box from each layer's hidden state before the "
                        "first digit; writes results/<name>/attention.{json,png} beside its results.json")
    p.add_argument("--probe-train", type=int, default=500,
                   help="--attention: training pairs the hidden-state readout is fitted on")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where SFT runs (fp32 either way; the figures committed here are all from the CPU)")
    p.add_argument("--seed", type=int, default=0, help="model init + SFT seed")
    p.add_argument("--data-seed", type=int, default=0, help="training pairs' seed (held out: +1000; r4: the demo seed)")
    p.add_argument("--data-root", default="runs/ladder/data")
    p.add_argument("--smoke", action="store_true", help="a few steps; results under runs/ladder/smoke only")
    p.add_argument("--force", action="store_true", help="overwrite an existing committed result")
    args = p.parse_args(argv)
    if not args.table and (args.rung is None or args.name is None):
        p.error("--rung and --name are required (or --table)")
    return args


def ladder_runs(root: Path = HERE / "results") -> Iterator[dict[str, Any]]:
    """The ``results.json`` of every committed ladder run under ``root``, sorted by name (other studies' folders
    beside them, e.g. ``defect_signal``, have no ``rung`` and are skipped)."""
    for path in sorted(root.glob("*/results.json")):
        r = json.loads(path.read_text())
        if "rung" in r:
            yield r


def results_table(root: Path = HERE / "results") -> str:
    """One Markdown row per committed result (SFT runs and probes), sorted by name."""
    head = ("| run | rung | what (changes from the defaults) | held-out mIoU | Acc@0.3 | unparsable | distinct answers | best constant | "
            "margin | passes |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    defaults = vars(parse_args(["--table"]))
    skip = {"rung", "name", "table", "probe", "probe_tokens", "probe_train", "attention", "device", "force", "smoke", "data_root"}

    def changes(cmd: str) -> str:
        given = vars(parse_args(cmd.split("ladder.py", 1)[1].split()))
        diff = [f"{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                for k, v in given.items() if k not in skip and v != defaults[k]
                and not (isinstance(v, (list, tuple)) and isinstance(defaults[k], (list, tuple))
                         and list(v) == list(defaults[k]))]
        return ", ".join(diff) or "–"

    rows = []
    for r in ladder_runs(root):
        if r.get("probe"):
            rows.append(f"| {r['name']} | {r['rung']} | probe ({r['probe']} tokens); {changes(r['command'])} | "
                        f"{r['probe_miou']:.3f} | "
                        f"{r['probe_acc']:.3f} | – | – | {r['best_constant_miou']:.3f} | {r['margin']:+.3f} | "
                        f"{'yes' if r['margin'] >= PASS_MARGIN else 'no'} |")
        else:
            m = r["model"]
            best = max(c["miou"] for c in r["constants"])
            rows.append(f"| {r['name']} | {r['rung']} | SFT; {changes(r['command'])} | {m['miou']:.3f} | "
                        f"{m['acc']:.3f} | {m['invalid_rate']:.2f} | {r['distinct_answers']} | {best:.3f} | "
                        f"{r['margin']:+.3f} | {'yes' if r['passes'] else 'no'} |")
    return head + "\n".join(rows) + "\n"


def attention_table(root: Path = HERE / "results") -> str:
    """One Markdown row per run with an ``attention.json`` (``--attention``): the greedy figure beside where
    the best head looks and what each layer's hidden state holds before the first digit."""
    head = ("| run | held-out mIoU (greedy) | margin | best head | its target attention on the square | "
            "chance | hidden-state readout mIoU, layers 1→last | best constant |\n"
            "|---|---:|---:|---|---:|---:|---|---:|\n")
    rows = []
    for path in sorted(root.glob("*/attention.json")):
        a = json.loads(path.read_text())
        r = json.loads((path.parent / "results.json").read_text())
        probe = " / ".join(f"{v:.2f}" for v in a["hidden_probe_miou"][1:])
        rows.append(f"| {a['name']} | {r['model']['miou']:.3f} | {r['margin']:+.3f} | layer {a['best'][0] + 1}, head {a['best'][1]} | "
                    f"{a['best_share']:.2f} | {a['chance']:.2f} | {probe} | {a['best_constant_miou']:.3f} |")
    return head + "\n".join(rows) + "\n"


def tower_table(root: Path = HERE / "results") -> str:
    """One Markdown row per run with ``--tower-pretrain``: the head's own figure beside the greedy one."""
    head = ("| run | rung | seed | tower readout | head alone (held-out mIoU) | held-out mIoU (greedy) | best constant | "
            "margin | distinct answers | passes |\n|---|---|---:|---|---:|---:|---:|---:|---:|---|\n")
    rows = []
    for r in ladder_runs(root):
        if "tower_pretrain" not in r:
            continue
        t, c = r["tower_pretrain"], r["config"]
        best = max(k["miou"] for k in r["constants"])
        pairs = c.get("tower_pairs")
        readout = "target" if not pairs else "pairs, " + ("slot" if pairs is True else pairs)
        rows.append(f"| {r['name']} | {r['rung']} | {c['seed']} | {t['steps']} steps, {readout} | "
                    f"{t['head_miou']:.3f} | {r['model']['miou']:.3f} | "
                    f"{best:.3f} | {r['margin']:+.3f} | {r['distinct_answers']} | {'yes' if r['passes'] else 'no'} |")
    return head + "\n".join(rows) + "\n"


def attention_main(args: argparse.Namespace) -> int:
    """``--attention``: :func:`square_attention` of a trained run's checkpoint on its held-out pairs."""
    from differad_rl.integrations.qwen_vl.loading import load_model_and_processor

    root = Path("runs/ladder") / ("smoke" if args.smoke else "work") / args.name
    res_dir = Path("runs/ladder/smoke") / args.name if args.smoke else HERE / "results" / args.name
    ckpt = Path(args.init) if args.init else root / "checkpoint"
    if not ckpt.is_dir():
        raise SystemExit(f"--attention: no checkpoint at {ckpt}; train the run first (same --name and options)")
    if args.smoke:
        args.n_train, args.n_test = 16, 8
    train, test = rung_data(args, root)
    model, processor = load_model_and_processor(str(ckpt))
    if args.patch_contrast:
        contrast_patches(model)
    att = square_attention(model, processor, test)
    att["hidden_probe_miou"] = hidden_probe(model, processor, train[:args.probe_train], test)
    att["best_constant_miou"] = max(r.metrics["overall"]["miou"] for r in constant_results(train, test).values())
    layer, head = att["best"]
    summary = {k: v for k, v in att.items() if k != "maps"}
    summary.update(name=args.name, rung=args.rung, n_test=len(test), checkpoint=str(ckpt),
                   lift=att["best_share"] / att["chance"],
                   command="OMP_NUM_THREADS=1 python examples/ladder/ladder.py " + " ".join(sys.argv[1:]))
    res_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(res_dir / "attention.json", json.dumps(summary, indent=2) + "\n")
    attention_png(test, att, res_dir / "attention.png",
                  f"{args.name}: layer {layer + 1} head {head} at the digits, {att['best_share']:.2f} of its target "
                  f"attention on the square (chance {att['chance']:.2f})")
    print(json.dumps({k: summary[k] for k in ("name", "best", "best_share", "chance", "lift", "hidden_probe_miou",
                                              "best_constant_miou")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(results_table())
        print(attention_table())
        print(tower_table())
        return 0
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if args.attention:
        return attention_main(args)
    if args.smoke:
        args.steps, args.n_train, args.n_test = 4, 16, 8
        args.tower_pretrain = min(args.tower_pretrain, 4)
        res_dir = Path("runs/ladder/smoke") / args.name
    else:
        res_dir = HERE / "results" / args.name
        if (res_dir / "results.json").exists() and not args.force:
            raise SystemExit(f"{res_dir}/results.json exists; --force to overwrite, or choose another --name")
    work = Path("runs/ladder") / ("smoke" if args.smoke else "work") / args.name
    work.mkdir(parents=True, exist_ok=True)
    res_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, test = rung_data(args, work)
    from differad_rl.integrations.qwen_vl.loading import (
        keep_tiny_manifest,
        load_model_and_processor,
    )
    from differad_rl.integrations.qwen_vl.predict import PredictConfig, predict_records

    from differad_rl.eval.protocol import EvalConfig, evaluate_records, read_predictions

    model_path = build_model(args, work)
    model, processor = load_model_and_processor(model_path)
    if args.pos_init == "sincos":
        sincos_positions(model, args.pos_scale)
    if args.patch_contrast:
        contrast_patches(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.rung}: {len(train)} train / {len(test)} held-out pairs, {n_params:,} parameters", flush=True)
    if args.probe:
        from differad_rl.eval.comparison import comparison_table

        preds, ridge = probe_predictions(model, processor, train, test, args.probe_tokens)
        results = {f"linear probe, {args.probe_tokens} visual tokens (ridge {ridge:g})": evaluate_records(
            preds, test, EvalConfig(family="pixel"))}
        results.update(constant_results(train, test))
        table = comparison_table(results)
        row = next(iter(results.values())).metrics["overall"]
        best = max(r.metrics["overall"]["miou"] for k, r in list(results.items())[1:])
        cmd = "OMP_NUM_THREADS=1 python examples/ladder/ladder.py " + " ".join(argv if argv is not None else sys.argv[1:])
        summary = {"rung": args.rung, "name": args.name, "command": cmd, "probe": args.probe_tokens, "ridge": ridge,
                   "model_path": model_path,
                   "probe_miou": row["miou"], "probe_acc": row["acc"], "best_constant_miou": best,
                   "margin": row["miou"] - best, "n_train": len(train), "n_test": len(test)}
        atomic_write_text(res_dir / "results.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(res_dir / "comparison.md", f"# {args.name} ({args.rung}, probe)\n\n`{cmd}`\n\n{table}")
        answers_png(next(iter(results.values())), res_dir / "answers.png",
                    f"{args.name}: probe held-out mIoU {row['miou']:.3f} (best constant {best:.3f})")
        print(table)
        return 0
    tower = pretrain_tower(model, processor, train, test, steps=args.tower_pretrain, seed=args.seed,
                           pairs=args.tower_pairs) if args.tower_pretrain else None
    if tower:
        print(json.dumps({"tower_pretrain": tower}), flush=True)
    if args.answer == "bare":
        sft_cold_start.answer_text = bare_answer_text  # sft_rows looks it up at call time
    t1 = time.time()
    trainer = sft_cold_start.run_sft(model, processor, train, work, max_steps=args.steps, batch_size=args.batch_size,
                                     learning_rate=args.lr, lr_scheduler=args.schedule, seed=args.seed,
                                     logging_steps=max(1, args.steps // 20), use_cpu=args.device == "cpu",
                                     bf16=False, gradient_checkpointing=False)  # fp32 on every device
    sft_cold_start.answer_text = _SHIPPED_ANSWER
    train_s = time.time() - t1
    ckpt = work / "checkpoint"
    trainer.save_model(str(ckpt))
    processor.save_pretrained(str(ckpt))
    keep_tiny_manifest(model, ckpt)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    preds = work / "heldout.predictions.jsonl"
    preds.unlink(missing_ok=True)
    predict_records(model, processor, test, preds, model_name=args.name,
                    config=PredictConfig(batch_size=20, max_new_tokens=64), progress=True)
    results = {"model (greedy)": evaluate_records(read_predictions(preds), test, EvalConfig(reasoning=True))}
    results.update(constant_results(train, test))
    from differad_rl.eval.comparison import comparison_rows, comparison_table

    rows = comparison_rows(results)
    model_row, const_rows = rows[0], rows[1:]
    best = max(const_rows, key=lambda r: r["miou"])
    model_res = results["model (greedy)"]
    valid = model_res.pred_valid
    distinct = len({tuple(np.round(b, 1)) for b, v in zip(model_res.pred_boxes, valid) if v})
    summary = {
        "rung": args.rung, "name": args.name,
        "command": "OMP_NUM_THREADS=1 python examples/ladder/ladder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "parameters": n_params, "n_train": len(train), "n_test": len(test),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "model": model_row, "constants": const_rows, "best_constant": best["method"],
        "margin": model_row["miou"] - best["miou"],
        "passes": bool(model_row["miou"] - best["miou"] >= PASS_MARGIN),
        "distinct_answers": distinct, "unparsable_rate": model_row["invalid_rate"],
        "miou_by_defect": miou_by_defect(model_res.ious, test),
    }
    if tower:
        summary["tower_pretrain"] = tower
    table = comparison_table(results)
    atomic_write_text(res_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(res_dir / "comparison.md", f"# {args.name} ({args.rung})\n\n`{summary['command']}`\n\n{table}")
    answers_png(model_res, res_dir / "answers.png",
                f"{args.name}: held-out mIoU {model_row['miou']:.3f} (best constant {best['miou']:.3f}) — "
                "answer red, truth green")
    print(table)
    print(json.dumps({k: summary[k] for k in ("name", "margin", "passes", "distinct_answers", "unparsable_rate",
                                              "train_seconds", "loss_first", "loss_last")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
