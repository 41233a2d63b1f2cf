"""Where a registration starts: an initial transform that needs no shared header.

Conventions (see ``geometry.py``): physical points in **RAS** millimetres; every transform here is
a 4x4 RAS **resampling** transform, fixed point -> moving point (``registered(x) = moving(T(x))``,
the direction of ``RegistrationResult.fixed_to_moving_ras`` and of ``.tfm`` files).

Modes (:data:`INIT_MODES`):

* ``header``: the identity, i.e. trust both headers (the behaviour before initialisation existed);
* ``centre``: translate the moving foreground's centre of mass onto the fixed one's;
* ``moments``: centres of mass and principal axes of the foreground; the axes leave the sign of
  each axis (and, when two spreads are close, their order) undetermined, so every proper rotation
  that maps the fixed axes onto the moving axes up to sign and order (24 candidates), and the
  header's own orientation, are scored on image similarity at a coarse level and the most similar
  is kept (:func:`best_candidates`);
* ``auto`` (default): the headers when the two foregrounds overlap well under them
  (:data:`OVERLAP_WELL`, :data:`CENTRE_WELL`), otherwise the centres of mass; for volumes that are
  3D heads (not a thin stack or a 2D image) and when ``search`` is asked for (the engine's
  ``volume`` mode), a coarse search: rotations about the three axes through the fixed centre of
  mass (:data:`SEARCH_DEG`, each with the centres of mass aligned) and the 24 principal-axis
  candidates are scored with the start on the same coarse similarity (cheap: a few thousand points).
  When the headers overlap well and the most similar candidate is within :data:`KEEP_START_DEG` /
  :data:`KEEP_START_MM` of them, the headers are kept exactly (the network and the refinement reach
  that far); otherwise the best :data:`POLISH` are polished by :func:`refine.refine_rigid` at the
  coarse level and the most similar is the start. The network's in-plane passes and the 6-DOF
  refinement continue from there: the coarse stage only has to bring a motion within their reach
  (out-of-plane rotations of about 15 degrees).

The foreground is the project's: voxels above :func:`preprocess.foreground_threshold`, on block
averages of about :data:`COARSE_MM` millimetres (:mod:`refine`'s pyramid), so every measurement
here is cheap (a few thousand points).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import geometry as geo
from .options import INIT_MODES
from .preprocess import foreground_threshold, intensity_range
from .refine import _block_average, _block_matrix, _dilate, _factors, refine_rigid
from .resample import sample_volume_at_ras
from .similarity import mutual_information
from .volume import Volume

#: Block size (mm) of the coarse copies on which moments and similarity are measured.
COARSE_MM = 6.0
#: The headers "overlap well" (``auto`` keeps them) when at least this fraction of the fixed
#: foreground lands on moving foreground under them and the two centres of mass are at most
#: :data:`CENTRE_WELL` times the fixed foreground's RMS radius apart. Measured on the capture cases
#: (BraTS2021_90004, IXI): shared headers with +-30 deg / +-30 mm gave fractions 0.55-0.95 and
#: distances up to 0.6 radius; moving headers shifted by 50-150 mm gave 0-0.45 and 0.8-2.5 radii.
OVERLAP_WELL = 0.5
CENTRE_WELL = 0.75
#: Rotations (degrees) tried about each RAS axis by the coarse search (all combinations).
SEARCH_DEG = (-30.0, -15.0, 0.0, 15.0, 30.0)
#: How many of the best-scoring candidates are polished at the coarse level, with at most how
#: many similarity evaluations and sample points (:func:`refine.refine_rigid`). On 24 capture cases
#: (BraTS2021_90004 T1 -> T1/T2, +-30 deg / +-30 mm, shared and moved headers) the candidate
#: scoring best before polishing was the one nearest the truth in 22 and within 1 deg of it in 2.
POLISH, POLISH_STEPS, POLISH_POINTS = 2, 20, 3000
#: The coarse search keeps the headers' exact start unless it ends farther than this from it: the
#: network's passes and the refinement recover motions of this size from the headers themselves
#: (and a start they would correct anyway is not worth changing the result for).
KEEP_START_DEG, KEEP_START_MM = 10.0, 10.0
#: At most this many fixed points (a fixed stride subset) score the candidates.
SCORE_POINTS = 2500
#: A volume thinner than this (mm, foreground extent along its thinnest axis) is not searched in 3D.
MIN_THICKNESS_MM = 40.0


@dataclass(frozen=True)
class ForegroundMoments:
    """Centre of mass and principal axes of a volume's foreground (RAS mm).

    ``axes_ras``: unit principal axes as the columns of a 3x3 matrix, largest spread first (a
    proper rotation: determinant +1); ``spread_mm``: standard deviation along each; ``points``:
    foreground blocks used."""

    centre_ras: np.ndarray
    axes_ras: np.ndarray
    spread_mm: np.ndarray
    points: int

    @property
    def radius_mm(self) -> float:
        """RMS distance of the foreground from its centre of mass."""
        return float(np.sqrt(np.sum(self.spread_mm**2)))


@dataclass
class CoarseVolume:
    """A volume's block averages at about :data:`COARSE_MM`, normalised to ``[0, 1]`` by the full
    volume's 1st/99th percentiles, with the RAS positions of its foreground blocks."""

    blocks: torch.Tensor  # (I', J', K') float32 in [0, 1]
    block_to_ras: np.ndarray  # 4x4 block index -> RAS mm of the block centre
    foreground_ras: np.ndarray  # (N, 3) centres of the blocks above the foreground threshold
    near_foreground_ras: np.ndarray  # (M, 3) the same grown by one block (edges count for similarity)
    threshold: float  # the foreground threshold, on the [0, 1] scale


def _voxels(volume: Volume, voxels: torch.Tensor | None) -> torch.Tensor:
    """The volume's voxels as a float32 CPU tensor: ``voxels`` when the caller has them (the
    engine's own copy: converted, and its intensity range measured, once per registration)."""
    if voxels is not None and voxels.device.type == "cpu" and tuple(voxels.shape) == tuple(volume.shape):
        return voxels
    return torch.from_numpy(np.asarray(volume.array, dtype=np.float32))


def coarse_volume(volume: Volume, level_mm: float = COARSE_MM, voxels: torch.Tensor | None = None) -> CoarseVolume:
    """Block averages of ``volume`` and where its foreground is (see :class:`CoarseVolume`);
    ``voxels``: its voxels as a float32 tensor, when the caller has them."""
    full = _voxels(volume, voxels)
    lo, hi = intensity_range(full)
    span = (hi - lo) or 1.0
    threshold = (foreground_threshold(full) - lo) / span
    factors = _factors(volume.ijk_to_ras, volume.shape, level_mm)
    blocks = ((_block_average(full, factors) - lo) / span).clamp(0.0, 1.0)
    to_ras = geo.compose(volume.ijk_to_ras, _block_matrix(factors))
    mask = blocks > threshold
    points = geo.apply_to_points(to_ras, torch.nonzero(mask).double().numpy())
    near = geo.apply_to_points(to_ras, torch.nonzero(_dilate(mask)).double().numpy())
    return CoarseVolume(blocks.contiguous(), to_ras, points, near, threshold)


def foreground_moments(volume: Volume | CoarseVolume) -> ForegroundMoments:
    """Centre of mass and principal axes (RAS mm) of the foreground blocks of a volume (each block
    counts once: the shape of the head, not its intensities, which differ between contrasts)."""
    coarse = volume if isinstance(volume, CoarseVolume) else coarse_volume(volume)
    pts = coarse.foreground_ras
    if len(pts) < 4:
        raise ValueError("too little foreground to measure its centre and axes")
    centre = pts.mean(axis=0)
    cov = np.cov((pts - centre).T)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    axes = vectors[:, order]
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1.0
    return ForegroundMoments(centre, axes, np.sqrt(np.clip(values[order], 0.0, None)), len(pts))


def centre_transform(fixed: ForegroundMoments, moving: ForegroundMoments, rotation: np.ndarray | None = None) -> np.ndarray:
    """Resampling transform (RAS, fixed -> moving) that rotates by ``rotation`` (3x3, identity if
    None) about the fixed centre of mass and takes it onto the moving centre of mass."""
    r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = moving.centre_ras - r @ fixed.centre_ras
    return m


def axis_rotations(fixed: ForegroundMoments, moving: ForegroundMoments) -> list[np.ndarray]:
    """The 24 proper rotations ``R = A_m Q A_f^T`` that map the fixed principal axes onto the
    moving ones up to sign and order (``Q`` a signed permutation with ``det R = +1``)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            q = np.zeros((3, 3))
            q[list(perm), range(3)] = signs
            r = moving.axes_ras @ q @ fixed.axes_ras.T
            if np.linalg.det(r) > 0:
                out.append(r)
    return out


def search_rotations(degrees: tuple[float, ...] = SEARCH_DEG) -> list[np.ndarray]:
    """Rotations (3x3, RAS) about x, then y, then z by every combination of ``degrees``."""
    return [geo.rigid_matrix_3d(tuple(a))[:3, :3] for a in itertools.product(degrees, repeat=3)]


def coarse_similarity(fixed: CoarseVolume, moving: CoarseVolume, transforms: np.ndarray, bins: int = 32) -> np.ndarray:
    """Mutual information (nats) between the fixed coarse volume at its (grown) foreground blocks
    and the moving coarse volume at the same points mapped by each resampling transform
    ``(K, 4, 4)``; returns ``(K,)``. Points mapped outside the moving volume read 0 (background),
    so a candidate that moves the head out of view scores low. MI serves every contrast pairing."""
    t = np.asarray(transforms, dtype=np.float64).reshape(-1, 4, 4)
    pts = fixed.near_foreground_ras
    pts = pts[:: max(1, -(-len(pts) // SCORE_POINTS))]
    f_vals = sample_volume_at_ras(fixed.blocks, fixed.block_to_ras, pts).float()
    mapped = pts[None] @ t[:, :3, :3].transpose(0, 2, 1) + t[:, None, :3, 3]
    m_vals = sample_volume_at_ras(moving.blocks, moving.block_to_ras, mapped).float()
    return mutual_information(f_vals.expand(len(t), -1), m_vals, bins=bins).double().numpy()


def overlap_fraction(fixed: CoarseVolume, moving: CoarseVolume, transform: np.ndarray | None = None) -> float:
    """Fraction of the fixed foreground blocks that ``transform`` (resampling, identity if None)
    sends onto moving foreground."""
    t = np.eye(4) if transform is None else np.asarray(transform, dtype=np.float64)
    mapped = geo.apply_to_points(t, fixed.foreground_ras)
    values = sample_volume_at_ras(moving.blocks, moving.block_to_ras, mapped)
    return float((values > moving.threshold).double().mean()) if len(mapped) else 0.0


@dataclass
class Initialisation:
    """The start a registration used: ``fixed_to_moving_ras`` (RAS resampling transform), the
    ``requested`` mode, the one ``used`` (``header``, ``centre`` or ``moments``; ``given`` when only
    a caller's initial transform placed the moving volume), whether the coarse rotation search
    changed it (``searched``), why (``reason``) and the measured ``signals``."""

    requested: str
    used: str
    fixed_to_moving_ras: np.ndarray
    reason: str
    searched: bool = False
    signals: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    given: np.ndarray | None = None  # the caller's initial transform, included in fixed_to_moving_ras

    def as_report(self) -> dict[str, object]:
        """JSON-ready: the ``init`` entry of ``report.json``."""
        return {
            "requested": self.requested,
            "initial_transform_given": None if self.given is None else np.asarray(self.given).tolist(),
            "used": self.used,
            "coarse_search": self.searched,
            "reason": self.reason,
            "signals": {k: round(float(v), 4) for k, v in self.signals.items()},
            "fixed_to_moving_RAS": np.asarray(self.fixed_to_moving_ras).tolist(),
            "seconds": round(self.seconds, 4),
        }


def _thin(coarse: CoarseVolume, moments: ForegroundMoments) -> bool:
    """A foreground too thin for 3D moments and rotations (a 2D image or a short stack)."""
    extent = np.ptp(coarse.foreground_ras @ moments.axes_ras, axis=0) if len(coarse.foreground_ras) else np.zeros(3)
    return float(extent.min()) < MIN_THICKNESS_MM


def best_candidates(fixed: CoarseVolume, moving: CoarseVolume, fixed_t: torch.Tensor, fixed_ijk_to_ras: np.ndarray,
                    moving_t: torch.Tensor, moving_ijk_to_ras: np.ndarray, candidates: list[np.ndarray],
                    polish: int = POLISH, scores: np.ndarray | None = None) -> tuple[int, np.ndarray, float]:
    """Score ``candidates`` (RAS resampling transforms) on :func:`coarse_similarity` (unless their
    ``scores`` are given), polish the ``polish`` best with :func:`refine.refine_rigid` (Mattes MI at
    :data:`COARSE_MM`) and return (index of the winner, its polished transform, its polished
    similarity in nats)."""
    if scores is None:
        scores = coarse_similarity(fixed, moving, np.stack(candidates))
    best_i, best_t, best_s = -1, np.eye(4), -np.inf
    for i in np.argsort(-scores, kind="stable")[: max(1, polish)]:
        try:
            r = refine_rigid(fixed_t, fixed_ijk_to_ras, moving_t, moving_ijk_to_ras, candidates[i], metric="mi",
                             levels_mm=(COARSE_MM,), steps=POLISH_STEPS, max_points=POLISH_POINTS, bins=32)
        except ValueError:  # no overlapping signal under this candidate
            continue
        if r.similarity_after > best_s:
            best_i, best_t, best_s = int(i), r.fixed_to_moving_ras, float(r.similarity_after)
    if best_i < 0:
        best_i = int(np.argmax(scores))
        best_t, best_s = candidates[best_i], float(scores[best_i])
    return best_i, best_t, best_s


def initial_transform(fixed: Volume, moving: Volume, mode: str = "auto", search: bool = True,
                      fixed_voxels: torch.Tensor | None = None, moving_voxels: torch.Tensor | None = None) -> Initialisation:
    """Initial RAS resampling transform (fixed -> moving) of ``moving`` to ``fixed`` by ``mode``
    (:data:`INIT_MODES`, module docstring); ``search``: allow ``auto``'s coarse rotation search
    (otherwise ``auto`` is ``header`` or ``moments``); ``fixed_voxels``, ``moving_voxels``: the
    volumes' voxels as float32 CPU tensors when the caller has them (not modified)."""
    t0 = time.perf_counter()
    if mode not in INIT_MODES:
        raise ValueError(f"init must be one of {', '.join(INIT_MODES)}, not {mode!r}")

    def done(used: str, transform: np.ndarray, reason: str, searched: bool = False) -> Initialisation:
        return Initialisation(mode, used, transform, reason, searched, signals, time.perf_counter() - t0)

    signals: dict[str, float] = {}
    if mode == "header":
        return done("header", np.eye(4), "requested: the headers as they are")
    f_t, m_t = _voxels(fixed, fixed_voxels), _voxels(moving, moving_voxels)
    fc, mc = coarse_volume(fixed, voxels=f_t), coarse_volume(moving, voxels=m_t)
    fm, mm = foreground_moments(fc), foreground_moments(mc)
    centred = centre_transform(fm, mm)
    signals.update(header_overlap=overlap_fraction(fc, mc), centre_distance_mm=float(np.linalg.norm(mm.centre_ras - fm.centre_ras)),
                   fixed_radius_mm=fm.radius_mm)
    if mode == "centre":
        return done("centre", centred, "requested: centres of mass aligned")
    header_well = (signals["header_overlap"] >= OVERLAP_WELL
                   and signals["centre_distance_mm"] <= CENTRE_WELL * signals["fixed_radius_mm"])
    why = (f"fixed foreground on moving foreground {signals['header_overlap']:.2f} (well: >= {OVERLAP_WELL}), centres "
           f"{signals['centre_distance_mm']:.0f} mm apart (well: <= {CENTRE_WELL} x radius {signals['fixed_radius_mm']:.0f} mm)")
    if mode == "auto" and (_thin(fc, fm) or _thin(mc, mm)):  # a 2D image or a short stack: no 3D axes to trust
        if header_well:
            return done("header", np.eye(4), f"thin volume, the headers overlap well: {why}")
        return done("centre", centred, f"thin volume, the headers do not overlap well ({why}): centres aligned")
    axes = [centre_transform(fm, mm, r) for r in axis_rotations(fm, mm)]
    if mode == "moments":
        # the header's orientation first: on a tie (symmetric spreads) it wins
        i, start, score = best_candidates(fc, mc, f_t, fixed.ijk_to_ras, m_t, moving.ijk_to_ras, [centred] + axes)
        signals["similarity"] = score
        return done("moments", start, "requested: centres of mass and principal axes, "
                    + ("the header's orientation kept" if i == 0 else f"axis candidate {i} of 24 most similar"))
    if header_well and not search:
        return done("header", np.eye(4), f"the headers overlap well: {why}")
    # auto: the start (the headers when they overlap well, else the centres of mass), rotations about
    # the centre of mass in a grid around the header's orientation and the principal-axis candidates
    grid = [centre_transform(fm, mm, r) for r in search_rotations()] if search else []
    start = np.eye(4) if header_well else centred
    candidates = [start] + grid + axes
    scores = coarse_similarity(fc, mc, np.stack(candidates))
    top = int(np.argmax(scores))
    rot, mm_ = geo.rigid_error(candidates[top], start, fm.centre_ras)
    if header_well and rot <= KEEP_START_DEG and mm_ <= KEEP_START_MM:
        # the most similar candidate is one the network and the refinement reach from the headers
        return done("header", np.eye(4), f"the headers overlap well: {why}; no candidate of the coarse search "
                    "is more similar farther than the network and the refinement reach")
    i, best, score = best_candidates(fc, mc, f_t, fixed.ijk_to_ras, m_t, moving.ijk_to_ras, candidates, scores=scores)
    signals["similarity"] = score
    rot, mm_ = geo.rigid_error(best, start, fm.centre_ras)
    if header_well:
        if rot <= KEEP_START_DEG and mm_ <= KEEP_START_MM:
            return done("header", np.eye(4), f"the headers overlap well: {why}; the coarse search ended within "
                        f"{KEEP_START_DEG:g} deg / {KEEP_START_MM:g} mm of them")
        return done("header", best, f"the headers overlap well: {why}; the coarse search moved the start by "
                    f"{rot:.0f} deg / {mm_:.0f} mm (MI {score:.3f} nats)", searched=True)
    kind = "the header's orientation" if i == 0 else ("a rotation of the coarse search" if i <= len(grid)
                                                          else "a principal-axis candidate")
    return done("moments", best, f"the headers do not overlap well ({why}): centres of mass aligned, {kind} "
                f"most similar (MI {score:.3f} nats)", searched=bool(grid))


def place_moving(fixed: Volume, moving: Volume, mode: str = "auto", given: np.ndarray | None = None,
                 search: bool = True, fixed_voxels: torch.Tensor | None = None,
                 moving_voxels: torch.Tensor | None = None) -> tuple[Volume, Initialisation]:
    """The moving volume placed at the start of a registration, and how it was placed.

    ``given``: the caller's initial RAS resampling transform ``G`` (fixed -> moving; None: none);
    the moving volume is first placed by it, then ``mode`` (:func:`initial_transform`) finds ``T1``
    on the placed volume. Returns a copy of ``moving`` whose header is ``inv(T0) @ ijk_to_ras``
    with ``T0 = G @ T1`` (the voxels are shared, not copied), so that registering ``fixed`` to it
    from the identity and composing ``T0 @ T`` gives the transform to the original ``moving``:
    ``registered(x) = moving(T0(T(x)))``; and the :class:`Initialisation` (``fixed_to_moving_ras``
    = ``T0``). ``fixed_voxels``, ``moving_voxels``: as :func:`initial_transform`."""
    g = None if given is None else np.asarray(given, dtype=np.float64)
    first = moving if g is None else Volume(moving.array, geo.invert(g) @ moving.ijk_to_ras, moving.name)
    init = initial_transform(fixed, first, mode, search, fixed_voxels, moving_voxels)
    if g is not None:
        init.given = g
        init.fixed_to_moving_ras = g @ init.fixed_to_moving_ras
        if init.used == "header":
            init.used = "given"
    if np.array_equal(init.fixed_to_moving_ras, np.eye(4)):
        return moving, init
    placed = Volume(moving.array, geo.invert(init.fixed_to_moving_ras) @ moving.ijk_to_ras, moving.name)
    return placed, init
