"""Synthetic anomalies for RL training pairs (docs/method.md §7), seeded and reproducible.

Two recipes, as in the paper:

* **Perlin texture** (DRAEM-style): a Perlin-noise shaped mask, filled with a *foreign* texture,
  ``out = img · (1 − m) + m · ((1 − β) · tex + β · img)`` with opacity ``1 − β``.
* **Cut-paste** of a real defect crop (image + its mask) into a normal image, blended with a
  Poisson (gradient-domain) solve on the pasted region.

In both the ground-truth box is the box of the region actually changed (the pasted/filled mask),
computed by :func:`differad_rl.data.masks.mask_to_boxes` (exclusive x2/y2). Every function takes a
``numpy.random.Generator``; the same generator state gives byte-identical output.

Images are float arrays in [0, 1], ``(H, W, C)``; masks are bool ``(H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from differad_rl.data.masks import largest_component, mask_to_boxes

__all__ = [
    "perlin_noise",
    "fractal_perlin_noise",
    "perlin_mask",
    "blob_mask",
    "fill_texture",
    "poisson_blend",
    "PerlinAnomalyConfig",
    "perlin_anomaly",
    "cut_paste_anomaly",
]


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` = (cells along y, cells along x).

    Random unit gradients on the ``(ry + 1) × (rx + 1)`` lattice, quintic fade
    ``6t⁵ − 15t⁴ + 10t³``, bilinear blend of the four corner dot products; scaled by √2 so the
    values lie in about [−1, 1]. Shape need not be a multiple of ``res`` (computed on the next
    multiple and cropped). Fully vectorised (no per-pixel loops).
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    dy, dx = -(-h // ry), -(-w // rx)
    ys = np.arange(h) / dy
    xs = np.arange(w) / dx
    yi, xi = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = ys - yi, xs - xi
    ang = 2.0 * np.pi * rng.random((ry + 1, rx + 1))
    gy, gx = np.sin(ang), np.cos(ang)

    def corner(oy: int, ox: int) -> np.ndarray:
        iy, ix = (yi + oy)[:, None], (xi + ox)[None, :]
        return gy[iy, ix] * (fy - oy)[:, None] + gx[iy, ix] * (fx - ox)[None, :]

    uy, ux = _fade(fy)[:, None], _fade(fx)[None, :]
    n0 = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    n1 = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return np.sqrt(2.0) * (n0 * (1 - uy) + n1 * uy)


def fractal_perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator, octaves: int = 3, persistence: float = 0.5
) -> np.ndarray:
    """Sum of ``octaves`` Perlin layers, octave k at ``res · 2^k`` with amplitude ``persistence^k``."""
    out = np.zeros(shape, dtype=np.float64)
    amp = 1.0
    for k in range(octaves):
        out += amp * perlin_noise(shape, (res[0] * 2**k, res[1] * 2**k), rng)
        amp *= persistence
    return out


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    min_scale: int = 0,
    max_scale: int = 6,
    threshold: float = 0.5,
    keep: str = "largest",
) -> np.ndarray:
    """DRAEM-style anomaly mask: Perlin noise at a random lattice ``2^a × 2^b`` cells
    (``a, b ∈ [min_scale, max_scale)``), thresholded at ``threshold``.

    ``keep="largest"`` keeps only the component with the largest box (one defect = one box);
    ``"all"`` keeps every component. May be empty (caller retries).
    """
    a = int(rng.integers(min_scale, max_scale))
    b = int(rng.integers(min_scale, max_scale))
    noise = perlin_noise(shape, (2**a, 2**b), rng)
    mask = noise > threshold
    if keep == "largest":
        mask = _keep_largest(mask)
    elif keep != "all":
        raise ValueError(f"keep must be 'largest' or 'all', got {keep!r}")
    return mask


def _keep_largest(mask: np.ndarray) -> np.ndarray:
    return largest_component(mask) if mask.any() else mask


def blob_mask(
    shape: tuple[int, int],
    center: tuple[float, float],
    radii: tuple[float, float],
    rng: np.random.Generator,
    *,
    roughness: float = 0.6,
    angle: float = 0.0,
) -> np.ndarray:
    """A single irregular blob: an ellipse (``center`` = (y, x), ``radii`` = (ry, rx), rotated by
    ``angle`` radians) whose edge is perturbed by Perlin noise of relative amplitude ``roughness``.

    The blob is connected (largest component kept) and non-empty (the centre pixel at least).
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = center
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (c * dx + s * dy) / max(radii[1], 0.5)
    v = (-s * dx + c * dy) / max(radii[0], 0.5)
    r = np.sqrt(u * u + v * v)
    cells = int(rng.integers(2, 6))
    noise = fractal_perlin_noise((h, w), (cells, cells), rng, octaves=2)
    mask = r < 1.0 + roughness * 0.5 * noise
    mask = _keep_largest(mask)
    iy = int(np.clip(round(cy), 0, h - 1))
    ix = int(np.clip(round(cx), 0, w - 1))
    if not mask.any():
        mask[iy, ix] = True
    return mask


def fill_texture(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float = 0.0) -> np.ndarray:
    """``image · (1 − m) + m · ((1 − β) · texture + β · image)``; ``texture`` has the image's shape."""
    m = mask.astype(image.dtype)[..., None] if image.ndim == 3 else mask.astype(image.dtype)
    return image * (1 - m) + m * ((1 - beta) * texture + beta * image)


def poisson_blend(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seamless (Poisson) cloning of ``src`` into ``dst`` on ``mask``; all three share ``(H, W)``.

    Solves, for every pixel p in Ω = mask (channels independently), the discrete Poisson equation
    ``4 f_p − Σ_{q∈N(p)∩Ω} f_q = Σ_{q∈N(p)} (g_p − g_q) + Σ_{q∈N(p)∖Ω} f*_q`` with g = ``src``,
    f* = ``dst`` (4-neighbourhood; neighbours outside the image are dropped from both sums). One
    sparse LU factorisation serves all channels. Pixels outside Ω are ``dst`` unchanged; the result
    is clipped to [0, 1]. An empty mask returns a copy of ``dst``.
    """
    from scipy import sparse
    from scipy.sparse.linalg import splu

    if dst.shape != src.shape or dst.shape[:2] != mask.shape:
        raise ValueError(f"poisson_blend: shapes differ: dst {dst.shape}, src {src.shape}, mask {mask.shape}")
    out = dst.astype(np.float64, copy=True)
    m = mask.astype(bool)
    n = int(m.sum())
    if n == 0:
        return out
    squeeze = out.ndim == 2
    if squeeze:
        out = out[..., None]
        srcf = src.astype(np.float64)[..., None]
    else:
        srcf = src.astype(np.float64)
    h, w = m.shape
    idx = -np.ones((h, w), dtype=np.int64)
    ys, xs = np.nonzero(m)
    idx[ys, xs] = np.arange(n)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.zeros(n)]
    rhs = np.zeros((n, out.shape[2]))
    deg = np.zeros(n)
    for oy, ox in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + oy, xs + ox
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        p = np.nonzero(inside)[0]
        qy, qx = ny[inside], nx[inside]
        deg[p] += 1
        rhs[p] += srcf[ys[p], xs[p]] - srcf[qy, qx]
        qi = idx[qy, qx]
        in_omega = qi >= 0
        rows.append(p[in_omega])
        cols.append(qi[in_omega])
        vals.append(-np.ones(int(in_omega.sum())))
        rhs[p[~in_omega]] += out[qy[~in_omega], qx[~in_omega]]
    vals[0] = deg
    a = sparse.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    sol = splu(a).solve(rhs)
    out[ys, xs] = sol
    np.clip(out, 0.0, 1.0, out=out)
    return out[..., 0] if squeeze else out


@dataclass(frozen=True)
class PerlinAnomalyConfig:
    """Parameters of :func:`perlin_anomaly` (DRAEM defaults).

    ``beta_range``: opacity parameter β ~ U(range); β = 0 pastes pure texture.
    ``min_area_fraction``/``max_area_fraction``: the mask is redrawn (up to ``max_tries``) until its
    pixel share lies in this range.
    """

    threshold: float = 0.5
    min_scale: int = 0
    max_scale: int = 6
    beta_range: tuple[float, float] = (0.0, 0.8)
    min_area_fraction: float = 0.001
    max_area_fraction: float = 0.25
    keep: str = "largest"
    max_tries: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta_range[0] <= self.beta_range[1] <= 1.0:
            raise ValueError(f"beta_range must satisfy 0 <= lo <= hi <= 1, got {self.beta_range}")
        if not 0.0 <= self.min_area_fraction < self.max_area_fraction <= 1.0:
            raise ValueError(
                f"need 0 <= min_area_fraction < max_area_fraction <= 1, got "
                f"{self.min_area_fraction}, {self.max_area_fraction}"
            )
        if not 0 <= self.min_scale < self.max_scale:
            raise ValueError(f"need 0 <= min_scale < max_scale, got {self.min_scale}, {self.max_scale}")
        if self.keep not in ("largest", "all"):
            raise ValueError(f"keep must be 'largest' or 'all', got {self.keep!r}")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")


def perlin_anomaly(
    image: np.ndarray,
    texture: np.ndarray,
    rng: np.random.Generator,
    config: PerlinAnomalyConfig | None = None,
    foreground: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Perlin-shaped foreign-texture anomaly. Returns ``(augmented, mask, boxes)``.

    ``texture`` must have the image's shape (resize/crop it first). ``foreground`` (bool ``(H, W)``)
    restricts the mask to the object. ``boxes`` = ``mask_to_boxes(mask, "all")`` (one box with the
    default ``keep="largest"``). Raises ``ValueError`` when no mask in the area range is found.
    """
    cfg = config or PerlinAnomalyConfig()
    if texture.shape != image.shape:
        raise ValueError(f"texture shape {texture.shape} must equal image shape {image.shape}")
    h, w = image.shape[:2]
    for _ in range(cfg.max_tries):
        mask = perlin_mask(
            (h, w), rng, min_scale=cfg.min_scale, max_scale=cfg.max_scale, threshold=cfg.threshold, keep="all"
        )
        if foreground is not None:
            mask &= foreground.astype(bool)
        if cfg.keep == "largest":
            mask = _keep_largest(mask)
        frac = mask.mean()
        if cfg.min_area_fraction <= frac <= cfg.max_area_fraction:
            break
    else:
        raise ValueError(
            f"perlin_anomaly: no mask with area fraction in [{cfg.min_area_fraction}, {cfg.max_area_fraction}] "
            f"after {cfg.max_tries} tries (foreground too small?)"
        )
    beta = float(rng.uniform(*cfg.beta_range))
    out = fill_texture(image.astype(np.float64), texture.astype(np.float64), mask, beta)
    return out, mask, mask_to_boxes(mask, "all")


def cut_paste_anomaly(
    target: np.ndarray,
    defect_image: np.ndarray,
    defect_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    blend: str = "poisson",
    margin: int = 2,
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Paste the largest defect region of ``defect_image`` (where ``defect_mask``) into ``target``
    at a random position, blended by ``"poisson"`` (gradient domain) or ``"alpha"`` (hard copy).

    The crop is the defect's box grown by ``margin`` pixels; the paste mask is the defect mask dilated
    by 1 pixel (the Poisson boundary sits just outside the defect). Returns
    ``(augmented, pasted_mask, boxes)`` with ``boxes`` the box of the pasted mask.
    Raises ``ValueError`` when the defect mask is empty or the crop does not fit into ``target``.
    """
    from scipy import ndimage

    if blend not in ("poisson", "alpha"):
        raise ValueError(f"blend must be 'poisson' or 'alpha', got {blend!r}")
    defect_mask = _keep_largest(np.asarray(defect_mask, dtype=bool))
    boxes = mask_to_boxes(defect_mask, "largest")
    if not boxes:
        raise ValueError("cut_paste_anomaly: the defect mask is empty")
    x1, y1, x2, y2 = boxes[0]
    dh, dw = defect_mask.shape
    x1, y1 = max(0, x1 - margin), max(0, y1 - margin)
    x2, y2 = min(dw, x2 + margin), min(dh, y2 + margin)
    crop = defect_image[y1:y2, x1:x2].astype(np.float64)
    cmask = ndimage.binary_dilation(defect_mask[y1:y2, x1:x2], iterations=1)
    ch, cw = cmask.shape
    th, tw = target.shape[:2]
    if ch + 2 > th or cw + 2 > tw:
        raise ValueError(f"cut_paste_anomaly: defect crop {cw}x{ch} does not fit into target {tw}x{th}")
    oy = int(rng.integers(1, th - ch))
    ox = int(rng.integers(1, tw - cw))
    full_mask = np.zeros((th, tw), dtype=bool)
    full_mask[oy : oy + ch, ox : ox + cw] = cmask
    src = target.astype(np.float64, copy=True)
    src[oy : oy + ch, ox : ox + cw] = crop
    if blend == "poisson":
        out = poisson_blend(target.astype(np.float64), src, full_mask)
    else:
        out = fill_texture(target.astype(np.float64), src, full_mask)
    return out, full_mask, mask_to_boxes(full_mask, "all")
