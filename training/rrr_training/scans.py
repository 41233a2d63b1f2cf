"""Scans with a known truth, made from real held-out volumes, for the evaluator and the benchmarks:
motion *between* slices (a head that moved during the acquisition, :func:`interslice_motion`,
:func:`apply_interslice_motion`) and a T2-like contrast made from a T1 point by point
(:func:`t2_like_contrast`), whose alignment with its T1 is exact.

Geometry: per-slice motions are in-plane parameters ``(theta_deg, tx_mm, ty_mm)`` in the volume's
own slice frame (``geometry.slice_frame``, the axis it is stored along), resampling direction (fixed
slice point -> moving point). Only numpy at import time (the benchmarks' peer workers import this
without paying for torch); the functions that make volumes import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.volume import Volume

if TYPE_CHECKING:
    import torch


def t2_like_contrast(t1: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A T2-like contrast made from a T1 volume point by point, with its own noise: a cross-contrast
    pair whose alignment is exact (real T2/FLAIR are only as aligned as the data's co-registration).

    Inside the head (above ``lo + 0.05 (hi - lo)``, ``lo``/``hi`` the 1st/99th percentiles) the
    normalised intensity ``v`` in [0, 1] becomes ``0.15 + 0.85 (1 - v)^1.5`` (white matter dark, CSF
    bright); outside stays 0. The map is not monotone over the image (background 0, the darkest
    tissue brightest), so only a statistical similarity (MI) relates it to the T1. Gaussian noise of
    3% of the range (seeded, independent of the T1's own noise) is added inside the head, so the
    pair does not share one noise pattern. Returns a new float32 tensor on the same grid.
    """
    import torch

    from RigidResNetRegistrationLib.preprocess import intensity_range

    x = t1.float()
    lo, hi = intensity_range(x, 0.01, 0.99)
    v = ((x - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
    head = x > lo + 0.05 * (hi - lo)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 0.03
    return torch.where(head, 0.15 + 0.85 * (1 - v) ** 1.5 + noise, torch.zeros_like(x)).clamp_min(0) * 1000.0


#: Motion between slices (:func:`interslice_motion`): two steps of at most this many degrees and
#: millimetres during the scan, and this much jitter (deg and mm) per slice.
INTERSLICE_STEP_DEG, INTERSLICE_STEP_MM, INTERSLICE_JITTER = 3.0, 2.0, 0.3


def interslice_motion(rng: np.random.Generator, n_slices: int, common: np.ndarray, max_step_deg: float = INTERSLICE_STEP_DEG,
                      max_step_mm: float = INTERSLICE_STEP_MM, jitter: float = INTERSLICE_JITTER) -> np.ndarray:
    """``(S, 3)`` in-plane parameters ``(theta_deg, tx_mm, ty_mm)`` per axial slice of a scan during
    which the head moved: the motion ``common`` for every slice, plus two steps at random slices
    (each uniform in +-``max_step_deg`` and +-``max_step_mm``) that last to the end of the scan, plus
    independent jitter per slice (uniform in +-``jitter`` deg and mm)."""
    params = np.tile(np.asarray(common, dtype=np.float64), (n_slices, 1))
    for start in np.sort(rng.integers(n_slices // 5, 4 * n_slices // 5, 2)):
        params[start:] += np.r_[rng.uniform(-max_step_deg, max_step_deg), rng.uniform(-max_step_mm, max_step_mm, 2)]
    return params + rng.uniform(-jitter, jitter, (n_slices, 3))


def apply_interslice_motion(volume: Any, params: np.ndarray):
    """Moving volume (on ``volume``'s grid) whose axial slice ``s`` shows ``volume``'s anatomy moved
    in-plane by ``params[s]`` (slice-frame parameters, :func:`interslice_motion`), and the true RAS
    resampling transforms ``(S, 4, 4)`` (fixed -> moving) per slice: ``moving(truth[s](x)) =
    volume(x)`` for ``x`` on slice ``s`` (in-plane motions keep a slice in its plane, so this is exact)."""
    from RigidResNetRegistrationLib.preprocess import as_float_tensor
    from RigidResNetRegistrationLib.resample import resample_per_slice

    frame = geo.slice_frame(volume.ijk_to_ras, volume.shape)
    truth = np.stack([geo.params_to_ras(p, frame, "rigid", s) for s, p in enumerate(params)])
    inverse = np.stack([geo.invert(t) for t in truth])  # moving(y) = volume(truth[s]^-1 y)
    data = resample_per_slice(as_float_tensor(volume), volume.ijk_to_ras, volume.shape, volume.ijk_to_ras, frame.axis, inverse)
    return Volume(data.numpy(), np.asarray(volume.ijk_to_ras, dtype=np.float64).copy(), "moving (motion between slices)"), truth
