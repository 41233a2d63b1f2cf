"""The registration engine: volumes in, a rigid (or per-slice) transform and images out.

Steps (one implementation shared by the Slicer Logic, the command line and the benchmarks):

1. validate both volumes; choose the fixed volume's slice frame (:func:`geometry.slice_frame`);
   find where to start (:func:`initialise.place_moving`: the headers, a caller's initial transform,
   centres of mass / principal axes, a coarse rotation search; ``init``) and place the moving
   volume there: every later step works on the placed volume and the result composes the start;
2. survey every fixed slice on a coarse copy of the network grid to find the slices with brain
   signal in both volumes; in ``volume`` mode keep ``max_slices`` of them spread over the brain;
3. sample fixed and moving on the network grid of those slices, through their own headers (which
   resamples the moving volume onto the fixed grid), and predict slice-frame parameters in
   batches (again on the re-warped moving slices, composing the estimates: ``iterations``,
   until a pass corrects by less than ``tolerance``; with the refinement to follow, by less than
   ``REFINE_PASS_TOLERANCE``, the first pass included); ``slices`` mode first finds the motion
   common to all slices this way from ``max_slices`` slices (to ``SLICE_PASS_TOLERANCE``), then
   predicts every slice once from there, and again only while a slice's own correction is above
   ``SLICE_PASS_TOLERANCE`` and shrinking;
4. ``volume`` mode: combine the per-slice estimates robustly (median/MAD outlier rejection, mean
   of the inliers) into one transform, then (``refine``) polish all six rigid parameters on
   image similarity; ``slices`` mode: keep one transform per slice (``refine_slices``: each
   polished on its own slice's similarity first, :func:`refine.refine_slices`);
5. measure the similarity of each slice before and after, and decide the quality verdict
   (``ok`` / ``suspicious`` / ``failed``, :mod:`quality`) on the final transform;
6. resample the moving volume onto the fixed grid and compute |fixed - registered|.

All transforms are kept in the *resampling* direction (fixed point -> moving point), RAS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np
import torch

from . import geometry as geo
from .allocator import reuse_freed_memory
from .errors import InputError, RegistrationCancelled
from .initialise import Initialisation, place_moving
from .model import ModelCard, resolve_device
from .options import RegistrationOptions
from .preprocess import (
    Volume,
    as_float_tensor,
    check_before_registration,
    check_overlap,
    intensity_range,
    normalise_slices,
    select_slices,
    survey_slices,
)
from .profiling import timed
from .quality import QualityVerdict, RunSignals, judge, measure
from .refine import refine_rigid, refine_slices
from .resample import resample_per_slice, resample_volume, sample_slice_stack
from .similarity import mutual_information, ncc

#: A refinement that lowers the mean slice MI (half-resolution network grid) by more than this
#: (nats) against the network's own transform is rejected (quality control).
REFINE_REJECT_MI = 0.01
#: With the refinement on, the network's passes stop once a pass, the first one included,
#: corrects by less than this (degrees and mm): the refinement (capture about +-15 deg about
#: every axis from the identity, more in-plane) closes what is left. On the held-out volume
#: (T1 -> T1/T2/FLAIR; in-plane motions of +-5 to +-30 deg, 18 of 18..30 deg, 6-DOF +-10) this
#: kept every case within 0.14 deg / 0.22 mm with 1-2 passes where 1.0 needed 2-4.
REFINE_PASS_TOLERANCE = 10.0
#: In ``slices`` mode a slice is predicted again only while its own correction is at least this
#: (degrees or mm) and shrinking: one slice's single-pass estimate is off by up to ~1-1.5 deg (p90,
#: network noise), and re-predicting slices for corrections of that size made them worse on
#: held-out scans with and without motion between slices (1 deg: p90 6.5 deg; 2 deg: p90 1.3 deg).
#: With symmetric prediction (the default) 0.5 helped same-contrast scans with motion between
#: slices (median 0.054 -> 0.030 deg) but hurt cross-contrast ones (0.32 -> 0.41 deg, success 92%
#: -> 84%) and cost 25-65% more time: kept at 2.
SLICE_PASS_TOLERANCE = 2.0
#: ``slices`` mode: the quality verdict is measured on at most this many slices spread over the stack.
QC_SLICES = 16
ProgressCallback = Callable[[float, str], None]


class Predictor(Protocol):
    """What the engine needs from a model: its card (grid, transform kind) and a batched call
    ``(B, 2, H, W)`` normalised fixed/moving pairs -> ``(B, P)`` parameters (CPU tensor). A
    predictor may also have a ``coarse`` predictor (:attr:`model.LoadedModel.coarse`), which the
    engine uses for the passes that a refinement follows."""

    card: ModelCard

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RegistrationResult:
    """What a registration produced. Matrices are 4x4 RAS; ``fixed_to_moving_ras`` is the
    resampling transform (what ``transform.tfm`` holds, in LPS), ``moving_to_fixed_ras`` the
    modeling transform (Slicer's "to parent" transform that moves the moving volume onto the fixed)."""

    fixed_to_moving_ras: np.ndarray
    params: np.ndarray  # volume-level slice-frame parameters (model units)
    slice_params: np.ndarray  # (S, P) per fixed slice: the parameters used to resample that slice
    used: np.ndarray  # (S,) bool: slice was predicted
    inlier: np.ndarray  # (S,) bool: used and kept by the robust combination
    similarity_slices: dict[str, np.ndarray]  # ncc/mi before/after per slice (NaN if unused)
    frame: geo.SliceFrame
    mode: str
    transform_kind: str
    device: str
    seconds: float
    registered: Volume | None = None
    difference: Volume | None = None
    timings: dict[str, float] = field(default_factory=dict)
    informative: np.ndarray | None = None  # (S,) bool: slice had signal in both volumes
    precision: str = "fp32"
    symmetric: bool = False  # every slice pair was predicted in both orders
    passes: int = 0  # predict/warp/compose passes made
    network_fixed_to_moving_ras: np.ndarray | None = None  # the network's transform before refinement
    refinement: dict[str, object] | None = None  # metric, similarity before/after, steps (None: not refined)
    warnings: list[str] = field(default_factory=list)  # the quality verdict's reasons, one line each
    agrees: np.ndarray | None = None  # (S,) bool: used and its estimate within 1 deg / 1 mm of the volume's
    quality: QualityVerdict | None = None  # ok / suspicious / failed, its reasons and signals (quality.py)
    # the fixed and the moving volume's intensity ranges (preprocess.intensity_range) that scale
    # the difference volume to [0, 1]; the overview scales its panels by the same
    intensity_ranges: tuple[tuple[float, float], tuple[float, float]] | None = None

    # where the registration started (:mod:`initialise`); ``params``, ``slice_params`` and
    # ``network_fixed_to_moving_ras``'s network part are relative to it: a slice is resampled with
    # ``initial_fixed_to_moving_ras @ params_to_ras(slice_params[s])``
    initialisation: Initialisation | None = None

    @property
    def verdict(self) -> str:
        """``ok``, ``suspicious`` or ``failed`` (:func:`quality.judge`; ``ok`` when not measured)."""
        return "ok" if self.quality is None else self.quality.verdict

    @property
    def initial_fixed_to_moving_ras(self) -> np.ndarray:
        """The start (RAS resampling transform) the network's parameters are relative to."""
        return np.eye(4) if self.initialisation is None else self.initialisation.fixed_to_moving_ras

    @property
    def likely_failed(self) -> bool:
        """True unless quality control found the result ``ok`` (kept for compatibility: see ``verdict``)."""
        return self.verdict != "ok"

    @property
    def moving_to_fixed_ras(self) -> np.ndarray:
        return geo.invert(self.fixed_to_moving_ras)

    @property
    def similarity(self) -> dict[str, float]:
        """Mean NCC and MI over the used slices, before and after registration."""
        used = self.used
        return {k: float(np.mean(v[used])) if used.any() else float("nan") for k, v in self.similarity_slices.items()}

    def slice_table(self) -> list[dict[str, object]]:
        """One row per fixed slice (the ``slices.csv`` columns)."""
        names = (
            ["theta_deg", "tx_mm", "ty_mm"]
            if self.transform_kind == "rigid"
            else ["a11_minus_1", "a12", "a21", "a22_minus_1", "tx_mm", "ty_mm"]
        )
        rows = []
        for s in range(len(self.used)):
            row: dict[str, object] = {"slice": s, "used": bool(self.used[s]), "inlier": bool(self.inlier[s])}
            if self.agrees is not None:
                row["agrees"] = bool(self.agrees[s])
            for n, v in zip(names, self.slice_params[s]):
                row[n] = round(float(v), 6)
            for key, values in self.similarity_slices.items():
                row[key] = None if np.isnan(values[s]) else round(float(values[s]), 6)
            rows.append(row)
        return rows


# --------------------------------------------------------------------------- small steps


def robust_combine(params: np.ndarray, floor: np.ndarray | float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-slice parameters ``(S, P)`` into one ``(P,)`` estimate, rejecting outliers.

    A slice is an inlier when every parameter lies within ``max(3 * 1.4826 * MAD, floor)`` of the
    median; the result is the mean of the inliers (of all slices if none qualifies).
    """
    p = np.asarray(params, dtype=np.float64)
    med = np.median(p, axis=0)
    dev = np.abs(p - med)
    tol = np.maximum(3.0 * 1.4826 * np.median(dev, axis=0), floor)
    inlier = np.all(dev <= tol, axis=1)
    if not inlier.any():
        inlier[:] = True
    return p[inlier].mean(axis=0), inlier


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for a device: ``auto`` is bf16 where the device computes it natively
    (CUDA GPUs with bf16 support; CPUs whose oneDNN build has bf16 kernels, i.e. AVX-512 BF16 or
    AMX), fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):  # private oneDNN probe missing in this build
            return "fp32"
    return "fp32"


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def predict_parameters(
    predictor: Predictor,
    fixed_slices: torch.Tensor,
    moving_slices: torch.Tensor,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    precision: str = "fp32",
    notice: Callable[[str], None] | None = None,
    symmetric: bool = False,
    stride: int = 1,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise fixed/moving network-grid slices ``(S, H, W)`` and predict ``(S, P)`` parameters
    in batches of ``batch_size`` network inputs (results do not depend on the batch size).

    ``precision``: ``fp32`` or ``bf16`` (autocast on the predictor's device). ``symmetric``: each
    pair is also predicted swapped (moving, fixed), in the same batch (so ``batch_size // 2`` pairs,
    at least one, per batch), and the two estimates are combined by
    :func:`geometry.symmetric_params_2d` (twice the network work; the network's order-independent
    errors cancel). ``stride`` (symmetric only, for the slices of one stack, in order): only rows
    0, ``stride``, 2 ``stride``, ... and the last are predicted in both orders, the others in one
    order with the order-independent error interpolated from those rows subtracted
    (:func:`geometry.symmetric_params_2d_interpolated`, along ``positions``, the rows' slice
    indices, consecutive when None; 1 + 1/``stride`` network inputs per pair).
    When the device runs out of memory the batch is halved and retried (``notice`` is told); at
    one slice pair per batch the error is raised as a :class:`RuntimeError` that says what to do.
    """
    n = fixed_slices.shape[0]
    n_params = predictor.card.n_params
    both = np.zeros(n, dtype=bool)  # rows predicted in both orders
    if symmetric and n:
        both[:: max(1, int(stride))] = True
        both[-1] = True
    forward = np.zeros((n, n_params))
    backward = np.full((n, n_params), np.nan)
    device = getattr(predictor, "device", fixed_slices.device)
    device_type = torch.device(device).type
    start, size = 0, max(1, int(batch_size))
    while start < n:
        if cancel is not None and cancel():
            raise RegistrationCancelled("registration cancelled")
        # slice pairs in this batch: as many as fit in `size` network inputs (two for a pair
        # predicted in both orders), at least one
        step = max(1, int(np.searchsorted(np.cumsum(1 + both[start:]), size, side="right")))
        f = normalise_slices(fixed_slices[start : start + step])
        m = normalise_slices(moving_slices[start : start + step])
        two = both[start : start + f.shape[0]]
        pairs = torch.stack([f, m], dim=1)
        if two.any():  # (fixed, moving) pairs, then those predicted in both orders swapped
            pairs = torch.cat([pairs, pairs[torch.from_numpy(two).to(pairs.device)].flip(1)])
        try:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                params = predictor(pairs)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc):
                raise
            if device_type == "cuda":
                torch.cuda.empty_cache()
            if step == 1:  # one slice pair (both orders when symmetric) per batch: nothing left to halve
                raise RuntimeError(
                    f"out of memory on {device} even with one slice pair per batch: free memory on it or use the CPU (device cpu)"
                ) from None
            size = max(1, size // 2)
            if notice is not None:
                pairs_txt = " (a pair predicted in both orders counts twice)" if symmetric else ""
                notice(f"out of memory on {device}: retrying with {size} slices per batch{pairs_txt}")
            continue
        params = params.double().cpu().numpy()
        k = f.shape[0]
        forward[start : start + k] = params[:k]
        backward[start : start + k][two] = params[k:]
        start += k
        if progress is not None:
            progress(start)
    if not symmetric or not n:
        return forward
    # rows with both orders: the symmetric estimate; the others (stride > 1) corrected between them
    return geo.symmetric_params_2d_interpolated(forward, backward, predictor.card.transform, positions)


@dataclass(frozen=True)
class _PassSettings:
    """What every network pass of one registration shares (:func:`_network_passes`)."""

    predictor: Predictor
    frame: geo.SliceFrame
    kind: str
    iterations: int
    floor: np.ndarray  # robust_combine's floor per parameter
    batch_size: int
    precision: str
    report: ProgressCallback
    cancel: Callable[[], bool] | None
    symmetric: bool
    stride: int  # symmetric_stride, used on a pass over every slice of the stack (slices mode)


def _network_passes(
    run: _PassSettings,
    sample_fixed: Callable[[np.ndarray], torch.Tensor],
    slice_indices: np.ndarray,
    moving_identity: torch.Tensor | None,
    sample_moving: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    start: np.ndarray | None,
    tolerance: float,
    combine: bool,
    span: tuple[float, float],
    first_tolerance: float | None = None,
) -> tuple[np.ndarray, int]:
    """Predict slice-frame parameters ``(S, P)`` for ``S`` slices by up to ``iterations`` passes
    of warp, predict, compose; returns them and the number of passes made.

    ``sample_fixed(rows)``: the fixed slices of rows ``rows`` of ``slice_indices``; ``start``:
    initial estimates (None: identity, and ``moving_identity`` holds the moving slices sampled
    without a transform); ``sample_moving(slice_indices, (n, 4, 4) RAS transforms)`` samples
    moving slices through their current transforms. ``combine``: after every pass but
    the last, all slices take the robust combination of the estimates (one motion), and the
    passes stop once a pass's median correction is below ``tolerance``; otherwise each slice
    keeps its own estimate and only the slices whose own last correction was at least
    ``tolerance`` and smaller than the one before are predicted again. A first pass from the
    identity counts as converged (``combine`` only) when its median correction is below
    ``first_tolerance``, never when that is None. ``run.iterations`` caps the passes;
    ``run.symmetric``: as :func:`predict_parameters`, with its ``stride`` ``run.stride`` on a
    pass over all slices without ``combine`` (consecutive slices of the stack: slices mode) and
    1 otherwise (a few slices spread over the brain, or the slices left after a pass).
    """
    predictor, frame, kind, report = run.predictor, run.frame, run.kind, run.report
    n = len(slice_indices)
    current = np.zeros((n, predictor.card.n_params)) if start is None else np.array(start, dtype=np.float64)
    active = np.arange(n)
    group = max(64, 2 * run.batch_size)  # slices sampled and predicted together
    last_size = np.full((n, 2), np.inf)  # each slice's last correction: degrees (or equivalent), mm
    passes = 0
    iterations = run.iterations
    for it in range(iterations):
        first = it == 0 and start is None
        transforms = None if first else np.stack(
            [geo.params_to_ras(p, frame, kind, int(s)) for p, s in zip(current[active], slice_indices[active])])
        delta = np.empty((len(active), current.shape[1]))
        # moving slices are sampled group by group: only one group's stack exists at a time
        for g0 in range(0, len(active), group):
            rows = active[g0 : g0 + group]
            moving = moving_identity[rows] if first else sample_moving(slice_indices[rows], transforms[g0 : g0 + group])

            def on_batch(done: int, it: int = it, g0: int = g0) -> None:
                fraction = min(1.0, (it * n + g0 + done) / max(n * iterations, 1))
                report(span[0] + (span[1] - span[0]) * fraction, f"pass {it + 1}: slice {g0 + done}/{len(active)}")

            delta[g0 : g0 + len(rows)] = predict_parameters(
                predictor, sample_fixed(rows), moving, run.batch_size, on_batch, run.cancel, run.precision,
                notice=lambda message: report(span[0], message), symmetric=run.symmetric,
                stride=run.stride if not combine and len(active) == n else 1, positions=slice_indices[rows])
        passes += 1
        # registered(x) = moving(T(D(x))): apply the new estimate D first, then the current T
        current[active] = delta if first else geo.compose_params_2d(delta, current[active], kind)
        if combine:
            limit = first_tolerance if first else tolerance
            if (limit is not None and _step_is_small(delta, kind, limit)) or it == iterations - 1:
                break
            current[:] = robust_combine(current, run.floor)[0]
        else:
            size = _step_size(delta, kind)
            # a slice goes on while its correction is above the tolerance and still shrinking
            # (a slice the network cannot register swings by a similar amount every pass)
            above = np.ones(len(active), dtype=bool) if first else ~np.all(size < tolerance, axis=1)
            moving_on = above & np.any(size < last_size[active], axis=1)
            last_size[active] = size
            active = active[moving_on]
            if not len(active):
                break
    return current, passes


def slice_similarity(
    fixed_slices: torch.Tensor, moving_slices: torch.Tensor, reduce: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice NCC and MI (nats) of normalised network-grid slices ``(S, H, W)``, measured on
    the grid averaged over ``reduce`` x ``reduce`` pixels (a quality figure, 4x cheaper for 2)."""
    f, m = normalise_slices(fixed_slices), normalise_slices(moving_slices)
    if reduce > 1 and min(f.shape[1:]) >= 8 * reduce:
        f, m = (torch.nn.functional.avg_pool2d(x[:, None], reduce)[:, 0] for x in (f, m))
    return ncc(f, m).double().cpu().numpy(), mutual_information(f, m).double().cpu().numpy()


def _stack_similarity(
    n: int, sample_fixed: Callable[[np.ndarray], torch.Tensor], sample_moving: Callable[[np.ndarray], torch.Tensor],
    group: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`slice_similarity` of ``n`` fixed and moving slices, both sampled group by group
    (``sample_fixed(rows)``, ``sample_moving(rows)``), so only ``group`` of each exist at a time."""
    groups = [np.arange(a, min(a + group, n)) for a in range(0, n, group)]
    parts = [slice_similarity(sample_fixed(rows), sample_moving(rows)) for rows in groups]
    if not parts:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def scale_to_unit(values: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Map ``value_range`` ``(low, high)`` (e.g. a volume's :func:`preprocess.intensity_range`) to
    ``[0, 1]``, clipped."""
    lo, hi = value_range
    return torch.sub(values, lo).div_(hi - lo if hi > lo else 1.0).clamp_(0.0, 1.0)  # one new tensor


def difference_image(fixed: torch.Tensor, resampled: torch.Tensor, fixed_range: tuple[float, float],
                     moving_range: tuple[float, float]) -> torch.Tensor:
    """``|fixed - resampled|`` in ``[0, 1]``, the scale of ``difference.nii.gz``: the fixed image
    (or part of it) and the moving one resampled onto the fixed grid (or part of it) each scaled
    by their whole volume's 1st/99th percentiles (``fixed_range``, ``moving_range``:
    :func:`preprocess.intensity_range`)."""
    return scale_to_unit(fixed, fixed_range).sub_(scale_to_unit(resampled, moving_range)).abs_()


# --------------------------------------------------------------------------- the flow, stage by stage


@dataclass
class _Run:
    """What every stage of one registration reads: the inputs as prepared (the moving volume
    already placed at the start), the slice frame and the selected slices, the options and the
    caller's callbacks. Built by :func:`_prepare`; the stages never change it."""

    fixed: Volume
    moving: Volume  # placed at the start (``start_t``): every stage works from there
    f_t: torch.Tensor  # the fixed voxels (float32, on ``device``)
    m_t: torch.Tensor  # the placed moving voxels
    frame: geo.SliceFrame
    idx: np.ndarray  # the selected fixed slices (indices along ``frame.axis``)
    first_rows: np.ndarray  # rows of ``idx`` registered from the start (volume mode: all)
    survey_informative: np.ndarray  # (S,) slices with signal in both volumes
    fixed_slices: "_FixedSlices"
    moving_start: torch.Tensor  # moving slices of ``idx[first_rows]`` at the start, network grid
    predictor: Predictor
    opts: RegistrationOptions
    device: torch.device
    precision: str
    start_t: np.ndarray  # the start (RAS resampling transform)
    initialisation: Initialisation
    report: ProgressCallback
    cancel: Callable[[], bool] | None

    @property
    def kind(self) -> str:
        return self.predictor.card.transform

    @property
    def size(self) -> tuple[int, int]:
        return self.predictor.card.input_size

    @property
    def spacing(self) -> float:
        return self.predictor.card.spacing_mm

    def moving_slices(self, slice_indices: np.ndarray, transforms: np.ndarray | None = None) -> torch.Tensor:
        """Moving slices on the network grid of fixed slices ``slice_indices``, through ``transforms``
        (one RAS resampling transform, or one per slice; None: the start)."""
        return sample_slice_stack(self.m_t, self.moving.ijk_to_ras, self.frame, self.size, self.spacing,
                                  slice_indices, transforms)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise RegistrationCancelled("registration cancelled")


class _FixedSlices:
    """The fixed slices ``idx`` on the network grid, by row of ``idx``: in volume mode all sampled at
    once (a few slices); in slices mode group by group as the passes first need them (sampling a
    large volume's whole stack at once takes most of the working memory), each kept once sampled:
    the passes and the quality figures read them again."""

    def __init__(self, f_t: torch.Tensor, fixed: Volume, frame: geo.SliceFrame, idx: np.ndarray,
                 size: tuple[int, int], spacing: float, all_at_once: bool) -> None:
        self._sample = lambda slices: sample_slice_stack(f_t, fixed.ijk_to_ras, frame, size, spacing, slices)
        self._idx = idx
        self.all = self._sample(idx) if all_at_once else None
        self._kept = None if all_at_once else torch.empty((len(idx), *size), dtype=torch.float32, device=f_t.device)
        self._sampled = np.zeros(len(idx), dtype=bool)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        if self.all is not None:
            return self.all[rows]
        need = np.asarray(rows)[~self._sampled[rows]]
        if len(need):
            self._kept[need] = self._sample(self._idx[need])
            self._sampled[need] = True
        return self._kept[rows]


@dataclass
class _NetworkEstimate:
    """The network's per-slice estimates ``(len(idx), P)`` relative to the start, and its passes."""

    params: np.ndarray
    passes: int


@dataclass
class _Combined:
    """The per-slice estimates combined into the volume's transform (:func:`robust_combine`)."""

    params: np.ndarray  # (P,) the volume's slice-frame parameters
    slice_params: np.ndarray  # (S, P) per fixed slice: the parameters it is resampled with
    inlier: np.ndarray  # (S,) bool
    agrees: np.ndarray  # (S,) bool: within 1 deg / 1 mm of the volume's estimate
    volume_t: np.ndarray  # the volume's RAS resampling transform, relative to the start
    per_slice_t: np.ndarray | None  # slices mode: (S, 4, 4) one per fixed slice


@dataclass
class _Judged:
    """The similarity figures per slice, the quality verdict and the final transform (the network's
    when the independent check rejected the refinement)."""

    similarity: dict[str, np.ndarray]
    verdict: QualityVerdict
    volume_t: np.ndarray


def _prepare(fixed: Volume, moving: Volume, predictor: Predictor, opts: RegistrationOptions,
             report: ProgressCallback, cancel: Callable[[], bool] | None, timings: dict[str, float]) -> _Run:
    """Stages ``initialise`` and ``prepare`` (module docstring, step 1-2): validate, place the moving
    volume at the start, survey and select slices, sample the first slices on the network grid."""
    named = [v if v.name != "volume" else replace(v, name=f"{role} volume") for v, role in ((fixed, "fixed"), (moving, "moving"))]
    card = predictor.card
    size, spacing = card.input_size, card.spacing_mm
    frame = check_before_registration(named[0], named[1], opts.axis, size, spacing)
    try:
        device = resolve_device(opts.device)
    except RuntimeError as exc:
        raise InputError(str(exc)) from None
    precision = resolve_precision(opts.precision, torch.device(getattr(predictor, "device", device)))

    with timed(timings, "initialise"):
        report(0.0, "finding where to start")
        # the voxels as float32 once: the start, every later stage and their intensity ranges share them
        # (placing the moving volume changes its header, not its voxels)
        f_t, m_t = as_float_tensor(fixed, device), as_float_tensor(moving, device)
        try:  # the moving volume placed at the start: registered from there, the start composed at the end
            placed, initialisation = place_moving(named[0], named[1], opts.init, opts.initial_transform,
                                                  search=opts.mode == "volume", fixed_voxels=f_t, moving_voxels=m_t)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    with timed(timings, "prepare"):
        report(0.02, "preparing slices")
        survey = survey_slices(f_t, fixed.ijk_to_ras, m_t, placed.ijk_to_ras, frame, size, spacing,
                               min_foreground=opts.min_foreground)
        check_overlap(survey)
        idx = select_slices(survey, opts.max_slices if opts.mode == "volume" else 0)
        fixed_slices = _FixedSlices(f_t, fixed, frame, idx, size, spacing, all_at_once=opts.mode == "volume")
        # the slices registered from the start: all of them in volume mode; in slices mode those of
        # the common-motion stage (the others start from its result)
        first_rows = (np.arange(len(idx)) if opts.mode == "volume"
                      else np.searchsorted(idx, select_slices(survey, opts.max_slices or 8)))
        moving_start = sample_slice_stack(m_t, placed.ijk_to_ras, frame, size, spacing, idx[first_rows])
    return _Run(fixed, placed, f_t, m_t, frame, idx, first_rows, survey.informative.copy(), fixed_slices, moving_start,
                predictor, opts, device, precision, initialisation.fixed_to_moving_ras, initialisation, report, cancel)


def _predict(run: _Run) -> _NetworkEstimate:
    """Stage ``predict`` (step 3): network passes (predict, re-warp, predict again, composing in the
    slice frame). Volume mode: the selected slices from the start, combined after every pass; slices
    mode: the common motion first, then every slice from there for its own residual motion."""
    opts, kind = run.opts, run.kind
    # with the refinement to follow, the passes only need to bring the motion within its reach:
    # a looser tolerance, and the coarse network alone (no fine stage, no mirror averaging)
    refine_follows = opts.refine and opts.mode == "volume" and kind == "rigid"
    predictor = getattr(run.predictor, "coarse", run.predictor) if refine_follows else run.predictor
    settings = _PassSettings(predictor, run.frame, kind, opts.iterations, _floor(kind, opts.outlier_floor),
                             opts.batch_size, run.precision, run.report, run.cancel, opts.symmetric,
                             opts.symmetric_stride)

    def passes(rows: np.ndarray, start: np.ndarray | None, combine: bool, span: tuple[float, float],
               tolerance: float, first_tolerance: float | None = None) -> tuple[np.ndarray, int]:
        return _network_passes(settings, lambda r: run.fixed_slices(rows[r]), run.idx[rows],
                               run.moving_start if start is None else None, run.moving_slices,
                               start, tolerance, combine, span, first_tolerance)

    tolerance = max(opts.tolerance, REFINE_PASS_TOLERANCE) if refine_follows else opts.tolerance
    if opts.mode == "volume":
        current, n = passes(run.first_rows, None, True, (0.05, 0.8), tolerance, tolerance if refine_follows else None)
        return _NetworkEstimate(current, n)
    # slices mode: the common motion is only where the slices start, so its passes stop at
    # SLICE_PASS_TOLERANCE too; then each slice is re-predicted only while its correction is above it
    common, n = passes(run.first_rows, None, True, (0.05, 0.25), max(tolerance, SLICE_PASS_TOLERANCE))
    start = np.broadcast_to(common[0], (len(run.idx), run.predictor.card.n_params)).copy()
    current, more = passes(np.arange(len(run.idx)), start, False, (0.25, 0.8), max(tolerance, SLICE_PASS_TOLERANCE))
    return _NetworkEstimate(current, n + more)


def _refine_each_slice(run: _Run, current: np.ndarray) -> tuple[np.ndarray, dict[str, object] | None]:
    """Stage ``refine`` in slices mode (step 4): each slice's own in-plane transform polished on its
    image similarity (:func:`refine.refine_slices`); returns the parameters and the figures."""
    run.report(0.8, "refining every slice on image similarity")
    metric = run.opts.metric
    if metric == "auto":  # on the common-motion stage's slices, as the network left them
        rows = run.first_rows
        net = np.stack([geo.params_to_ras(p, run.frame, run.kind, int(s)) for p, s in zip(current[rows], run.idx[rows])])
        metric = choose_metric(run.fixed_slices(rows), run.moving_slices(run.idx[rows], net))
    try:
        sliced = refine_slices(run.f_t, run.fixed.ijk_to_ras, run.m_t, run.moving.ijk_to_ras, run.frame, run.idx,
                               current, run.size, run.spacing, metric=metric, cancel=run.cancel)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    # how far the image similarity took each slice from the network's estimate: more than 1 deg /
    # 1 mm means the two disagree on that slice (a network miss, or a similarity optimum elsewhere)
    moved_rot, moved_mm = geo.params_error_2d(sliced.params, current)
    scored = np.isfinite(sliced.similarity_before)  # the slices with enough signal to refine
    if not scored.any():
        return sliced.params, None
    return sliced.params, {"metric": metric, "scope": "slices",
                           "similarity_before": float(sliced.similarity_before[scored].mean()),
                           "similarity_after": float(sliced.similarity_after[scored].mean()),
                           "steps": sliced.steps, "slices_refined": int(sliced.improved.sum()),
                           "slices_moved_over_1": int(np.sum((moved_rot > 1.0) | (moved_mm > 1.0))),
                           "seconds": sliced.seconds}


def _combine(run: _Run, current: np.ndarray) -> _Combined:
    """Stage ``combine`` (step 4): the per-slice estimates into the volume's transform, rejecting
    outliers; slices mode keeps each slice's own for resampling."""
    kind, n_params = run.kind, run.predictor.card.n_params
    n_slices = len(run.frame.offsets)
    combined, inl = robust_combine(current, _floor(kind, run.opts.outlier_floor))
    inlier = np.zeros(n_slices, dtype=bool)
    inlier[run.idx] = inl
    agrees = np.zeros(n_slices, dtype=bool)
    agrees[run.idx] = np.all(np.abs(current - combined) <= _agreement_tolerance(kind), axis=1)
    slice_params = np.broadcast_to(combined, (n_slices, n_params)).copy()
    per_slice_t = None
    if run.opts.mode == "slices":
        slice_params[run.idx] = current
        per_slice_t = np.stack([geo.params_to_ras(p, run.frame, kind, s) for s, p in enumerate(slice_params)])
    return _Combined(combined, slice_params, inlier, agrees, geo.params_to_ras(combined, run.frame, kind), per_slice_t)


def _refine_volume(run: _Run, network_t: np.ndarray) -> tuple[np.ndarray, dict[str, object], torch.Tensor]:
    """Stage ``refine`` in volume mode (step 4): all six rigid parameters on image similarity from the
    network's transform; returns the refined transform, the figures and the selected moving slices
    through the network's transform (the independent check of :func:`_judge` reads them)."""
    run.report(0.8, "refining on image similarity")
    net_moving = run.moving_slices(run.idx, network_t)
    metric = run.opts.metric if run.opts.metric != "auto" else choose_metric(run.fixed_slices.all, net_moving)
    try:
        refined = refine_rigid(run.f_t, run.fixed.ijk_to_ras, run.m_t, run.moving.ijk_to_ras, network_t, metric=metric,
                               levels_mm=tuple(run.opts.refine_levels_mm), cancel=run.cancel)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return refined.fixed_to_moving_ras, {"metric": metric, "similarity_before": refined.similarity_before,
                                         "similarity_after": refined.similarity_after, "steps": refined.steps,
                                         "steps_per_level": list(refined.steps_per_level),
                                         "seconds": refined.seconds}, net_moving


def _judge(run: _Run, combined: _Combined, volume_t: np.ndarray, network_t: np.ndarray,
           refinement: dict[str, object] | None, net_moving: torch.Tensor | None) -> _Judged:
    """Stage ``quality`` (step 5): similarity of every used slice before and after on the network
    grid, the independent check of the volume refinement (the slices' MI must not fall below the
    network's), and the quality verdict on the final transform."""
    run.report(0.82, "measuring similarity")
    idx, n_slices = run.idx, len(run.frame.offsets)
    if run.opts.mode == "slices":  # all slices: in groups, so no further whole stack is kept
        nb, mb = _stack_similarity(len(idx), run.fixed_slices, lambda rows: run.moving_slices(idx[rows]))
        na, ma = _stack_similarity(len(idx), run.fixed_slices,
                                   lambda rows: run.moving_slices(idx[rows], combined.per_slice_t[idx[rows]]))
    else:
        nb, mb = slice_similarity(run.fixed_slices.all, run.moving_start)
        na, ma = slice_similarity(run.fixed_slices.all, run.moving_slices(idx, volume_t))
    if refinement is not None and run.opts.mode == "volume":
        net_ncc, net_mi = slice_similarity(run.fixed_slices.all, net_moving)
        if float(np.mean(ma)) < float(np.mean(net_mi)) - REFINE_REJECT_MI:
            volume_t, na, ma = network_t.copy(), net_ncc, net_mi
            refinement["rejected"] = True  # a quality finding (quality.judge)
    sims = {k: np.full(n_slices, np.nan) for k in ("ncc_before", "ncc_after", "mi_before", "mi_after")}
    sims["ncc_before"][idx], sims["mi_before"][idx] = nb, mb
    sims["ncc_after"][idx], sims["mi_after"][idx] = na, ma
    verdict = _quality_verdict(run.f_t, run.fixed, run.m_t, run.moving, run.frame, idx, run.size, run.spacing,
                               run.opts.mode, volume_t, network_t, combined.per_slice_t, refinement, combined.agrees)
    return _Judged(sims, verdict, volume_t)


def _resample_outputs(run: _Run, volume_t: np.ndarray, per_slice_t: np.ndarray | None) -> tuple[Volume | None, Volume | None]:
    """Stage ``resample`` (step 6): the moving volume on the fixed grid through the final transform
    (slices mode: each slice's own) and ``|fixed - registered|``, as asked by the options."""
    opts = run.opts
    if not (opts.compute_registered or opts.compute_difference):
        return None, None
    run.report(0.9, "resampling the moving volume")
    fixed = run.fixed
    if opts.mode == "slices":
        reg_t = resample_per_slice(run.m_t, run.moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, run.frame.axis, per_slice_t)
    else:
        reg_t = resample_volume(run.m_t, run.moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, volume_t)
    registered = Volume(reg_t.cpu().numpy(), fixed.ijk_to_ras.copy(), "registered") if opts.compute_registered else None
    difference = None
    if opts.compute_difference:
        diff = difference_image(run.f_t, reg_t, intensity_range(run.f_t), intensity_range(run.m_t))
        difference = Volume(diff.cpu().numpy(), fixed.ijk_to_ras.copy(), "difference")
    return registered, difference


def register_volumes(
    fixed: Volume,
    moving: Volume,
    predictor: Predictor,
    options: RegistrationOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (neither is modified) with a slice-wise network.

    ``progress(fraction, message)`` is called as work proceeds; ``cancel()`` is polled between
    batches and raises :class:`RegistrationCancelled` when it returns True. The stages (module
    docstring) are timed in ``result.timings``: initialise, prepare, predict, refine, quality,
    resample. On Linux (glibc) the first call sets the process's allocator to reuse freed
    volume-sized blocks (:func:`allocator.reuse_freed_memory`: no page faults on every temporary;
    the results are the same).
    """
    opts = options or RegistrationOptions()
    opts.validate()
    reuse_freed_memory()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run = _prepare(fixed, moving, predictor, opts, progress or (lambda fraction, message: None), cancel, timings)
    kind = run.kind
    with timed(timings, "predict"):
        network = _predict(run)
    current, refinement = network.params, None
    if opts.refine_slices and opts.mode == "slices" and kind == "rigid":
        with timed(timings, "refine"):
            current, refinement = _refine_each_slice(run, current)
    combined = _combine(run, current)
    run.check_cancel()
    volume_t = network_t = combined.volume_t
    net_moving = None
    if opts.refine and opts.mode == "volume" and kind == "rigid":
        with timed(timings, "refine"):
            volume_t, refinement, net_moving = _refine_volume(run, network_t)
    with timed(timings, "quality"):
        judged = _judge(run, combined, volume_t, network_t, refinement, net_moving)
    with timed(timings, "resample"):
        registered, difference = _resample_outputs(run, judged.volume_t, combined.per_slice_t)
    run.report(1.0, "done")
    used = np.zeros(len(run.frame.offsets), dtype=bool)
    used[run.idx] = True
    return RegistrationResult(
        fixed_to_moving_ras=run.start_t @ judged.volume_t,
        params=combined.params,
        slice_params=combined.slice_params,
        used=used,
        inlier=combined.inlier,
        similarity_slices=judged.similarity,
        frame=run.frame,
        mode=opts.mode,
        transform_kind=kind,
        device=str(run.device),
        seconds=time.perf_counter() - t0,
        registered=registered,
        difference=difference,
        timings=timings,
        informative=run.survey_informative,
        precision=run.precision,
        symmetric=opts.symmetric,
        passes=network.passes,
        network_fixed_to_moving_ras=run.start_t @ network_t,
        refinement=refinement,
        warnings=list(judged.verdict.reasons),
        agrees=combined.agrees,
        quality=judged.verdict,
        initialisation=run.initialisation,
        intensity_ranges=(intensity_range(run.f_t), intensity_range(run.m_t)),
    )


def choose_metric(fixed_slices: torch.Tensor, moving_slices: torch.Tensor, threshold: float = 0.8) -> str:
    """``ncc`` when network-aligned fixed/moving slices ``(S, H, W)`` are the same contrast, else ``mi``.

    Same contrast is decided by the median per-slice NCC over the pixels that are signal in both
    (normalised intensity above 0.1): whole-slice NCC is high across contrasts too, because the
    background is dark in every MRI contrast; inside the brain T1 and T2 anti-correlate.
    """
    f, m = normalise_slices(fixed_slices), normalise_slices(moving_slices)
    mask = ((f > 0.1) & (m > 0.1)).float()
    return "ncc" if float(ncc(f, m, mask).median()) >= threshold else "mi"


def _quality_verdict(
    f_t: torch.Tensor, fixed: Volume, m_t: torch.Tensor, moving: Volume, frame: geo.SliceFrame, idx: np.ndarray,
    size: tuple[int, int], spacing: float, mode: str, volume_t: np.ndarray, network_t: np.ndarray,
    per_slice_t: np.ndarray | None, refinement: dict[str, object] | None, agrees: np.ndarray,
) -> QualityVerdict:
    """The quality verdict on the final transform (:mod:`quality`), measured on the registered
    slices (``slices`` mode: at most ``QC_SLICES`` of them spread over the stack, each with its own
    transform), with the slices' agreement and the refinement's figures recorded (``volume`` mode)."""
    if mode == "slices":
        rows = np.unique(np.round(np.linspace(0, len(idx) - 1, min(QC_SLICES, len(idx)))).astype(int))
        transforms = per_slice_t[idx[rows]]
    else:
        rows, transforms = np.arange(len(idx)), volume_t
    run = RunSignals()
    if mode == "volume":
        run.slices_agree = float(np.mean(agrees[idx])) if len(idx) else None
        if refinement is not None:
            centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
            run.refine_moved_deg, run.refine_moved_mm = geo.rigid_error(volume_t, network_t, centre)
            run.refine_steps = int(refinement["steps"])
            run.refine_rejected = bool(refinement.get("rejected", False))
    return judge(measure(f_t, fixed.ijk_to_ras, m_t, moving.ijk_to_ras, frame, idx[rows], size, spacing, transforms,
                         run=run))


def _agreement_tolerance(kind: str) -> np.ndarray:
    """How far a slice's estimate may be from the volume's and still agree: 1 deg and 1 mm (the
    success criterion); 1.75% (1 deg of rotation) for the dimensionless affine terms."""
    return np.ones(3) if kind == "rigid" else np.array([0.0175, 0.0175, 0.0175, 0.0175, 1.0, 1.0])


def _step_size(delta: np.ndarray, kind: str) -> np.ndarray:
    """``(S, 2)`` size of each slice's correction: rotation in degrees (affine: the largest matrix
    term, in degrees-equivalent radians x 57.3) and translation in mm."""
    d = np.asarray(delta, dtype=np.float64)
    if kind == "rigid":
        return np.column_stack([np.abs(d[:, 0]), np.hypot(d[:, 1], d[:, 2])])
    return np.column_stack([np.degrees(np.abs(d[:, :4]).max(axis=1)), np.hypot(d[:, 4], d[:, 5])])


def _step_is_small(delta: np.ndarray, kind: str, tolerance: float) -> bool:
    """True when a pass's correction (median over the slices) is below ``tolerance`` in degrees
    (or, for affine matrix terms, ``tolerance`` / 57.3 per term) and in mm of translation."""
    step = np.median(np.asarray(delta, dtype=np.float64), axis=0)
    if kind == "rigid":
        return abs(step[0]) < tolerance and float(np.hypot(step[1], step[2])) < tolerance
    return bool(np.all(np.abs(step[:4]) < np.deg2rad(tolerance))) and float(np.hypot(step[4], step[5])) < tolerance


def _floor(kind: str, floor: float) -> np.ndarray:
    """Outlier floor per parameter: ``floor`` for angles (deg) and translations (mm); 1% for the
    dimensionless affine matrix terms."""
    return np.full(3, floor) if kind == "rigid" else np.array([0.01, 0.01, 0.01, 0.01, floor, floor])
