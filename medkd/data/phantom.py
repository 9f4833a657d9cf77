"""Synthetic abdominal CT with a spleen label (the "phantom"), and the MSD-style sample dataset writer.

Real public CT cannot be shipped, so medkd makes its own. Each case is a slab of the upper abdomen: body outline,
subcutaneous fat, muscle wall, spine and ribs, liver (with vessels), kidneys, aorta/IVC, pancreas, stomach with an
air-fluid level, bowel loops and the **spleen** (label 1), whose size, position, lobulated shape and craniocaudal
extent vary per case. The task is deliberately not solvable by intensity: the spleen's mean HU is drawn per case
around the liver's (either may be brighter) and sits next to muscle, pancreas and stomach wall of similar density;
the image is blurred at organ borders (partial volume) and carries white plus spatially correlated noise.

Geometry: arrays are ``(x, y, z)`` = ``(i, j, k)``; the NIfTI affine (RAS+) is
``diag(-sx, -sy, sz)`` plus an origin, i.e. ``i`` runs toward the patient's left, ``j`` toward posterior and ``k``
toward superior -- the orientation a DICOM series with ``ImageOrientationPatient = [1,0,0, 0,1,0]`` has
(voxel ``(0, 0, 0)`` is the first slice's ``ImagePositionPatient``). Displaying ``image[:, :, k].T`` gives the usual
radiological view (liver on the left of the screen, spine at the bottom).

Everything is a pure function of the seed: the same seed gives the same arrays, and
:func:`write_msd_dataset` writes byte-identical files (gzip header ``mtime=0``, fixed DICOM UIDs, no clock dates).
"""

from __future__ import annotations

import gzip
import io
import json
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage

SPLEEN = 1
HU_MIN, HU_MAX = -1024, 3071
RESCALE_INTERCEPT = -1024
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

__all__ = [
    "generate_case",
    "write_msd_dataset",
    "make_sample_data",
    "dicom_series_bytes",
    "case_seed",
    "phantom_affine",
    "best_threshold_dice",
    "nifti_bytes",
    "SPLEEN",
    "DEFAULT_CASES",
    "DEFAULT_SIZE",
    "DEFAULT_SLICES",
    "DEFAULT_SPACING",
]


# ----------------------------------------------------------------------------------------------------------- helpers
# The shipped sample: 64 px at 5.8 mm is a 371 mm field of view (a 512 px clinical slice at ~0.73 mm,
# downsampled); 5 mm slices, 20 +- 4 per case (a thin slab through the spleen).
DEFAULT_SPACING = (5.8, 5.8, 5.0)
DEFAULT_SIZE = 64
DEFAULT_SLICES = 20
# 60 cases: the default 0.2 / 0.1 test / val fractions give 12 test and 6 validation cases (42 train), enough test
# cases for a per-case paired test and seed-level statistics; the student's 50 % sees 21 labelled cases.
DEFAULT_CASES = 60


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a dataset made with ``seed`` (deterministic, independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def phantom_affine(size: int, n_slices: int, spacing: Sequence[float], origin_jitter=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS+ affine of a phantom volume: ``diag(-sx, -sy, sz)`` with a scanner-like origin.

    The in-plane centre of the volume sits near the scanner isocentre and the slab is placed in the upper
    abdomen (z around -200 mm), as in real abdominal CT.

    Returns:
        ``(4, 4)`` float64 affine mapping ``(i, j, k, 1)`` to RAS millimetres.
    """
    sx, sy, sz = (float(s) for s in spacing)
    aff = np.diag([-sx, -sy, sz, 1.0])
    # Voxel (0,0,0) is the right-anterior corner (RAS: +x, +y) of the bottom slice.
    aff[0, 3] = round(sx * (size - 1) / 2.0 + origin_jitter[0], 3)
    aff[1, 3] = round(sy * (size - 1) / 2.0 + 20.0 + origin_jitter[1], 3)
    aff[2, 3] = round(-200.0 - sz * (n_slices - 1) / 2.0 + origin_jitter[2], 3)
    return aff


# Reproducibility: voxel-wise maths below uses only + - * / and sqrt (IEEE-exact, the same on every x86 CPU whatever
# SIMD numpy dispatches to); transcendental functions are evaluated per slice or per case with Python's ``math``.
# numpy's SIMD sin/arctan2/power may differ in the last bit between CPUs and flip a voxel at a threshold.
def _field(rng: np.random.Generator, shape: Tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation, float32."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / np.float32(max(float(f.std(dtype=np.float64)), 1e-6))


def _col(values) -> np.ndarray:
    """Per-slice values as a float32 ``(1, 1, n)`` array (broadcasts over a volume)."""
    return np.asarray(list(values), dtype=np.float32)[None, None, :]


def _rot(du, dv, ang):
    c, s = math.cos(ang), math.sin(ang)
    return c * du + s * dv, -s * du + c * dv


def _ell(du, dv, a, b, ang=0.0):
    """Squared normalised radius of an (optionally rotated) ellipse; < 1 inside."""
    if ang:
        du, dv = _rot(du, dv, ang)
    x, y = du / a, dv / b
    return x * x + y * y


def _zprofile(tt, lo, hi, power=0.6):
    """Craniocaudal size profile per slice: 0 outside [lo, hi], rising to 1 in the middle (an ellipsoid-like cap)."""
    c, h = (lo + hi) / 2.0, max((hi - lo) / 2.0, 1e-6)
    return _col(max(0.0, 1.0 - ((x - c) / h) ** 2) ** power for x in tt)


def _ramp(tt, start, width, power=1.0):
    """Per-slice ramp ``clip((t - start) / width, 0, 1) ** power`` (``width < 0`` ramps downward)."""
    return _col(min(max((x - start) / width, 0.0), 1.0) ** power for x in tt)


# ------------------------------------------------------------------------------------------------------- generation
def generate_case(
    seed: int,
    size: int = DEFAULT_SIZE,
    n_slices: int = DEFAULT_SLICES,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdominal CT volume and its spleen mask.

    Args:
        seed: Case seed; the result is a pure function of ``(seed, size, n_slices, spacing)``.
        size: In-plane matrix size (square).
        n_slices: Number of axial slices; the anatomy spans the slab (organs appear and disappear along z, and the
            top and bottom slices never contain spleen).
        spacing: Voxel size ``(sx, sy, sz)`` in mm, written into the affine.

    Returns:
        ``(image, label, affine)``: image ``(size, size, n_slices)`` int16 Hounsfield units in ``[-1024, 3071]``,
        label of the same shape uint8 (0 background, 1 spleen), affine ``(4, 4)`` float64 RAS+.
    """
    if size < 16 or n_slices < 8:
        raise ValueError(f"phantom needs size >= 16 and n_slices >= 8 (got size={size}, n_slices={n_slices})")
    rng = np.random.default_rng(int(seed))
    N, n = int(size), int(n_slices)
    shape = (N, N, n)
    U = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    # ---- per-case parameters (all drawn up front, in a fixed order) ----------------------------------------
    bu, bv = U(-0.03, 0.03), U(-0.03, 0.05)  # body centre (normalised)
    A0, B0 = U(0.78, 0.90), U(0.56, 0.68)  # body semi-axes, lateral / AP
    fat = U(0.06, 0.15)  # subcutaneous fat thickness (fraction of body radius)
    wall = U(0.045, 0.065)  # muscle wall thickness
    hu_fat, hu_vfat, hu_muscle = U(-115, -90), U(-105, -80), U(42, 58)
    hu_liver = float(np.clip(rng.normal(60, 8), 42, 78))
    hu_spleen = float(np.clip(hu_liver + rng.uniform(-14, 10), 38, 78))  # overlaps the liver; either may be brighter
    hu_kidney, hu_medulla = U(140, 185), U(80, 115)
    hu_aorta = U(150, 210)
    hu_pancreas, hu_bowel_wall = U(38, 55), U(35, 55)
    noise_sd, corr_sd = U(15, 25), U(6, 12)
    # liver: right, from a bottom tip up through the slab; left lobe crosses the midline anteriorly above tl_lobe
    tl_bottom, tl_lobe = U(-0.1, 0.3), U(0.45, 0.7)
    # spleen: left posterior, never in the top/bottom slices
    sp_h = U(0.22, 0.33)
    sp_c = U(0.14 + sp_h, 0.86 - sp_h)
    sp_u, sp_v = U(0.42, 0.62), U(0.12, 0.42)  # centre, as fractions of body semi-axes
    sp_a, sp_b = U(0.12, 0.2), U(0.2, 0.32)  # semi-axes (normalised to half the matrix)
    sp_ang = U(0.35, 1.05)  # long axis oblique, following the ribs
    sp_drift = U(-0.12, 0.02)  # moves anterior toward its lower pole
    sp_lob = U(0.15, 0.35)  # lobulation amplitude
    # kidneys (left higher than right), stomach, bowel
    kl_hi, kr_hi = U(0.38, 0.6), U(0.28, 0.5)
    st_lo = U(0.35, 0.6)
    n_bowel = int(rng.integers(6, 12))
    bowel = [
        (U(-0.5, 0.5), U(-0.55, 0.05), U(0.045, 0.1), U(-0.15, 0.15), U(-0.15, 0.15), int(rng.integers(0, 3)))
        for _ in range(n_bowel)
    ]
    rib_phase, rib_freq = U(0, 2 * math.pi), U(3.0, 4.5)
    vert_phase = U(0, 1)
    origin_jitter = (U(-10, 10), U(-10, 10), U(-30, 30))

    # smooth random fields (each a unit-variance Gaussian field)
    f_spleen = _field(rng, shape, (N / 14, N / 14, n / 8))
    f_liver = _field(rng, shape, (N / 10, N / 10, n / 6))
    f_v1 = _field(rng, shape, (N / 40, N / 40, max(n / 16, 1.0)))
    f_v2 = _field(rng, shape, (N / 40, N / 40, max(n / 16, 1.0)))
    f_tex = _field(rng, shape, (N / 32, N / 32, 1.0))
    f_mot = _field(rng, shape, (N / 60, N / 60, 0.7))  # mottled bowel content
    white = rng.standard_normal(shape).astype(np.float32)
    corr = _field(rng, shape, (1.3, 1.3, 0.6))

    # ---- coordinates (normalised to half the matrix): u -> patient's left, v -> posterior, t: 0 bottom .. 1 top
    u = ((np.arange(N, dtype=np.float32) - (N - 1) / 2) / (N / 2))[:, None, None]
    v = ((np.arange(N, dtype=np.float32) - (N - 1) / 2) / (N / 2))[None, :, None]
    tt = [k / (n - 1) for k in range(n)]
    t = _col(tt)
    zeros = np.zeros(shape, np.float32)

    # ---- body, fat, muscle wall -------------------------------------------------------------------------
    A = A0 * (1.0 + 0.05 * (t - 0.5))
    B = B0 * (1.0 + 0.03 * (t - 0.5))
    du, dv = u - bu + zeros, v - bv + zeros
    # superellipse, exponent 2 in front and 3 at the back (flatter back: the patient lies on the table);
    # within(c) is the region "rho < c" where rho is the superellipse radius (1 = skin)
    xb, yb = np.abs(du / A), np.abs(dv / B)
    post = dv > 0
    S = np.where(post, xb * xb * xb + yb * yb * yb, xb * xb + yb * yb)

    def within(c: float) -> np.ndarray:
        return np.where(post, S < c * c * c, S < c * c)

    s1, s2 = 1.0 - fat, 1.0 - fat - wall
    body = within(1.0)
    interior = within(s2)

    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = hu_fat
    hu[~within(0.985) & body] = 20.0  # skin
    hu[within(s1) & ~interior] = hu_muscle
    hu[interior] = hu_vfat
    mesentery = interior & (f_tex > 1.2)  # soft-tissue strands in the visceral fat
    hu[mesentery] = -40.0

    # ---- spine (vertebral body/disc, canal, posterior elements), paraspinal muscles, psoas ------------------
    back = bv + B * s2  # inner posterior wall (per slice)
    vb_u, vb_v, vb_r = bu, back - 0.24 * B0, 0.1
    r_vb = _ell(u - vb_u, v - vb_v, vb_r * 1.05, vb_r)
    level = np.mod(np.arange(n) / max(n / 2.7, 1.0) + vert_phase, 1.0)[None, None, :]
    disc = (level < 0.18) + zeros > 0
    canal_v = vb_v + vb_r + 0.045
    r_canal = _ell(u - vb_u, v - canal_v, 0.045, 0.04)
    r_arch = _ell(u - vb_u, v - canal_v - 0.01, 0.085, 0.075)
    r_spinous = _ell(u - vb_u, v - canal_v - 0.11, 0.025, 0.09)
    r_para_l = _ell(u - vb_u - 0.13, v - canal_v - 0.06, 0.1, 0.09)
    r_para_r = _ell(u - vb_u + 0.13, v - canal_v - 0.06, 0.1, 0.09)
    psoas_s = _ramp(tt, 0.45, -0.45)  # psoas grows toward the bottom
    r_psoas_l = _ell(u - vb_u - 0.15, v - vb_v + 0.01, 0.03 + 0.07 * psoas_s, 0.03 + 0.06 * psoas_s)
    r_psoas_r = _ell(u - vb_u + 0.15, v - vb_v + 0.01, 0.03 + 0.07 * psoas_s, 0.03 + 0.06 * psoas_s)
    hu[((r_para_l < 1) | (r_para_r < 1)) & body] = hu_muscle
    hu[((r_psoas_l < 1) | (r_psoas_r < 1)) & (psoas_s > 0.05)] = hu_muscle

    # ---- ribs: bright arcs in the lateral/posterior wall, present in the upper part ----------------------------
    # angle theta around the body centre as (cos, sin); sin(7 theta + phi) = Im((cos + i sin)^7 e^{i phi})
    xr, yr = du / A, dv / B
    rr = np.sqrt(xr * xr + yr * yr) + np.float32(1e-6)
    cth, sth = xr / rr, yr / rr
    re, im = cth, sth
    for _ in range(6):
        re, im = re * cth - im * sth, re * sth + im * cth
    phi = [2 * math.pi * rib_freq * x + rib_phase for x in tt]
    rib_on = im * _col(math.cos(f) for f in phi) + re * _col(math.sin(f) for f in phi) > 0.35
    anterior_gap = (sth < 0) & (cth > -0.737) & (cth < 0.732)  # costal cartilage region: no bony rib
    posterior_gap = sth > 0.969  # spine
    rib_band = ~within(s2 - 0.015) & within(s2 + 0.035)
    ribs = rib_band & rib_on & ~anterior_gap & ~posterior_gap & (t > 0.22)
    rib_cortex = ribs & (within(s2 - 0.005) | ~within(s2 + 0.025))
    hu[ribs] = 350.0
    hu[rib_cortex] = 850.0

    # ---- liver (right), with vessels and a left lobe reaching across the midline ------------------------------
    lz = _ramp(tt, tl_bottom, 0.45, 0.7)
    r_liver = _ell(u - bu + 0.42 * A, v - bv + 0.02, 0.46 * A * lz + 1e-3, 0.72 * B * (0.35 + 0.65 * lz))
    lobe = _ramp(tt, tl_lobe, 0.3, 0.6)
    r_lobe = _ell(u - bu - 0.05, v - bv + 0.45 * B, 0.42 * A * lobe + 1e-3, 0.22 * B * lobe + 1e-3, -0.15)
    liver = ((r_liver + 0.12 * f_liver < 1.0) | (r_lobe + 0.12 * f_liver < 1.0)) & interior
    hu[liver] = hu_liver
    vessels = liver & (np.abs(f_v1) < 0.16) & (np.abs(f_v2) < 0.16)
    hu[vessels] = hu_liver + U(40, 80)

    # ---- kidneys (posterior, beside the spine), lower part -----------------------------------------------------
    kidney_any = np.zeros(shape, bool)
    for side, k_hi in ((1.0, kl_hi), (-1.0, kr_hi)):
        kz = _zprofile(tt, k_hi - 0.55, k_hi, 0.5)
        kc_u, kc_v = vb_u + side * 0.3 * A0, vb_v - 0.02
        rk = _ell(u - kc_u, v - kc_v, 0.085 * kz + 1e-3, 0.13 * kz + 1e-3, side * 0.5)
        kid = (rk < 1.0) & interior
        hilum = _ell(u - kc_u + side * 0.07, v - kc_v + 0.02, 0.04 * kz + 1e-3, 0.05 * kz + 1e-3) < 1.0
        hu[kid] = hu_kidney
        hu[kid & (rk < 0.45)] = hu_medulla
        hu[kid & hilum] = -60.0
        kidney_any |= kid & ~hilum

    # ---- stomach (left anterior, upper): wall, fluid, air anteriorly (patient supine) --------------------------
    sz_prof = _ramp(tt, st_lo, 0.25, 0.5)
    st_u, st_v = bu + 0.22 * A0, bv - 0.2 * B0
    r_st = _ell(u - st_u, v - st_v, 0.2 * sz_prof + 1e-3, 0.17 * sz_prof + 1e-3, 0.4)
    stomach = (r_st < 1.0) & interior & ~liver
    air_level = st_v - 0.05
    hu[stomach] = hu_bowel_wall
    lumen = stomach & (r_st < 0.72)
    hu[lumen] = 12.0
    hu[lumen & (v < air_level)] = -1000.0

    # ---- bowel loops (anterior, lower part): air, fluid or mottled content inside a wall ------------------------
    for cu, cv, r, su, sv, kind in bowel:
        bz = _ramp(tt, 0.7, -0.2)
        cu_t, cv_t = bu + cu * A0 + su * t, bv + cv * B0 + sv * t
        rb = _ell(u - cu_t, v - cv_t, r * (0.3 + 0.7 * bz) + 1e-3, r * 0.85 * (0.3 + 0.7 * bz) + 1e-3)
        loop = (rb < 1.0) & interior & ~liver & ~kidney_any & (bz > 0.05)
        inner = loop & (rb < 0.55)
        hu[loop] = hu_bowel_wall
        if kind == 0:
            hu[inner] = -1000.0
        elif kind == 1:
            hu[inner] = 15.0
        else:
            hu[inner] = np.where(f_mot[inner] > 0.3, -600.0, 20.0 + 30.0 * f_mot[inner])

    # ---- aorta and IVC, pancreas ------------------------------------------------------------------------------
    r_ao = _ell(u - vb_u - 0.07, v - (vb_v - vb_r - 0.07), 0.06, 0.06)
    r_ivc = _ell(u - vb_u + 0.13, v - (vb_v - vb_r - 0.06), 0.07, 0.05)
    pz = _zprofile(tt, sp_c - sp_h * 0.9, sp_c + sp_h * 0.5, 0.5)
    r_pan = _ell(u - vb_u - 0.2, v - (vb_v - vb_r - 0.17), 0.28 * pz + 1e-3, 0.05 * pz + 1e-3, -0.35)
    pancreas = (r_pan + 0.15 * f_tex < 1.0) & interior & ~liver
    hu[pancreas] = hu_pancreas

    # ---- spleen (label 1): left posterior, deformed lobulated ellipsoid with a medial hilum -----------------------
    spz = _zprofile(tt, sp_c - sp_h, sp_c + sp_h, 0.55)
    c_u = bu + sp_u * A0 + 0.03 * (t - sp_c) / sp_h
    c_v = bv + sp_v * B0 + sp_drift * (sp_c - t) / sp_h
    su_, sv_ = u - c_u + zeros, v - c_v + zeros
    r_sp = _ell(su_, sv_, sp_a * spz + 1e-3, sp_b * spz + 1e-3, sp_ang)
    ru, rv = _rot(su_, sv_, sp_ang)
    # hilum: a concavity on the medial-anterior side
    r_hil = _ell(ru + 1.05 * sp_a * spz, rv + 0.1 * sp_b * spz, 0.55 * sp_a * spz + 1e-3, 0.55 * sp_b * spz + 1e-3)
    spleen = (r_sp + sp_lob * f_spleen < 1.0) & ~(r_hil < 1.0) & (spz > 0.05)
    spleen &= within(s2 - 0.02)  # inside the wall, clear of the ribs
    spleen &= ~kidney_any & (r_vb > 1.3) & (r_para_l > 1.0)
    hu[spleen] = hu_spleen
    # splenic vein along the hilum toward the midline: a bright neighbour at the spleen's mid levels
    vz = _zprofile(tt, sp_c - 0.12, sp_c + 0.08, 0.5)
    r_sv = _ell(u - (vb_u + 0.25), v - (vb_v - vb_r - 0.1), 0.22 * vz + 1e-3, 0.022 * vz + 1e-3, -0.45)
    hu[(r_sv < 1.0) & interior & ~spleen & ~liver] = hu_aorta - 30.0

    # vessels and spine drawn last (they sit on top of everything)
    hu[(r_ao < 1.0)] = hu_aorta
    hu[(r_ivc < 1.0) & (t < 0.85)] = hu_aorta - 50.0
    hu[((r_arch < 1.0) | (r_spinous < 1.0)) & within(s1)] = 650.0
    hu[r_canal < 1.0] = 15.0
    hu[r_vb < 1.0] = np.where(disc, 85.0, 750.0)[r_vb < 1.0]
    hu[(r_vb < 0.72) & ~disc] = 230.0

    # ---- texture, partial volume, noise -------------------------------------------------------------------------
    soft = body & (hu > -200) & (hu < 200)
    hu[soft] += 5.0 * f_tex[soft]
    hu = ndimage.gaussian_filter(hu, (0.75, 0.75, 0.4), mode="nearest")
    hu += noise_sd * white + corr_sd * corr
    image = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    label = spleen.astype(np.uint8)
    affine = phantom_affine(N, n, spacing, origin_jitter)
    return image, label, affine


# ------------------------------------------------------------------------------------------------------- analysis
def best_threshold_dice(image: np.ndarray, label: np.ndarray, lo: int = -300, hi: int = 400, step: int = 2) -> float:
    """Best Dice of any single HU interval ``[a, b]`` used as a spleen detector (an intensity-only baseline).

    Args:
        image: HU array, any shape.
        label: Binary mask of the same shape.

    Returns:
        The maximum Dice over all intervals with ends on a ``step``-HU grid in ``[lo, hi]``.
    """
    edges = np.arange(lo, hi + step, step)
    img = image.ravel()
    lab = label.ravel().astype(bool)
    all_h = np.histogram(img, bins=edges)[0].astype(np.float64)
    pos_h = np.histogram(img[lab], bins=edges)[0].astype(np.float64)
    c_all = np.concatenate([[0.0], np.cumsum(all_h)])
    c_pos = np.concatenate([[0.0], np.cumsum(pos_h)])
    # interval = bins a..b-1, all a < b (shape (nb+1, nb+1))
    tp = c_pos[None, :] - c_pos[:, None]
    pred = c_all[None, :] - c_all[:, None]
    dice = np.where(pred > 0, 2.0 * tp / (pred + lab.sum() + 1e-9), 0.0)
    return float(dice.max())


# ------------------------------------------------------------------------------------------------------- writing
def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A ``.nii.gz`` file's bytes, reproducible (gzip ``mtime=0``, no file name in the gzip header).

    The header carries the affine as both qform and sform (code 1, scanner) and millimetre units.
    """
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(raw)
    return buf.getvalue()


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medkd-phantom", str(seed), *[str(p) for p in parts]])


def dicom_series_bytes(image: np.ndarray, affine: np.ndarray, seed: int, case_id: str) -> List[bytes]:
    """One CT Image Storage file per axial slice (``k`` order, inferior first), as bytes.

    Pixel ``[row, col]`` of slice ``k`` is voxel ``(col, row, k)`` (DICOM arrays are ``(rows, cols) = (y, x)``).
    Geometry is LPS: ``ImagePositionPatient`` is the voxel's RAS position with x and y negated, and
    ``ImageOrientationPatient`` holds the affine's first two columns (unit, LPS). Stored values are
    ``HU - RescaleIntercept`` as uint16 (``RescaleSlope`` 1, ``RescaleIntercept`` -1024).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    import medkd

    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = ras_to_lps @ affine
    sx, sy, sz = (float(np.linalg.norm(affine[:3, c])) for c in range(3))
    row_dir = lps[:3, 0] / sx  # direction of increasing column index (x)
    col_dir = lps[:3, 1] / sy  # direction of increasing row index (y)
    study, series, frame = _uid(seed, case_id, "study"), _uid(seed, case_id, "series"), _uid(seed, case_id, "frame")
    impl_uid = _uid(0, "medkd-implementation")
    out = []
    for k in range(image.shape[2]):
        sop = _uid(seed, case_id, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = impl_uid
        meta.ImplementationVersionName = "MEDKD_" + medkd.__version__.replace(".", "")[:10]
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"  # fixed, never the clock
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.Modality = "CT"
        ds.Manufacturer = "medkd synthetic phantom"
        ds.StudyDescription = "Synthetic abdominal CT (medkd phantom)"
        ds.SeriesDescription = f"{case_id} axial"
        ds.PatientName = f"Phantom^{case_id}"
        ds.PatientID = f"MEDKD-{case_id}"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = f"{sz:g}"
        ds.SpacingBetweenSlices = f"{sz:g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        pos = lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [f"{c:.4f}" for c in pos[:3]]
        ds.ImageOrientationPatient = [f"{c:.6f}" for c in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{pos[2]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(image.shape[1]), int(image.shape[0])
        ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]  # (between rows, between columns)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        stored = (image[:, :, k].T.astype(np.int32) - RESCALE_INTERCEPT).astype("<u2")
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        buf = io.BytesIO()
        try:
            ds.save_as(buf, enforce_file_format=True)
        except TypeError:  # pydicom < 3
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(buf, write_like_original=False)
        out.append(buf.getvalue())
    return out


def write_msd_dataset(
    out: Path,
    n_cases: int = DEFAULT_CASES,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    n_slices: int = DEFAULT_SLICES,
    dicom_case: bool = True,
    vary_slices: bool = True,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> Path:
    """Write an MSD Task09-style spleen dataset of phantom cases into ``out``.

    Layout: ``dataset.json``, ``imagesTr/spleen_XXX.nii.gz`` (int16 HU), ``labelsTr/spleen_XXX.nii.gz`` (uint8) and,
    when ``dicom_case``, case 0 again as a DICOM series in the folder-of-cases layout:
    ``dicom/spleen_000/IM0001.dcm ...`` with its label ``dicom/spleen_000_label.nii.gz``.

    Args:
        out: Output folder (created; existing files with the same names are replaced).
        n_cases: Number of cases.
        seed: Dataset seed; case ``i`` uses :func:`case_seed` ``(seed, i)``.
        size: In-plane matrix size.
        n_slices: Nominal slices per case; with ``vary_slices`` each case gets ``n_slices`` + an integer in [-4, 4].
        dicom_case: Also write case 0 as a DICOM series.
        vary_slices: Vary the slice count per case.
        spacing: Voxel size in mm.

    Returns:
        ``out``. The files are byte-identical for identical arguments.
    """
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        cs = case_seed(seed, i)
        n_i = n_slices + (int(np.random.default_rng(cs ^ 0x5EED).integers(-4, 5)) if vary_slices else 0)
        image, label, affine = generate_case(cs, size=size, n_slices=max(n_i, 8), spacing=spacing)
        cid = f"spleen_{i:03d}"
        (out / "imagesTr" / f"{cid}.nii.gz").write_bytes(nifti_bytes(image, affine))
        (out / "labelsTr" / f"{cid}.nii.gz").write_bytes(nifti_bytes(label, affine))
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        if dicom_case and i == 0:
            dcm_dir = out / "dicom" / cid
            dcm_dir.mkdir(parents=True, exist_ok=True)
            for k, blob in enumerate(dicom_series_bytes(image, affine, cs, cid)):
                (dcm_dir / f"IM{k + 1:04d}.dcm").write_bytes(blob)
            (out / "dicom" / f"{cid}_label.nii.gz").write_bytes(nifti_bytes(label, affine))
    doc = {
        "name": "Spleen (medkd synthetic phantom)",
        "description": "Synthetic abdominal CT with spleen segmentation, made by medkd.data.phantom",
        "reference": "medkd sample-data (synthetic; no patient data)",
        "licence": "CC0-1.0",
        "release": f"seed {seed}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(doc, indent=4) + "\n")
    (out / "README.md").write_text(_readme(n_cases, seed, size, n_slices, dicom_case, vary_slices, spacing))
    return out


def _regen_command(n_cases, seed, size, n_slices, dicom_case, vary_slices, spacing) -> str:
    cmd = "medkd sample-data OUT"
    for flag, value, default in (("--cases", n_cases, DEFAULT_CASES), ("--seed", seed, 0),
                                 ("--size", size, DEFAULT_SIZE), ("--slices", n_slices, DEFAULT_SLICES)):
        if value != default:
            cmd += f" {flag} {value}"
    if not dicom_case:
        cmd += " --no-dicom"
    if not vary_slices or tuple(float(x) for x in spacing) != DEFAULT_SPACING:
        cmd = (f"python -c 'from medkd.data.phantom import write_msd_dataset; write_msd_dataset(\"OUT\", {n_cases}, "
               f"{seed}, {size}, {n_slices}, {dicom_case}, {vary_slices}, {tuple(spacing)})'")
    return cmd


def _readme(n_cases, seed, size, n_slices, dicom_case, vary_slices, spacing) -> str:
    cmd = _regen_command(n_cases, seed, size, n_slices, dicom_case, vary_slices, spacing)
    sx, sy, sz = spacing
    lines = [
        "# medkd sample data (synthetic abdominal CT, spleen labels)",
        "",
        "Made by `medkd.data.phantom` -- no patient data. An MSD Task09-style dataset: `dataset.json`,",
        "`imagesTr/spleen_XXX.nii.gz` (int16 Hounsfield units) and `labelsTr/spleen_XXX.nii.gz` (uint8, 1 = spleen),",
        f"{n_cases} cases of {size}x{size} voxels x "
        + (f"{n_slices - 4}-{n_slices + 4} slices" if vary_slices else f"{n_slices} slices")
        + f", spacing {sx:g} x {sy:g} x {sz:g} mm (RAS+ affine `diag(-sx, -sy, sz)`).",
        "",
        "The phantom has body wall, spine and ribs, liver, kidneys, aorta/IVC, pancreas, stomach and bowel. The spleen",
        "(left, posterior) varies in size, position and lobulated shape; its mean HU is drawn around the liver's, so",
        "intensity alone cannot find it (the best single HU-interval threshold scores Dice < 0.5 on every case);",
        "the top and bottom slices contain no spleen.",
        "",
    ]
    if dicom_case:
        lines += [
            "`dicom/` holds case 0 again in the folder-of-cases layout: a DICOM series `dicom/spleen_000/IM0001.dcm ...`",
            "(CT Image Storage, one file per axial slice, inferior first, LPS geometry, RescaleIntercept -1024) with its",
            "label beside it as `dicom/spleen_000_label.nii.gz`.",
            "",
        ]
    lines += [
        "Regenerate it bit-identically (same files, byte for byte), where OUT is this folder, with:",
        "",
        "```",
        cmd + (" --overwrite" if cmd.startswith("medkd") else ""),
        "```",
        "",
        "(The copy shipped in the medkd repository: `medkd sample-data sample_data --overwrite` from the repository",
        "root; `tests/test_phantom.py` checks that it matches.)",
        "",
    ]
    return "\n".join(lines)


def check_sample_options(n_cases: int, seed: int, size: int, n_slices: int) -> None:
    """The ``sample-data`` options in range (the command line makes a bad one a usage error, exit 2).

    Raises:
        OptionError: ``--cases`` < 1, a ``--seed`` outside what numpy takes, ``--size`` outside [16, MAX_SIZE],
            ``--slices`` outside [12, MAX_SIZE].
    """
    from medkd.options import check_int, check_seed, check_size

    check_int(n_cases, "--cases", lo=1)
    check_seed(seed, "--seed")
    check_size(size, "--size", lo=16)
    check_size(n_slices, "--slices", lo=12)


def make_sample_data(
    out: Path,
    *,
    overwrite: bool = False,
    n_cases: int = DEFAULT_CASES,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    n_slices: int = DEFAULT_SLICES,
    dicom_case: bool = True,
) -> dict:
    """Write the sample dataset into ``out`` atomically (temp folder beside it, then ``os.replace``).

    Args:
        out: Destination folder. An existing non-empty ``out`` is refused unless ``overwrite``.
        overwrite: Replace an existing ``out``.
        n_cases, seed, size, n_slices, dicom_case: As in :func:`write_msd_dataset`.

    Returns:
        Summary dict: ``out``, ``cases``, ``files``, ``bytes``, ``seconds``.

    Raises:
        MedkdError: ``out`` exists and is not empty (without ``overwrite``), or bad arguments
            (:func:`check_sample_options`).
    """
    import shutil
    import time

    from medkd.errors import MedkdError
    from medkd.rundir import replace_dir, temp_dir_beside

    out = Path(out)
    check_sample_options(n_cases, seed, size, n_slices)
    exists = out.exists() or out.is_symlink()
    if exists and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise MedkdError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    t0 = time.perf_counter()
    tmp = temp_dir_beside(out)
    try:
        write_msd_dataset(tmp, n_cases=n_cases, seed=seed, size=size, n_slices=n_slices, dicom_case=dicom_case)
        files = [p for p in tmp.rglob("*") if p.is_file()]
        n_bytes = sum(p.stat().st_size for p in files)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "cases": n_cases, "files": len(files), "bytes": n_bytes,
            "seconds": time.perf_counter() - t0}
