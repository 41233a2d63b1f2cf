"""Resampling: the one (bi/tri)linear interpolator used by inference, training and benchmarks.

Interpolation follows ITK's ``LinearInterpolateImageFunction`` as used by its resampler: a
point whose continuous index lies within half a voxel of the grid (``-0.5 <= idx <= size-0.5``
on every axis) is interpolated with edge values repeated; any other point gets ``0``. So a
transform written to a ``.tfm`` file and applied with SimpleITK reproduces our output.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import SliceFrame, compose, invert, network_grid_affine, network_grid_plane


def grid_sample_points(image: torch.Tensor, grid: torch.Tensor, min_points_per_thread: int = 4096) -> torch.Tensor:
    """``F.grid_sample`` (linear, border padding, ``align_corners=True``) of ``image``
    ``(B, C, *spatial)`` at the points ``grid`` ``(B, P, ndim)`` (normalised, x first), returned
    as ``(B, C, P)``.

    On the CPU, one image's points are split into one batch item per thread over the same
    (expanded, not copied) image: PyTorch's CPU grid sampler runs the items of a batch in
    parallel but one item's points on one thread, so a single image would use one core.
    """
    b, c = image.shape[:2]
    ndim = grid.shape[-1]
    p = grid.shape[1]
    n = torch.get_num_threads() if image.device.type == "cpu" and b == 1 else 1
    n = min(n, p // max(1, min_points_per_thread))
    if n <= 1:
        out = F.grid_sample(image, grid.reshape(b, *([1] * (ndim - 1)), p, ndim), mode="bilinear",
                            padding_mode="border", align_corners=True)
        return out.reshape(b, c, p)
    per = -(-p // n)
    flat = grid[0]
    if per * n > p:  # pad with copies of the last point, dropped again below
        flat = torch.cat([flat, flat[-1:].expand(per * n - p, ndim)])
    out = F.grid_sample(image.expand(n, *image.shape[1:]), flat.reshape(n, *([1] * (ndim - 1)), per, ndim),
                        mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(n, c, per).transpose(0, 1).reshape(1, c, n * per)[:, :, :p]


def index_to_grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For a 3D image of ``shape`` (array order ``i, j, k``): the 4x4 float64 map from continuous
    array indices ``(i, j, k, 1)`` to grid_sample's normalised coordinates ``(x, y, z, 1)``
    (``align_corners=True``: index ``0 -> -1``, ``n - 1 -> +1``, axes reversed: ``x`` is ``k``),
    and the ITK bound ``(3,)``: a point is inside when ``|x|, |y|, |z|`` are each at most that
    (half a voxel beyond the edge voxels' centres). A size-1 axis maps every index to 0 (inside).
    Compose it with an index map once, instead of converting every point as
    :func:`sample_at_indices` does."""
    sizes = np.asarray(shape, dtype=np.float64)
    if sizes.shape != (3,):
        raise ValueError(f"index_to_grid needs a 3D shape, not {tuple(shape)}")
    scale = np.where(sizes > 1, 2.0 / np.maximum(sizes - 1, 1), 0.0)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)[[2, 1, 0]]
    m[:3, 3] = -np.where(sizes > 1, 1.0, 0.0)[[2, 1, 0]]
    return m, 1.0 + 0.5 * scale[[2, 1, 0]]


def sample_at_indices(image: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` at continuous array indices (linear, ITK-style bounds, zero outside).

    ``image``: ``(B, C, *spatial)`` with 2 or 3 spatial axes, array order.
    ``indices``: ``(B, *out, ndim)`` continuous indices *in array-axis order* (``[i, j, k]`` for
    ``image[..., i, j, k]``; ``[row, col]`` for 2D images). Returns ``(B, C, *out)``.
    Differentiable with respect to ``image`` and ``indices``.
    """
    ndim = image.dim() - 2
    if indices.shape[-1] != ndim or ndim not in (2, 3):
        raise ValueError(f"indices must end in {ndim} coordinates for a {ndim}D image")
    sizes = torch.tensor(image.shape[2:], dtype=indices.dtype, device=indices.device)
    inside = ((indices >= -0.5) & (indices <= sizes - 0.5)).all(dim=-1)
    # normalised coordinates for grid_sample(align_corners=True): -1 <-> 0, +1 <-> size-1;
    # grid_sample wants them in reversed (x = last axis) order. Size-1 axes map to 0.
    denom = torch.clamp(sizes - 1, min=1)
    norm = torch.where(sizes > 1, 2.0 * indices / denom - 1.0, torch.zeros_like(indices))
    out_shape = indices.shape[1:-1]
    grid = norm.flip(-1).to(image.dtype).reshape(indices.shape[0], -1, ndim)
    sampled = grid_sample_points(image, grid)
    sampled = sampled.reshape(image.shape[0], image.shape[1], *out_shape)
    return sampled * inside.unsqueeze(1).to(sampled.dtype)


def sample_volume_at_ras(
    volume: torch.Tensor, ijk_to_ras: np.ndarray, points_ras: np.ndarray | torch.Tensor
) -> torch.Tensor:
    """Sample a 3D volume (``array[i, j, k]`` as a tensor of shape ``(I, J, K)``) at RAS points.

    ``points_ras``: ``(..., 3)`` RAS mm. Returns a tensor of shape ``points.shape[:-1]``.
    """
    ras_to_ijk = torch.as_tensor(invert(ijk_to_ras), dtype=torch.float64, device=volume.device)
    pts = torch.as_tensor(points_ras, dtype=torch.float64, device=volume.device)
    idx = pts @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]
    flat = idx.reshape(1, -1, 3).to(torch.float32)
    out = sample_at_indices(volume[None, None].float(), flat)
    return out.reshape(pts.shape[:-1])


def separable_pairs(index_map: np.ndarray, tol: float = 1e-7) -> list[tuple[int, int]]:
    """Every ``(r, m)`` for which :func:`separable_axes` holds (all three for grids that differ by a
    shift or scaling only, one for an in-plane rotation, none for an oblique map)."""
    a = np.asarray(index_map, dtype=np.float64)[:3, :3]
    found = []
    for r in range(3):
        for m in range(3):
            other_r = [x for x in range(3) if x != r]
            other_m = [x for x in range(3) if x != m]
            if abs(a[m, r]) > tol and np.all(np.abs(a[m, other_r]) <= tol) and np.all(np.abs(a[other_m, r]) <= tol):
                found.append((r, m))
    return found


def separable_axes(index_map: np.ndarray, tol: float = 1e-7, reference_shape: tuple[int, ...] | None = None,
                   moving_shape: tuple[int, ...] | None = None) -> tuple[int, int] | None:
    """``(r, m)`` when a reference-ijk -> moving-ijk affine map keeps slices apart, else None.

    That is: moving array axis ``m`` depends only on reference axis ``r`` and the two other moving
    axes only on the two other reference axes (any in-plane rotation, flip or permutation, any
    spacing). Then trilinear resampling is a bilinear resampling of whole planes followed by linear
    interpolation between planes: the same numbers, far less work. ``tol`` is in voxels per voxel.
    Where several axes qualify (grids that differ by a shift only), the cheapest is taken when the
    shapes are given: the fewest moving voxels in the planes read (one plane of the fixed grid,
    as the overview draws, reads one or two moving planes, not the whole volume); else the first.
    """
    found = separable_pairs(index_map, tol)
    if not found:
        return None
    if reference_shape is None or moving_shape is None:
        return found[0]
    return min(found, key=lambda rm: int(reference_shape[rm[0]]) * int(np.prod(moving_shape)) // max(1, int(moving_shape[rm[1]])))


def _resample_separable(
    moving: torch.Tensor, index_map: np.ndarray, reference_shape: tuple[int, int, int], r: int, m: int
) -> torch.Tensor:
    """Trilinear resampling (ITK bounds) when ``index_map`` keeps slices apart (:func:`separable_axes`).

    Reference slice ``s`` along axis ``r`` lies at moving coordinate ``z = a s + b`` along axis
    ``m``; its in-plane points map by the same 2D affine map for every slice. Each needed moving
    plane is sampled once in 2D (planes as channels), then neighbouring planes are blended with
    weights ``1 - w`` and ``w``.
    """
    dev = moving.device
    ref_in = [x for x in range(3) if x != r]
    mov_in = [x for x in range(3) if x != m]
    n_ref, n_mov = int(reference_shape[r]), int(moving.shape[m])
    # slice position along the moving axis, ITK bounds, clamped (edge values repeated)
    z = index_map[m, r] * np.arange(n_ref, dtype=np.float64) + index_map[m, 3]
    inside = (z >= -0.5) & (z <= n_mov - 0.5)
    zc = np.clip(z, 0.0, n_mov - 1)
    z0 = np.minimum(np.floor(zc).astype(np.int64), max(n_mov - 2, 0))
    w = zc - z0
    z1 = np.minimum(z0 + 1, n_mov - 1)
    need = np.unique(np.concatenate([z0[inside], z1[inside & (w > 0)]]))
    out = torch.zeros((n_ref, *(int(reference_shape[x]) for x in ref_in)), dtype=torch.float32, device=dev)
    if len(need):
        # in-plane: moving (m1, m2) index = B @ (ref r1, ref r2) + c, one 2D grid for all planes
        bmat = torch.as_tensor(index_map[np.ix_(mov_in, ref_in)], dtype=torch.float32, device=dev)
        cvec = torch.as_tensor(index_map[mov_in, 3], dtype=torch.float32, device=dev)
        u, v = torch.meshgrid(
            torch.arange(reference_shape[ref_in[0]], dtype=torch.float32, device=dev),
            torch.arange(reference_shape[ref_in[1]], dtype=torch.float32, device=dev),
            indexing="ij",
        )
        grid = torch.stack([u, v], dim=-1) @ bmat.T + cvec
        planes_src = moving.movedim(m, 0)[torch.as_tensor(need, device=dev)].float()
        planes = sample_at_indices(planes_src[None], grid[None])[0]  # (len(need), R1, R2)
        where = {int(z): i for i, z in enumerate(need)}
        for s in np.flatnonzero(inside):
            p0 = planes[where[int(z0[s])]]
            out[s] = p0 if w[s] == 0 else (1.0 - float(w[s])) * p0 + float(w[s]) * planes[where[int(z1[s])]]
    return out.movedim(0, r)


#: Index map that reverses the array axes: ``(i, j, k, 1) -> (k, j, i, 1)`` (its own inverse).
#: ``ijk_to_ras @ REVERSE_AXES`` is the index-to-RAS matrix of the reversed-axes view
#: ``volume.permute(2, 1, 0)``.
REVERSE_AXES = np.eye(4)[[2, 1, 0, 3]]


def is_fortran_ordered(volume: torch.Tensor) -> bool:
    """True for a 3D tensor laid out with its first axis fastest (``i`` fastest, as a NIfTI or NRRD
    file and Slicer's arrays hold voxels; :func:`preprocess.as_float_tensor` keeps that order), so
    that its reversed-axes view ``volume.permute(2, 1, 0)`` is C-contiguous."""
    return volume.dim() == 3 and not volume.is_contiguous() and volume.permute(2, 1, 0).is_contiguous()


def resample_volume(
    moving: torch.Tensor,
    moving_ijk_to_ras: np.ndarray,
    reference_shape: tuple[int, int, int],
    reference_ijk_to_ras: np.ndarray,
    fixed_to_moving_ras: np.ndarray | None = None,
    slab_voxels: int = 262_144,
    allow_separable: bool = True,
) -> torch.Tensor:
    """Resample ``moving`` onto a reference grid: ``out[v] = moving(T(ijk_to_ras_ref v))``.

    ``fixed_to_moving_ras`` is the RAS *resampling* transform (fixed point -> moving point;
    identity when None), exactly as stored, in LPS, in the ``.tfm`` file. When the map between
    the two voxel grids keeps slices apart (an in-plane transform between grids that share their
    slice direction, the usual case of ``volume`` mode) whole planes are interpolated at once
    (:func:`separable_axes`); otherwise the volume is done slab by slab along the first axis, so
    memory stays bounded for large volumes. Both give ITK's linear interpolation.

    A Fortran-ordered ``moving`` (:func:`is_fortran_ordered`) is resampled as its C-ordered
    reversed-axes view (``ijk_to_ras @ REVERSE_AXES``), so every pass reads it along its memory, and
    the result is laid out as that view's result: Fortran-ordered from the general path and from the
    plane path for slices along the last axis (axial slices of a RAS-like volume), a NIfTI file's
    order, written without reordering (a reordering copy costs 20 ms on 240 x 240 x 155 voxels).
    """
    t = np.eye(4) if fixed_to_moving_ras is None else np.asarray(fixed_to_moving_ras, dtype=np.float64)
    if is_fortran_ordered(moving):  # the same work on the reversed-axes views, with an output laid out as the input
        return resample_volume(moving.permute(2, 1, 0), moving_ijk_to_ras @ REVERSE_AXES, _reversed(reference_shape),
                               reference_ijk_to_ras @ REVERSE_AXES, t, slab_voxels, allow_separable).permute(2, 1, 0)
    index_map = compose(invert(moving_ijk_to_ras), t, reference_ijk_to_ras)  # ref ijk -> moving ijk
    axes = separable_axes(index_map, reference_shape=reference_shape, moving_shape=tuple(moving.shape)) if allow_separable else None
    if axes is not None:
        return _resample_separable(moving, index_map, reference_shape, *axes)
    return _resample_general(moving, index_map, reference_shape, slab_voxels)


def _reversed(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(int(x) for x in reversed(tuple(shape)))  # type: ignore[return-value]


def nonzero_box(volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """The smallest box of array indices ``(i, j, k)`` holding every nonzero voxel of a 3D
    ``volume`` (NaN counts as nonzero): ``(first, last)`` int arrays (inclusive), or None when every
    voxel is 0. A volume with a nonzero voxel on each of its six faces (a head with its background
    noise) is its own box, found from the faces alone. Otherwise two passes of max/min reductions
    (no boolean copy of the volume): along ``i`` for the ``(j, k)`` extent, then over that extent's
    planes for ``i``."""
    if all(bool(volume.select(axis, end).any()) for axis in range(3) for end in (0, -1)):
        return _whole_box(tuple(volume.shape))
    jk = _any_nonzero(volume, (0,))
    found_j, found_k = torch.nonzero(jk.any(dim=1)).flatten(), torch.nonzero(jk.any(dim=0)).flatten()
    if found_j.numel() == 0:
        return None
    j0, j1, k0, k1 = int(found_j[0]), int(found_j[-1]), int(found_k[0]), int(found_k[-1])
    found_i = torch.nonzero(_any_nonzero(volume[:, j0 : j1 + 1, k0 : k1 + 1], (1, 2))).flatten()
    return np.asarray([int(found_i[0]), j0, k0], dtype=np.int64), np.asarray([int(found_i[-1]), j1, k1], dtype=np.int64)


def _any_nonzero(volume: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Whether any voxel along ``dims`` is nonzero (or NaN: max and min propagate it), by a max and a
    min reduction."""
    return (volume.amax(dim=dims) != 0) | (volume.amin(dim=dims) != 0)


def _whole_box(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The box of every voxel of a volume of ``shape`` (as :func:`nonzero_box` gives it)."""
    return np.zeros(3, dtype=np.int64), np.asarray(shape, dtype=np.int64) - 1


def _nonzero_box_if_worth(moving: torch.Tensor, n_points: int) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`nonzero_box` of ``moving`` when sampling ``n_points`` points costs about as much as
    finding it (at least half as many points as voxels: a whole output volume); else the whole
    volume's box, so that a few slices or one plane do not pay a pass over every voxel."""
    if 2 * int(n_points) >= moving.numel():
        return nonzero_box(moving)
    return _whole_box(tuple(moving.shape))


def _signal_index_bounds(shape: tuple[int, ...], box: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper continuous array indices ``(i, j, k)`` of the points whose linear
    interpolation in a volume of ``shape`` can be nonzero, given the ``box`` of its nonzero voxels
    (:func:`nonzero_box`): within ITK's bounds (half a voxel beyond the edge voxels) and closer than
    one voxel (plus a 1e-3 voxel margin for rounding) to the box on every axis; every point outside
    them interpolates only zeros."""
    sizes = np.asarray(shape, dtype=np.float64)
    return np.maximum(-0.5, box[0] - 1.0 - 1e-3), np.minimum(sizes - 0.5, box[1] + 1.0 + 1e-3)


def _signal_bounds(shape: tuple[int, int, int], box: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_signal_index_bounds` as grid_sample's normalised ``(x, y, z)`` (``x`` is ``k``)."""
    sizes = np.asarray(shape, dtype=np.float64)
    lo_idx, hi_idx = _signal_index_bounds(shape, box)
    scale = 2.0 / np.maximum(sizes - 1, 1)  # as index_to_grid, per array axis i, j, k
    lower = np.where(sizes > 1, lo_idx * scale - 1.0, -1.0)  # a size-1 axis maps every index to 0: inside
    upper = np.where(sizes > 1, hi_idx * scale - 1.0, 1.0)
    return lower[::-1].copy(), upper[::-1].copy()  # as (x, y, z): x is k


def _resample_general(
    moving: torch.Tensor, index_map: np.ndarray, reference_shape: tuple[int, int, int], slab_voxels: int = 262_144
) -> torch.Tensor:
    """Trilinear resampling (ITK bounds) through any affine reference-ijk -> moving-ijk map, slab by
    slab along the first reference axis.

    The map is folded into grid_sample's normalised coordinates (``align_corners=True``: index
    ``0 -> -1``, ``n - 1 -> +1``, axes in reversed order) once, so each slab's sampling grid is the
    broadcast sum of three per-axis terms. Only points that can interpolate a nonzero value are
    sampled: along a row each coordinate is linear in ``k``, so the points inside the moving
    volume (ITK bounds) and near its nonzero voxels (:func:`nonzero_box`: the brain of a
    skull-stripped volume; looked for when the reference grid is a whole volume,
    :func:`_nonzero_box_if_worth`) form one run of ``k``, found once per row (:func:`_inside_runs`); each
    slab samples the rectangle of ``(j, k)`` holding its runs, and every other voxel is 0, exactly
    what sampling it would give. The points are sampled in parallel on CPU threads
    (:func:`grid_sample_points`).
    """
    dev = moving.device
    ni, nj, nk = (int(s) for s in reference_shape)
    out = torch.zeros((ni, nj, nk), dtype=torch.float32, device=dev)
    box = _nonzero_box_if_worth(moving, ni * nj * nk)
    if box is None:  # an all-zero volume resamples to zeros
        return out
    to_grid, _ = index_to_grid(tuple(moving.shape))
    rows = (to_grid @ np.asarray(index_map, dtype=np.float64))[:3]  # reference ijk -> grid_sample's (x, y, z)
    vol = moving[None, None].float()

    def axis_term(n: int, column: int, with_offset: bool) -> torch.Tensor:
        a = torch.arange(n, dtype=torch.float64, device=dev)[:, None] * torch.as_tensor(rows[:3, column], device=dev)
        if with_offset:
            a = a + torch.as_tensor(rows[:3, 3], device=dev)
        return a.float()

    ti = axis_term(ni, 0, True)[:, None, None, :]
    tjk = axis_term(nj, 1, False)[None, :, None, :] + axis_term(nk, 2, False)[None, None, :, :]  # one plane
    k_first, k_last = _inside_runs(rows, *_signal_bounds(tuple(moving.shape), box), ni, nj, nk)
    k_index = torch.arange(nk, dtype=torch.int64, device=dev)
    per_slab = max(1, slab_voxels // max(1, nj * nk))
    for i0 in range(0, ni, per_slab):
        i1 = min(ni, i0 + per_slab)
        first, last = k_first[i0:i1], k_last[i0:i1]
        filled = first <= last
        if not filled.any():
            continue
        js = np.flatnonzero(filled.any(axis=0))
        j0, j1 = int(js[0]), int(js[-1]) + 1
        k0, k1 = int(first[filled].min()), int(last[filled].max()) + 1
        grid = ti[i0:i1] + tjk[:, j0:j1, k0:k1]  # (slab, j1 - j0, k1 - k0, 3) normalised (x, y, z)
        inside = ((k_index[k0:k1] >= torch.as_tensor(first[:, j0:j1, None], device=dev))
                  & (k_index[k0:k1] <= torch.as_tensor(last[:, j0:j1, None], device=dev)))
        sampled = grid_sample_points(vol, grid.reshape(1, -1, 3)).reshape(grid.shape[:3])
        out[i0:i1, j0:j1, k0:k1] = sampled * inside
    return out


def _inside_runs(rows: np.ndarray, lower: np.ndarray, upper: np.ndarray, ni: int, nj: int,
                 nk: int) -> tuple[np.ndarray, np.ndarray]:
    """For each reference row ``(i, j)``, the first and last ``k`` whose point lies within the
    bounds: ``(ni, nj)`` int arrays (``first > last`` for none).

    ``rows``: ``(3, 4)`` map from reference ``(i, j, k, 1)`` to grid_sample's normalised ``(x, y, z)``;
    ``lower``, ``upper``: ``(3,)`` the bounds of ``x, y, z``. Along a row each coordinate is linear
    in ``k``, so the points within them are one run, found per row (float64) instead of per point.
    """
    i = np.arange(ni, dtype=np.float64)[:, None]
    j = np.arange(nj, dtype=np.float64)[None, :]
    lo = np.full((ni, nj), -np.inf)
    hi = np.full((ni, nj), np.inf)
    for d in range(3):
        a = rows[d, 0] * i + rows[d, 1] * j + rows[d, 3]  # coordinate d at k = 0
        slope = rows[d, 2]
        if abs(slope) < 1e-12:  # constant along the row
            out = (a < lower[d]) | (a > upper[d])
            lo[out], hi[out] = np.inf, -np.inf
            continue
        k1, k2 = (lower[d] - a) / slope, (upper[d] - a) / slope
        lo = np.maximum(lo, np.minimum(k1, k2))
        hi = np.minimum(hi, np.maximum(k1, k2))
    first = np.clip(np.ceil(lo), 0, nk)
    last = np.clip(np.floor(hi), -1, nk - 1)
    return first.astype(np.int64), last.astype(np.int64)


def resample_per_slice(
    moving: torch.Tensor,
    moving_ijk_to_ras: np.ndarray,
    reference_shape: tuple[int, int, int],
    reference_ijk_to_ras: np.ndarray,
    axis: int,
    transforms: np.ndarray,
) -> torch.Tensor:
    """Resample ``moving`` onto a reference grid with one RAS resampling transform per reference
    slice along ``axis`` (``transforms``: ``(S, 4, 4)``, fixed point -> moving point).

    When every slice's grid-to-grid map keeps slices apart (:func:`separable_axes`, same axes for
    all), all slices are interpolated in two batched 2D passes (the planes below and above each
    slice's position) and blended; otherwise slice by slice with :func:`resample_volume`. A
    Fortran-ordered ``moving`` gives a Fortran-ordered result, as :func:`resample_volume`.
    """
    if is_fortran_ordered(moving):  # as resample_volume: the reversed-axes views, the output laid out as the input
        return resample_per_slice(moving.permute(2, 1, 0), moving_ijk_to_ras @ REVERSE_AXES, _reversed(reference_shape),
                                  reference_ijk_to_ras @ REVERSE_AXES, 2 - axis, transforms).permute(2, 1, 0)
    n = int(reference_shape[axis])
    maps = np.stack([compose(invert(moving_ijk_to_ras), transforms[s], reference_ijk_to_ras) for s in range(n)])
    # the slices kept apart along ``axis`` by every slice's map (a slice moved by a shift only is
    # separable along every axis: the common one is taken, not the first)
    common = set.intersection(*(set(separable_pairs(m)) for m in maps)) if n else set()
    along = sorted(pair for pair in common if pair[0] == axis)
    if along:
        return _resample_separable_per_slice(moving, maps, reference_shape, *along[0])
    out = torch.empty(tuple(int(x) for x in reference_shape), dtype=torch.float32, device=moving.device)
    one = list(reference_shape)
    one[axis] = 1
    for s in range(n):
        shift = np.eye(4)
        shift[axis, 3] = s
        piece = resample_volume(moving, moving_ijk_to_ras, tuple(one), reference_ijk_to_ras @ shift, transforms[s])
        out.narrow(axis, s, 1).copy_(piece)
    return out


def _signal_region_per_slice(
    maps: np.ndarray, box: tuple[np.ndarray, np.ndarray], moving_shape: tuple[int, ...], reference_shape: tuple[int, int, int],
    r: int, m: int,
) -> tuple[slice, slice, slice] | None:
    """For :func:`_resample_separable_per_slice`: the reference slices (along ``r``) and the
    rectangle of their in-plane indices (the two other axes, in order) outside which every point
    interpolates only zeros, given the ``box`` of the moving volume's nonzero voxels
    (:func:`nonzero_box`, :func:`_signal_index_bounds`); None when no point can. Each slice's
    in-plane map is inverted at the corners of the box's rectangle; a map that cannot be inverted
    keeps the whole plane."""
    ref_in = [x for x in range(3) if x != r]
    mov_in = [x for x in range(3) if x != m]
    lo, hi = _signal_index_bounds(moving_shape, box)
    s_idx = np.arange(len(maps), dtype=np.float64)
    z = maps[:, m, r] * s_idx + maps[:, m, 3]
    active = np.flatnonzero((z >= lo[m]) & (z <= hi[m]))
    if not len(active):
        return None
    corners = np.array([[a, b] for a in (lo[mov_in[0]], hi[mov_in[0]]) for b in (lo[mov_in[1]], hi[mov_in[1]])])
    shape_in = [int(reference_shape[x]) for x in ref_in]
    low, high = np.array(shape_in, dtype=np.float64), np.full(2, -1.0)
    for s in active:
        b = maps[s][np.ix_(mov_in, ref_in)]
        if abs(np.linalg.det(b)) < 1e-12:
            low, high = np.zeros(2), np.array(shape_in, dtype=np.float64) - 1
            break
        uv = (corners - maps[s, mov_in, 3]) @ np.linalg.inv(b).T
        low, high = np.minimum(low, uv.min(axis=0)), np.maximum(high, uv.max(axis=0))
    first = np.clip(np.floor(low), 0, np.array(shape_in) - 1).astype(np.int64)
    last = np.clip(np.ceil(high), 0, np.array(shape_in) - 1).astype(np.int64)
    if np.any(first > last) or np.any(high < 0) or np.any(low > np.array(shape_in) - 1):
        return None
    return (slice(int(active[0]), int(active[-1]) + 1), slice(int(first[0]), int(last[0]) + 1),
            slice(int(first[1]), int(last[1]) + 1))


def _resample_separable_per_slice(
    moving: torch.Tensor, maps: np.ndarray, reference_shape: tuple[int, int, int], r: int, m: int
) -> torch.Tensor:
    """:func:`_resample_separable` with its own map for each reference slice ``s`` along ``r``
    (``maps``: ``(S, 4, 4)`` reference ijk -> moving ijk, all keeping slices apart). Only the slices
    and the in-plane rectangle that can interpolate a nonzero value are sampled
    (:func:`_signal_region_per_slice`, when the reference grid is a whole volume:
    :func:`_nonzero_box_if_worth`); the other points are 0, what sampling them gives."""
    dev = moving.device
    ref_in = [x for x in range(3) if x != r]
    mov_in = [x for x in range(3) if x != m]
    n_ref, n_mov = int(reference_shape[r]), int(moving.shape[m])
    shape_in = tuple(int(reference_shape[x]) for x in ref_in)
    box = _nonzero_box_if_worth(moving, n_ref * int(np.prod(shape_in)))
    region = None if box is None else _signal_region_per_slice(maps, box, tuple(moving.shape), reference_shape, r, m)
    if region is None:  # nothing but zeros to interpolate
        return torch.zeros((n_ref, *shape_in), dtype=torch.float32, device=dev).movedim(0, r).contiguous()
    rs, ru, rv = region
    s_idx = np.arange(n_ref, dtype=np.float64)[rs]
    maps = maps[rs]
    n_sub = len(s_idx)
    z = maps[:, m, r] * s_idx + maps[:, m, 3]
    inside = (z >= -0.5) & (z <= n_mov - 0.5)
    zc = np.clip(z, 0.0, n_mov - 1)
    z0 = np.minimum(np.floor(zc).astype(np.int64), max(n_mov - 2, 0))
    w = torch.as_tensor(zc - z0, dtype=torch.float32, device=dev)[:, None, None]
    z1 = np.minimum(z0 + 1, n_mov - 1)
    sub_in = (ru.stop - ru.start, rv.stop - rv.start)
    u = torch.arange(ru.start, ru.stop, dtype=torch.float64, device=dev)[None, :, None]
    v = torch.arange(rv.start, rv.stop, dtype=torch.float64, device=dev)[None, None, :]
    # each point's moving in-plane index, in grid_sample's (x, y) order (the later moving axis
    # first), as the broadcast sum of a per-row and a per-column term; then the ITK bounds, and the
    # normalisation (align_corners=True; a size-1 axis reads 0) folded into the two terms
    grid = torch.empty((n_sub, *sub_in, 2), dtype=torch.float32, device=dev)
    inside_pt = torch.as_tensor(inside, device=dev)[:, None, None].expand(n_sub, *sub_in).clone()
    for d, axis_m in enumerate((mov_in[1], mov_in[0])):
        size = int(moving.shape[axis_m])
        b = torch.as_tensor(maps[:, axis_m][:, ref_in], dtype=torch.float64, device=dev)  # (S, 2)
        c = torch.as_tensor(maps[:, axis_m, 3], dtype=torch.float64, device=dev)[:, None, None]
        rows, cols = b[:, 0, None, None] * u + c, b[:, 1, None, None] * v  # (S, R1, 1), (S, 1, R2)
        index = torch.add(rows.float(), cols.float())
        inside_pt &= (index >= -0.5) & (index <= size - 0.5)
        scale = 2.0 / (size - 1) if size > 1 else 0.0
        torch.add((rows * scale - (1.0 if size > 1 else 0.0)).float(), (cols * scale).float(), out=grid[..., d])
    grid = grid.reshape(n_sub, -1, 2)
    inside_pt = inside_pt.reshape(n_sub, -1)
    planes = moving.movedim(m, 0)
    below = grid_sample_points(planes[torch.as_tensor(z0, device=dev)][:, None].float(), grid)[:, 0]  # (S, P)
    out = below
    if bool((w > 0).any()):
        above = grid_sample_points(planes[torch.as_tensor(z1, device=dev)][:, None].float(), grid)[:, 0]
        out = above.sub_(below).mul_(w.reshape(n_sub, 1)).add_(below)  # (1 - w) below + w above
    out.mul_(inside_pt)
    if (n_sub, *sub_in) == (n_ref, *shape_in):  # the whole grid: no copy into the zeros
        return out.reshape(n_ref, *shape_in).movedim(0, r).contiguous()
    result = torch.zeros((n_ref, *shape_in), dtype=torch.float32, device=dev)
    result[rs, ru, rv] = out.reshape(n_sub, *sub_in)
    return result.movedim(0, r).contiguous()


def slice_stack_index_maps(
    ijk_to_ras: np.ndarray,
    frame: SliceFrame,
    size: tuple[int, int],
    spacing_mm: float,
    slices: np.ndarray,
    fixed_to_moving_ras: np.ndarray | None = None,
) -> np.ndarray:
    """``(S, 4, 4)`` maps from network-grid index ``(0, row, col)`` of each slice to the volume's
    continuous array index ``(i, j, k)``, through the RAS resampling transform(s) when given (one
    4x4, or ``(S, 4, 4)`` one per slice). Column 0 is zero: each map holds one slice."""
    grid = network_grid_affine(frame, size, spacing_mm, np.asarray(slices))
    t = np.eye(4) if fixed_to_moving_ras is None else np.asarray(fixed_to_moving_ras, dtype=np.float64)
    return invert(ijk_to_ras) @ t @ grid


def _plane_axis(maps: np.ndarray, tol: float = 1e-7) -> int | None:
    """The volume array axis along which every slice of ``maps`` (:func:`slice_stack_index_maps`)
    lies at one constant index (slices parallel to the volume's planes), else None."""
    for m in range(3):
        if np.all(np.abs(maps[:, m, 1:3]) <= tol):
            return m
    return None


def sample_slice_stack(
    volume: torch.Tensor,
    ijk_to_ras: np.ndarray,
    frame: SliceFrame,
    size: tuple[int, int],
    spacing_mm: float,
    slices: np.ndarray | None = None,
    fixed_to_moving_ras: np.ndarray | None = None,
    chunk_points: int = 1_048_576,
    allow_planes: bool = True,
) -> torch.Tensor:
    """Network-grid slices ``(S, H, W)`` of a volume, sampled on the fixed volume's slice frame.

    ``fixed_to_moving_ras``: optional resampling transform(s) applied to the grid points first,
    one 4x4 for all slices or ``(S, 4, 4)``, one per slice (used for the moving volume). When the
    sampled slices lie parallel to the volume's own planes (the fixed volume itself, or a moving
    volume with the same slice direction and an in-plane transform), each slice is interpolated
    bilinearly in the two planes around it and blended (:func:`_resample_separable_per_slice`):
    the same trilinear values, about twice as fast for the network grid (used when the grid has at
    least a quarter as many pixels as a volume plane, as the two planes are copied). Otherwise the
    points are interpolated in 3D. Both paths work from the same grid-to-array-index maps
    (:func:`slice_stack_index_maps`), in groups of about ``chunk_points``, so the temporary point
    clouds stay small.
    """
    idx = np.arange(len(frame.offsets)) if slices is None else np.asarray(slices)
    h, w = int(size[0]), int(size[1])
    out = torch.empty((len(idx), h, w), dtype=torch.float32, device=volume.device)
    if not len(idx):
        return out
    step = max(1, chunk_points // max(1, h * w))
    maps = slice_stack_index_maps(ijk_to_ras, frame, size, spacing_mm, idx, fixed_to_moving_ras)
    m = _plane_axis(maps) if allow_planes else None
    # the plane path copies two whole volume planes per slice: worth it unless the grid is much
    # sparser than a plane (e.g. the coarse survey grid)
    planes = m is not None and 4 * h * w >= int(np.prod(volume.shape)) // int(volume.shape[m])
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    row_col = np.stack([rows, cols], axis=-1)  # (H, W, 2) grid index of every pixel
    vol = volume[None, None].float()
    for a in range(0, len(idx), step):
        part = maps[a : a + step]
        if planes:
            out[a : a + len(part)] = _resample_separable_per_slice(volume, part, (len(part), h, w), 0, m)
        else:  # the same maps, every point interpolated in 3D
            index = row_col @ part[:, None, :3, 1:3].transpose(0, 1, 3, 2) + part[:, None, None, :3, 3]
            out[a : a + len(part)] = sample_at_indices(vol, torch.as_tensor(index.reshape(1, -1, 3), dtype=torch.float32,
                                                                             device=volume.device)).reshape(len(part), h, w)
    return out


def warp_images_2d(
    images: torch.Tensor, matrices_2d: torch.Tensor, spacing_mm: float
) -> torch.Tensor:
    """Warp network-grid images by 2D resampling transforms: ``out(p) = image(A p)``.

    ``images``: ``(B, C, H, W)``; ``matrices_2d``: ``(B, 3, 3)`` slice-frame matrices in centred
    mm coordinates (see :func:`geometry.params_to_matrix_2d`; torch version in
    :func:`torch_params_to_matrix_2d`). Differentiable (used by the unsupervised loss).
    """
    b, _, h, w = images.shape
    dev, dt = images.device, images.dtype
    xy = torch.as_tensor(network_grid_plane((h, w), spacing_mm), device=dev, dtype=dt).reshape(-1, 2)
    pts = torch.cat([xy, torch.ones_like(xy[:, :1])], dim=1)[None]  # (1, HW, 3): x, y, 1
    moved = pts @ matrices_2d.to(dt).transpose(1, 2)  # (B, HW, 3)
    col = moved[..., 0] / spacing_mm + (w - 1) / 2.0
    row = moved[..., 1] / spacing_mm + (h - 1) / 2.0
    idx = torch.stack([row, col], dim=-1).reshape(b, h, w, 2)
    return sample_at_indices(images, idx)


def torch_params_to_matrix_2d(params: torch.Tensor, kind: str = "rigid") -> torch.Tensor:
    """Differentiable torch twin of :func:`geometry.params_to_matrix_2d`, ``(B, P) -> (B, 3, 3)``.

    Same convention: rigid ``(theta_deg, tx_mm, ty_mm)``, affine ``(a11-1, a12, a21, a22-1, tx, ty)``.
    """
    b = params.shape[0]
    zeros = params.new_zeros(b)
    ones = params.new_ones(b)
    if kind == "rigid":
        t = torch.deg2rad(params[:, 0])
        c, s = torch.cos(t), torch.sin(t)
        rows = [c, -s, params[:, 1], s, c, params[:, 2]]
    elif kind == "affine":
        rows = [1 + params[:, 0], params[:, 1], params[:, 4], params[:, 2], 1 + params[:, 3], params[:, 5]]
    else:
        raise ValueError(f"transform kind must be rigid or affine, not {kind!r}")
    return torch.stack(rows + [zeros, zeros, ones], dim=-1).reshape(b, 3, 3)
