"""Quality control: is a registration result ``ok``, ``suspicious`` or ``failed``?

One rule (:func:`judge`) over signals measured on the images (:func:`measure`), so it can score
*any* transform, not only the one a registration returned (a result perturbed on purpose, another
tool's transform):

- **pairing**: the NCC at the transform over the points that are signal in both images decides
  same contrast (NCC at least ``SAME_CONTRAST_NCC``: measured with NCC) or cross contrast
  (Mattes mutual information, nats) unless the caller names the metric;
- **similarity level**: the similarity at the transform against what registered pairs of that
  pairing reach;
- **peak**: the relative drop of the similarity when the transform is moved by ``PROBE_STEP``
  (degrees about, and mm along, each axis of the fixed slice frame): unrelated images (noise,
  another object) have no similarity peak at any transform;
- **local optimality**: from the same probes, a parabola through the three values on each axis
  estimates how far the transform is from the similarity optimum (degrees or mm; exact for a
  parabolic peak, ``d / (2 - d)`` for a cusp-like one ``d`` away, so 1 reads 1 either way); a
  transform that is not at an optimum is not a registration;
- **mirror**: the best similarity reached by a left-right *mirrored* mapping searched near the
  transform, over the transform's own: a moving image flipped left-right still has a similarity
  peak, only a lower one than the mirrored mapping reaches.

Similarities are measured on the network grid of the registered slices, at the fixed volume's
foreground points and their neighbours in the slice (the foreground grown by ``EDGE_PIXELS``; at
most ``MAX_POINTS``), the moving volume linearly interpolated (ITK bounds: points mapped outside
the moving volume are left out). The edge counts, as for the refinement (:mod:`refine` grows its
foreground by one block): inside the brain alone, the mutual information of some contrast pairs
peaks millimetres away from where the brain's outline and the refinement put it (a glioma case's
T1 -> T2, measured: 2-3 mm along the slice normal, at the true transform too).

What the registration itself reports (:class:`RunSignals`: agreement between slices, the
refinement's steps and how far it moved from the network's estimate) is recorded with the signals;
of it only a rejected refinement enters the rule: on the calibration set the others did not
separate good from bad results (correct 6-DOF results have 0-25% of slices agreeing with the
volume transform, since an in-plane network cannot see out-of-plane motion, and the refinement
moves 7-10 deg / mm from the network's estimate; on uniform noise 62% of the slices agreed).

Only :func:`measure` needs torch (imported there); the verdict and its constants do not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import geometry as geo

if TYPE_CHECKING:
    import torch

VERDICTS = ("ok", "suspicious", "failed")

# --------------------------------------------------------------------------- thresholds
# Calibrated on the QC calibration set (benchmarks/rrr_benchmarks/qc_calibration.py, table in
# benchmarks/results-qc/qc_calibration.md): known-good registrations of held-out volumes
# (BraTS2021_90004 T1 -> T1 / T2 / FLAIR, 3D and single 2D slices; IXI and whole-head/ whole-head
# scans; Kirby21 and niivue skull-stripped; ANTsPy 2D slices) and known-bad ones (uniform-noise
# moving, an unrelated synthetic limb-like object, a block-scrambled brain, a left-right mirrored
# moving, correct results perturbed by 5 deg and/or 5 mm). The table prints every value and margin.

#: Degrees (about each frame axis) and mm (along each) of the probes around the transform.
PROBE_STEP = 2.0
#: Points the similarity is measured at (pseudo-random subset, fixed seed).
MAX_POINTS = 10_000
#: The foreground is grown by this many network-grid pixels in each slice, to take its edge in. On
#: the calibration set 1 to 4 each keep every verdict; 1 leaves the mirrored cases farthest from their
#: threshold (benchmarks/README.md, "Quality verdict calibration").
EDGE_PIXELS = 1
#: Points of the mirrored-mapping search (a subset of the MAX_POINTS, every n-th).
MIRROR_POINTS = 4_000
#: Histogram bins of the mutual information (fixed values in hard bins, moving in B-spline windows).
MI_BINS = 32
#: In-brain NCC at the transform from which a pair counts as the same contrast (as engine.choose_metric).
SAME_CONTRAST_NCC = 0.8
#: Similarity below which a result has failed, per metric (NCC; MI in nats).
SIMILARITY_FAILED = {"ncc": 0.5, "mi": 0.1}
#: Peak: the similarity must drop by at least this fraction of itself, on average over the probes
#: ``PROBE_STEP`` away (failed below).
PEAK_FAILED = 0.02
#: Estimated distance to the similarity optimum (deg or mm, largest over the axes) above which a
#: result is suspicious / has failed; a probe direction that does not curve down counts as infinite.
OFFSET_SUSPICIOUS = 1.0
OFFSET_FAILED = 2.0
#: Mirror: best mirrored similarity / the result's similarity above which it has failed (the
#: mirrored mapping fits better). No "almost as similar" level: a symmetric brain (the embedded
#: MNI152 2009a *symmetric* template, correctly registered, reaches 0.938) is not a warning.
MIRROR_FAILED = 1.0


@dataclass
class RunSignals:
    """What the registration itself reports (all optional): ``slices_agree``: fraction of the
    registered slices whose own estimate is within 1 deg / 1 mm of the volume's; ``refine_moved_deg``
    / ``refine_moved_mm``: how far the refinement took the transform from the network's (rotation
    in degrees, translation in mm at the fixed volume's centre); ``refine_steps``: its evaluations;
    ``refine_rejected``: the refinement was rejected and the network's transform kept."""

    slices_agree: float | None = None
    refine_moved_deg: float | None = None
    refine_moved_mm: float | None = None
    refine_steps: int | None = None
    refine_rejected: bool = False


@dataclass
class QualitySignals:
    """Signals measured on the images at one transform (see the module docstring).

    ``metric``: ``ncc`` or ``mi``; ``in_brain_ncc``: NCC over the points that are signal in both
    (what decided the metric); ``similarity``: at the transform; ``peak``: relative drop of the
    similarity at the ``PROBE_STEP`` probes (mean over them, divided by ``similarity``);
    ``offset_deg`` / ``offset_mm``: estimated distance to the similarity optimum, largest over the
    rotation / translation axes (``inf``: a probe direction does not curve down); ``mirror``: best
    mirrored similarity / ``similarity`` (None: not measured, e.g. a sagittal 2D pair);
    ``overlap``: fraction of the points mapped inside the moving volume; ``points``: how many
    points; ``planar``: 2D (in-plane probes only)."""

    metric: str
    in_brain_ncc: float
    similarity: float
    peak: float
    offset_deg: float
    offset_mm: float
    mirror: float | None
    overlap: float
    points: int
    planar: bool = False
    run: RunSignals = field(default_factory=RunSignals)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (rounded; infinity and NaN as None); the run's signals flattened in."""
        out: dict[str, object] = {}
        for k, v in asdict(self).items():
            if k == "run":
                out.update({n: _round(x) for n, x in v.items() if x is not None})
            else:
                out[k] = _round(v)
        return out


@dataclass
class QualityVerdict:
    """``verdict``: one of :data:`VERDICTS`; ``reasons``: one line per finding that made it
    suspicious or failed (empty for ``ok``); ``signals``: what it was decided from."""

    verdict: str
    reasons: list[str]
    signals: QualitySignals

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "reasons": list(self.reasons), "signals": self.signals.as_dict()}


def _round(v: object) -> object:
    if isinstance(v, float):
        return round(v, 5) if math.isfinite(v) else None
    return v


def _fmt(v: float) -> str:
    return f"{v:.1f}" if math.isfinite(v) else "inf"


# --------------------------------------------------------------------------- the rule


def judge(s: QualitySignals) -> QualityVerdict:
    """The rule: ``failed`` when any failure finding holds, else ``suspicious`` when any suspicious
    finding holds, else ``ok``.

    failed: similarity below ``SIMILARITY_FAILED`` (per metric); no similarity peak (``peak`` below
    ``PEAK_FAILED``); not at a similarity optimum (estimated offset above ``OFFSET_FAILED``); a
    mirrored mapping more similar than the result (``mirror`` above ``MIRROR_FAILED``).
    suspicious: offset above ``OFFSET_SUSPICIOUS``; the refinement was rejected.
    """
    name = "NCC" if s.metric == "ncc" else "MI"
    failed: list[str] = []
    suspicious: list[str] = []
    if not s.similarity >= SIMILARITY_FAILED[s.metric]:
        failed.append(f"{name} {s.similarity:.3f} is far below what registered images reach (< {SIMILARITY_FAILED[s.metric]})")
    if not s.peak >= PEAK_FAILED:
        failed.append(f"no similarity peak: {name} changes by {-100 * s.peak:+.1f}% {PROBE_STEP:g} deg / mm away "
                      "(unrelated images?)")
    offset = max(s.offset_deg, s.offset_mm)
    where = f"{_fmt(s.offset_deg)} deg, {_fmt(s.offset_mm)} mm"
    if not offset <= OFFSET_FAILED:
        failed.append(f"not at a similarity optimum (estimated {where} away)")
    elif offset > OFFSET_SUSPICIOUS:
        suspicious.append(f"close to but not at a similarity optimum (estimated {where} away)")
    if s.mirror is not None and s.mirror > MIRROR_FAILED:
        failed.append(f"a left-right mirrored mapping is more similar ({100 * (s.mirror - 1):+.0f}% {name}): "
                      "is the moving image flipped?")
    if s.run.refine_rejected:
        suspicious.append("the refinement was rejected (it made the registered slices less similar): the network's "
                          "transform is kept")
    verdict = "failed" if failed else "suspicious" if suspicious else "ok"
    return QualityVerdict(verdict, failed + suspicious, s)


# --------------------------------------------------------------------------- measuring


class SimilarityProbe:
    """The similarity of the fixed foreground points with the moving volume under any transforms.

    ``fixed``, ``moving``: ``(I, J, K)`` float tensors on one device with their ``ijk_to_ras``;
    ``frame``, ``slices``, ``size``, ``spacing_mm``: the network grid of the registered slices
    (points: the fixed foreground there grown by ``edge_pixels`` in each slice, at most
    ``max_points``). ``metric``: ``ncc``, ``mi`` or ``auto`` (chosen later by :meth:`use`).
    :meth:`__call__` takes ``(K, 4, 4)`` transforms (one per candidate, all slices) or
    ``(K, S, 4, 4)`` (one per candidate and slice) RAS resampling transforms and returns ``(K,)``.
    """

    def __init__(self, fixed: "torch.Tensor", fixed_ijk_to_ras: np.ndarray, moving: "torch.Tensor",
                 moving_ijk_to_ras: np.ndarray, frame: geo.SliceFrame, slices: np.ndarray, size: tuple[int, int],
                 spacing_mm: float, metric: str, max_points: int = MAX_POINTS, bins: int = MI_BINS,
                 edge_pixels: int = EDGE_PIXELS) -> None:
        import torch

        from .preprocess import foreground_threshold, intensity_range
        from .refine import _dilate
        from .resample import index_to_grid, sample_volume_at_ras

        self.bins, self.device = int(bins), moving.device
        pts = geo.network_grid_points(frame, size, spacing_mm, np.asarray(slices))  # (S, H, W, 3)
        n_sl, grid_shape = pts.shape[0], pts.shape[:3]
        group = np.broadcast_to(np.arange(n_sl)[:, None, None], grid_shape).reshape(-1)
        pts = pts.reshape(-1, 3)
        values = sample_volume_at_ras(fixed, fixed_ijk_to_ras, pts).float().cpu()
        self.f_threshold = foreground_threshold(fixed)
        near = (values > self.f_threshold).reshape(grid_shape)
        for _ in range(int(edge_pixels)):  # the foreground's edge, in each slice's plane
            near = _dilate(near, axes=(1, 2))
        keep = torch.nonzero(near.reshape(-1)).flatten()
        if keep.numel() > max_points:
            gen = torch.Generator().manual_seed(0)
            keep = keep[torch.randperm(keep.numel(), generator=gen)[:max_points].sort().values]
        keep_np = keep.numpy()
        self.points = torch.as_tensor(pts[keep_np], dtype=torch.float64, device=self.device)
        # the points are in slice order (keep is sorted): each slice's points are one run
        bounds = np.searchsorted(group[keep_np], np.arange(n_sl + 1))
        self.rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.n_slices = n_sl
        self.centre = pts[keep_np].mean(axis=0) if len(keep_np) else frame.centre.copy()
        self.fixed_values = values[keep].to(self.device)
        to_grid, bound = index_to_grid(tuple(moving.shape))
        self.ras_to_grid = torch.as_tensor(to_grid @ geo.invert(np.asarray(moving_ijk_to_ras, np.float64)),
                                           dtype=torch.float64, device=self.device)
        self.bound = torch.as_tensor(bound, dtype=torch.float32, device=self.device)
        self.moving = moving.float()[None, None]
        self.f_lo, f_hi = intensity_range(fixed.float())
        self.f_span = (f_hi - self.f_lo) or 1.0
        self.m_lo, m_hi = intensity_range(moving.float())
        self.m_span = (m_hi - self.m_lo) or 1.0
        self.m_threshold = foreground_threshold(moving.float())
        self.metric = ""
        if metric != "auto":
            self.use(metric)

    def use(self, metric: str) -> None:
        """Measure ``metric`` (``ncc`` or ``mi``) from now on."""
        from .similarity import fixed_bins

        if metric not in ("ncc", "mi"):
            raise ValueError(f"metric must be ncc or mi, not {metric!r}")
        self.metric = metric
        if metric == "mi":
            self.fixed = fixed_bins((self.fixed_values - self.f_lo) / self.f_span, self.bins)
        else:
            self.fixed = self.fixed_values

    def same_contrast_ncc(self, transform: np.ndarray) -> float:
        """NCC at ``transform`` over the points that are signal in both images: high for the same
        contrast (a whole-image NCC is high across contrasts too, the background being dark in all)."""
        from .similarity import ncc

        self.use("ncc")
        values, inside = self._moving_values(np.asarray(transform, dtype=np.float64)[None])
        both = inside * (values > self.m_threshold).float() * (self.fixed_values > self.f_threshold).float()
        return float(ncc(self.fixed_values[None], values, both)[0])

    @property
    def n_points(self) -> int:
        return int(self.points.shape[0])

    def subset(self, max_points: int) -> "SimilarityProbe":
        """The same probe on at most ``max_points`` of its points (every n-th, so each slice keeps
        its share); the metric in use is kept."""
        import copy

        import torch

        step = -(-self.n_points // max(1, int(max_points)))
        if step <= 1:
            return self
        keep = np.arange(0, self.n_points, step)
        group = np.repeat(np.arange(self.n_slices), [r.stop - r.start for r in self.rows])[keep]
        bounds = np.searchsorted(group, np.arange(self.n_slices + 1))
        out = copy.copy(self)
        index = torch.as_tensor(keep, device=self.points.device)
        out.points, out.fixed_values = self.points[index], self.fixed_values[index]
        if self.metric:
            out.fixed = self.fixed[index]
        out.rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        return out

    def _moving_values(self, t: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Moving values ``(k, N)`` at the points under ``k`` transforms ``(k, 4, 4)`` or
        ``(k, S, 4, 4)``, and 1/0 weights: 0 where a point falls outside the moving volume."""
        import torch

        from .resample import grid_sample_points

        if t.ndim == 3:
            t = np.broadcast_to(t[:, None], (t.shape[0], self.n_slices, 4, 4))
        m = self.ras_to_grid @ torch.as_tensor(np.array(t, dtype=np.float64), device=self.device)  # a writable copy
        k = m.shape[0]
        grid = torch.empty((k, self.n_points, 3), dtype=torch.float32, device=self.device)
        for g, rows in enumerate(self.rows):  # each slice's points through its own transform
            grid[:, rows] = (self.points[rows] @ m[:, g, :3, :3].transpose(1, 2) + m[:, g, None, :3, 3]).float()
        inside = (grid.abs() <= self.bound).all(dim=-1).float()
        return grid_sample_points(self.moving.expand(k, -1, -1, -1, -1), grid)[:, 0], inside

    def __call__(self, transforms: np.ndarray, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Similarity ``(K,)`` and fraction of the points inside the moving volume ``(K,)``."""
        import torch

        from .similarity import ncc

        t = np.asarray(transforms, dtype=np.float64)
        sims, inside_frac = [], []
        with torch.no_grad():
            for a in range(0, t.shape[0], chunk):
                values, inside = self._moving_values(t[a : a + chunk])
                k = values.shape[0]
                if self.metric == "mi":
                    s = _mutual_information(self.fixed, (values - self.m_lo) / self.m_span, inside, self.bins)
                else:
                    s = ncc(self.fixed.expand(k, -1), values, inside)
                sims.append(s.double().cpu().numpy())
                inside_frac.append(inside.mean(dim=1).double().cpu().numpy())
        return np.concatenate(sims), np.concatenate(inside_frac)


def _mutual_information(fixed_bin: "torch.Tensor", moving: "torch.Tensor", weights: "torch.Tensor", bins: int) -> "torch.Tensor":
    """Mutual information (nats) of ``k`` pairs: fixed values in hard bins ``(N,)`` (as
    :func:`similarity.fixed_bins`), moving values ``(k, N)`` in ``[0, 1]`` (clamped) split linearly
    between their two nearest bins, points weighted by ``weights`` ``(k, N)``. A forward-only,
    cheaper relative of :func:`similarity.mattes_mutual_information` (no gradient is needed to score)."""
    import torch

    k = moving.shape[0]
    x = moving.clamp(0, 1) * (bins - 1)
    lo = x.floor().clamp(max=bins - 2)
    frac = x - lo
    base = torch.arange(k, device=moving.device)[:, None] * (bins * bins) + fixed_bin[None] * bins + lo.long()
    h = moving.new_zeros(k * bins * bins)
    h.index_add_(0, base.reshape(-1), ((1 - frac) * weights).reshape(-1))
    h.index_add_(0, (base + 1).reshape(-1), (frac * weights).reshape(-1))
    p = h.reshape(k, bins, bins)
    p = p / p.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    ratio = p / (p.sum(dim=2, keepdim=True) * p.sum(dim=1, keepdim=True)).clamp_min(1e-12)
    return (p * torch.log(ratio.clamp_min(1e-12))).sum(dim=(1, 2))


def _delta(axis: np.ndarray, centre: np.ndarray, angle_deg: float = 0.0, shift_mm: float = 0.0) -> np.ndarray:
    """4x4 RAS rotation by ``angle_deg`` about ``axis`` through ``centre``, then ``shift_mm`` along ``axis``."""
    m = np.eye(4)
    r = geo.rotation_matrix_3d(axis, angle_deg)
    m[:3, :3] = r
    m[:3, 3] = centre - r @ centre + shift_mm * np.asarray(axis, dtype=np.float64)
    return m


def _moves(rot_axes: list[np.ndarray], shift_axes: list[np.ndarray], centre: np.ndarray, step: float) -> list[np.ndarray]:
    """The probes ``step`` away: ``-step``, ``+step`` degrees about each of ``rot_axes``, then
    ``-step``, ``+step`` mm along each of ``shift_axes`` (rotations through ``centre``)."""
    return ([_delta(ax, centre, sign * step) for ax in rot_axes for sign in (-1.0, 1.0)]
            + [_delta(ax, centre, 0.0, sign * step) for ax in shift_axes for sign in (-1.0, 1.0)])


def _apply(transforms: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``T o delta`` (delta acts on fixed points first) for one ``(4, 4)`` or ``(S, 4, 4)`` transform."""
    return np.asarray(transforms) @ delta


def _mirror(axis: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 reflection across the plane through ``centre`` with normal ``axis``."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    m = np.eye(4)
    m[:3, :3] = np.eye(3) - 2.0 * np.outer(a, a)
    m[:3, 3] = 2.0 * (a @ centre) * a
    return m


def _pattern_search(probe: SimilarityProbe, start: np.ndarray, rot_axes: list[np.ndarray], shift_axes: list[np.ndarray],
                    centre: np.ndarray,
                    steps: tuple[float, ...] = (4.0, 2.0), max_rounds: int = 6) -> float:
    """Best similarity found from ``start`` by a compass search over rotations about ``rot_axes`` and
    shifts along ``shift_axes`` (each step size until no probe improves, at most ``max_rounds``
    moves in all)."""
    current = np.asarray(start, dtype=np.float64)
    best = float(probe(current[None])[0][0])
    rounds = 0
    for step in steps:
        while rounds < max_rounds:
            cands = np.stack([_apply(current, d) for d in _moves(rot_axes, shift_axes, centre, step)])
            sims, _ = probe(cands)
            i = int(np.argmax(sims))
            if not sims[i] > best + 1e-6:
                break
            best, current = float(sims[i]), cands[i]
            rounds += 1
    return best


def measure(
    fixed: "torch.Tensor",
    fixed_ijk_to_ras: np.ndarray,
    moving: "torch.Tensor",
    moving_ijk_to_ras: np.ndarray,
    frame: geo.SliceFrame,
    slices: np.ndarray,
    size: tuple[int, int],
    spacing_mm: float,
    fixed_to_moving_ras: np.ndarray,
    metric: str = "auto",
    run: RunSignals | None = None,
    mirror: bool = True,
) -> QualitySignals:
    """Measure the image signals of one transform (module docstring).

    ``fixed``, ``moving``: ``(I, J, K)`` float tensors on one device (CPU or CUDA) with their
    ``ijk_to_ras``; ``frame``, ``slices``, ``size``, ``spacing_mm``: the network grid of the
    registered slices (:func:`geometry.network_grid_points`) where the fixed foreground is
    sampled; ``fixed_to_moving_ras``: the RAS resampling transform scored, ``(4, 4)``, or
    ``(len(slices), 4, 4)`` one per slice (``slices`` mode); ``metric``: ``ncc``, ``mi`` or
    ``auto`` (by ``in_brain_ncc``); ``run``: the registration's own signals, recorded;
    ``mirror``: also search a left-right mirrored mapping. When either volume is a single slice
    (2D images), only in-plane probes are made (rotation about the normal, shifts in the plane).
    """
    probe = SimilarityProbe(fixed, fixed_ijk_to_ras, moving, moving_ijk_to_ras, frame, slices, size, spacing_mm, "auto")
    t = np.asarray(fixed_to_moving_ras, dtype=np.float64)
    planar = int(fixed.shape[frame.axis]) == 1 or 1 in tuple(moving.shape)
    run = run or RunSignals()
    if probe.n_points == 0:
        return QualitySignals(metric if metric != "auto" else "ncc", math.nan, math.nan, math.nan, math.inf, math.inf,
                              None, 0.0, 0, planar, run)
    in_brain = probe.same_contrast_ncc(t)
    probe.use(metric if metric != "auto" else "ncc" if in_brain >= SAME_CONTRAST_NCC else "mi")
    axes = [frame.n] if planar else [frame.ex, frame.ey, frame.n]
    shift_axes = [frame.ex, frame.ey] if planar else axes
    centre = probe.centre
    sims, inside = probe(np.stack([t] + [_apply(t, d) for d in _moves(axes, shift_axes, centre, PROBE_STEP)]))
    s0, pairs = float(sims[0]), sims[1:].reshape(-1, 2)
    curvature = 2.0 * s0 - pairs.sum(axis=1)  # > 0: the similarity curves down along that axis
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature > 0, np.abs(PROBE_STEP * (pairs[:, 1] - pairs[:, 0]) / (2.0 * curvature)), np.inf)
    n_rot = len(axes)
    ratio = None
    # the mirror plane: normal along the fixed frame axis closest to anatomical R, through the
    # foreground centre; in 2D only when that axis lies in the plane
    basis = [frame.ex, frame.ey, frame.n]
    lr = int(np.argmax([abs(b[0]) for b in basis]))
    if mirror and not (planar and lr == 2) and s0 > 0:
        # in 3D on a subset of the points (the search is most of the verdict's cost), compared with
        # the similarity at the result on the same points; a 2D image (one slice) keeps them all
        few = probe if planar else probe.subset(MIRROR_POINTS)
        s0_few = s0 if few is probe else float(few(t[None])[0][0])
        if s0_few > 0:
            ratio = _pattern_search(few, _apply(t, _mirror(basis[lr], centre)), axes, shift_axes, centre) / s0_few
    return QualitySignals(
        metric=probe.metric,
        in_brain_ncc=in_brain,
        similarity=s0,
        peak=float((s0 - pairs.mean()) / abs(s0)) if s0 != 0 else 0.0,
        offset_deg=float(offset[:n_rot].max()),
        offset_mm=float(offset[n_rot:].max()),
        mirror=ratio,
        overlap=float(inside[0]),
        points=probe.n_points,
        planar=planar,
        run=run,
    )


def assess(*args, **kwargs) -> QualityVerdict:
    """:func:`measure` then :func:`judge`: the verdict on one transform (same arguments as :func:`measure`)."""
    return judge(measure(*args, **kwargs))
