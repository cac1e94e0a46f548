"""Intensity models of the varied training family (``scripts/varied.py``): label map -> uint8 image.

Every model takes ``gts`` ((D, H, W) uint8, classes 1..K), ``body`` ((D, H, W) bool, the
patient; ignored by microscopy), ``extra`` ((D, H, W) uint8, unlabelled structures 1..M that look
like organs but are not classes), the spacing (z, y, x) in mm, ``contrast`` (1 = usual object
contrast, smaller = harder) and ``noise`` (multiplier of the noise level), and returns a
``(D, H, W)`` uint8 image (0..255, like the organizer's preprocessed data):

- ``CT``: tissue values in Hounsfield-like units, a little blur, spatially correlated noise,
  then one of several clinical windows (soft tissue, liver, mediastinum, wide) to 0..255;
- ``MR``: tissue values in arbitrary units times a bias field made of a random quadratic
  polynomial and the fall-off of a surface coil outside the volume, additive noise, scaled by the
  maximum of the smoothed image;
- ``PET``: uptake values (labelled lesions mostly hot, thin structures always), Gaussian blur of 4-9 mm FWHM, Poisson
  counting noise, scaled by a high percentile;
- ``US``: echogenicity (objects 4-20 dB hypo- or hyper-echoic), depth attenuation, correlated
  Rayleigh speckle, log compression to a 35-55 dB dynamic range, inside a fan-shaped field of view
  (zero outside: the caller cuts labels there too);
- ``Microscopy``: bright objects on a dark background, an axially elongated point-spread
  function, Poisson and read noise.

Objects get an internal texture (smooth noise at two scales). Every model is deterministic in
``rng``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from scripts.synth_base import _smooth_noise

MODALITIES = ("CT", "MR", "PET", "US", "Microscopy")
CT_WINDOWS = ((40, 400), (60, 160), (50, 350), (40, 600), (100, 1000))  # (level, width) HU


def texture(rng, shape) -> np.ndarray:
    """Smooth noise at a coarse and a fine scale, in about [-1, 1], float32."""
    return (0.6 * _smooth_noise(rng, shape, int(rng.integers(3, 6)))
            + 0.4 * _smooth_noise(rng, shape, int(rng.integers(8, 14))))


def _paint(rng, img, labels, values, amp):
    """``img[labels == j] = values[j - 1] + amp * texture`` for each label j (in place)."""
    for j, v in enumerate(values, start=1):
        m = labels == j
        if m.any():
            img[m] = v + amp * texture(rng, img.shape)[m]


def _signed(rng, lo, hi, n, p_bright=0.6):
    sign = np.where(rng.random(n) < p_bright, 1.0, -1.0)
    return sign * rng.uniform(lo, hi, size=n)


def _to_uint8(x) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _sigma_vox(mm, spacing):
    return tuple(float(mm) / float(s) for s in spacing)


def ct(rng, gts, body, extra, spacing, contrast=1.0, noise=1.0):
    shape, K, M = gts.shape, int(gts.max()), int(extra.max())
    base = float(rng.uniform(-20, 60))
    hu = np.where(body, np.float32(base), np.float32(-1000.0)).astype(np.float32)
    hu += 12.0 * texture(rng, shape) * body
    _paint(rng, hu, extra, base + _signed(rng, 40, 250, M) * contrast, 15.0)
    deltas = _signed(rng, 40, 250, K) * contrast
    if contrast >= 1.0:  # now and then a bone-like (very bright) class
        deltas = np.where(rng.random(K) < 0.12, rng.uniform(400, 900, K), deltas)
    _paint(rng, hu, gts, base + deltas, float(rng.uniform(5, 30)))
    hu = ndimage.gaussian_filter(hu, sigma=0.6)
    grain = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=0.8)
    hu += grain / max(float(grain.std()), 1e-6) * float(rng.uniform(5, 30)) * noise
    level, width = CT_WINDOWS[int(rng.integers(0, len(CT_WINDOWS)))]
    return _to_uint8((hu - (level - width / 2)) / width * 255.0)


def _mr_bias(rng, shape, spacing):
    c = [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
         for i, n in enumerate(shape)]
    bias = 1.0 + sum(float(rng.uniform(-0.25, 0.25)) * c[i] for i in range(3))
    for i in range(3):
        for j in range(i, 3):
            bias = bias + float(rng.uniform(-0.15, 0.15)) * c[i] * c[j]
    # a surface coil just outside one face: 1 / (1 + d / d0) fall-off
    extent = np.asarray(shape) * np.asarray(spacing)
    coil = rng.uniform(0.2, 0.8, 3) * extent
    axis = int(rng.integers(1, 3))
    coil[axis] = -0.1 * extent[axis] if rng.random() < 0.5 else 1.1 * extent[axis]
    d = np.sqrt(sum(((np.arange(n, dtype=np.float32) * s - p) ** 2)
                    .reshape([-1 if a == i else 1 for a in range(3)])
                    for i, (n, s, p) in enumerate(zip(shape, spacing, coil))))
    falloff = 1.0 / (1.0 + d / float(rng.uniform(0.3, 1.0) * extent.max()))
    strength = float(rng.uniform(0.0, 1.0))
    bias = bias * ((1 - strength) + strength * falloff / falloff.max())
    return np.clip(bias, 0.2, None).astype(np.float32)


def mr(rng, gts, body, extra, spacing, contrast=1.0, noise=1.0):
    shape, K, M = gts.shape, int(gts.max()), int(extra.max())
    base = float(rng.uniform(0.3, 0.5))
    v = np.where(body, np.float32(base), np.float32(0.0)).astype(np.float32)
    v += 0.04 * texture(rng, shape) * body
    _paint(rng, v, extra, np.clip(base + _signed(rng, 0.12, 0.4, M) * contrast, 0.03, None), 0.04)
    _paint(rng, v, gts, np.clip(base + _signed(rng, 0.12, 0.45, K) * contrast, 0.03, None),
           float(rng.uniform(0.01, 0.06)))
    v = ndimage.gaussian_filter(v * _mr_bias(rng, shape, spacing), sigma=0.5)
    v += rng.normal(0.0, float(rng.uniform(0.01, 0.05)) * noise, size=shape).astype(np.float32)
    v = np.clip(v, 0, None)
    top = float(ndimage.gaussian_filter(v, 1.0).max())
    return _to_uint8(v / max(top, 1e-6) * 240.0)


def pet(rng, gts, body, extra, spacing, contrast=1.0, noise=1.0):
    shape, K, M = gts.shape, int(gts.max()), int(extra.max())
    bg = float(rng.uniform(0.5, 1.5))
    u = np.where(body, np.float32(bg), np.float32(0.02)).astype(np.float32)
    u *= 1.0 + 0.2 * texture(rng, shape)
    # unlabelled uptake (brain, heart, bladder-like) is often hotter than the lesions
    _paint(rng, u, extra, bg * rng.uniform(1.5, 10.0, M), 0.1 * bg)
    hot = rng.random(K) < 0.8
    ratio = np.where(hot, rng.uniform(2.0, 8.0, K), rng.uniform(0.2, 0.6, K))
    for k in range(K):  # thin classes (mostly gone after one erosion) would vanish in the blur
        m = gts == k + 1
        if ndimage.binary_erosion(m).sum() < 0.3 * m.sum():
            ratio[k] = max(ratio[k], 4.0) if hot[k] else float(rng.uniform(4.0, 10.0))
    ratio = 1.0 + (ratio - 1.0) * contrast
    _paint(rng, u, gts, bg * ratio, 0.15 * bg)
    fwhm = float(rng.uniform(4.0, 9.0))
    u = ndimage.gaussian_filter(np.clip(u, 0, None), sigma=_sigma_vox(fwhm / 2.355, spacing))
    scale = float(rng.uniform(8.0, 40.0)) / max(noise, 1e-3) ** 2 / bg  # counts per unit uptake
    counts = rng.poisson(u * scale).astype(np.float32) / scale
    top = float(np.percentile(counts, 99.9))
    return _to_uint8(counts / max(top, 1e-6) * 255.0)


def fan(rng, shape):
    """(D, H, W) bool fan-shaped field of view: apex above row 0 (y is depth), half-angle 30-50
    degrees about a near-vertical axis, cut at a depth of 0.8-1.05 H."""
    H, W = shape[1:]
    apex_y = -float(rng.uniform(0.0, 0.25)) * H
    apex_x = (W - 1) / 2 + float(rng.uniform(-0.1, 0.1)) * W
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    ang = np.degrees(np.arctan2(xx - apex_x, yy - apex_y)) - float(rng.uniform(-8, 8))
    r = np.hypot(yy - apex_y, xx - apex_x)
    half, depth = float(rng.uniform(30, 50)), float(rng.uniform(0.8, 1.05)) * H - apex_y
    return np.broadcast_to(((np.abs(ang) <= half) & (r <= depth))[None], shape).copy()


def us(rng, gts, body, extra, spacing, contrast=1.0, noise=1.0, fov=None):
    shape, K, M = gts.shape, int(gts.max()), int(extra.max())
    e = np.ones(shape, dtype=np.float32)
    e *= 1.0 + 0.3 * texture(rng, shape)
    # echogenicity relative to the background, in dB: hypo-echoic (down to cyst-like) or hyper
    _paint(rng, e, extra, 10 ** (_signed(rng, 3, 15, M, 0.4) * contrast / 20), 0.1)
    _paint(rng, e, gts, 10 ** (_signed(rng, 4, 20, K, 0.4) * contrast / 20), 0.1)
    depth = (np.arange(shape[1], dtype=np.float32) * float(spacing[1]))[None, :, None]
    e *= np.exp(-float(rng.uniform(0.002, 0.012)) * depth)  # attenuation along y (depth)
    sig = (float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.4, 1.2)), float(rng.uniform(0.8, 2.0)))
    re = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sig)
    im = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sig)
    speckle = np.hypot(re, im)
    speckle /= max(float(speckle.mean()), 1e-6)
    db = 20 * np.log10(np.clip(e, 1e-3, None) * np.clip(speckle, 1e-3, None) ** min(1.0, 0.6 * noise + 0.2))
    top, dyn = float(np.percentile(db, 99.5)), float(rng.uniform(35, 55))  # log compression
    img = (db - (top - dyn)) / dyn * 230.0
    if fov is not None:
        img = img * fov
    return _to_uint8(img)


def microscopy(rng, gts, body, extra, spacing, contrast=1.0, noise=1.0):
    shape, K, M = gts.shape, int(gts.max()), int(extra.max())
    bg = float(rng.uniform(0.02, 0.1))
    v = np.full(shape, bg, dtype=np.float32)
    _paint(rng, v, extra, bg + rng.uniform(0.1, 0.5, M) * contrast, 0.08)
    _paint(rng, v, gts, bg + rng.uniform(0.3, 0.9, K) * contrast, float(rng.uniform(0.05, 0.2)))
    psf = (float(rng.uniform(0.8, 2.0)), float(rng.uniform(0.4, 1.0)), float(rng.uniform(0.4, 1.0)))
    v = ndimage.gaussian_filter(np.clip(v, 0, None), psf)  # elongated along z (voxels)
    photons = float(rng.uniform(20, 200)) / max(noise, 1e-3) ** 2
    v = rng.poisson(v * photons).astype(np.float32) / photons
    v += rng.normal(0, 0.01 * noise, size=shape).astype(np.float32)
    top = float(np.percentile(v, 99.9))
    return _to_uint8(v / max(top, 1e-6) * 255.0)


MODELS = {"CT": ct, "MR": mr, "PET": pet, "US": us, "Microscopy": microscopy}
