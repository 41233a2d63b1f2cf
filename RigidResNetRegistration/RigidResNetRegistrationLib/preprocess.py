"""Preparation: validated volumes, intensity normalisation, network-grid slice stacks.

A :class:`Volume` is an ``array[i, j, k]`` (nibabel order) with its ``ijk_to_ras`` 4x4 matrix
(voxel index -> RAS mm). Inputs are never modified: every function copies what it changes.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .geometry import SliceFrame
from .options import MIN_FOREGROUND
from .resample import sample_slice_stack
from .volume import Volume


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
    lo, hi = np.min(a), np.max(a)  # a NaN or an infinity shows in one of them: no third pass
    if np.issubdtype(a.dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise InputError(f"{name}: contains {bad} NaN or infinite voxel values")
    if lo == hi:
        raise InputError(f"{name}: the volume is constant (every voxel is {lo}); nothing to register")


def torch_view(array: np.ndarray) -> torch.Tensor | None:
    """A CPU tensor sharing ``array``'s memory, with its strides (a NIfTI volume's Fortran order as
    it is); None where torch cannot or should not view it: read-only arrays (memory maps, Slicer's
    arrays: torch warns on them), negative strides, non-native byte order, unsupported types."""
    a = np.asarray(array)
    if not a.flags.writeable:
        return None
    try:
        return torch.from_numpy(a)
    except (TypeError, ValueError):
        return None


def as_float_tensor(volume: Volume, device: torch.device | str = "cpu") -> torch.Tensor:
    """A new dense float32 tensor of the volume's voxels, ``[i, j, k]`` (a copy: the input array is
    never touched), in the input's memory order: Fortran-ordered (``i`` fastest) when the array is,
    as NIfTI and NRRD readers and Slicer's arrays (transposed) give them, else C-contiguous.

    Keeping the file's order makes the copy a plain one (11 ms for 240 x 240 x 155 voxels, where
    reordering took 21 ms) and keeps each axial plane in one block of memory: sampling the network's axial slices
    from it is about 5x faster than from a C-ordered copy, whose axial planes are strided over the
    whole volume. The resamplers give outputs in the moving volume's order
    (:func:`resample.resample_volume`), so Fortran-ordered results are written to NIfTI without a
    further copy. The cast to float32 is made by torch on every CPU thread from a
    :func:`torch_view`; numpy copies what torch cannot view."""
    array = np.asarray(volume.array)
    source = torch_view(array)
    if source is None:
        source = torch.from_numpy(np.array(array, dtype=np.float32, copy=True, order="K"))
    if array.ndim == 3 and array.flags.f_contiguous and not array.flags.c_contiguous:
        out = torch.empty(tuple(array.shape[::-1]), dtype=torch.float32, device=device).permute(2, 1, 0)
    else:
        out = torch.empty(tuple(array.shape), dtype=torch.float32, device=device)
    out.copy_(source)
    return out


#: :func:`intensity_range` results by ``id`` of the tensor: (a weak reference to it, its version
#: counter, the arguments, the result). One registration asks for the same two volumes' ranges
#: from several stages (start, refinement, quality, difference image): 16 computations, 20 ms of
#: CPU each on a 240 x 240 x 155 volume, became 2.
_RANGE_CACHE: dict[int, tuple[weakref.ref, int, tuple[float, float, int], tuple[float, float]]] = {}
_RANGE_CACHE_SIZE = 16
_RANGE_LOCK = threading.Lock()


def row_major_indices(flat: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The array indices, one tensor per axis, of the positions ``flat`` in row-major (C) order of
    an array of ``shape``: ``torch.unravel_index`` without its first call's import of sympy (0.4 s
    of a command line run on two CPU cores)."""
    rest = flat
    indices = []
    for size in reversed(shape):
        indices.append(rest % size)
        rest = rest // size
    return tuple(reversed(indices))


def intensity_range(
    values: torch.Tensor, low: float = 0.01, high: float = 0.99, max_samples: int = 65_536
) -> tuple[float, float]:
    """Robust intensity range of a tensor: its ``low`` and ``high`` quantiles.

    Large tensors are subsampled with a fixed stride (deterministic) to at most ``max_samples``
    values: the quantiles of a 9-million-voxel brain volume move by well under 1% of the range.
    Remembered for the same tensor object while it lives and is not modified in place (its
    version counter), so stages that each need a volume's range do not recompute it.
    """
    args = (float(low), float(high), int(max_samples))
    with _RANGE_LOCK:
        hit = _RANGE_CACHE.get(id(values))
    if hit is not None and hit[0]() is values and hit[1] == values._version and hit[2] == args:
        return hit[3]
    n = values.numel()
    if n > max_samples:
        step = -(-n // max_samples)  # ceil
        if values.is_contiguous():
            flat = values.reshape(-1)[step // 2 :: step]
        else:  # the same values in the same (row-major) order, without copying the whole tensor
            picks = torch.arange(step // 2, n, step, device=values.device)
            flat = values[row_major_indices(picks, tuple(values.shape))]
    else:
        flat = values.reshape(-1)
    flat = flat.float()
    q = torch.quantile(flat, torch.tensor([low, high], dtype=flat.dtype, device=flat.device))
    result = (float(q[0]), float(q[1]))
    try:
        ref = weakref.ref(values)
    except TypeError:  # not weakly referenceable: not remembered
        return result
    with _RANGE_LOCK:
        if len(_RANGE_CACHE) >= _RANGE_CACHE_SIZE:
            _RANGE_CACHE.pop(next(iter(_RANGE_CACHE)))
        _RANGE_CACHE[id(values)] = (ref, values._version, args, result)
    return result


def foreground_threshold(volume: torch.Tensor) -> float:
    """Intensity above which a voxel counts as signal (brain): 10% of the way from the volume's
    1st percentile (background) to its 99th percentile. Percentiles, not the minimum: a few
    negative voxels (interpolation undershoot in preprocessed data) must not turn a zero
    background into signal."""
    lo, hi = intensity_range(volume, 0.01, 0.99)
    return lo + 0.1 * (hi - lo)


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
class SliceSurvey:
    """Which fixed slices carry signal in both volumes, found on a coarse copy of the network grid.

    ``fixed_fg``/``moving_fg``: ``(S,)`` fraction of each fixed slice's grid pixels above the
    volume's foreground threshold (the moving volume sampled at the same RAS points);
    ``informative``: slices with at least ``min_foreground`` signal in both.
    """

    frame: SliceFrame
    fixed_fg: np.ndarray
    moving_fg: np.ndarray
    informative: np.ndarray

    @property
    def overlap(self) -> np.ndarray:
        """``(S,)`` the smaller of the two foreground fractions: how much of a slice can be compared."""
        return np.minimum(self.fixed_fg, self.moving_fg)


def survey_slices(
    fixed: torch.Tensor,
    fixed_ijk_to_ras: np.ndarray,
    moving: torch.Tensor,
    moving_ijk_to_ras: np.ndarray,
    frame: SliceFrame,
    size: tuple[int, int],
    spacing_mm: float,
    initial_fixed_to_moving_ras: np.ndarray | None = None,
    min_foreground: float = MIN_FOREGROUND,
    coarsening: int = 4,
) -> SliceSurvey:
    """Foreground fractions of every fixed slice, on the network grid's field of view sampled
    ``coarsening`` times more coarsely (cheap: 1/16 of the points for 4).

    Both volumes are sampled at the same RAS points (the moving one through its own header,
    optionally mapped by the resampling transform ``initial_fixed_to_moving_ras``).
    """
    c = max(1, int(coarsening))
    coarse = (max(8, size[0] // c), max(8, size[1] // c))
    coarse_spacing = spacing_mm * size[1] / coarse[1]
    fixed_stack = sample_slice_stack(fixed, fixed_ijk_to_ras, frame, coarse, coarse_spacing)
    moving_stack = sample_slice_stack(
        moving, moving_ijk_to_ras, frame, coarse, coarse_spacing, fixed_to_moving_ras=initial_fixed_to_moving_ras
    )
    ffg = (fixed_stack > foreground_threshold(fixed)).float().mean(dim=(1, 2)).cpu().double().numpy()
    mfg = (moving_stack > foreground_threshold(moving)).float().mean(dim=(1, 2)).cpu().double().numpy()
    informative = (ffg >= min_foreground) & (mfg >= min_foreground)
    return SliceSurvey(frame, ffg, mfg, informative)


def select_slices(survey: SliceSurvey, max_slices: int = 0) -> np.ndarray:
    """Indices of the slices to register (sorted).

    All informative slices when ``max_slices`` is 0 or at least their number; otherwise
    ``max_slices`` slices spread evenly (by position) over the informative slices whose overlap
    is at least half the largest one, i.e. through the bulk of the brain rather than its edges.
    """
    idx = np.flatnonzero(survey.informative)
    if max_slices <= 0 or len(idx) <= max_slices:
        return idx
    overlap = survey.overlap[idx]
    bulk = idx[overlap >= 0.5 * overlap.max()]
    pool = bulk if len(bulk) >= max_slices else idx
    picks = np.round(np.linspace(0, len(pool) - 1, max_slices)).astype(int)
    return np.unique(pool[picks])


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


def check_overlap(survey: SliceSurvey) -> None:
    """Raise :class:`InputError` when no slice has signal in both volumes (no spatial overlap)."""
    if not survey.informative.any():
        if float(survey.moving_fg.max()) == 0.0:
            raise InputError(
                "fixed and moving volumes do not overlap in space (check their headers / origins)"
            )
        raise InputError(
            "no slice has enough signal in both volumes to register (are they brain images that overlap?)"
        )


#: In-plane resolution limits (README, "Bad input and safety"). Along the two in-plane axes of the
#: fixed volume's slice frame, a volume's voxels (their footprint, in mm) may be at most
#: ``MAX_IN_PLANE_PIXELS`` network-grid pixels long, and the longer side at most
#: ``MAX_IN_PLANE_RATIO`` times the shorter one (a side finer than the grid counts as one grid
#: pixel: detail the grid cannot see does not make a volume anisotropic). Thick slices along the
#: slice axis are not limited: that is how most clinical MRI is acquired.
MAX_IN_PLANE_PIXELS = 6.0
MAX_IN_PLANE_RATIO = 4.0


def in_plane_voxel_extent(ijk_to_ras: np.ndarray, frame: SliceFrame) -> tuple[float, float]:
    """Length (mm) of a voxel's footprint along the slice frame's ``ex`` and ``ey``: for a grid
    aligned with the frame, its two in-plane voxel spacings; for an oblique grid, how far one
    voxel reaches along each in-plane direction (thick slices tilted into the plane count)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    return float(np.abs(frame.ex @ m).sum()), float(np.abs(frame.ey @ m).sum())


def check_in_plane_resolution(volume: Volume, frame: SliceFrame, grid_spacing_mm: float) -> None:
    """Raise :class:`InputError` (naming the volume and its spacing) when the volume's voxels in
    the slice plane are so coarse or so anisotropic that the network grid would be mostly
    interpolation (limits: :data:`MAX_IN_PLANE_PIXELS`, :data:`MAX_IN_PLANE_RATIO`)."""
    from .geometry import orientation_of_axis

    ex, ey = in_plane_voxel_extent(volume.ijk_to_ras, frame)
    coarse, fine = max(ex, ey), max(min(ex, ey), grid_spacing_mm)
    limit = MAX_IN_PLANE_PIXELS * grid_spacing_mm
    if coarse <= limit and coarse <= MAX_IN_PLANE_RATIO * fine:
        return
    spacing = " x ".join(f"{s:.3g}" for s in volume.spacing)
    why = (f"longer than {limit:.3g} mm" if coarse > limit
           else f"one side over {MAX_IN_PLANE_RATIO:g} times the other")
    thick = orientation_of_axis(volume.ijk_to_ras, int(np.argmax(volume.spacing)))
    has_thick_slices = volume.spacing.max() >= 1.5 * np.median(volume.spacing)
    hint = (f"its thick {thick} slices cross the slice plane: resample it to finer voxels"
            if has_thick_slices and thick != frame.orientation else "resample it to finer voxels")
    raise InputError(
        f"{volume.name}: voxel spacing {spacing} mm is too coarse in the {frame.orientation} slice plane "
        f"({ex:.3g} x {ey:.3g} mm, {why}; the network grid has {grid_spacing_mm:g} mm pixels); {hint}"
    )


def _dimensions(volume: Volume) -> str:
    """``3D (44 x 50 x 30 voxels)`` or, for a single slice, ``2D (60 x 70 pixels)``."""
    if 1 in volume.shape:
        return f"2D ({' x '.join(str(n) for n in volume.shape if n != 1) or '1'} pixels)"
    return f"3D ({' x '.join(str(n) for n in volume.shape)} voxels)"


def check_same_dimensionality(fixed: Volume, moving: Volume) -> None:
    """Raise :class:`InputError` when one volume is a single slice (a 2D image) and the other is not:
    the slices of the one cannot be paired with the other's."""
    f, m = _dimensions(fixed), _dimensions(moving)
    if f[:2] != m[:2]:
        raise InputError(f"the {fixed.name} is {f} but the {moving.name} is {m}; register two 3D volumes or two 2D images")


def check_before_registration(fixed: Volume, moving: Volume, axis: str, size: tuple[int, int],
                              grid_spacing_mm: float) -> SliceFrame:
    """Every input check the front doors make before heavy work: both volumes valid
    (:func:`validate_volume`) and both 3D or both 2D (:func:`check_same_dimensionality`; a 2D image
    sliced in its own plane), the fixed field of view large enough for the network grid, and both volumes' in-plane resolution
    (:func:`check_in_plane_resolution`) on the fixed volume's slice frame for ``axis``, which is
    returned."""
    from .geometry import orientation_of_axis, slice_frame

    validate_volume(fixed)
    validate_volume(moving)
    check_same_dimensionality(fixed, moving)
    frame = slice_frame(fixed.ijk_to_ras, fixed.shape, axis)
    if 1 in fixed.shape and fixed.shape[frame.axis] != 1:  # slices across a 2D image: one pixel wide
        plane = orientation_of_axis(fixed.ijk_to_ras, fixed.shape.index(1))
        raise InputError(f"the {fixed.name} is 2D: it is registered in its own ({plane}) plane, not in "
                         f"{frame.orientation} slices across it; choose the {plane} slice axis")
    check_field_of_view(fixed, frame, size, grid_spacing_mm)
    for volume in (fixed, moving):
        check_in_plane_resolution(volume, frame, grid_spacing_mm)
    return frame
