"""The non-LLM baselines through the box protocol: the classic image difference (``method="diff"``,
no model) and the paper's anomaly-map methods PatchCore and PaDiM (``method="patchcore"`` /
``"padim"``, :mod:`~differad_rl.eval.patchcore`, :mod:`~differad_rl.eval.padim`, on the pretrained
EfficientNet-Lite0 of :mod:`~differad_rl.eval.backbone`, installed by the ``baselines`` extra).

**PatchCore / PaDiM**: one model per category, fitted on that category's normal images only —
the references of every pair plus the normal targets of pairs that are neither evaluated nor
calibration pairs (:func:`normal_images`; a target of an evaluated or calibration pair is never
fitted on) — then each target's anomaly map at ``image_size × image_size``.

**diff** (the honest floor any trained model must beat on aligned pairs):

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

Every method then follows the anomaly-map protocol (:mod:`differad_rl.eval.anomaly_maps`): the
threshold maximising the pixel F1 on a seeded calibration split (masks = the records' boxes
rasterised), binarise, largest connected component, its box scaled back to original target pixels
(outward rounding); a map with no pixel above the threshold answers the zero box ("normal"). One
threshold serves all categories. The evaluated maps also get image AUROC, pixel AUROC and AUPRO
(:mod:`~differad_rl.eval.map_metrics`) against the rasterised boxes (pair records keep boxes, not the
original masks, so these are box-level pixel metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from differad_rl.eval.anomaly_maps import best_f1_threshold, maps_to_boxes, pixel_f1, scale_boxes
from differad_rl.eval.padim import PadimConfig
from differad_rl.eval.patchcore import PatchCoreConfig

METHODS = ("diff", "patchcore", "padim")

__all__ = [
    "BaselineConfig",
    "BaselineResult",
    "METHODS",
    "anomaly_map",
    "baseline_splits",
    "normal_images",
    "difference_map",
    "phase_shift",
    "run_baseline",
]


@dataclass(frozen=True)
class BaselineConfig:
    """Options of the baselines (the ``diff`` ones are ignored by PatchCore/PaDiM and vice versa).

    Attributes:
        method: ``"diff"`` (classic difference, the default), ``"patchcore"`` or ``"padim"``.
        patchcore: PatchCore options (:class:`~differad_rl.eval.patchcore.PatchCoreConfig`).
        padim: PaDiM options (:class:`~differad_rl.eval.padim.PadimConfig`).
        device: torch device of the backbone (``"cpu"``, ``"cuda"``, …).
        batch_size: images per backbone forward pass.
        map_metrics: also compute image AUROC, pixel AUROC and AUPRO of the evaluated maps (keeps
            every evaluated map in memory: ``N · H · W · 4`` bytes).
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
            anomaly-map protocol of docs/method.md §8, masks = rasterised boxes) or ``"miou"`` (the box
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
    method: str = "diff"
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    padim: PadimConfig = field(default_factory=PadimConfig)
    device: str = "cpu"
    batch_size: int = 16
    map_metrics: bool = True

    def __post_init__(self) -> None:
        checks = {
            "method": self.method in METHODS,
            "batch_size": self.batch_size >= 1,
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
                hint = f" (one of {', '.join(METHODS)})" if name == "method" else ""
                raise ValueError(f"BaselineConfig.{name} is invalid: {getattr(self, name)!r}{hint}")


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
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            orig = im.size
            if size is not None and im.size != size:
                im = im.resize(size, Image.Resampling.BILINEAR)
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
    """What :func:`run_baseline` found.

    Attributes:
        boxes: ``(N, 4)`` boxes in original target pixels (zero box = "normal").
        threshold: the calibrated map threshold.
        calibration_f1: pooled pixel F1 at ``threshold`` on the calibration pairs.
        calibration_ids: ids of the calibration pairs.
        map_metrics: image AUROC, pixel AUROC, AUPRO of the evaluated maps, overall, per category
            and their category mean (:func:`~differad_rl.eval.map_metrics.map_metrics`); ``None``
            when ``config.map_metrics`` is off.
        fit_images: PatchCore/PaDiM only: number of normal images each category's model was fitted on.
    """

    boxes: np.ndarray
    threshold: float
    calibration_f1: float
    calibration_ids: list[str]
    map_metrics: dict[str, Any] | None = None
    fit_images: dict[str, int] | None = None


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


def normal_images(
    records: Sequence[Any], evaluated: Sequence[Any], calibration: Sequence[Any]
) -> dict[str, list[str]]:
    """Per category, the normal images PatchCore/PaDiM are fitted on (paths, first-seen order).

    The reference of every record in ``records`` (references are normal by construction) and the
    target of every normal record (``boxes == []``) that is neither evaluated nor a calibration
    pair — minus any image that is the target of an evaluated or calibration pair, so a test
    target is never fitted on.
    """
    used = {r.id for r in evaluated} | {r.id for r in calibration}
    banned = {r.target for r in evaluated} | {r.target for r in calibration}
    out: dict[str, dict[str, None]] = {}
    for r in list(records) + list(evaluated) + list(calibration):
        paths = out.setdefault(r.category, {})
        if r.reference not in banned:
            paths[r.reference] = None
        if not r.boxes and r.id not in used and r.target not in banned:
            paths[r.target] = None
    return {cat: list(paths) for cat, paths in out.items()}


def _feature_maps(
    records: Sequence[Any],
    calibration_records: Sequence[Any],
    cfg: BaselineConfig,
    normal: dict[str, list[str]],
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """PatchCore/PaDiM maps of the calibration and evaluated targets, one model per category."""
    from tqdm.auto import tqdm

    from differad_rl.eval.backbone import load_efficientnet_lite0
    from differad_rl.eval.feature_maps import load_images
    from differad_rl.eval.padim import Padim
    from differad_rl.eval.patchcore import PatchCore

    backbone = load_efficientnet_lite0(device=cfg.device)
    size = cfg.patchcore.image_size if cfg.method == "patchcore" else cfg.padim.image_size
    bs = cfg.batch_size
    calib_maps: list[Any] = [None] * len(calibration_records)
    eval_maps: list[Any] = [None] * len(records)
    categories = list(dict.fromkeys([r.category for r in calibration_records] + [r.category for r in records]))
    fitted: dict[str, int] = {}
    for cat in tqdm(categories, desc=f"{cfg.method} per category", leave=False):
        paths = normal.get(cat, [])
        if not paths:
            raise ValueError(
                f"category {cat!r} has no normal image to fit {cfg.method} on "
                "(every reference of the category is also an evaluated or calibration target)"
            )
        model: PatchCore | Padim
        model = PatchCore(backbone, cfg.patchcore) if cfg.method == "patchcore" else Padim(backbone, cfg.padim)
        model.fit(load_images(paths[s : s + bs], size, cfg.workers) for s in range(0, len(paths), bs))
        fitted[cat] = len(paths)
        for recs, out in ((calibration_records, calib_maps), (records, eval_maps)):
            idx = [i for i, r in enumerate(recs) if r.category == cat]
            for s in range(0, len(idx), bs):
                part = idx[s : s + bs]
                maps = model.score(load_images([recs[i].target for i in part], size, cfg.workers))
                for i, m in zip(part, maps, strict=True):
                    out[i] = m
        del model
    return calib_maps, eval_maps, fitted


def run_baseline(
    records: Sequence[Any],
    calibration_records: Sequence[Any],
    config: BaselineConfig | None = None,
    chunk: int = 64,
    *,
    normal: dict[str, list[str]] | None = None,
) -> BaselineResult:
    """Calibrate on ``calibration_records`` (all of them: the caller draws the split), box ``records``.

    Records are ``PairRecord``-like (``id``, ``reference``, ``target``, ``boxes``, ``width``,
    ``height``, ``category``). ``diff`` maps are computed in chunks of ``chunk`` pairs. PatchCore and
    PaDiM fit one model per category on ``normal`` (category → normal image paths; default
    :func:`normal_images` of ``records`` and ``calibration_records``, i.e. their references — pass
    ``normal_images(all_records, records, calibration_records)`` to add the normal training targets).

    Raises:
        ImportError: PatchCore/PaDiM without the ``baselines`` extra (names the missing package).
    """
    cfg = config if config is not None else BaselineConfig()
    if not calibration_records:
        raise ValueError("run_baseline needs at least one calibration record")
    fitted: dict[str, int] | None = None
    keep: list[np.ndarray] = []
    if cfg.method == "diff":
        calib_maps = _maps(calibration_records, cfg, "baseline calibration")
    else:
        from differad_rl.eval.backbone import weights_path

        weights_path()  # fail at start-up, naming the missing package
        if normal is None:
            normal = normal_images([], records, calibration_records)
        calib_maps, all_eval_maps, fitted = _feature_maps(records, calibration_records, cfg, normal)
    masks = [_box_mask(rec, m.shape) for rec, m in zip(calibration_records, calib_maps, strict=True)]
    threshold, f1 = best_f1_threshold(calib_maps, masks)
    if cfg.objective == "miou":
        threshold = _best_miou_threshold(calib_maps, calibration_records, cfg.connectivity)
        f1 = pixel_f1(calib_maps, masks, threshold)
    del calib_maps, masks
    boxes = np.zeros((len(records), 4), dtype=np.float64)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        if cfg.method == "diff":
            maps = _maps(part, cfg, f"baseline {start + len(part)}/{len(records)}")
        else:
            maps = all_eval_maps[start : start + chunk]
        work = maps_to_boxes(maps, threshold, cfg.connectivity)
        boxes[start : start + len(part)] = _to_pixels(work, part, maps)
        if cfg.map_metrics:
            keep.extend(maps)
    metrics = None
    if cfg.map_metrics and len(records):
        from differad_rl.eval.map_metrics import map_metrics

        gt = [_box_mask(rec, m.shape) for rec, m in zip(records, keep, strict=True)]
        metrics = map_metrics(keep, gt, [r.category for r in records])
    return BaselineResult(boxes, threshold, f1, [r.id for r in calibration_records], metrics, fitted)


def _check_split(records: Sequence[Any], split: str, option: str) -> None:
    from differad_rl.eval.protocol import select_split

    select_split(records, split, option=option)  # the message lists the splits present


def baseline_splits(
    records: Sequence[Any],
    eval_split: str | None = "auto",
    calib_split: str | None = "auto",
    fraction: float = 0.3,
    seed: int = 0,
) -> tuple[list[Any], list[Any]]:
    """``(evaluated, calibration)`` records.

    Evaluated: the records whose ``split`` is ``eval_split``; ``None`` or ``"all"`` = every record;
    ``"auto"`` = ``"test"`` when some record has it, else every record. Calibration: a seeded
    ``fraction`` of the records (not evaluated) whose split is ``calib_split`` (``"auto"`` =
    ``"train"`` when there are such records); with ``None``/``"all"``, or ``"auto"`` and none, a seeded
    ``fraction`` of the evaluated records, which are then removed from the evaluated set (never
    calibrate and report on the same pairs).

    Raises:
        ValueError: an explicit split that no record has (the message lists the splits present).
    """
    from differad_rl.eval.anomaly_maps import calibration_split

    present = {r.split for r in records}
    if eval_split == "auto":
        eval_split = "test" if "test" in present else None
    elif eval_split == "all":
        eval_split = None
    elif eval_split is not None:
        _check_split(records, eval_split, "--split")
    evaluated = [r for r in records if eval_split is None or r.split == eval_split]
    taken = {r.id for r in evaluated}
    if calib_split == "all":
        calib_split = None
    elif calib_split not in (None, "auto"):
        _check_split(records, calib_split, "--calib-split")
    wanted = "train" if calib_split == "auto" else calib_split
    pool = [r for r in records if wanted is not None and r.split == wanted and r.id not in taken]
    if calib_split not in (None, "auto") and not pool:
        raise ValueError(
            f"calibration split {calib_split!r} has no record outside the evaluated split {eval_split!r}"
        )
    if pool:
        idx, _ = calibration_split(len(pool), fraction, seed)
        return evaluated, [pool[i] for i in idx]
    if len(evaluated) < 2:
        raise ValueError("need at least 2 records to split off a calibration set")
    calib, rest = calibration_split(len(evaluated), fraction, seed)
    return [evaluated[i] for i in rest], [evaluated[i] for i in calib]
