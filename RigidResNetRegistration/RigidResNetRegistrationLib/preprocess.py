"""Preparation: validated volumes, intensity normalisation, network-grid slice stacks.

A :class:`Volume` is an ``array[i, j, k]`` (nibabel order) with its ``ijk_to_ras`` 4x4 matrix
(voxel index -> RAS mm). Inputs are never modified: every function copies what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import SliceFrame, voxel_spacing
from .resample import sample_slice_stack


class InputError(ValueError):
    """Bad input from the user: the message is one clear line, shown as is."""


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


def validate_volume(volume: Volume) -> None:
    """Raise :class:`InputError` (one line naming the volume) unless it is a usable 3D scalar image."""
    a, m, name = volume.array, np.asarray(volume.ijk_to_ras), volume.name
    if not isinstance(a, np.ndarray):
        raise InputError(f"{name}: image data is not an array")
    if a.ndim == 4 and a.shape[3] == 1:
        raise InputError(f"{name}: squeeze the trailing size-1 axis before validation")
    if a.ndim != 3:
        raise InputError(
            f"{name}: a 3D scalar volume is needed, got an array of shape {tuple(a.shape)}"
            + (" (4D or vector/multi-component image)" if a.ndim > 3 else "")
        )
    if a.size == 0 or min(a.shape) < 1:
        raise InputError(f"{name}: the volume is empty (shape {tuple(a.shape)})")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
        raise InputError(f"{name}: voxel type {a.dtype} is not a real scalar type")
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise InputError(f"{name}: the voxel-to-physical matrix (IJK to RAS) is invalid or singular")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise InputError(f"{name}: contains {bad} NaN or infinite voxel values")
    lo, hi = np.min(a), np.max(a)
    if lo == hi:
        raise InputError(f"{name}: the volume is constant (every voxel is {lo}); nothing to register")


def as_float_tensor(volume: Volume, device: torch.device | str = "cpu") -> torch.Tensor:
    """A new float32 tensor of the volume's voxels (a copy: the input array is never touched)."""
    return torch.from_numpy(np.array(volume.array, dtype=np.float32, copy=True)).to(device)


def intensity_range(values: torch.Tensor, low: float = 0.01, high: float = 0.99) -> tuple[float, float]:
    """Robust intensity range of a tensor: its ``low`` and ``high`` quantiles (subsampled if large)."""
    flat = values.reshape(-1).float()
    if flat.numel() > 2_000_000:
        step = flat.numel() // 2_000_000 + 1
        flat = flat[::step]
    q = torch.quantile(flat, torch.tensor([low, high], dtype=flat.dtype, device=flat.device))
    return float(q[0]), float(q[1])


def foreground_threshold(volume: torch.Tensor) -> float:
    """Intensity above which a voxel counts as signal (brain): 10% of the way from the volume's
    minimum (background) to its 99th percentile."""
    vmin = float(volume.min())
    _, hi = intensity_range(volume, 0.01, 0.99)
    return vmin + 0.1 * (hi - vmin)


def normalise_slices(stack: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Per-slice robust intensity normalisation of ``(S, H, W)`` to ``[0, 1]``.

    Each slice is mapped linearly so its ``low`` and ``high`` quantiles go to 0 and 1, then
    clipped: outliers (vessels, tumour enhancement, hot pixels) cannot squash the contrast.
    Constant slices become 0.
    """
    flat = stack.reshape(stack.shape[0], -1).float()
    q = torch.quantile(flat, torch.tensor([low, high], dtype=flat.dtype, device=flat.device), dim=1)
    lo, hi = q[0][:, None, None], q[1][:, None, None]
    span = hi - lo
    out = (stack.float() - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out.clamp(0.0, 1.0), torch.zeros_like(out))


@dataclass
class SliceStacks:
    """Network-grid slices of fixed and (initially aligned) moving volumes, on the fixed frame.

    ``fixed``/``moving``: ``(S, H, W)`` raw intensities for *all* slices of the fixed volume;
    ``fixed_fg``/``moving_fg``: fraction of each slice's pixels above the volume's foreground
    threshold; ``informative``: slices with enough signal in both to be registered.
    """

    frame: SliceFrame
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_fg: torch.Tensor
    moving_fg: torch.Tensor
    informative: np.ndarray


def prepare_slice_stacks(
    fixed: torch.Tensor,
    fixed_ijk_to_ras: np.ndarray,
    moving: torch.Tensor,
    moving_ijk_to_ras: np.ndarray,
    frame: SliceFrame,
    size: tuple[int, int],
    spacing_mm: float,
    initial_fixed_to_moving_ras: np.ndarray | None = None,
    min_foreground: float = 0.05,
) -> SliceStacks:
    """Sample both volumes on the network grid of every fixed slice (one interpolation each).

    The moving volume is sampled through its own header at the same RAS points (optionally
    mapped by ``initial_fixed_to_moving_ras``), which is resampling it onto the fixed grid.
    """
    fixed_stack = sample_slice_stack(fixed, fixed_ijk_to_ras, frame, size, spacing_mm)
    moving_stack = sample_slice_stack(
        moving, moving_ijk_to_ras, frame, size, spacing_mm, fixed_to_moving_ras=initial_fixed_to_moving_ras
    )
    ft, mt = foreground_threshold(fixed), foreground_threshold(moving)
    ffg = (fixed_stack > ft).float().mean(dim=(1, 2))
    mfg = (moving_stack > mt).float().mean(dim=(1, 2))
    informative = ((ffg >= min_foreground) & (mfg >= min_foreground)).cpu().numpy()
    return SliceStacks(frame, fixed_stack, moving_stack, ffg, mfg, informative)


def check_field_of_view(volume: Volume, frame: SliceFrame, size: tuple[int, int], spacing_mm: float) -> None:
    """Raise :class:`InputError` when the volume's in-plane field of view is too small for the
    network grid (under a quarter of its side, or under 16 grid pixels)."""
    in_plane = [a for a in range(3) if a != frame.axis]
    extent = np.asarray(volume.shape, dtype=float)[in_plane] * volume.spacing[in_plane]
    need = max(0.25 * min(size) * spacing_mm, 16 * spacing_mm)
    if extent.min() < need:
        raise InputError(
            f"{volume.name}: in-plane field of view {extent[0]:.0f} x {extent[1]:.0f} mm is too small for the "
            f"network grid ({size[1] * spacing_mm:.0f} x {size[0] * spacing_mm:.0f} mm); at least {need:.0f} mm is needed"
        )


def check_overlap(stacks: SliceStacks) -> None:
    """Raise :class:`InputError` when no slice has signal in both volumes (no spatial overlap)."""
    if not stacks.informative.any():
        if float(stacks.moving_fg.max()) == 0.0:
            raise InputError(
                "fixed and moving volumes do not overlap in space (check their headers / origins)"
            )
        raise InputError(
            "no slice has enough signal in both volumes to register (are they brain images that overlap?)"
        )
