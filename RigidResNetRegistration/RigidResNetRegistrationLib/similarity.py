"""Image similarity: normalised cross-correlation and (Parzen-window) mutual information.

One implementation, used for the unsupervised training losses, the quality figures reported
by the engine (before/after) and the benchmarks. :func:`ncc` and :func:`mutual_information` are
batched over the first axis, differentiable, and accept an optional mask of the pixels to use.
:func:`mattes_mutual_information` is the form the refinements optimise (one pair, or a batch of
slice pairs with one histogram each), with the fixed image's bins computed once (:func:`fixed_bins`)
and an analytic gradient. :class:`NCCMetric` and :class:`MattesMIMetric` (:func:`point_metric`)
hold what a refinement fixes once (the fixed values, their bins, the intensity scaling) and score
moving values sampled at the same points: both refinements (6-DOF and per slice) use them.
"""

from __future__ import annotations

from typing import Protocol

import torch

#: The similarities a refinement can maximise.
POINT_METRICS = ("ncc", "mi")


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


def _window(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Where each intensity ``x`` (clamped to ``[0, 1]``) falls among ``bins`` bin centres
    ``0, 1/(bins-1), ..., 1``: the first of the 4 bins its cubic B-spline window touches (int64,
    ``floor(s) - 1`` with ``s = x (bins - 1)``; the others follow it, and each is clamped to
    ``0 .. bins-1`` where it is used), and the distances ``|d|`` from the 4, one tensor each, each
    on one side of the kernel's knots: ``1 <= |d0| <= 2``, ``0 <= |d1| < 1``, ``0 < |d2| <= 1``,
    ``1 <= |d3| <= 2``. Each distance is computed as ``|s - bin|`` would be, bit for bit, and
    keeps ``x``'s autograd history (the bins have none)."""
    s = x.clamp(0, 1) * (bins - 1)
    floor = torch.floor(s).detach()
    return floor.long() - 1, (s - (floor - 1), s - floor, (floor + 1) - s, (floor + 2) - s)


def _bspline_weights(dist: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The cubic B-spline (the Parzen window of Mattes et al. 2003) at the 4 distances of
    :func:`_window`, summing to 1: ``(4 - 6 a^2 + 3 a^3) / 6`` for ``a = |d| < 1``,
    ``(2 - a)^3 / 6`` for ``1 <= a < 2``, 0 beyond; each distance's side of the knots is known,
    so no branch is evaluated (at ``a = 1`` both pieces give 1/6, at ``a = 2`` the outer one 0)."""
    a0, a1, a2, a3 = dist
    return (2 - a0) ** 3 / 6, (4 - 6 * a1**2 + 3 * a1**3) / 6, (4 - 6 * a2**2 + 3 * a2**3) / 6, (2 - a3) ** 3 / 6


def _bspline_weight_derivatives(dist: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Derivatives of :func:`_bspline_weights` with respect to the intensity position ``s``
    (``d = s - bin``: bins 0 and 1 lie below ``s``, 2 and 3 above), summing to 0."""
    a0, a1, a2, a3 = dist
    return -0.5 * (2 - a0) ** 2, (9 * a1**2 - 12 * a1) / 6, -((9 * a2**2 - 12 * a2) / 6), 0.5 * (2 - a3) ** 2


def parzen_window(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cubic B-spline Parzen window of intensities ``x`` (any shape, clamped to ``[0, 1]``) over
    ``bins`` bins whose centres are ``0, 1/(bins-1), ..., 1``: for each value the 4 bins it
    touches ``(..., 4)`` (int64; the edge bins absorb what falls beyond them), their weights
    (summing to 1) and the weights' derivatives with respect to ``x`` (zero where ``x`` was clamped).
    """
    first, dist = _window(x, bins)
    idx = (first[..., None] + torch.arange(4, device=first.device)).clamp_(0, bins - 1)
    slope = ((x >= 0) & (x <= 1)).to(dist[0].dtype) * (bins - 1)
    return (idx, torch.stack(_bspline_weights(dist), dim=-1),
            torch.stack(_bspline_weight_derivatives(dist), dim=-1) * slope[..., None])


def fixed_bins(x: torch.Tensor, bins: int) -> torch.Tensor:
    """The hard (zero-order) bin of each fixed intensity in ``[0, 1]`` (clamped), int64: the
    nearest of the centres ``0, 1/(bins-1), ..., 1``, for :func:`mattes_mutual_information`."""
    return torch.round(x.clamp(0, 1) * (bins - 1)).long()


class _MattesMI(torch.autograd.Function):
    """Forward: MI of the joint histogram of hard fixed bins and B-spline moving windows.
    Backward (``moving`` only): ``dMI/dh_ab = log(p_ab / (p_a p_b)) / S`` (``S`` the weight sum;
    the other terms cancel because each moving window's weights sum to 1), chained through the
    window weights' derivatives."""

    @staticmethod
    def forward(ctx, moving: torch.Tensor, fixed_bin: torch.Tensor, weights: torch.Tensor, bins: int) -> torch.Tensor:
        # (B, N): B independent pairs, each with its own histogram at offset b * bins**2
        idx, w, dw = parzen_window(moving, bins)
        pair = torch.arange(moving.shape[0], device=moving.device)[:, None, None] * (bins * bins)
        joint_idx = (pair + fixed_bin[..., None] * bins + idx).reshape(-1)
        h = moving.new_zeros(moving.shape[0] * bins * bins).index_add_(0, joint_idx, (w * weights[..., None]).reshape(-1))
        h = h.reshape(-1, bins, bins)
        total = h.sum(dim=(1, 2)).clamp_min(1e-12)
        p = h / total[:, None, None]
        ratio = p / (p.sum(dim=2, keepdim=True) * p.sum(dim=1, keepdim=True)).clamp_min(1e-12)
        log_ratio = torch.log(ratio.clamp_min(1e-12))
        ctx.save_for_backward(joint_idx, dw, weights, log_ratio.reshape(-1), total)
        return (p * log_ratio).sum(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        joint_idx, dw, weights, log_ratio, total = ctx.saved_tensors
        g = (dw * log_ratio.index_select(0, joint_idx).reshape(dw.shape)).sum(dim=-1) * weights / total[:, None]
        return grad_out[:, None] * g, None, None, None


def mattes_mutual_information(fixed_bin: torch.Tensor, moving: torch.Tensor, weights: torch.Tensor, bins: int) -> torch.Tensor:
    """Mutual information (nats) of an image pair in the form of Mattes et al. (2003) and ITK's
    ``MattesMutualInformation``: each fixed intensity falls in one bin (``fixed_bin``, from
    :func:`fixed_bins`, computed once), each moving intensity (``(N,)``, ``[0, 1]``, clamped) is
    spread over 4 bins by the cubic B-spline window; ``weights`` ``(N,)`` weigh the points (0 leaves
    one out). A scalar, differentiable in ``moving`` by an analytic gradient (4 terms per point
    instead of the 16 of the batched :func:`mutual_information`, which also smooths the fixed side).
    ``(B, N)`` inputs give ``B`` independent pairs (one histogram each) and a ``(B,)`` result.
    """
    if moving.dim() == 1:
        return _MattesMI.apply(moving[None], fixed_bin[None], weights[None].to(moving.dtype), int(bins))[0]
    return _MattesMI.apply(moving, fixed_bin, weights.to(moving.dtype), int(bins))


def joint_histogram(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, bins: int = 32) -> torch.Tensor:
    """Joint histogram of intensities in ``[0, 1]`` with a cubic B-spline Parzen window,
    ``(B, bins, bins)``, normalised to sum to 1 per batch item. Each pixel adds to 4 x 4 bins, so
    the cost is linear in the number of pixels, and it is differentiable in the intensities."""
    a, b = _flatten(a), _flatten(b)
    w = torch.ones_like(a) if mask is None else _flatten(mask)
    (first_a, da), (first_b, db) = _window(a, bins), _window(b, bins)
    wa, wb = _bspline_weights(da), _bspline_weights(db)
    ia = [(first_a + k).clamp(0, bins - 1) for k in range(4)]
    ib = [(first_b + k).clamp(0, bins - 1) for k in range(4)]
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


class PointMetric(Protocol):
    """A similarity of moving values sampled at fixed sample points (higher is better): called
    with ``moving_values`` and ``weights`` shaped as the fixed values it was made with (``(N,)``:
    a scalar; ``(B, N)``: ``B`` independent pairs, ``(B,)``); differentiable in ``moving_values``."""

    name: str

    def __call__(self, moving_values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


class NCCMetric:
    """Normalised cross-correlation (:func:`ncc`) against fixed values ``(N,)`` or ``(B, N)``."""

    name = "ncc"

    def __init__(self, fixed_values: torch.Tensor) -> None:
        self.fixed_values = fixed_values

    def __call__(self, moving_values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fixed_values.dim() == 1:
            return ncc(self.fixed_values[None], moving_values[None], weights[None])[0]
        return ncc(self.fixed_values, moving_values, weights)


class MattesMIMetric:
    """Mattes mutual information (:func:`mattes_mutual_information`) against fixed values ``(N,)``
    or ``(B, N)``: each side mapped to ``[0, 1]`` by its intensity range ``(low, high)`` (the
    volumes' 1st/99th percentiles, :func:`preprocess.intensity_range`) and clamped; the fixed
    values' bins computed once."""

    name = "mi"

    def __init__(self, fixed_values: torch.Tensor, fixed_range: tuple[float, float],
                 moving_range: tuple[float, float], bins: int = 48) -> None:
        f_lo, f_hi = fixed_range
        self.fixed_bin = fixed_bins((fixed_values - f_lo) / ((f_hi - f_lo) or 1.0), bins)
        self.m_lo = moving_range[0]
        self.m_span = (moving_range[1] - moving_range[0]) or 1.0
        self.bins = int(bins)

    def __call__(self, moving_values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return mattes_mutual_information(self.fixed_bin, (moving_values - self.m_lo) / self.m_span, weights, self.bins)


def point_metric(name: str, fixed_values: torch.Tensor, fixed_range: tuple[float, float] | None = None,
                 moving_range: tuple[float, float] | None = None, bins: int = 48) -> PointMetric:
    """The :class:`PointMetric` called ``name`` (``ncc`` or ``mi``; MI needs both intensity ranges)."""
    if name == "ncc":
        return NCCMetric(fixed_values)
    if name == "mi":
        if fixed_range is None or moving_range is None:
            raise ValueError("mutual information needs the fixed and moving intensity ranges")
        return MattesMIMetric(fixed_values, fixed_range, moving_range, bins)
    raise ValueError(f"metric must be one of {', '.join(POINT_METRICS)}, not {name!r}")
