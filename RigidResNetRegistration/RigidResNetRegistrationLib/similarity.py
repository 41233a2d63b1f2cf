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


def _cubic_bspline(d: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline kernel (support ``|d| < 2``), the Parzen window of Mattes et al. (2003)."""
    a = d.abs()
    return torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))


def joint_histogram(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, bins: int = 32) -> torch.Tensor:
    """Joint histogram of intensities in ``[0, 1]`` with a cubic B-spline Parzen window,
    ``(B, bins, bins)``, normalised to sum to 1 per batch item. Each pixel adds to 4 x 4 bins, so
    the cost is linear in the number of pixels, and it is differentiable in the intensities."""
    a, b = _flatten(a).clamp(0, 1) * (bins - 1), _flatten(b).clamp(0, 1) * (bins - 1)
    w = torch.ones_like(a) if mask is None else _flatten(mask)
    base_a, base_b = torch.floor(a).detach() - 1, torch.floor(b).detach() - 1
    wa = [_cubic_bspline(a - (base_a + k)) for k in range(4)]
    wb = [_cubic_bspline(b - (base_b + k)) for k in range(4)]
    ia = [(base_a + k).clamp(0, bins - 1).long() for k in range(4)]
    ib = [(base_b + k).clamp(0, bins - 1).long() for k in range(4)]
    joint = a.new_zeros(a.shape[0], bins * bins)
    for ka in range(4):
        for kb in range(4):
            joint = joint.scatter_add(1, ia[ka] * bins + ib[kb], w * wa[ka] * wb[kb])
    joint = joint.reshape(-1, bins, bins)
    return joint / joint.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def mutual_information(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, bins: int = 32) -> torch.Tensor:
    """Mutual information (nats) per batch item from a Parzen (cubic B-spline) joint histogram, ``(B,)``.

    Intensities are expected normalised to ``[0, 1]`` (see ``preprocess.normalise_slices``).
    """
    p = joint_histogram(a, b, mask, bins)
    pa = p.sum(dim=2, keepdim=True)
    pb = p.sum(dim=1, keepdim=True)
    ratio = p / (pa * pb).clamp_min(1e-12)
    return (p * torch.log(ratio.clamp_min(1e-12))).sum(dim=(1, 2))
