"""The volume type shared by every part of the library, the benchmarks and the trainer, and its
conversion to and from SimpleITK images (numpy only, SimpleITK imported where needed: importable
without torch, e.g. by the classical peers' benchmark workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import ijk_to_ras_from_lps_grid, lps_grid, voxel_spacing

__all__ = ["Volume", "sitk_ijk_to_ras", "volume_from_sitk", "volume_to_sitk"]


@dataclass
class Volume:
    """A 3D scalar image: ``array[i, j, k]`` and ``ijk_to_ras`` (voxel index -> RAS mm).

    ``name`` is used in error messages ("fixed volume", "moving volume", a file name).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = "volume"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        return voxel_spacing(self.ijk_to_ras)


def sitk_ijk_to_ras(image: Any) -> np.ndarray:
    """The 4x4 ``ijk_to_ras`` of a 2D or 3D ``SimpleITK.Image`` (its LPS origin, spacing and
    direction, converted to RAS). A 2D image is the plane ``k = 0`` of a 3D grid: its physical
    frame is exactly ITK's (``z = 0``, 1 mm along ``k``, in-plane direction unchanged), so a PNG
    (origin 0, spacing 1, identity direction in LPS) gets ``diag(-1, -1, 1)``."""
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise ValueError(f"a 2D or 3D image is needed, got {dim}D")
    origin, spacing, direction = np.zeros(3), np.ones(3), np.eye(3)
    origin[:dim] = image.GetOrigin()
    spacing[:dim] = image.GetSpacing()
    direction[:dim, :dim] = np.reshape(image.GetDirection(), (dim, dim))
    return ijk_to_ras_from_lps_grid(origin, spacing, direction)


def volume_from_sitk(image: Any, name: str = "volume") -> Volume:
    """A 2D or 3D scalar ``SimpleITK.Image`` as a :class:`Volume` (voxel type kept). SimpleITK's
    arrays are ``[k, j, i]`` (``[j, i]`` in 2D); ours ``[i, j, k]`` (a 2D image: ``[i, j, 0]``)."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("a scalar image is needed")
    ijk_to_ras = sitk_ijk_to_ras(image)
    a = sitk.GetArrayFromImage(image)
    array = a.T[:, :, None] if a.ndim == 2 else np.transpose(a, (2, 1, 0))
    return Volume(array, ijk_to_ras, name)


def volume_to_sitk(volume: Volume, dtype: Any = None) -> Any:
    """A :class:`Volume` as a 3D ``SimpleITK.Image`` with its LPS header (voxel type kept, or
    ``dtype``; booleans become uint8)."""
    import SimpleITK as sitk

    a = np.asarray(volume.array)
    a = a.astype(np.uint8) if dtype is None and a.dtype == bool else a if dtype is None else a.astype(dtype, copy=False)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(a, (2, 1, 0))))
    origin, spacing, direction = lps_grid(volume.ijk_to_ras)
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
    return img
