"""Embedded demo pairs: a small reference/target set built offline from real photographs that ship
inside scikit-image (``skimage.data``: brick, grass, gravel, coins, text, camera, ...).

Every example and many tests use it, so it needs no network and no download. For each pair:

1. A **category** is one source photograph. A random window of it (random zoom) is rendered twice:
   the *reference* view and the *target* view. The target view is displaced by a small random
   affine nuisance — shift of up to ``max_shift`` pixels, rotation up to ``max_rotation_deg``,
   scale ± ``max_scale`` (2 %) — so the two images are aligned only approximately.
2. Anomalous targets get one (sometimes two) **synthetic defects** drawn in target pixels:
   ``scratch`` (thin curved line), ``stain`` (Perlin-edged coloured blob), ``texture`` (Perlin
   blob filled with a *foreign* texture from another category, the paper's recipe) or ``hole``
   (dark missing-material blob). Their box areas cycle through four size bins, from *tiny*
   (0.2–1 % of the image) to *large* (8–15 %). The box is the exact box of the drawn mask
   (exclusive x2/y2, :func:`differad_rl.data.masks.mask_to_boxes`).
3. Both images get mild **photometric nuisance** (the target: brightness ±0.06, contrast ×0.9–1.1,
   gamma 0.9–1.1, a smooth uneven-lighting field of ±3–8 %, sometimes a slight blur; both:
   Gaussian noise σ ≤ 0.02), on normal and anomalous targets alike, so a naive pixel difference
   lights up everywhere and is not enough (``photometric=False`` turns it off).

With ``max_shift = max_rotation_deg = max_scale = 0`` and ``photometric=False`` the two images are equal outside
the defects (an aligned, clean set for debugging a pipeline or splitting what makes the task hard); every
random draw is still made, so such a set has the same windows, defects and boxes as the default one, up to the
view's margin for the shift.

A share ``normal_fraction`` of pairs are normal (``boxes = []``). Ids are
``<category>/<defect>/<index>`` (``defect = "good"`` for normal pairs, ``"multi"`` for two defects),
so per-category and per-defect reports work. ``split`` is ``"train"``/``"test"``, held out by pair,
stratified by category and normal/anomalous.

Determinism: pair ``i`` draws all its randomness from ``numpy.random.default_rng([seed, i])``,
independent of the number of workers; PNGs are written by Pillow with fixed settings. The same
parameters therefore build byte-identical files. The set is written into a temporary folder and
moved into place as a whole; ``manifest.json`` records the parameters and a content hash, and a
later call with the same parameters reuses a complete, unmodified set.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from differad_rl.data.atomic import atomic_directory
from differad_rl.data.records import PairRecord, write_pairs

__all__ = [
    "DEFAULT_CATEGORIES",
    "DEFECT_KINDS",
    "NO_GEOMETRIC_NUISANCE",
    "NO_NUISANCE",
    "NO_PHOTOMETRIC_NUISANCE",
    "SIZE_BINS",
    "DemoConfig",
    "build_demo_pairs",
    "contrast_color",
    "load_source_image",
    "render_pair",
]

DEMO_VERSION = 2  # bump whenever rendering changes: old sets on disk are then rebuilt, not reused
SOURCE = "skimage_demo"
PAIRS_FILE = "pairs.jsonl"
MANIFEST_FILE = "manifest.json"

#: ``skimage.data`` images bundled with the wheel (no pooch download); verified in the tests.
DEFAULT_CATEGORIES: tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "coins",
    "text",
    "camera",
    "moon",
    "page",
    "coffee",
    "immunohistochemistry",
)
DEFECT_KINDS: tuple[str, ...] = ("scratch", "stain", "texture", "hole")
#: (name, min, max) box-area fraction of the image.
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("tiny", 0.002, 0.01),
    ("small", 0.01, 0.03),
    ("medium", 0.03, 0.08),
    ("large", 0.08, 0.15),
)
#: ``build_demo_pairs`` keyword arguments that switch a nuisance off (the windows, defects and boxes stay the
#: same): the target view's affine displacement, the lighting and noise, and both (``demo-data --clean``).
NO_GEOMETRIC_NUISANCE: Mapping[str, Any] = MappingProxyType(
    {"max_shift": 0.0, "max_rotation_deg": 0.0, "max_scale": 0.0}
)
NO_PHOTOMETRIC_NUISANCE: Mapping[str, Any] = MappingProxyType({"photometric": False})
NO_NUISANCE: Mapping[str, Any] = MappingProxyType({**NO_GEOMETRIC_NUISANCE, **NO_PHOTOMETRIC_NUISANCE})


@dataclass(frozen=True)
class DemoConfig:
    """Parameters of the demo set (stored in the manifest; equal configs reuse a built set)."""

    n_pairs: int = 160
    size: int = 128
    seed: int = 0
    test_fraction: float = 0.25
    normal_fraction: float = 0.25
    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    max_shift: float = 3.0
    max_rotation_deg: float = 1.5
    multi_every: int = 8
    size_bins: tuple[str, ...] = tuple(b[0] for b in SIZE_BINS)
    max_scale: float = 0.02
    photometric: bool = True
    defect_kinds: tuple[str, ...] = DEFECT_KINDS

    def __post_init__(self) -> None:
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {self.size}")
        for name in ("test_fraction", "normal_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not self.categories:
            raise ValueError("categories must not be empty")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct, got {list(self.categories)}")
        if self.max_shift < 0 or self.max_rotation_deg < 0:
            raise ValueError(
                f"max_shift and max_rotation_deg must be >= 0, got {self.max_shift}, {self.max_rotation_deg}"
            )
        if not 0.0 <= self.max_scale < 0.5:
            raise ValueError(f"max_scale must be in [0, 0.5) (a fraction: 0.02 = ±2 %), got {self.max_scale}")
        if not self.defect_kinds or any(k not in DEFECT_KINDS for k in self.defect_kinds) or len(
            set(self.defect_kinds)
        ) != len(self.defect_kinds):
            raise ValueError(f"defect_kinds must be distinct names out of {list(DEFECT_KINDS)}, got {list(self.defect_kinds)}")
        if not isinstance(self.photometric, bool):
            raise ValueError(f"photometric must be True or False, got {self.photometric!r}")
        names = [b[0] for b in SIZE_BINS]
        if not self.size_bins or any(b not in names for b in self.size_bins) or len(set(self.size_bins)) != len(
            self.size_bins
        ):
            raise ValueError(f"size_bins must be distinct names out of {names}, got {list(self.size_bins)}")
        if self.multi_every < 0:
            raise ValueError(f"multi_every must be >= 0 (0 = never two defects), got {self.multi_every}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["categories"] = list(self.categories)
        if self.size_bins == DemoConfig.size_bins:  # the default: manifests of older sets stay valid
            del d["size_bins"]
        else:
            d["size_bins"] = list(self.size_bins)
        for name in ("max_scale", "photometric", "defect_kinds"):  # defaults: manifests of older sets stay valid
            if getattr(self, name) == getattr(DemoConfig, name):
                del d[name]
        if "defect_kinds" in d:
            d["defect_kinds"] = list(self.defect_kinds)
        d["version"] = DEMO_VERSION
        return d


# ----------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=32)
def load_source_image(name: str) -> np.ndarray:
    """``skimage.data.<name>()`` as float64 RGB ``(H, W, 3)`` in [0, 1] (cached per process).

    Raises ``ValueError`` naming the category when it is not a bundled ``skimage.data`` image or
    would need a download.
    """
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None or not callable(fn) or name.startswith("_"):
        raise ValueError(f"category {name!r}: not an image of skimage.data")
    try:
        img = fn()
    except Exception as exc:  # pooch missing / download needed / network error
        raise ValueError(
            f"category {name!r}: skimage.data.{name}() does not load offline ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(img, tuple):
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float64)
    elif np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float64) / float(np.iinfo(img.dtype).max)
    else:
        img = img.astype(np.float64)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 64:
        raise ValueError(f"category {name!r}: unsupported image shape {img.shape}")
    return np.ascontiguousarray(img)


# ----------------------------------------------------------------------------- geometry
def _view(
    src: np.ndarray, size: int, zoom_px: float, origin: tuple[float, float], shift: tuple[float, float],
    angle: float, scale: float,
) -> np.ndarray:
    """Render a ``size × size`` view: output pixel (r, c) samples the source at
    ``origin + (R(angle) · s · ((r, c) − centre) + centre + shift) / zoom_px`` (bilinear, reflect)."""
    from scipy import ndimage

    c = (size - 1) / 2.0
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]]) * scale / zoom_px
    offset = np.array(origin) + (np.array([c, c]) + np.array(shift)) / zoom_px - rot @ np.array([c, c])
    out = np.empty((size, size, 3), dtype=np.float64)
    for ch in range(3):
        ndimage.affine_transform(
            src[..., ch], rot, offset=offset, output_shape=(size, size), output=out[..., ch], order=1, mode="reflect"
        )
    return out


# ----------------------------------------------------------------------------- defects
def _box_dims(rng: np.random.Generator, size: int, bin_idx: int) -> tuple[float, float]:
    _, lo, hi = SIZE_BINS[bin_idx]
    area = rng.uniform(lo, hi) * size * size
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    bw = min(size * 0.9, np.sqrt(area * aspect))
    bh = min(size * 0.9, area / bw)
    return max(bh, 3.0), max(bw, 3.0)


def contrast_color(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour that stands out from the masked region: dark on bright regions and vice versa."""
    mean = float(img[mask].mean()) if mask.any() else 0.5
    base = rng.uniform(0.0, 0.2) if mean > 0.45 else rng.uniform(0.8, 1.0)
    tint = rng.uniform(-0.15, 0.15, size=3)
    return np.clip(base + tint, 0.0, 1.0)


def _scratch(img: np.ndarray, rng: np.random.Generator, center, dims) -> np.ndarray:
    h, w = img.shape[:2]
    bh, bw = dims
    cy, cx = center
    # a quadratic Bézier from one corner of the box to the opposite one
    flip = rng.random() < 0.5
    p0 = np.array([cy - bh / 2, cx - bw / 2 if not flip else cx + bw / 2])
    p2 = np.array([cy + bh / 2, cx + bw / 2 if not flip else cx - bw / 2])
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.2, size=2) * np.array([bh, bw])
    t = np.linspace(0, 1, 4 * int(bh + bw) + 8)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    radius = rng.uniform(0.6, 1.2) * max(1.0, h / 128.0)
    y0, y1 = int(max(0, np.floor(pts[:, 0].min() - radius - 1))), int(min(h, np.ceil(pts[:, 0].max() + radius + 2)))
    x0, x1 = int(max(0, np.floor(pts[:, 1].min() - radius - 1))), int(min(w, np.ceil(pts[:, 1].max() + radius + 2)))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = d2.min(axis=-1) <= radius * radius
    return mask


def _draw_defect(
    img: np.ndarray, kind: str, bin_idx: int, rng: np.random.Generator, cfg: DemoConfig, category: str,
    avoid: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect; returns ``(image, mask)``. ``avoid``: pixels the defect must not touch."""
    from scipy import ndimage

    from differad_rl.data.synthetic import blob_mask, fill_texture

    size = cfg.size
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(20):
        bh, bw = _box_dims(rng, size, bin_idx)
        margin_y, margin_x = bh / 2 + 2, bw / 2 + 2
        cy = rng.uniform(margin_y, size - margin_y)
        cx = rng.uniform(margin_x, size - margin_x)
        if kind == "scratch":
            mask = _scratch(img, rng, (cy, cx), (bh, bw))
        else:
            mask = blob_mask((size, size), (cy, cx), (bh / 2, bw / 2), rng, roughness=0.6)
        if avoid is None or not (ndimage.binary_dilation(mask, iterations=2) & avoid).any():
            break
    else:
        return img, np.zeros((size, size), dtype=bool)
    m3 = mask[..., None]
    if kind == "scratch":
        color = contrast_color(img, mask, rng)
        out = np.where(m3, 0.15 * img + 0.85 * color, img)
    elif kind == "stain":
        color = contrast_color(img, mask, rng)
        alpha = rng.uniform(0.55, 0.8)
        mottling = 0.15 * rng.standard_normal((size, size, 1))
        out = np.where(m3, np.clip((1 - alpha) * img + alpha * color + mottling * alpha, 0, 1), img)
    elif kind == "texture":
        others = [c for c in cfg.categories if c != category] or [category]
        other = others[int(rng.integers(len(others)))]
        tex_src = load_source_image(other)
        zoom = size / min(tex_src.shape[:2]) * rng.uniform(1.0, 2.5)
        span = size / zoom
        oy = rng.uniform(0, tex_src.shape[0] - span)
        ox = rng.uniform(0, tex_src.shape[1] - span)
        tex = _view(tex_src, size, zoom, (oy, ox), (0.0, 0.0), rng.uniform(0, 2 * np.pi), 1.0)
        tex = np.clip(tex[..., rng.permutation(3)] * rng.uniform(0.7, 1.3, size=3), 0, 1)  # foreign colours
        # keep the texture visibly different from what it covers
        if abs(float(tex[mask].mean()) - float(img[mask].mean())) < 0.15:
            tex = 1.0 - tex
        out = fill_texture(img, tex, mask, beta=float(rng.uniform(0.0, 0.3)))
    elif kind == "hole":
        depth = rng.uniform(0.02, 0.15)
        dist = ndimage.distance_transform_edt(mask)
        shade = depth + 0.1 * np.clip(dist / (dist.max() + 1e-9), 0, 1)
        out = np.where(m3, shade[..., None] + 0.02 * rng.standard_normal((size, size, 1)), img)
        if float(img[mask].mean()) < 0.3:  # dark material: the hole shows a bright backdrop
            out = np.where(m3, 1.0 - out, img)
    else:  # pragma: no cover - guarded by DEFECT_KINDS
        raise ValueError(f"unknown defect kind {kind!r}")
    return np.clip(out, 0.0, 1.0), mask


def _photometric(img: np.ndarray, rng: np.random.Generator, strong: bool) -> np.ndarray:
    from scipy import ndimage

    from differad_rl.data.synthetic import perlin_noise

    out = img
    if strong:
        gamma = rng.uniform(0.9, 1.1)
        out = np.clip(out, 0, 1) ** gamma
        out = (out - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.06, 0.06)
        # uneven lighting: a smooth multiplicative field of ±3–8 %
        h, w = out.shape[:2]
        light = 1.0 + rng.uniform(0.03, 0.08) * perlin_noise((h, w), (2, 2), rng)
        out = out * light[..., None]
        if rng.random() < 0.3:
            out = ndimage.gaussian_filter(out, sigma=(0.6, 0.6, 0))
    out = out + rng.normal(0.0, rng.uniform(0.005, 0.02), size=out.shape)
    return np.clip(out, 0.0, 1.0)


def _to_png(img: np.ndarray) -> bytes:
    from PIL import Image

    arr = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


@dataclass(frozen=True)
class _PairSpec:
    index: int
    category: str
    normal: bool
    kinds: tuple[str, ...]
    bins: tuple[int, ...]
    split: str


def render_pair(spec: _PairSpec, cfg: DemoConfig) -> tuple[np.ndarray, np.ndarray, list[list[int]], str]:
    """Render one pair: ``(reference, target, boxes, defect_name)``, float RGB in [0, 1]."""
    from differad_rl.data.masks import mask_to_boxes

    rng = np.random.default_rng([cfg.seed, spec.index])
    src = load_source_image(spec.category)
    size = cfg.size
    zoom_px = size / min(src.shape[:2]) * rng.uniform(1.15, 2.0)  # output px per source px
    span = (size + 4 * cfg.max_shift + 4) / zoom_px
    oy = rng.uniform(0, max(0.0, src.shape[0] - span))
    ox = rng.uniform(0, max(0.0, src.shape[1] - span))
    origin = (oy + 2 * cfg.max_shift / zoom_px, ox + 2 * cfg.max_shift / zoom_px)
    reference = _view(src, size, zoom_px, origin, (0.0, 0.0), 0.0, 1.0)
    shift = tuple(rng.uniform(-cfg.max_shift, cfg.max_shift, size=2))
    angle = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    target = _view(src, size, zoom_px, origin, shift, angle, rng.uniform(1.0 - cfg.max_scale, 1.0 + cfg.max_scale))
    boxes: list[list[int]] = []
    if not spec.normal:
        union = np.zeros((size, size), dtype=bool)
        masks = []
        for kind, b in zip(spec.kinds, spec.bins):
            target, mask = _draw_defect(target, kind, b, rng, cfg, spec.category, union if union.any() else None)
            if mask.any():
                masks.append(mask)
                union |= mask
        boxes = [mask_to_boxes(m, "all")[0] for m in masks]  # one box per defect (each is connected)
    if cfg.photometric:  # the last draws of the pair: turning it off changes nothing above
        reference = _photometric(reference, rng, strong=False)
        target = _photometric(target, rng, strong=True)
    if spec.normal:
        defect = "good"
    elif len(boxes) > 1:
        defect = "multi"
    else:
        defect = spec.kinds[0]
    return reference, target, boxes, defect


def _render_files(args: tuple[_PairSpec, DemoConfig]) -> tuple[int, bytes, bytes, list[list[int]], str]:
    spec, cfg = args
    ref, tgt, boxes, defect = render_pair(spec, cfg)
    return spec.index, _to_png(ref), _to_png(tgt), boxes, defect


# ----------------------------------------------------------------------------- planning
def _plan(cfg: DemoConfig) -> list[_PairSpec]:
    rng = np.random.default_rng([cfg.seed, 2**31 - 1])
    n, cats = cfg.n_pairs, cfg.categories
    category = [cats[i % len(cats)] for i in range(n)]
    n_normal = int(round(n * cfg.normal_fraction))
    normal = np.zeros(n, dtype=bool)
    normal[rng.permutation(n)[:n_normal]] = True
    # defect kind × size bin cycle over anomalous pairs, in a seeded order
    anomalous = np.nonzero(~normal)[0]
    bin_ids = [i for i, b in enumerate(SIZE_BINS) if b[0] in cfg.size_bins]
    kind_ids = [i for i, k in enumerate(DEFECT_KINDS) if k in cfg.defect_kinds]
    combos = [(k, b) for b in bin_ids for k in kind_ids]
    perm = rng.permutation(len(combos))
    kinds: dict[int, tuple[str, ...]] = {}
    bins: dict[int, tuple[int, ...]] = {}
    for j, i in enumerate(anomalous):
        k, b = combos[perm[j % len(combos)]]
        ks, bs = [DEFECT_KINDS[k]], [b]
        if cfg.multi_every and j % cfg.multi_every == cfg.multi_every - 1:
            ks.append(DEFECT_KINDS[kind_ids[int(rng.integers(len(kind_ids)))]])
            bs.append(bin_ids[int(rng.integers(0, min(2, len(bin_ids))))])  # the two smallest allowed bins
        kinds[int(i)], bins[int(i)] = tuple(ks), tuple(bs)
    # split held out by pair, stratified by (category, normal): strata are shuffled and laid end to
    # end, then every position p with floor((p + 1) f + u) > floor(p f + u) is a test pair (systematic
    # sampling: ~n·f test pairs in total, spread over every stratum even when strata are small)
    order: list[int] = []
    for c in cats:
        for is_normal in (False, True):
            idx = [i for i in range(n) if category[i] == c and normal[i] == is_normal]
            order.extend(int(i) for i in rng.permutation(np.array(idx, dtype=np.int64)))
    f, u = cfg.test_fraction, float(rng.random())
    pos = np.arange(n)
    is_test = np.floor((pos + 1) * f + u) > np.floor(pos * f + u)
    split = np.array(["train"] * n, dtype=object)
    split[np.array(order, dtype=np.int64)[is_test]] = "test"
    return [
        _PairSpec(i, category[i], bool(normal[i]), kinds.get(i, ()), bins.get(i, ()), str(split[i])) for i in range(n)
    ]


# ----------------------------------------------------------------------------- manifest
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_hash(files: dict[str, str]) -> str:
    return _sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode())


def _existing_set_ok(out: Path, params: dict[str, Any]) -> bool:
    man_path = out / MANIFEST_FILE
    if not man_path.is_file():
        return False
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if man.get("params") != params or not isinstance(man.get("files"), dict):
        return False
    files: dict[str, str] = man["files"]
    if _content_hash(files) != man.get("content_hash"):
        return False
    for rel, digest in files.items():
        p = out / rel
        if not p.is_file() or _sha256(p.read_bytes()) != digest:
            return False
    return True


def _is_demo_folder(out: Path) -> bool:
    man = out / MANIFEST_FILE
    if not man.is_file():
        return False
    try:
        return json.loads(man.read_text(encoding="utf-8")).get("generator") == __name__
    except (OSError, json.JSONDecodeError):
        return False


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))



def _size_bins_option(size_bins: Any) -> dict[str, Any]:
    """``{"size_bins": tuple(size_bins)}``, or no option when ``size_bins`` is None (the config's default)."""
    return {} if size_bins is None else {"size_bins": tuple(size_bins)}


def build_demo_pairs(
    out_dir: str | os.PathLike[str],
    *,
    n_pairs: int = 160,
    size: int = 128,
    seed: int = 0,
    test_fraction: float = 0.25,
    normal_fraction: float = 0.25,
    workers: int | None = None,
    categories: Sequence[str] | None = None,
    size_bins: Sequence[str] | None = None,
    multi_every: int = 8,
    max_shift: float = 3.0,
    max_rotation_deg: float = 1.5,
    max_scale: float = 0.02,
    photometric: bool = True,
    defect_kinds: Sequence[str] | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Build (or reuse) the demo pair set in ``out_dir``; returns the path of ``pairs.jsonl``.

    Layout: ``out_dir/pairs.jsonl`` (relative image paths), ``out_dir/images/<id>_{ref,tgt}.png``
    (``/`` in ids replaced by ``_``), ``out_dir/manifest.json`` (parameters, SHA-256 of every file
    and an overall content hash). See the module docstring for what the pairs contain.

    Args:
        n_pairs, size, seed, test_fraction, normal_fraction: see :class:`DemoConfig`.
        workers: processes for rendering (default ``min(4, cpu_count)``; ``<= 1`` renders in this
            process). The output does not depend on it. Processes use the platform's start method
            (fork on Linux); where it is spawn (macOS, Windows) call this under
            ``if __name__ == "__main__":`` or pass ``workers=1``.
        categories: ``skimage.data`` image names (default :data:`DEFAULT_CATEGORIES`).
        size_bins: names of the :data:`SIZE_BINS` the defects are drawn from (default: all four,
            tiny to large); e.g. ``("medium", "large")`` for defects of 3–15 % of the image.
        multi_every: every ``multi_every``-th anomalous pair gets a second, smaller defect (0 = never).
        max_shift, max_rotation_deg, max_scale: the target view's affine nuisance (pixels, degrees, a
            fraction of the scale); 0 turns each off.
        photometric: the photometric nuisance (target lighting, contrast, gamma, blur; noise on both).
            All four off: the two images are equal outside the defects.
        defect_kinds: names of the :data:`DEFECT_KINDS` drawn (default: all four), e.g. ``("hole",)``.
        progress: show a tqdm bar.
        force: rebuild even if a matching set exists.

    Reuse: when ``out_dir`` holds a manifest with the same parameters and every file still matches
    its hash, nothing is rebuilt. Otherwise the set is rendered into a temporary sibling folder and
    swapped in whole. A non-empty ``out_dir`` that is not a demo set raises ``ValueError`` (it is
    never deleted).
    """
    cfg = DemoConfig(
        n_pairs=n_pairs,
        size=size,
        seed=seed,
        test_fraction=test_fraction,
        normal_fraction=normal_fraction,
        categories=tuple(categories) if categories is not None else DEFAULT_CATEGORIES,
        multi_every=multi_every,
        max_shift=max_shift,
        max_rotation_deg=max_rotation_deg,
        max_scale=max_scale,
        photometric=photometric,
        **({} if defect_kinds is None else {"defect_kinds": tuple(defect_kinds)}),
        **_size_bins_option(size_bins),
    )
    out = Path(out_dir).absolute()  # image paths are written relative to it: never cwd-relative
    params = cfg.to_json()
    if not force and _existing_set_ok(out, params):
        return out / PAIRS_FILE
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_demo_folder(out))):
        raise ValueError(f"out_dir {out} exists and is not a demo pair set; refusing to overwrite it")
    for c in cfg.categories:  # fail fast, naming the category, before any rendering
        load_source_image(c)

    specs = _plan(cfg)
    n_workers = _default_workers() if workers is None else int(workers)
    jobs = [(s, cfg) for s in specs]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="demo pairs", unit="pair", disable=not progress)
    results: list[tuple[int, bytes, bytes, list[list[int]], str]] = []
    try:
        if n_workers <= 1 or len(jobs) < 32:  # small sets: a pool costs more than it saves
            for j in jobs:
                results.append(_render_files(j))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=n_workers) as ex:
                for r in ex.map(_render_files, jobs, chunksize=max(1, len(jobs) // (8 * n_workers))):
                    results.append(r)
                    bar.update(1)
    finally:
        bar.close()

    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        files: dict[str, str] = {}
        records: list[PairRecord] = []
        for (idx, ref_png, tgt_png, boxes, defect), spec in zip(results, specs):
            assert idx == spec.index
            rid = f"{spec.category}/{defect}/{idx:04d}"
            stem = rid.replace("/", "_")
            ref_rel, tgt_rel = f"images/{stem}_ref.png", f"images/{stem}_tgt.png"
            (tmp / ref_rel).write_bytes(ref_png)
            (tmp / tgt_rel).write_bytes(tgt_png)
            files[ref_rel], files[tgt_rel] = _sha256(ref_png), _sha256(tgt_png)
            records.append(
                PairRecord(
                    id=rid,
                    reference=str(tmp / ref_rel),
                    target=str(tmp / tgt_rel),
                    boxes=boxes,
                    width=cfg.size,
                    height=cfg.size,
                    category=spec.category,
                    defect=defect,
                    source=SOURCE,
                    split=spec.split,
                )
            )
        write_pairs(records, tmp / PAIRS_FILE)
        files[PAIRS_FILE] = _sha256((tmp / PAIRS_FILE).read_bytes())
        manifest = {
            "generator": __name__,
            "params": params,
            "files": files,
            "content_hash": _content_hash(files),
            "n_pairs": len(records),
            "n_normal": sum(r.is_normal for r in records),
            "n_test": sum(r.split == "test" for r in records),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out / PAIRS_FILE


def demo_content_hash(out_dir: str | os.PathLike[str]) -> str:
    """The content hash stored in a demo set's manifest (equal hashes = byte-identical sets)."""
    return json.loads((Path(out_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))["content_hash"]
