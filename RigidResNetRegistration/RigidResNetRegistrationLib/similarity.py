"""Image similarity: normalised cross-correlation and (Parzen-window) mutual information.

One implementation, used for the unsupervised training losses, the quality figures reported
by the engine (before/after) and the benchmarks. All functions are batched over the first
axis, differentiable, and accept an optional mask of the pixels to use.
"""

from __future__ import annotations

import torch


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Global normalised cross-correlation per batch item (paper eq. 3), in ``[-1, 1]``.

    ``a``, ``b``: ``(B, ...)``; ``mask``: same shape, weights in ``[0, 1]`` (all ones if None).
    Returns ``(B,)``; 0 where either image is constant under the mask.
    """
    a, b = _flatten(a), _flatten(b)
    w = torch.ones_like(a) if mask is None else _flatten(mask)
    wsum = w.sum(dim=1).clamp_min(eps)
    ma = (w * a).sum(dim=1) / wsum
    mb = (w * b).sum(dim=1) / wsum
    da, db = a - ma[:, None], b - mb[:, None]
    cov = (w * da * db).sum(dim=1)
    var = ((w * da * da).sum(dim=1) * (w * db * db).sum(dim=1)).clamp_min(0.0)
    return torch.where(var > eps, cov / torch.sqrt(var + eps), torch.zeros_like(cov))


def joint_histogram(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, bins: int = 32, sigma: float | None = None
) -> torch.Tensor:
    """Soft (Gaussian Parzen window) joint histogram of intensities in ``[0, 1]``, ``(B, bins, bins)``,
    normalised to sum to 1 per batch item."""
    a, b = _flatten(a).clamp(0, 1), _flatten(b).clamp(0, 1)
    w = torch.ones_like(a) if mask is None else _flatten(mask)
    centres = torch.linspace(0.0, 1.0, bins, device=a.device, dtype=a.dtype)
    s = (1.0 / (bins - 1)) if sigma is None else sigma
    wa = torch.exp(-0.5 * ((a[:, :, None] - centres) / s) ** 2)  # (B, N, bins)
    wb = torch.exp(-0.5 * ((b[:, :, None] - centres) / s) ** 2)
    wa = wa / wa.sum(dim=2, keepdim=True).clamp_min(1e-12)
    wb = wb / wb.sum(dim=2, keepdim=True).clamp_min(1e-12)
    joint = torch.einsum("bn,bni,bnj->bij", w, wa, wb)
    return joint / joint.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def mutual_information(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, bins: int = 32, sigma: float | None = None
) -> torch.Tensor:
    """Mutual information (nats) per batch item from a Parzen joint histogram, ``(B,)``.

    Intensities are expected normalised to ``[0, 1]`` (see ``preprocess.normalise_slices``).
    """
    p = joint_histogram(a, b, mask, bins, sigma)
    pa = p.sum(dim=2, keepdim=True)
    pb = p.sum(dim=1, keepdim=True)
    ratio = p / (pa * pb).clamp_min(1e-12)
    return (p * torch.log(ratio.clamp_min(1e-12))).sum(dim=(1, 2))
