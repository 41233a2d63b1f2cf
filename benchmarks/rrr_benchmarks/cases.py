"""Benchmark cases from held-out real volumes: known motions, contrast pairings, storage.

A *motion kind* (:data:`MOTIONS`) says how a random known motion is drawn and applied
(:func:`draw_motion`, :func:`apply_motion`): in-plane motions live in the fixed volume's axial
slice frame (rotation about the slice normal through the volume centre, translation along ``ex``,
``ey``), ``3d`` motions rotate about all three RAS axes and translate in 3D. Adding a kind is one
entry in :data:`MOTIONS` (plus a branch in the two functions if it is neither of these).

3D cases are written once (``.npy``: float32 ``array[i, j, k]``) and described by JSON-able dicts,
so every method's worker process reads exactly the same voxels. 2D slice-pair sets are the
network-grid pairs of :func:`rrr_training.evaluate.draw_pairs` (saved as ``.npz``).

Pairings (:data:`PAIRINGS`): T1 to T1, T1 to the real T2/FLAIR (co-registered by the data's
providers, so their truth is only as good as that), and T1 to a synthetic T2-like contrast made
from the same T1 (:func:`synthetic_contrast`, :func:`rrr_training.scans.t2_like_contrast`), whose
alignment is exact. Motion between slices: :mod:`rrr_training.scans`.

Only numpy at import time (peer workers must not pay for torch); building cases imports torch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rrr_training.scans import (  # noqa: F401  (the benchmarks' names for them)
    INTERSLICE_JITTER,
    INTERSLICE_STEP_DEG,
    INTERSLICE_STEP_MM,
    apply_interslice_motion,
    interslice_motion,
)
from rrr_training.scans import t2_like_contrast as synthetic_contrast

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.volume import Volume


@dataclass(frozen=True)
class MotionKind:
    """How a known motion is drawn: uniform in +-``max_rotation_deg`` and +-``max_translation_mm``."""

    name: str
    max_rotation_deg: float
    max_translation_mm: float
    in_plane: bool  # True: (theta_deg, tx_mm, ty_mm) in the axial slice frame; False: 3D rigid
    description: str


MOTIONS: dict[str, MotionKind] = {
    "normal": MotionKind("normal", 5.0, 5.0, True,
                         "in-plane: rotation about the axial slice normal through the volume centre, "
                         "uniform in +-5 deg; translation along ex (~R) and ey (~A), each uniform in +-5 mm"),
    "hard": MotionKind("hard", 15.0, 15.0, True,
                       "in-plane as `normal`, uniform in +-15 deg and +-15 mm (beyond the model's training range)"),
    "capture": MotionKind("capture", 20.0, 20.0, True,
                          "in-plane as `normal`, uniform in +-20 deg and +-20 mm (capture range)"),
    "wide": MotionKind("wide", 30.0, 30.0, True,
                       "in-plane as `normal`, uniform in +-30 deg and +-30 mm (beyond the capture goal)"),
    "none": MotionKind("none", 0.0, 0.0, True,
                       "no motion: the contrasts as delivered (BraTS co-registered them); a method's error is how far "
                       "from co-registered it finds them, which bounds how well any cross-contrast error can be measured"),
    "3d": MotionKind("3d", 10.0, 10.0, False,
                     "3D: rotations about R, A and S (each uniform in +-10 deg, about the volume centre), "
                     "translation along R, A, S (each uniform in +-10 mm)"),
    "capture30": MotionKind("capture30", 30.0, 30.0, False,
                            "3D as `3d`, uniform in +-30 deg about each axis and +-30 mm along each (the capture goal)"),
}

#: Header kinds: ``shared`` (both volumes in one physical frame, as delivered) and ``unshared``
#: (the moving volume's header moved as another scanner session would: :func:`unshare_header`).
HEADERS = ("shared", "unshared")
#: :func:`unshare_header`: origin shift (mm, uniform in this range, random direction) and rotation
#: (deg, uniform in +- this about each RAS axis) of the moving header.
UNSHARED_SHIFT_MM, UNSHARED_ROTATION_DEG = (50.0, 150.0), 30.0


def unshare_header(moving: Volume, truth: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray, np.ndarray]:
    """The same voxels under a header moved by a random rigid ``H`` (rotation of up to
    :data:`UNSHARED_ROTATION_DEG` about each axis, origin shift of :data:`UNSHARED_SHIFT_MM`): the
    new moving volume, its truth ``H @ truth`` (fixed -> new moving world) and ``H``."""
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(*UNSHARED_SHIFT_MM)
    h = geo.rigid_matrix_3d(tuple(rng.uniform(-UNSHARED_ROTATION_DEG, UNSHARED_ROTATION_DEG, 3)), tuple(shift))
    return Volume(moving.array, h @ moving.ijk_to_ras, moving.name), h @ truth, h


@dataclass(frozen=True)
class Pairing:
    """Which contrasts are registered: fixed ``fixed`` to moving ``moving[i % len]`` (alternating)."""

    name: str
    label: str
    fixed: str
    moving: tuple[str, ...]


#: The synthetic contrast made from a subject's T1 by :func:`synthetic_contrast` (never on disk).
SYNTHETIC = "t1-synth"

PAIRINGS: dict[str, Pairing] = {
    "same": Pairing("same", "T1 -> T1", "t1", ("t1",)),
    "cross": Pairing("cross", "T1 -> T2 / FLAIR", "t1", ("t2", "flair")),
    "synth": Pairing("synth", "T1 -> synthetic T2-like (exact truth)", "t1", (SYNTHETIC,)),
}


def has_contrast(images: dict, contrast: str) -> bool:
    """Whether a subject (its ``images`` or ``volumes`` by contrast) can give ``contrast``
    (the synthetic one is made from its T1)."""
    return contrast in images or (contrast == SYNTHETIC and "t1" in images)


def stable_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator per (seed, names): adding a motion kind or pairing never changes the others."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(n.encode()) for n in names])


def draw_motion(kind: MotionKind, rng: np.random.Generator) -> np.ndarray:
    """Random parameters of a motion kind: in-plane ``(theta_deg, tx_mm, ty_mm)``; 3D
    ``(rx_deg, ry_deg, rz_deg, tx_mm, ty_mm, tz_mm)`` (RAS axes)."""
    r, t = kind.max_rotation_deg, kind.max_translation_mm
    if kind.in_plane:
        return np.r_[rng.uniform(-r, r), rng.uniform(-t, t, 2)]
    return np.r_[rng.uniform(-r, r, 3), rng.uniform(-t, t, 3)]


def motion_truth(fixed: Any, kind: MotionKind, params: np.ndarray) -> np.ndarray:
    """The true RAS resampling transform (fixed -> moving) of a motion, in ``fixed``'s frame
    (in-plane: its axial slice frame; 3D: about its centre)."""
    if kind.in_plane:
        frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
        return geo.params_to_ras(np.asarray(params, dtype=np.float64), frame, "rigid")
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    return geo.rigid_matrix_3d(tuple(params[:3]), tuple(params[3:6]), centre)


def apply_motion(volume: Any, kind: MotionKind, params: np.ndarray, fixed: Any = None):
    """Moving volume (on ``volume``'s grid) showing ``volume``'s anatomy moved, and the true RAS
    resampling transform (fixed -> moving) that registers it: ``moving(truth(x)) = volume(x)``.

    The motion is defined in the frame of ``fixed`` (default: ``volume`` itself; the same thing
    for co-registered contrasts on one grid, as in BraTS, where in-plane motions are exactly
    ``sample.apply_known_motion``)."""
    from dataclasses import replace

    from RigidResNetRegistrationLib.sample import apply_known_motion, apply_known_transform

    vol = Volume(np.asarray(volume.array), np.asarray(volume.ijk_to_ras, dtype=np.float64), getattr(volume, "name", "volume"))
    ref = vol if fixed is None else fixed
    same_grid = ref.shape == vol.shape and np.allclose(ref.ijk_to_ras, vol.ijk_to_ras)
    if kind.in_plane and same_grid:
        return apply_known_motion(vol, np.asarray(params, dtype=np.float64))
    truth = motion_truth(ref, kind, params)
    return replace(apply_known_transform(vol, truth), name=f"moving (known {kind.name} motion)"), truth


# --------------------------------------------------------------------------- 3D cases


def build_volume_cases(subjects: list, motions: list[str], pairings: list[str], n: int, seed: int, folder: Path,
                       log=print, headers: tuple[str, ...] = ("shared",)) -> list[dict[str, Any]]:
    """``n`` cases per (motion, pairing, header kind), written to ``folder``; returns their descriptions.

    Case ``i`` uses subject ``i % len(subjects)`` and, for the moving image, the pairing's moving
    contrast ``i % len``; fixed is the subject's fixed contrast, as stored. ``headers``
    (:data:`HEADERS`): ``unshared`` cases have the same motions as the shared ones and the moving
    header moved by :func:`unshare_header` (their pairing label says so).
    """
    from RigidResNetRegistrationLib.io import read_volume

    folder.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple[str, str], Any] = {}

    def source(subject, contrast):
        key = (subject.name, contrast)
        if key not in cache:
            if contrast == SYNTHETIC:
                import torch

                t1, _ = source(subject, "t1")
                vol = Volume(synthetic_contrast(torch.from_numpy(np.asarray(t1.array, dtype=np.float32))).numpy(),
                             t1.ijk_to_ras.copy(), f"{subject.name} {SYNTHETIC}")
            else:
                vol = read_volume(subject.images[contrast])
            path = folder / f"{_safe(subject.name)}_{contrast}.npy"
            np.save(path, np.asarray(vol.array, dtype=np.float32))
            cache[key] = (vol, path)
        return cache[key]

    cases: list[dict[str, Any]] = []
    for motion in motions:
        kind = MOTIONS[motion]
        for pname in pairings:
            pairing = PAIRINGS[pname]
            usable = [s for s in subjects if pairing.fixed in s.images and any(has_contrast(s.images, c) for c in pairing.moving)]
            if not usable:
                log(f"skipped {pairing.label}: no subject has {pairing.fixed} and one of {', '.join(pairing.moving)}")
                continue
            for header in headers:
                rng = stable_rng(seed, "volumes", motion, pname)  # the same motions for every header kind
                header_rng = stable_rng(seed, "headers", motion, pname)
                for i in range(n):
                    subject = usable[i % len(usable)]
                    options = [c for c in pairing.moving if has_contrast(subject.images, c)]
                    contrast = options[i % len(options)]
                    fixed, fixed_path = source(subject, pairing.fixed)
                    moving_source, moving_source_path = source(subject, contrast)
                    params = draw_motion(kind, rng)
                    moving, truth = apply_motion(moving_source, kind, params, fixed)
                    moved_header = None
                    if header == "unshared":
                        moving, truth, moved_header = unshare_header(moving, truth, header_rng)
                    case_id = f"{motion}-{pname}{'' if header == 'shared' else '-' + header}-{i:03d}"
                    moving_path = folder / f"{case_id}.npy"
                    np.save(moving_path, np.asarray(moving.array, dtype=np.float32))
                    cases.append({
                        "id": case_id, "motion": motion, "subject": subject.name, "headers": header,
                        "pairing": pairing.label + ("" if header == "shared" else ", unshared headers"),
                        "fixed_contrast": pairing.fixed, "moving_contrast": contrast,
                        "params": [float(v) for v in params], "truth": np.asarray(truth).tolist(),
                        "fixed": str(fixed_path), "fixed_ijk_to_ras": np.asarray(fixed.ijk_to_ras).tolist(),
                        "centre_ras": geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape).tolist(),  # where errors are measured
                        "moving": str(moving_path), "moving_ijk_to_ras": np.asarray(moving.ijk_to_ras).tolist(),
                        "moving_source": str(moving_source_path),
                        "moving_source_ijk_to_ras": np.asarray(moving_source.ijk_to_ras).tolist(),
                        "moving_header_moved_by": None if moved_header is None else moved_header.tolist(),
                    })
                    log(f"case {case_id}: {subject.name} {pairing.fixed} -> {contrast}, motion {np.round(params, 2).tolist()}"
                        + ("" if moved_header is None else f", moving header moved {np.linalg.norm(moved_header[:3, 3]):.0f} mm"))
    return cases


def load_case(case: dict[str, Any]) -> tuple[Volume, Volume, np.ndarray]:
    """(fixed, moving, truth) of a stored 3D case."""
    fixed = Volume(np.load(case["fixed"]), np.array(case["fixed_ijk_to_ras"], dtype=np.float64), "fixed")
    moving = Volume(np.load(case["moving"]), np.array(case["moving_ijk_to_ras"], dtype=np.float64), "moving")
    return fixed, moving, np.array(case["truth"], dtype=np.float64)


def load_moving_source(case: dict[str, Any]) -> Volume:
    """The unmoved volume a stored 3D case's moving image was made from (the moving contrast,
    co-registered with the fixed one as delivered; the fixed volume itself for same contrast)."""
    return Volume(np.load(case["moving_source"]), np.array(case["moving_source_ijk_to_ras"], dtype=np.float64), "moving source")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


# --------------------------------------------------------------------------- 2D slice pairs


#: The 2D slice-pair sets are drawn from slices with at least this much signal on the network grid
#: (brain-filled slices, like the paper's centre crops); kept at the value the stored results were
#: drawn with, which is stricter than the engine's own ``MIN_FOREGROUND``.
PAIR_SET_MIN_FOREGROUND = 0.15


def load_subjects_2d(data: Path, card) -> list:
    """The data folder's subjects read for slice-pair drawing (``rrr_training.data.load_subject``)."""
    from rrr_training.data import find_subjects, load_subject

    loaded = []
    for subject in find_subjects(data):
        one = load_subject(subject, card.input_size, card.spacing_mm, PAIR_SET_MIN_FOREGROUND)
        if one is not None:
            loaded.append(one)
    return loaded


def draw_pair_set(loaded: list, card, motion: str, pairing: str, n: int, seed: int):
    """The ``PairBatch`` of one (motion, pairing) 2D set: ``n`` network-grid slice pairs drawn by
    ``rrr_training.evaluate.draw_pairs`` with a seed derived from (seed, motion, pairing)."""
    from types import SimpleNamespace

    from rrr_training.evaluate import draw_pairs

    from rrr_training.data import PairBatch

    kind, p = MOTIONS[motion], PAIRINGS[pairing]
    if not kind.in_plane:
        raise ValueError(f"slice pairs need an in-plane motion kind, not {motion}")
    if SYNTHETIC in p.moving:
        add_synthetic_contrast(loaded)
    pair_seed = int(stable_rng(seed, "pairs", motion, pairing).integers(2**31))
    drawn = draw_pairs(loaded, SimpleNamespace(card=card), n + n // 2 + 8, kind.max_rotation_deg,
                       kind.max_translation_mm, p.fixed, list(p.moving), pair_seed)
    keep = [b for b, src in enumerate(drawn.sources) if _has_signal(drawn.fixed[b], src[0], p.fixed)
            and _has_signal(drawn.moving[b], src[0], src[2])][:n]
    return PairBatch(drawn.fixed[keep], drawn.moving[keep], drawn.truth[keep], drawn.same_contrast[keep],
                     [drawn.sources[b] for b in keep])


def add_synthetic_contrast(loaded: list) -> None:
    """Give every loaded subject with a T1 the :data:`SYNTHETIC` contrast (made once; same grid),
    so pairs are drawn and re-sampled from it as from any other volume."""
    from RigidResNetRegistrationLib.preprocess import foreground_threshold

    for subject in loaded:
        if "t1" in subject.volumes and SYNTHETIC not in subject.volumes:
            subject.volumes[SYNTHETIC] = synthetic_contrast(subject.volumes["t1"])
            subject.ijk_to_ras[SYNTHETIC] = subject.ijk_to_ras["t1"]
            subject.thresholds[SYNTHETIC] = foreground_threshold(subject.volumes[SYNTHETIC])


#: A slice pair is used when both slices have at least this fraction of signal pixels.
MIN_SIGNAL = 0.15
_THRESHOLDS: dict[tuple[int, str], float] = {}


def _has_signal(image, subject, contrast: str) -> bool:
    """Whether a network-grid slice shows brain: at least :data:`MIN_SIGNAL` of its pixels above
    the volume's signal threshold, ``q01 + 0.1 (q99 - q01)`` (robust to volumes whose minimum is
    a few negative voxels below a zero background, where ``preprocess.foreground_threshold``, which
    starts from the minimum, counts the background as signal and ``load_subject`` keeps empty
    slices)."""
    key = (id(subject), contrast)
    if key not in _THRESHOLDS:
        from RigidResNetRegistrationLib.preprocess import intensity_range

        lo, hi = intensity_range(subject.volumes[contrast], 0.01, 0.99)
        _THRESHOLDS[key] = lo + 0.1 * (hi - lo)
    return float((image > _THRESHOLDS[key]).float().mean()) >= MIN_SIGNAL


def build_pair_sets(data: Path, card, motions: list[str], pairings: list[str], n: int, seed: int, folder: Path,
                    log=print) -> list[dict[str, Any]]:
    """Draw and store the 2D sets (``.npz``: ``fixed``, ``moving`` raw ``(n, H, W)``, ``truth``
    ``(n, 3)`` slice-frame parameters, ``moving_contrast``)."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_subjects_2d(data, card)
    sets = []
    for motion in motions:
        if not MOTIONS[motion].in_plane:
            log(f"no slice pairs for motion {motion}: slice pairs are in-plane by construction")
            continue
        for pname in pairings:
            try:
                batch = draw_pair_set(loaded, card, motion, pname, n, seed)
            except LookupError as exc:
                log(f"skipped slice pairs {PAIRINGS[pname].label}: {exc}")
                continue
            path = folder / f"pairs-{motion}-{pname}.npz"
            contrasts = np.array([src[2] for src in batch.sources])
            np.savez(path, fixed=batch.fixed.numpy(), moving=batch.moving.numpy(), truth=batch.truth.double().numpy(),
                     moving_contrast=contrasts)
            sets.append({"id": f"pairs-{motion}-{pname}", "motion": motion, "pairing": PAIRINGS[pname].label,
                         "pairing_key": pname, "n": int(len(batch.truth)), "file": str(path),
                         "size": list(card.input_size), "spacing_mm": float(card.spacing_mm)})
            log(f"slice pairs {motion} {PAIRINGS[pname].label}: {len(batch.truth)} pairs")
    return sets
