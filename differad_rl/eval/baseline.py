"""The classic no-model baseline: align, blur, absolute difference, calibrated threshold, largest
component → box. It is the honest floor any trained model must beat on aligned pairs.

Per pair (at a working resolution whose longest side is ``work_size``):

1. load both images as RGB floats; the reference is resized to the target's size;
2. normalise each channel of each image to zero mean / unit variance (cancels brightness and
   contrast changes);
3. Gaussian blur with ``sigma`` (suppresses noise and sub-pixel misalignment);
4. align the reference to the target by phase correlation (integer shift, searched within
   ``±max_shift`` pixels): ``r = IFFT(F_t · conj(F_r) / |F_t · conj(F_r)|)``, shift = argmax of
   ``r`` in the window;
5. anomaly map = mean over channels of ``|target − shifted reference|``, minimised over residual
   offsets within ``±local_search`` pixels (tolerates the small rotation/scale left after an
   integer shift), zero where the shifted reference does not cover the target (plus a margin);

then the anomaly-map protocol (:mod:`differad_rl.eval.anomaly_maps`): the threshold maximising the
pixel F1 on a seeded calibration split (masks = the records' boxes rasterised), binarise, largest
connected component, its box scaled back to original target pixels (outward rounding); a map with
no pixel above the threshold answers the zero box ("normal").
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from differad_rl.eval.anomaly_maps import best_f1_threshold, maps_to_boxes, pixel_f1, scale_boxes

__all__ = [
    "BaselineConfig",
    "BaselineResult",
    "anomaly_map",
    "baseline_splits",
    "difference_map",
    "phase_shift",
    "run_baseline",
]


@dataclass(frozen=True)
class BaselineConfig:
    """Options of the classic baseline.

    Attributes:
        work_size: longest side of the working resolution in pixels (0 = original size).
        sigma: Gaussian blur σ in working pixels.
        max_shift: largest alignment shift searched, in working pixels (0 = no alignment).
        border: extra margin (working pixels) zeroed around the uncovered border.
        local_search: residual misalignment tolerance: each pixel takes the smallest difference
            over reference offsets within ``±local_search`` pixels (rotation/scale nuisance).
        calibration_fraction: share of the calibration pool used to pick the threshold.
        seed: seed of the calibration split.
        connectivity: 8 or 4 for the connected components.
        workers: threads computing maps (image decoding and FFTs release the GIL).
        objective: what the threshold maximises on the calibration split: ``"pixel_f1"`` (the
            anomaly-map protocol of DESIGN §8, masks = rasterised boxes) or ``"miou"`` (the box
            mIoU of the whole pipeline, which also weighs false alarms on normal pairs; candidates
            are 101 quantiles of the upper half of the pooled scores plus every map's maximum).
    """

    work_size: int = 256
    sigma: float = 1.0
    max_shift: int = 8
    border: int = 2
    local_search: int = 3
    calibration_fraction: float = 0.3
    seed: int = 0
    connectivity: int = 8
    workers: int = 2
    objective: str = "pixel_f1"

    def __post_init__(self) -> None:
        checks = {
            "work_size": self.work_size >= 0,
            "sigma": self.sigma >= 0,
            "max_shift": self.max_shift >= 0,
            "border": self.border >= 0,
            "local_search": self.local_search >= 0,
            "calibration_fraction": 0.0 < self.calibration_fraction < 1.0,
            "connectivity": self.connectivity in (4, 8),
            "workers": self.workers >= 1,
            "objective": self.objective in ("pixel_f1", "miou"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"BaselineConfig.{name} is invalid: {getattr(self, name)!r}")


def phase_shift(target: np.ndarray, reference: np.ndarray, max_shift: int) -> tuple[int, int]:
    """Integer ``(dy, dx)`` such that ``reference`` shifted by it best matches ``target``.

    Phase correlation on the channel-mean images, peak searched within ``|dy|, |dx| <= max_shift``.
    """
    if max_shift <= 0:
        return 0, 0
    t = target.mean(axis=-1) if target.ndim == 3 else target
    r = reference.mean(axis=-1) if reference.ndim == 3 else reference
    cross = np.fft.rfft2(t) * np.conj(np.fft.rfft2(r))
    cross /= np.maximum(np.abs(cross), 1e-12)
    corr = np.fft.irfft2(cross, s=t.shape)
    h, w = t.shape
    my, mx = min(max_shift, h // 2), min(max_shift, w // 2)
    dys = np.arange(-my, my + 1)
    dxs = np.arange(-mx, mx + 1)
    window = corr[np.ix_(dys % h, dxs % w)]
    iy, ix = np.unravel_index(int(np.argmax(window)), window.shape)
    return int(dys[iy]), int(dxs[ix])


def difference_map(target: np.ndarray, reference: np.ndarray, config: BaselineConfig) -> np.ndarray:
    """Anomaly map ``(H, W) float32`` of two same-sized ``(H, W, C)`` float images (steps 2–5)."""
    if target.shape != reference.shape:
        raise ValueError(f"target and reference shapes differ: {target.shape} vs {reference.shape}")
    t = target.astype(np.float32, copy=True)
    r = reference.astype(np.float32, copy=True)
    for img in (t, r):
        img -= img.mean(axis=(0, 1), keepdims=True)
        img /= img.std(axis=(0, 1), keepdims=True) + 1e-6
    if config.sigma > 0:
        t = ndimage.gaussian_filter(t, sigma=(config.sigma, config.sigma, 0))
        r = ndimage.gaussian_filter(r, sigma=(config.sigma, config.sigma, 0))
    dy, dx = phase_shift(t, r, config.max_shift)
    shifted = np.roll(r, (dy, dx), axis=(0, 1))
    diff = np.abs(t - shifted).mean(axis=-1)
    k = config.local_search
    for ly in range(-k, k + 1):
        for lx in range(-k, k + 1):
            if ly or lx:
                np.minimum(diff, np.abs(t - np.roll(shifted, (ly, lx), axis=(0, 1))).mean(axis=-1), out=diff)
    h, w = diff.shape
    b = config.border + k
    top, bottom = max(dy, 0) + b, max(-dy, 0) + b
    left, right = max(dx, 0) + b, max(-dx, 0) + b
    diff[: min(top, h)] = 0
    diff[max(h - bottom, 0) :] = 0
    diff[:, : min(left, w)] = 0
    diff[:, max(w - right, 0) :] = 0
    return diff


def _load_rgb(path: str, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            orig = im.size
            if size is not None and im.size != size:
                im = im.resize(size, Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0, orig
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _work_size(width: int, height: int, work_size: int) -> tuple[int, int]:
    if work_size <= 0 or max(width, height) <= work_size:
        return width, height
    s = work_size / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def anomaly_map(record: Any, config: BaselineConfig) -> np.ndarray:
    """The baseline's anomaly map of one pair record, at the working resolution ``(h, w)``."""
    size = _work_size(int(record.width), int(record.height), config.work_size)
    target, _ = _load_rgb(record.target, size)
    reference, _ = _load_rgb(record.reference, size)
    return difference_map(target, reference, config)


def _box_mask(record: Any, shape: tuple[int, int]) -> np.ndarray:
    """The record's boxes rasterised at working resolution (pixel centres inside a box)."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    sx, sy = w / float(record.width), h / float(record.height)
    for x1, y1, x2, y2 in record.boxes:
        c0, c1 = int(np.ceil(x1 * sx - 0.5)), int(np.ceil(x2 * sx - 0.5))
        r0, r1 = int(np.ceil(y1 * sy - 0.5)), int(np.ceil(y2 * sy - 0.5))
        mask[max(r0, 0) : max(r1, r0 + 1), max(c0, 0) : max(c1, c0 + 1)] = True
    return mask


def _maps(records: Sequence[Any], config: BaselineConfig, desc: str) -> list[np.ndarray]:
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        it = pool.map(lambda rec: anomaly_map(rec, config), records)
        return list(tqdm(it, total=len(records), desc=desc, leave=False))


@dataclass(frozen=True)
class BaselineResult:
    """Boxes ``(N, 4)`` in original target pixels, the calibrated threshold and its pixel F1."""

    boxes: np.ndarray
    threshold: float
    calibration_f1: float
    calibration_ids: list[str]


def _to_pixels(work: np.ndarray, records: Sequence[Any], maps: Sequence[np.ndarray]) -> np.ndarray:
    """Working-resolution boxes → original target pixels (outward rounding)."""
    hw = np.array([m.shape for m in maps], dtype=np.float64).reshape(-1, 2)
    wh = np.array([(r.width, r.height) for r in records], dtype=np.float64).reshape(-1, 2)
    return scale_boxes(work, hw, wh)


def _best_miou_threshold(maps: list[np.ndarray], records: Sequence[Any], connectivity: int) -> float:
    """Threshold maximising the box mIoU over the calibration pairs (ties → the highest)."""
    from differad_rl.eval.metrics import sample_ious

    pooled = np.concatenate([m.reshape(-1) for m in maps])
    maxima = np.array([m.max() for m in maps])
    candidates = np.unique(
        np.concatenate([np.quantile(pooled, np.linspace(0.5, 1.0, 101)), maxima, np.nextafter(maxima, np.inf)])
    )
    gt = [rec.boxes for rec in records]
    best_t, best = float(candidates[-1]), -1.0
    for t in candidates:
        work = maps_to_boxes(maps, float(t), connectivity)
        boxes = _to_pixels(work, records, maps)
        score = float(sample_ious(boxes, None, gt).mean())
        if score >= best:
            best_t, best = float(t), score
    return best_t


def run_baseline(
    records: Sequence[Any],
    calibration_records: Sequence[Any],
    config: BaselineConfig | None = None,
    chunk: int = 64,
) -> BaselineResult:
    """Calibrate on ``calibration_records`` (all of them: the caller draws the split), box ``records``.

    Records are ``PairRecord``-like (``id``, ``reference``, ``target``, ``boxes``, ``width``,
    ``height``). Maps are computed in chunks of ``chunk`` pairs so memory stays bounded.
    """
    cfg = config if config is not None else BaselineConfig()
    if not calibration_records:
        raise ValueError("run_baseline needs at least one calibration record")
    calib_maps = _maps(calibration_records, cfg, "baseline calibration")
    masks = [_box_mask(rec, m.shape) for rec, m in zip(calibration_records, calib_maps, strict=True)]
    threshold, f1 = best_f1_threshold(calib_maps, masks)
    if cfg.objective == "miou":
        threshold = _best_miou_threshold(calib_maps, calibration_records, cfg.connectivity)
        f1 = pixel_f1(calib_maps, masks, threshold)
    del calib_maps, masks
    boxes = np.zeros((len(records), 4), dtype=np.float64)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        maps = _maps(part, cfg, f"baseline {start + len(part)}/{len(records)}")
        work = maps_to_boxes(maps, threshold, cfg.connectivity)
        boxes[start : start + len(part)] = _to_pixels(work, part, maps)
    return BaselineResult(boxes, threshold, f1, [r.id for r in calibration_records])


def baseline_splits(
    records: Sequence[Any],
    eval_split: str | None = "test",
    calib_split: str | None = "train",
    fraction: float = 0.3,
    seed: int = 0,
) -> tuple[list[Any], list[Any]]:
    """``(evaluated, calibration)`` records.

    Evaluated: the records whose ``split`` is ``eval_split`` (all records when None or when no
    record has it). Calibration: a seeded ``fraction`` of the records whose split is
    ``calib_split``; when there are none, a seeded ``fraction`` of the evaluated records, which are
    then removed from the evaluated set (never calibrate and report on the same pairs).
    """
    from differad_rl.eval.anomaly_maps import calibration_split

    evaluated = [r for r in records if eval_split is None or r.split == eval_split] or list(records)
    taken = {r.id for r in evaluated}
    pool = [r for r in records if calib_split is not None and r.split == calib_split and r.id not in taken]
    if pool:
        idx, _ = calibration_split(len(pool), fraction, seed)
        return evaluated, [pool[i] for i in idx]
    if len(evaluated) < 2:
        raise ValueError("need at least 2 records to split off a calibration set")
    calib, rest = calibration_split(len(evaluated), fraction, seed)
    return [evaluated[i] for i in rest], [evaluated[i] for i in calib]

