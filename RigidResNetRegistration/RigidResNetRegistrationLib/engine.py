"""The registration engine: volumes in, a rigid (or per-slice) transform and images out.

Steps (one implementation shared by the Slicer Logic, the command line and the benchmarks):

1. validate both volumes; choose the fixed volume's slice frame (:func:`geometry.slice_frame`);
2. sample fixed and moving on the network grid of every fixed slice, through their own headers
   (which resamples the moving volume onto the fixed grid); find slices with brain signal;
3. predict slice-frame parameters for all informative slices in batches (optionally again on
   the re-warped moving slices, composing the estimates: ``iterations``);
4. ``volume`` mode: combine the per-slice estimates robustly (median/MAD outlier rejection, mean
   of the inliers) into one transform; ``slices`` mode: keep one transform per slice;
5. resample the moving volume onto the fixed grid, compute |fixed - registered| and the
   similarity of each slice before and after.

All transforms are kept in the *resampling* direction (fixed point -> moving point), RAS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np
import torch

from . import geometry as geo
from .model import ModelCard, resolve_device
from .preprocess import (
    InputError,
    SliceStacks,
    Volume,
    as_float_tensor,
    check_field_of_view,
    check_overlap,
    intensity_range,
    normalise_slices,
    prepare_slice_stacks,
    validate_volume,
)
from .resample import resample_volume, sample_slice_stack
from .similarity import mutual_information, ncc

MODES = ("volume", "slices")
ProgressCallback = Callable[[float, str], None]


class RegistrationCancelled(RuntimeError):
    """Raised when the caller's ``cancel()`` returned True; nothing was produced."""


class Predictor(Protocol):
    """What the engine needs from a model: its card (grid, transform kind) and a batched call
    ``(B, 2, H, W)`` normalised fixed/moving pairs -> ``(B, P)`` parameters (CPU tensor)."""

    card: ModelCard

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RegistrationOptions:
    """How to register. ``mode``: ``volume`` (one transform) or ``slices`` (one per slice);
    ``axis``: ``auto`` (closest to S) or ``axial``/``coronal``/``sagittal``; ``iterations``:
    predict/warp/compose passes; ``min_foreground``: fraction of a slice's pixels that must be
    signal in both volumes for it to be used; ``outlier_floor``: smallest deviation from the
    median (per parameter, model units) that counts as an outlier in ``volume`` mode."""

    mode: str = "volume"
    axis: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    iterations: int = 2
    min_foreground: float = 0.05
    outlier_floor: float = 0.5
    compute_registered: bool = True
    compute_difference: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.axis not in ("auto", *geo.ORIENTATION_AXES):
            raise InputError(f"axis must be auto, axial, coronal or sagittal, not {self.axis!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size must be a positive integer, not {self.batch_size!r}")
        if not isinstance(self.iterations, int) or not 1 <= self.iterations <= 10:
            raise InputError(f"iterations must be an integer from 1 to 10, not {self.iterations!r}")
        if not 0.0 <= self.min_foreground < 1.0:
            raise InputError(f"min_foreground must be in [0, 1), not {self.min_foreground!r}")


@dataclass
class RegistrationResult:
    """What a registration produced. Matrices are 4x4 RAS; ``fixed_to_moving_ras`` is the
    resampling transform (what ``transform.tfm`` holds, in LPS), ``moving_to_fixed_ras`` the
    modeling transform (Slicer's "to parent" transform that moves the moving volume onto the fixed)."""

    fixed_to_moving_ras: np.ndarray
    params: np.ndarray  # volume-level slice-frame parameters (model units)
    slice_params: np.ndarray  # (S, P) per fixed slice: the parameters used to resample that slice
    used: np.ndarray  # (S,) bool: slice had signal and was predicted
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


def predict_parameters(
    predictor: Predictor,
    fixed_slices: torch.Tensor,
    moving_slices: torch.Tensor,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Normalise fixed/moving network-grid slices ``(S, H, W)`` and predict ``(S, P)`` parameters
    in batches of ``batch_size`` (results do not depend on the batch size)."""
    out = []
    n = fixed_slices.shape[0]
    for start in range(0, n, batch_size):
        if cancel is not None and cancel():
            raise RegistrationCancelled("registration cancelled")
        f = normalise_slices(fixed_slices[start : start + batch_size])
        m = normalise_slices(moving_slices[start : start + batch_size])
        out.append(predictor(torch.stack([f, m], dim=1)).double().numpy())
        if progress is not None:
            progress(min(n, start + batch_size))
    return np.concatenate(out, axis=0) if out else np.zeros((0, predictor.card.n_params))


def slice_similarity(fixed_slices: torch.Tensor, moving_slices: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice NCC and MI (nats) of normalised network-grid slices ``(S, H, W)``."""
    f, m = normalise_slices(fixed_slices), normalise_slices(moving_slices)
    return ncc(f, m).double().cpu().numpy(), mutual_information(f, m).double().cpu().numpy()


def normalise_volume(volume: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Map a volume to ``[0, 1]`` by the 1st/99th percentiles of ``reference`` (itself if None)."""
    lo, hi = intensity_range(volume if reference is None else reference, 0.01, 0.99)
    return ((volume - lo) / (hi - lo if hi > lo else 1.0)).clamp(0.0, 1.0)


def resample_per_slice(
    moving: torch.Tensor,
    moving_ijk_to_ras: np.ndarray,
    fixed: Volume,
    frame: geo.SliceFrame,
    transforms: np.ndarray,
) -> torch.Tensor:
    """Resample the moving volume onto the fixed grid with one RAS resampling transform per fixed
    slice along ``frame.axis`` (``transforms``: ``(S, 4, 4)``)."""
    shape = list(fixed.shape)
    axis = frame.axis
    out = torch.empty(fixed.shape, dtype=torch.float32, device=moving.device)
    one = shape.copy()
    one[axis] = 1
    for s in range(shape[axis]):
        shift = np.eye(4)
        shift[axis, 3] = s
        ref = fixed.ijk_to_ras @ shift
        piece = resample_volume(moving, moving_ijk_to_ras, tuple(one), ref, transforms[s])
        index = [slice(None)] * 3
        index[axis] = slice(s, s + 1)
        out[tuple(index)] = piece
    return out


# --------------------------------------------------------------------------- the flow


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
    batches and raises :class:`RegistrationCancelled` when it returns True.
    """
    opts = options or RegistrationOptions()
    opts.validate()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    report = progress or (lambda fraction, message: None)
    validate_volume(fixed if fixed.name != "volume" else replace(fixed, name="fixed volume"))
    validate_volume(moving if moving.name != "volume" else replace(moving, name="moving volume"))
    try:
        device = resolve_device(opts.device)
    except RuntimeError as exc:
        raise InputError(str(exc)) from None
    card = predictor.card
    kind = card.transform
    size, spacing = card.input_size, card.spacing_mm

    report(0.0, "preparing slices")
    f_t = as_float_tensor(fixed, device)
    m_t = as_float_tensor(moving, device)
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape, opts.axis)
    check_field_of_view(fixed if fixed.name != "volume" else replace(fixed, name="fixed volume"), frame, size, spacing)
    stacks: SliceStacks = prepare_slice_stacks(
        f_t, fixed.ijk_to_ras, m_t, moving.ijk_to_ras, frame, size, spacing, min_foreground=opts.min_foreground
    )
    check_overlap(stacks)
    used = stacks.informative.copy()
    idx = np.flatnonzero(used)
    n_slices = len(frame.offsets)
    timings["prepare"] = time.perf_counter() - t0

    # ---- predict, (optionally) re-warp and predict again, composing in the slice frame
    t1 = time.perf_counter()
    current = np.zeros((len(idx), card.n_params))
    fixed_sel = stacks.fixed[idx]
    moving_sel = stacks.moving[idx]
    total = len(idx) * opts.iterations
    for it in range(opts.iterations):
        if it > 0:
            transforms = np.stack([geo.params_to_ras(p, frame, kind, int(s)) for p, s in zip(current, idx)])
            moving_sel = sample_slice_stack(m_t, moving.ijk_to_ras, frame, size, spacing, idx, transforms)

        def on_batch(done: int, it: int = it) -> None:
            report(0.05 + 0.75 * (it * len(idx) + done) / max(total, 1), f"predicting slice {done}/{len(idx)}")

        delta = predict_parameters(predictor, fixed_sel, moving_sel, opts.batch_size, on_batch, cancel)
        # registered(x) = moving(T(D(x))): apply the new estimate D first, then the current T
        current = geo.compose_params_2d(delta, current, kind) if it > 0 else delta
        if opts.mode == "volume":
            combined, _ = robust_combine(current, _floor(kind, opts.outlier_floor))
            current = np.broadcast_to(combined, current.shape).copy() if it < opts.iterations - 1 else current
    timings["predict"] = time.perf_counter() - t1

    # ---- combine
    combined, inl = robust_combine(current, _floor(kind, opts.outlier_floor))
    inlier = np.zeros(n_slices, dtype=bool)
    inlier[idx] = inl
    slice_params = np.broadcast_to(combined, (n_slices, card.n_params)).copy()
    if opts.mode == "slices":
        slice_params[idx] = current
    volume_t = geo.params_to_ras(combined, frame, kind)
    per_slice_t = np.stack([geo.params_to_ras(p, frame, kind, s) for s, p in enumerate(slice_params)])
    if cancel is not None and cancel():
        raise RegistrationCancelled("registration cancelled")

    # ---- quality figures on the network grid
    report(0.82, "measuring similarity")
    after_moving = sample_slice_stack(
        m_t, moving.ijk_to_ras, frame, size, spacing, idx, per_slice_t[idx] if opts.mode == "slices" else volume_t
    )
    sims = {k: np.full(n_slices, np.nan) for k in ("ncc_before", "ncc_after", "mi_before", "mi_after")}
    nb, mb = slice_similarity(fixed_sel, stacks.moving[idx])
    na, ma = slice_similarity(fixed_sel, after_moving)
    sims["ncc_before"][idx], sims["mi_before"][idx] = nb, mb
    sims["ncc_after"][idx], sims["mi_after"][idx] = na, ma

    # ---- output images on the fixed grid
    registered = difference = None
    t2 = time.perf_counter()
    if opts.compute_registered or opts.compute_difference:
        report(0.9, "resampling the moving volume")
        if opts.mode == "slices":
            reg_t = resample_per_slice(m_t, moving.ijk_to_ras, fixed, frame, per_slice_t)
        else:
            reg_t = resample_volume(m_t, moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, volume_t)
        if opts.compute_registered:
            registered = Volume(reg_t.cpu().numpy(), fixed.ijk_to_ras.copy(), "registered")
        if opts.compute_difference:
            diff = (normalise_volume(f_t) - normalise_volume(reg_t, m_t)).abs()
            difference = Volume(diff.cpu().numpy(), fixed.ijk_to_ras.copy(), "difference")
    timings["resample"] = time.perf_counter() - t2
    report(1.0, "done")
    return RegistrationResult(
        fixed_to_moving_ras=volume_t,
        params=combined,
        slice_params=slice_params,
        used=used,
        inlier=inlier,
        similarity_slices=sims,
        frame=frame,
        mode=opts.mode,
        transform_kind=kind,
        device=str(device),
        seconds=time.perf_counter() - t0,
        registered=registered,
        difference=difference,
        timings=timings,
    )


def _floor(kind: str, floor: float) -> np.ndarray:
    """Outlier floor per parameter: ``floor`` for angles (deg) and translations (mm); 1% for the
    dimensionless affine matrix terms."""
    return np.full(3, floor) if kind == "rigid" else np.array([0.01, 0.01, 0.01, 0.01, floor, floor])
