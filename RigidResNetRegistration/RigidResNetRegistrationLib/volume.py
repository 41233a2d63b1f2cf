"""The volume type shared by every part of the library, the benchmarks and the trainer (numpy only:
importable without torch, e.g. by the classical peers' benchmark workers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import voxel_spacing

__all__ = ["Volume"]


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
