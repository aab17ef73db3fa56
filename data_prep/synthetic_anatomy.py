"""Geometry of synthetic BraTS-like cases: brain, tissues, ventricles, tumour, mass effect.

Everything is built from seeded smooth random fields (Gaussian noise on a coarse lattice,
upsampled by separable cubic B-spline interpolation, one banded 4-tap pass per axis) that are
thresholded into tissue classes. No per-voxel Python loops and no scipy: a 240x240x155 case takes
about a second of CPU time.

Coordinates are in *reference millimetres*: the volume is always mapped onto a 240x240x155 mm box
(BraTS 2021 size, axes x = left-right, y = posterior-anterior, z = inferior-superior) whatever
its voxel shape, so a 32^3 test volume holds the same brain as a full-size one, just coarser. Thin
structures (cortex, sulci, tumour rim) have a minimum width of about one voxel so that small
volumes keep every tissue class.

Tissue classes (``TISSUES``): 0 background, 1 CSF, 2 grey matter, 3 white matter, 4 deep grey
matter. Tumour classes (``TUMOUR``): 0 none, 1 edema, 2 enhancing rim, 3 necrosis, 4
non-enhancing core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "REF_SHAPE",
    "TISSUES",
    "TUMOUR",
    "Grid",
    "smooth_noise",
    "Anatomy",
    "build_anatomy",
    "Tumour",
    "build_tumour",
]

REF_SHAPE = (240, 240, 155)  # the millimetre box every volume is mapped onto
TISSUES = {"background": 0, "csf": 1, "gm": 2, "wm": 3, "deep_gm": 4}
TUMOUR = {"none": 0, "edema": 1, "enhancing": 2, "necrosis": 3, "non_enhancing": 4}

# Variance of one cubic-B-spline-interpolated unit Gaussian, averaged over positions, per axis:
# the B-spline autocorrelation at 0 (the degree-7 B-spline centre value) = 151/315.
_BSPLINE_VAR = 151.0 / 315.0


@dataclass(frozen=True)
class Grid:
    """A box of voxels: ``lo`` (first voxel index), ``shape``, ``spacing`` (mm per voxel)."""

    lo: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    full_shape: tuple[int, int, int]

    def axis(self, k: int) -> np.ndarray:
        """Millimetre coordinates (volume centre = 0) of the voxel centres along axis ``k``."""
        idx = np.arange(self.lo[k], self.lo[k] + self.shape[k], dtype=np.float32)
        mm = (idx + 0.5 - self.full_shape[k] / 2.0) * self.spacing[k]
        return mm.reshape([-1 if j == k else 1 for j in range(3)])  # broadcastable (n,1,1) etc.

    def sub(self, centre_mm: np.ndarray, half_mm: np.ndarray) -> Grid:
        """Sub-box of this grid covering ``centre_mm +- half_mm`` (clipped, at least 1 voxel)."""
        lo, hi = [], []
        for k in range(3):
            c = centre_mm[k] / self.spacing[k] + self.full_shape[k] / 2.0 - 0.5
            h = half_mm[k] / self.spacing[k]
            a = int(np.clip(np.floor(c - h), self.lo[k], self.lo[k] + self.shape[k] - 1))
            b = int(np.clip(np.ceil(c + h) + 1, a + 1, self.lo[k] + self.shape[k]))
            lo.append(a)
            hi.append(b)
        return Grid(tuple(lo), tuple(b - a for a, b in zip(lo, hi)), self.spacing, self.full_shape)

    def slices(self, parent: Grid) -> tuple[slice, slice, slice]:
        """Index of this box inside ``parent``'s arrays."""
        return tuple(
            slice(self.lo[k] - parent.lo[k], self.lo[k] - parent.lo[k] + self.shape[k])
            for k in range(3)
        )


def _bspline_weights(n_out: int, step: float, phase: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Cubic B-spline interpolation at coarse positions ``1 + phase + j * step``, j < n_out.

    Returns the first of the four coarse neighbours per output (n_out,), their weights
    (n_out, 4) and the coarse size needed.
    """
    u = 1.0 + phase + np.arange(n_out) * step
    i = np.floor(u).astype(np.intp)
    t = (u - i).astype(np.float32)
    w = np.stack(  # the four cubic B-spline basis values at fractional position t
        [
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        ],
        axis=1,
    )
    return i - 1, w, int(i[-1]) + 3


def _interp_axis(a: np.ndarray, first: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Banded 4-tap interpolation along ``axis`` (elementwise, no BLAS: fast and the same
    bits on any machine and thread count)."""
    shape = [1, 1, 1]
    shape[axis] = -1
    out = np.take(a, first, axis=axis)
    out *= w[:, 0].reshape(shape)
    for k in range(1, 4):
        tap = np.take(a, first + k, axis=axis)
        tap *= w[:, k].reshape(shape)
        out += tap
    return out


def smooth_noise(rng: np.random.Generator, grid: Grid, cell_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field on ``grid`` with feature size ``cell_mm``.

    White noise on a coarse lattice of spacing ``cell_mm`` (random phase), interpolated with a
    cubic B-spline: a C2-smooth field, one banded pass per axis.
    """
    cell_mm = max(cell_mm, max(grid.spacing))  # finer than a voxel is just white noise
    taps = [
        _bspline_weights(grid.shape[k], grid.spacing[k] / cell_mm, rng.uniform()) for k in range(3)
    ]
    coarse = rng.standard_normal(tuple(t[2] for t in taps), dtype=np.float32)
    coarse /= np.float32(_BSPLINE_VAR**1.5)  # unit variance after interpolation
    # z first and x last: the final, largest pass then copies whole contiguous (Y, Z) planes.
    out = _interp_axis(coarse, *taps[2][:2], axis=2)  # (cx, cy, Z)
    out = _interp_axis(out, *taps[1][:2], axis=1)  # (cx, Y, Z)
    return _interp_axis(out, *taps[0][:2], axis=0)  # (X, Y, Z)


def _sphere_noise(rng: np.random.Generator, pts: np.ndarray, cell_mm: float) -> np.ndarray:
    """Smooth noise (as :func:`smooth_noise`) at scattered points ``pts`` (N, 3) in mm,
    |pts| <= 75: a 2 mm lattice noise sampled by trilinear interpolation."""
    h = min(2.0, cell_mm / 4.0)  # lattice spacing, mm
    n = int(np.ceil(160.0 / h))  # lattice size: covers +-80 mm
    lattice = smooth_noise(rng, Grid((0, 0, 0), (n, n, n), (h, h, h), (n, n, n)), cell_mm)
    f = np.clip(pts / h + n / 2.0 - 0.5, 0, n - 1.001)  # (N, 3) fractional lattice index
    i0 = f.astype(np.intp)
    t = (f - i0).astype(np.float32)
    flat = lattice.ravel()
    base = (i0[:, 0] * n + i0[:, 1]) * n + i0[:, 2]
    out = np.zeros(len(pts), np.float32)
    for dx in (0, 1):
        wx = t[:, 0] if dx else 1 - t[:, 0]
        for dy in (0, 1):
            wxy = wx * (t[:, 1] if dy else 1 - t[:, 1])
            for dz in (0, 1):
                w = wxy * (t[:, 2] if dz else 1 - t[:, 2])
                out += w * flat[base + (dx * n + dy) * n + dz]
    return out


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


@dataclass
class Anatomy:
    """Healthy anatomy on the brain box ``grid`` (arrays have ``grid.shape``)."""

    grid: Grid
    tissue: np.ndarray  # uint8 TISSUES classes
    depth: np.ndarray  # float32 mm below the brain surface (negative in the outer CSF rim)
    centre: np.ndarray  # (3,) brain centre, mm
    semi_axes: np.ndarray  # (3,) ellipsoid semi-axes, mm
    midline: float  # x of the interhemispheric plane at the centre, mm


def build_anatomy(rng: np.random.Generator, full_shape: tuple[int, int, int]) -> Anatomy:
    """Brain (deformed ellipsoid), cortex with sulci, WM, deep GM, ventricles, outer CSF."""
    spacing = tuple(REF_SHAPE[k] / full_shape[k] for k in range(3))
    vmax = max(spacing)  # coarsest voxel size: minimum width of thin structures
    atrophy = _u(rng, 0.0, 1.0)  # older brains: larger ventricles, wider sulci
    centre = np.array([_u(rng, -3, 3), _u(rng, -6, 6), _u(rng, -2, 5)], np.float32)
    semi = np.array([_u(rng, 63, 71), _u(rng, 80, 90), _u(rng, 57, 64)], np.float32)
    whole = Grid((0, 0, 0), tuple(full_shape), spacing, tuple(full_shape))
    grid = whole.sub(centre, semi * 1.12 + 5 + vmax)  # brain box: skip the empty corners

    x, y, z = (grid.axis(k) - centre[k] for k in range(3))
    # Egg shape: narrower frontal pole (+y), flatter base (-z); then smooth random bumps.
    ax = semi[0] * (1.0 - 0.07 * np.clip(y / semi[1], -1, 1))
    az = semi[2] * (1.0 - 0.08 * (z < 0))
    ex, ey, ez = x / ax, y / semi[1], z / az
    rho = np.sqrt(ex**2 + ey**2 + ez**2)  # ellipsoid radius, 1 on the surface
    grad = np.sqrt((ex / ax) ** 2 + (ey / semi[1]) ** 2 + (ez / az) ** 2) / np.maximum(rho, 1e-3)
    bumps = 0.025 * smooth_noise(rng, grid, 45.0) + 0.007 * smooth_noise(rng, grid, 18.0)
    rho_d = rho / (1.0 + bumps)
    # First-order distance to the surface, (1 - rho)/|grad rho|, in mm.
    depth = ((1.0 - rho_d) / np.maximum(grad, 1e-4)).astype(np.float32)
    del rho_d, grad

    # Cortex: grey ribbon under the surface and around sulci. Sulci are the zero sheets of a
    # field g that is constant along rays from the centre (a noise on a sphere, evaluated at the
    # radial projection of each voxel), so they cut into the brain roughly perpendicular to its
    # surface; a little 3D noise bends them. Distance to a sheet ~ |g| / |grad g|.
    band = (depth < 45.0) & (depth > -12.0)
    cell = max(_u(rng, 6.5, 8.0), 3.0 * vmax)
    dirs = np.stack([np.broadcast_to(e, grid.shape)[band] for e in (ex, ey, ez)], axis=1)
    dirs *= 75.0 / np.maximum(rho[band], 1e-3)[:, None]  # (N, 3) on a 75 mm sphere
    del ex, ey, ez, rho
    g = np.full(grid.shape, 10.0, np.float32)  # far from any sheet outside the band
    g[band] = _sphere_noise(rng, dirs, cell) + 0.6 * smooth_noise(rng, grid, 11.0)[band]
    del dirs
    gx, gy, gz = np.gradient(g, *spacing)
    d_sulc = np.abs(g) / np.maximum(np.sqrt(gx**2 + gy**2 + gz**2), 1e-3)
    del gx, gy, gz, g
    sulc_depth = _u(rng, 17.0, 24.0) + 4.0 * smooth_noise(rng, grid, 30.0)
    d_sulc = np.sqrt(d_sulc**2 + np.maximum(depth - sulc_depth, 0.0) ** 2)
    # Interhemispheric fissure: a wavy midline sheet, absent under the corpus callosum arch.
    midline = centre[0] + _u(rng, -2, 2)
    wiggle = 1.5 * smooth_noise(
        rng,
        Grid(
            (grid.lo[0], grid.lo[1], grid.lo[2]),
            (1, grid.shape[1], grid.shape[2]),
            spacing,
            tuple(full_shape),
        ),
        25.0,
    )
    cc_y, cc_len = _u(rng, -4, 6), _u(rng, 32, 40)
    arch = np.clip(1 - ((y - cc_y) / cc_len) ** 2, 0, 1)
    cc_top = 10.0 + 9.0 * arch  # corpus callosum roof, mm above the centre
    # Joined from the callosum down through the diencephalon; split again near the base.
    joined = (np.abs(y - cc_y) < cc_len) & (z < cc_top) & (z > cc_top - 32.0 - 12.0 * arch)
    d_fiss = np.where(joined, np.float32(1e3), np.abs(x + centre[0] - midline - wiggle))

    gm_thick = max(_u(rng, 3.0, 4.0), 1.0 * vmax) + 0.4 * smooth_noise(rng, grid, 20.0)
    sulc_half = max(_u(rng, 0.5, 0.8) * (1 + 1.2 * atrophy), 0.35 * vmax)
    fiss_half = max(_u(rng, 0.9, 1.6) * (1 + 0.8 * atrophy), 0.45 * vmax)
    rim = max(_u(rng, 1.0, 2.2) + 1.0 * atrophy, 0.8 * vmax) + 0.8 * smooth_noise(rng, grid, 25.0)
    rim = np.maximum(rim, 0.5 * vmax)  # outer CSF everywhere: the parenchyma never touches 0

    tissue = np.full(grid.shape, TISSUES["wm"], np.uint8)
    tissue[np.minimum(np.minimum(depth, d_sulc), d_fiss) < gm_thick] = TISSUES["gm"]
    del gm_thick
    _deep_structures(rng, grid, tissue, centre, midline, atrophy, cc_y, vmax)
    sulc_half = sulc_half * (1.0 + 0.8 * np.exp(-np.maximum(depth, 0) / 5.0))  # open at the top
    tissue[(d_sulc < sulc_half) | (d_fiss < fiss_half) | (depth < 0)] = TISSUES["csf"]
    tissue[depth < -rim] = TISSUES["background"]
    return Anatomy(grid, tissue, depth, centre, semi, float(midline))


def _ellipsoid(grid: Grid, centre, semi, rng: np.random.Generator, rough: float, bend=(0.0, 0.0)):
    """(sub-grid, mask) of a rough ellipsoid; ``bend`` = (dx, dz) offsets at the y ends (mm)."""
    semi = np.asarray(semi, np.float32)
    centre = np.asarray(centre, np.float32)
    sub = grid.sub(centre, semi * (1 + 2 * rough) + np.abs([bend[0], 0, bend[1]]))
    x, y, z = (sub.axis(k) - centre[k] for k in range(3))
    t = np.clip(y / semi[1], -1, 1) ** 2  # 0 at the middle, 1 at the ends: banana bend
    q = ((x - bend[0] * t) / semi[0]) ** 2 + (y / semi[1]) ** 2 + ((z - bend[1] * t) / semi[2]) ** 2
    return sub, np.sqrt(q) < 1.0 + rough * smooth_noise(rng, sub, 12.0)


def _deep_structures(rng, grid, tissue, centre, midline, atrophy, cc_y, vmax) -> None:
    """Basal ganglia and thalami (deep GM), then lateral and third ventricles (CSF), in place."""
    size = (0.75 + 0.9 * atrophy) * _u(rng, 0.85, 1.15)
    cx, cy, cz = midline, centre[1] + cc_y, centre[2]
    for side in (-1.0, 1.0):
        s = size * _u(rng, 0.85, 1.15)  # ventricle asymmetry
        dx = side * _u(rng, 5.0, 8.0)
        for off, semi in (
            ((side * 21, 6, -8), (7, 15, 13)),
            ((side * 10, -13, -9), (9, 13, 13)),
            ((side * 13, 18, 2), (5, 9, 8)),
        ):  # lentiform, thalamus, caudate
            c = (cx + off[0] + _u(rng, -1.5, 1.5), cy + off[1], cz + off[2])
            sub, m = _ellipsoid(grid, c, semi, rng, 0.08)
            view = tissue[sub.slices(grid)]
            view[m & (view == TISSUES["wm"])] = TISSUES["deep_gm"]
        # lateral ventricle: banana-shaped, diverging and descending at its horns
        c = (cx + dx, cy + _u(rng, -4, 2), cz + _u(rng, 4, 10))
        semi = (
            max(_u(rng, 3.5, 6.0) * s, 0.6 * vmax),
            _u(rng, 30, 38) * min(1.0, 0.8 + 0.2 * s),
            max(_u(rng, 4.5, 7.0) * s, 0.6 * vmax),
        )
        sub, m = _ellipsoid(grid, c, semi, rng, 0.12, bend=(side * _u(rng, 5, 10), -_u(rng, 8, 14)))
        tissue[sub.slices(grid)][m] = TISSUES["csf"]
    # third ventricle: thin midline slit below the lateral ones
    c = (cx, cy - 3, cz - 10)
    sub, m = _ellipsoid(grid, c, (max(0.8 * size, 0.4 * vmax), 12, 11), rng, 0.05)
    tissue[sub.slices(grid)][m] = TISSUES["csf"]


@dataclass
class Tumour:
    """Tumour on the anatomy grid: classes, edema strength, and the mass-effect-warped tissue."""

    tissue: np.ndarray  # uint8 TISSUES after the mass-effect warp
    classes: np.ndarray  # uint8 TUMOUR classes
    strength: np.ndarray  # float32 edema strength in [0, 1] (0 outside edema)
    centre: np.ndarray  # (3,) mm
    radius: float  # core radius, mm


def _index_of(grid: Grid, mm: np.ndarray, k: int) -> np.ndarray:
    """Nearest voxel index (relative to ``grid.lo``, clipped) of mm coordinates along axis k."""
    i = np.rint(mm / grid.spacing[k] + grid.full_shape[k] / 2.0 - 0.5).astype(np.intp) - grid.lo[k]
    return np.clip(i, 0, grid.shape[k] - 1)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 6-neighbourhood (one voxel along each axis), via array shifts."""
    out = mask.copy()
    for ax in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        out[tuple(lo)] |= mask[tuple(hi)]
        out[tuple(hi)] |= mask[tuple(lo)]
    return out


def _mass_effect(anat: Anatomy, c: np.ndarray, push: float, reach: float) -> np.ndarray:
    """Tissue warped radially away from ``c``: inserting a ball of radius ``push`` conserves
    volume (r_src^3 = r^3 - push^3), tapered by exp(-(r/reach)^2) so the skull stays put."""
    grid, tissue = anat.grid, anat.tissue.copy()
    box = grid.sub(c, np.full(3, 1.75 * reach, np.float32))
    d = [box.axis(k) - c[k] for k in range(3)]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)  # (bx, by, bz)
    r_src = np.cbrt(np.maximum(r**3 - push**3 * np.exp(-((r / reach) ** 2)), 0.0))
    scale = r_src / np.maximum(r, 1e-6)  # monotone in r: d/dr(r^3 - p^3 t(r)) > 0 for t' < 0
    src = tuple(_index_of(grid, c[k] + d[k] * scale, k) for k in range(3))
    view = tissue[box.slices(grid)]
    warped = anat.tissue[src]  # nearest-neighbour pull-back
    warped[warped == TISSUES["background"]] = TISSUES["csf"]  # the brain outline does not move
    view[...] = np.where(view == TISSUES["background"], view, warped)
    return tissue


def build_tumour(rng: np.random.Generator, anat: Anatomy, with_enhancing: bool | None) -> Tumour:
    """Glioma-like lesion: necrotic core in an enhancing rim in irregular, WM-following edema.

    Without enhancement the whole core is non-enhancing tumour. Placement is redrawn until the
    core plus a one-voxel edema ring lies inside the brain, so edema always surrounds the core.
    """
    grid = anat.grid
    vmax = max(grid.spacing)
    if with_enhancing is None:
        with_enhancing = bool(rng.uniform() < 0.8)  # most BraTS gliomas enhance
    radius = max(_u(rng, 9.0, 24.0), 2.2 * vmax)
    extent = _u(rng, 1.3, 2.1)  # edema reach, in core radii
    ring = max(2.0, 1.0 * vmax)  # edema ring around the core, mm
    for attempt in range(200):
        if attempt and attempt % 40 == 0:
            radius *= 0.85  # a small brain cannot hold this tumour anywhere: shrink it
        u = rng.standard_normal(3)
        u *= rng.uniform() ** (1 / 3) / np.linalg.norm(u)  # uniform in the unit ball
        c = (anat.centre + u * anat.semi_axes * np.array([0.75, 0.7, 0.6])).astype(np.float32)
        if abs(c[0] - anat.midline) < 1.3 * radius + ring and attempt < 100:
            continue  # gliomas are mostly hemispheric (a tiny volume may not allow it)
        ci = tuple(int(_index_of(grid, c[k], k)) for k in range(3))
        if anat.depth[ci] < radius + ring + 6:
            continue
        box = grid.sub(c, np.full(3, radius * extent * 1.6 + 2 * vmax, np.float32))
        sl = box.slices(grid)
        d = [box.axis(k) - c[k] for k in range(3)]
        r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) / radius  # in core radii
        d_core = r - _u(rng, 0.08, 0.22) * np.clip(smooth_noise(rng, box, 0.7 * radius), -2, 2)
        core = d_core < 1.0
        around = ((d_core < 1.0 + ring / radius) | _dilate(core)) & ~core
        if not core.any() or not (anat.depth[sl][around | core] > 0).all():
            continue
        break
    else:  # pragma: no cover - the shrinking radius always fits eventually
        raise RuntimeError("could not place a tumour in this brain")

    tissue = _mass_effect(anat, c, push=radius * _u(rng, 0.4, 0.8), reach=2.0 * radius)
    t = tissue[sl]
    wobble = 0.3 * smooth_noise(rng, box, radius) + 0.15 * smooth_noise(rng, box, 0.35 * radius)
    d_edema = r / extent - np.clip(wobble, -0.6, 0.6)  # edema stays within 1.6 extents
    # Vasogenic edema spreads along white matter and spares cortex and CSF (finger-like shape).
    spread = (d_edema < 1.0) & (
        (t == TISSUES["wm"]) | (t == TISSUES["deep_gm"]) | ((t == TISSUES["gm"]) & (d_edema < 0.6))
    )
    # The falx stops edema at the midline: keep it in the tumour's hemisphere.
    same_side = (d[0] + c[0] - anat.midline) * np.sign(c[0] - anat.midline) > 0
    edema = (spread & same_side | around) & (anat.depth[sl] > 0) & ~core

    classes = np.zeros(grid.shape, np.uint8)
    cls = classes[sl]
    cls[edema] = TUMOUR["edema"]
    if with_enhancing:
        rim_min = max(2.0, 1.0 * vmax) / radius
        d_nec = d_core + 0.18 * smooth_noise(rng, box, 0.4 * radius)
        necrosis = core & (d_nec < _u(rng, 0.3, 0.8)) & (d_core < 1.0 - rim_min)
        necrosis &= ~_dilate(~core)  # at least one voxel of rim all round
        if necrosis.sum() == core.sum():  # a coarse grid can lose the rim: keep it enhancing
            necrosis[...] = False
        cls[core] = TUMOUR["enhancing"]
        cls[necrosis] = TUMOUR["necrosis"]
    else:
        cls[core] = TUMOUR["non_enhancing"]
    strength = np.zeros(grid.shape, np.float32)
    strength[sl][edema] = np.clip(1.2 - 0.5 * d_edema[edema], 0.6, 1.0)
    return Tumour(tissue, classes, strength, c, float(radius))
