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

from .geometry import SliceFrame, apply_to_points, compose, invert, network_grid_points


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
    grid = norm.flip(-1).to(image.dtype).reshape(indices.shape[0], *([1] * (ndim - 1)), -1, ndim)
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
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


def resample_volume(
    moving: torch.Tensor,
    moving_ijk_to_ras: np.ndarray,
    reference_shape: tuple[int, int, int],
    reference_ijk_to_ras: np.ndarray,
    fixed_to_moving_ras: np.ndarray | None = None,
    slab_voxels: int = 4_000_000,
) -> torch.Tensor:
    """Resample ``moving`` onto a reference grid: ``out[v] = moving(T(ijk_to_ras_ref v))``.

    ``fixed_to_moving_ras`` is the RAS *resampling* transform (fixed point -> moving point;
    identity when None), exactly as stored, in LPS, in the ``.tfm`` file. Works slab by slab
    along the first axis so memory stays bounded for large volumes.
    """
    t = np.eye(4) if fixed_to_moving_ras is None else np.asarray(fixed_to_moving_ras, dtype=np.float64)
    index_map = compose(invert(moving_ijk_to_ras), t, reference_ijk_to_ras)  # ref ijk -> moving ijk
    ni, nj, nk = (int(s) for s in reference_shape)
    out = torch.empty((ni, nj, nk), dtype=torch.float32, device=moving.device)
    vol = moving[None, None].float()
    m = torch.as_tensor(index_map, dtype=torch.float32, device=moving.device)
    jj, kk = torch.meshgrid(
        torch.arange(nj, dtype=torch.float32, device=moving.device),
        torch.arange(nk, dtype=torch.float32, device=moving.device),
        indexing="ij",
    )
    per_slab = max(1, slab_voxels // max(1, nj * nk))
    for i0 in range(0, ni, per_slab):
        i1 = min(ni, i0 + per_slab)
        ii = torch.arange(i0, i1, dtype=torch.float32, device=moving.device)[:, None, None].expand(-1, nj, nk)
        ijk = torch.stack([ii, jj.expand_as(ii), kk.expand_as(ii)], dim=-1)
        idx = ijk @ m[:3, :3].T + m[:3, 3]
        out[i0:i1] = sample_at_indices(vol, idx.reshape(1, -1, 3)).reshape(i1 - i0, nj, nk)
    return out


def sample_slice_stack(
    volume: torch.Tensor,
    ijk_to_ras: np.ndarray,
    frame: SliceFrame,
    size: tuple[int, int],
    spacing_mm: float,
    slices: np.ndarray | None = None,
    fixed_to_moving_ras: np.ndarray | None = None,
) -> torch.Tensor:
    """Network-grid slices ``(S, H, W)`` of a volume, sampled on the fixed volume's slice frame.

    ``fixed_to_moving_ras``: optional resampling transform(s) applied to the grid points first,
    one 4x4 for all slices or ``(S, 4, 4)``, one per slice (used for the moving volume).
    """
    pts = network_grid_points(frame, size, spacing_mm, slices)
    if fixed_to_moving_ras is not None:
        t = np.asarray(fixed_to_moving_ras, dtype=np.float64)
        if t.ndim == 2:
            pts = apply_to_points(t, pts)
        else:
            pts = np.einsum("sij,shwj->shwi", t[:, :3, :3], pts) + t[:, None, None, :3, 3]
    return sample_volume_at_ras(volume, ijk_to_ras, pts)


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
    xs = (torch.arange(w, device=dev, dtype=dt) - (w - 1) / 2.0) * spacing_mm
    ys = (torch.arange(h, device=dev, dtype=dt) - (h - 1) / 2.0) * spacing_mm
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(1, -1, 3)  # (1, HW, 3)
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
