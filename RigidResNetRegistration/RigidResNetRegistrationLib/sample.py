"""The embedded sample (MNI ICBM152 2009a T1 template, see ``Resources/SampleData/LICENSE.txt``)
and the known motion the demo applies to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import geometry as geo
from .io import read_volume
from .preprocess import Volume, as_float_tensor
from .resample import resample_volume

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "Resources" / "SampleData"
SAMPLE_T1 = SAMPLE_DIR / "MNI152_2009a_T1.nii.gz"

#: The demo's known motion, in the fixed volume's axial slice frame (ex ~ R, ey ~ A):
#: rotation about S through the volume centre (deg), translation along R and A (mm).
DEMO_MOTION = np.array([4.0, 3.0, -2.0])


def load_sample() -> Volume:
    """The bundled T1 sample volume (1 mm, RAS)."""
    return read_volume(SAMPLE_T1, "sample T1")


def apply_known_motion(fixed: Volume, params: np.ndarray = DEMO_MOTION, kind: str = "rigid") -> tuple[Volume, np.ndarray]:
    """Make a moving volume: ``fixed`` moved by in-plane slice-frame ``params``, on the same grid.

    Returns the moving volume and the true RAS *resampling* transform (fixed -> moving) that a
    perfect registration returns: ``moving(T(x)) = fixed(x)``.
    """
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    truth = geo.params_to_ras(params, frame, kind)
    return apply_known_transform(fixed, truth), truth


def apply_known_transform(fixed: Volume, truth_fixed_to_moving_ras: np.ndarray) -> Volume:
    """``fixed``'s anatomy moved so that ``truth_fixed_to_moving_ras`` (a RAS *resampling*
    transform, fixed point -> moving point, any rigid or affine 4x4) registers it, on the same grid:
    ``moving(y) = fixed(truth^-1 y)``, so ``moving(truth(x)) = fixed(x)``."""
    data = resample_volume(as_float_tensor(fixed), fixed.ijk_to_ras, fixed.shape, fixed.ijk_to_ras,
                           geo.invert(truth_fixed_to_moving_ras))
    return Volume(data.numpy(), fixed.ijk_to_ras.copy(), "moving (sample with known motion)")
