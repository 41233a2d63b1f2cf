"""Unsupervised losses: warp the moving slice by the predicted transform, compare to the fixed.

NCC (paper eq. 3) for same-contrast pairs, Parzen-window mutual information for cross-contrast
pairs; both come from ``RigidResNetRegistrationLib.similarity`` (the engine reports the same
figures). Parameter ground truth is never used here.
"""

from __future__ import annotations

import torch

from RigidResNetRegistrationLib.resample import torch_params_to_matrix_2d, warp_images_2d
from RigidResNetRegistrationLib.similarity import mutual_information, ncc


def warp_with_params(moving: torch.Tensor, params: torch.Tensor, kind: str, spacing_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp normalised moving slices ``(B, H, W)`` by predicted parameters ``(B, P)``:
    ``warped(x) = moving(T(x))``. Returns the warped slices and the mask of pixels that came
    from inside the moving slice (both ``(B, H, W)``)."""
    m = torch_params_to_matrix_2d(params.float(), kind)
    stacked = torch.stack([moving, torch.ones_like(moving)], dim=1)
    out = warp_images_2d(stacked, m, spacing_mm)
    return out[:, 0], (out[:, 1] > 0.999).float()


def similarity_loss(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    params: torch.Tensor,
    same_contrast: torch.Tensor,
    kind: str,
    spacing_mm: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the batch of ``1 - NCC`` (same contrast) or ``-MI`` (cross contrast) between the
    fixed slice and the moving slice warped by ``params``; also returns the mean NCC and MI."""
    warped, mask = warp_with_params(moving, params, kind, spacing_mm)
    n = ncc(fixed, warped, mask)
    mi = mutual_information(fixed, warped, mask)
    per_item = torch.where(same_contrast.to(n.device), 1.0 - n, -mi)
    return per_item.mean(), {"ncc": float(n.detach().mean()), "mi": float(mi.detach().mean())}
