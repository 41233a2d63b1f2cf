"""Evaluate a model on held-out subjects: random known motions, errors of the network's estimate.

    rigid-resnet-evaluate --data ../shared/data/brats/BraTS2021_90004 --pairs 400 \
        --max-rotation-deg 5 --max-translation-mm 5 [--weights CARD] [--iterations 1 2 3] [--refine-slices]
    rigid-resnet-evaluate --data ../shared/data --subjects-file training/holdout.txt --pairs 100 \
        --rows skull-stripped:t1-t1 skull-stripped:t1-t2 skull-stripped:t1-flair whole-head:same whole-head:synth \
        --motions 5/5 30/30
    rigid-resnet-evaluate ... --volumes 8 --volume-motion 6dof --volume-no-refine --max-rotation-deg 15 --max-translation-mm 15

Prints a markdown table: rotation error (deg) and translation error (mm) medians and 90th
percentiles, success rate (< 1 deg and < 1 mm) and network time per slice pair, for same-contrast
(T1 -> T1) and cross-contrast (T1 -> T2 / FLAIR) pairs, or for the ``--rows`` asked for: a
subject group (``all``, or a group named in ``--subjects-file``) and a pairing of :data:`PAIRINGS`
(``synth``: two synthetic contrasts of one scan, exact truth), at each of ``--motions``. The
motions are drawn with a fixed seed. ``--volumes N`` adds whole volumes registered by the engine
(``volume`` mode, in-plane or 6-DOF motions, with or without its refinement), rows per subject group.
Bad input ends with one line ``error: ...`` on stderr and exit code 2 (``RIGID_RESNET_DEBUG=1``
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.engine import predict_parameters, resolve_precision
from RigidResNetRegistrationLib.model import LoadedModel, load_model
from RigidResNetRegistrationLib.options import MIN_FOREGROUND, PRECISIONS

from .data import ORIENTATIONS, LoadedSubject, PairBatch, find_subjects, load_subject_views, read_holdout_file, sample_pairs
from .synth import synthetic_contrast

#: ``--rows`` pairings: name -> (row label, fixed contrast, moving contrasts). ``same``: each
#: subject's own contrast(s), fixed and moving alike; ``synth``: ``same`` pairs whose slices both
#: get a synthetic contrast of their own (:func:`synth.synthetic_contrast`), so a cross-contrast
#: pair with an exact truth on any scan, whole heads included.
PAIRINGS: dict[str, tuple[str, str | None, list[str] | None]] = {
    "t1-t1": ("T1 -> T1", "t1", ["t1"]),
    "t1-t2": ("T1 -> T2", "t1", ["t2"]),
    "t1-flair": ("T1 -> FLAIR", "t1", ["flair"]),
    "t1-t2flair": ("T1 -> T2 / FLAIR", "t1", ["t2", "flair"]),
    "same": ("same contrast", None, None),
    "synth": ("synthetic -> synthetic contrast", None, None),
}
DEFAULT_ROWS = ["all:t1-t1", "all:t1-t2flair"]


@dataclass
class EvalRow:
    pairs: str
    iterations: int
    n: int
    rot_median: float
    rot_p90: float
    trans_median: float
    trans_p90: float
    success: float
    ms_per_pair: float
    subjects: str = ""  # the subject group of a --rows row ("" in the default table)
    motion: str = ""  # its motion range, "deg / mm" ("" in the default table)


def draw_pairs(subjects: list[LoadedSubject], model: LoadedModel, n: int, max_rot: float, max_trans: float,
               fixed_contrast: str | None, moving_contrasts: list[str] | None, seed: int) -> PairBatch:
    """``n`` pairs (fixed seed) with fixed = ``fixed_contrast``, moving drawn from ``moving_contrasts``;
    ``fixed_contrast`` None: same-contrast pairs of any of each subject's contrasts."""
    if fixed_contrast is None:
        usable = [s for s in subjects if s.volumes]
    else:
        usable = [s for s in subjects if fixed_contrast in s.volumes and any(c in s.volumes for c in moving_contrasts)]
    if not usable:
        raise LookupError(f"no subject has {fixed_contrast} and one of {', '.join(moving_contrasts)}" if fixed_contrast
                          else "no subject")
    card = model.card
    if fixed_contrast is None:
        return sample_pairs(usable, np.random.default_rng(seed), n, card.input_size, card.spacing_mm, card.transform,
                            max_rot, max_trans, cross_contrast=0.0)
    return sample_pairs(usable, np.random.default_rng(seed), n, card.input_size, card.spacing_mm, card.transform,
                        max_rot, max_trans, fixed_contrast=fixed_contrast, moving_contrasts=moving_contrasts)


def synthetic_pairs(batch: PairBatch, seed: int) -> tuple[PairBatch, Callable[[torch.Tensor], torch.Tensor]]:
    """The pairs of ``batch`` with both slices in synthetic contrasts of their own, and the map
    that gives any moving slices of the batch the moving contrast again (the same random values,
    re-seeded: for the slices re-sampled after each pass). Marked cross contrast."""
    fixed = synthetic_contrast(batch.fixed, torch.Generator().manual_seed(seed))

    def moving_contrast(moving: torch.Tensor) -> torch.Tensor:
        return synthetic_contrast(moving, torch.Generator().manual_seed(seed + 1))

    return PairBatch(fixed, batch.moving, batch.truth, torch.zeros_like(batch.same_contrast), batch.sources), moving_contrast


def evaluate_batch(model: LoadedModel, batch: PairBatch, iterations: int, batch_size: int = 32,
                   precision: str = "auto", symmetric: bool = True,
                   refine: tuple[str, str] | None = None,
                   moving_contrast: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Network estimates (``iterations`` passes of warp, re-predict, compose) -> errors, time.
    ``precision`` and ``symmetric`` (each pair also predicted swapped, the estimates combined
    inverse-consistently) as the engine's: ``auto`` is bf16 where the device computes it natively.
    ``refine``: ``(fixed contrast, metric)`` to follow the passes with the per-slice refinement
    (:func:`refine_pair_estimates`; rigid models only), timed with them. ``moving_contrast``: a map
    applied to the moving slices before every pass (:func:`synthetic_pairs`), timed too."""
    card = model.card
    precision = resolve_precision(precision, torch.device(model.device))
    estimate = np.zeros((len(batch.truth), card.n_params))
    moving = batch.moving
    t0 = time.perf_counter()
    for it in range(iterations):
        if it > 0:
            moving = batch.resample_moving(estimate, card.transform, card.input_size, card.spacing_mm)
        shown = moving if moving_contrast is None else moving_contrast(moving)
        delta = predict_parameters(model, batch.fixed, shown, batch_size, precision=precision, symmetric=symmetric)
        estimate = geo.compose_params_2d(delta, estimate, card.transform) if it > 0 else delta
    if refine is not None:
        estimate = refine_pair_estimates(batch, estimate, refine[0], card.input_size, card.spacing_mm, refine[1])
    seconds = time.perf_counter() - t0
    rot, trans = geo.params_error_2d(estimate, batch.truth.double().numpy(), card.transform)
    return rot, trans, seconds


def refine_pair_estimates(batch: PairBatch, estimate: np.ndarray, fixed_contrast: str, size: tuple[int, int],
                          spacing_mm: float, metric: str) -> np.ndarray:
    """The engine's per-slice refinement (:func:`refine.refine_slices`, ``slices`` mode's
    ``--refine-slices``) applied to each pair's estimate ``(B, 3)``, rigid, from the pair's own
    volumes: returns the refined estimates in the same (slice-frame, resampling) convention.

    A pair's moving slice is its moving volume sampled through the pair's motion ``A`` and then
    the estimate ``T`` (:meth:`PairBatch.resample_moving`: ``moving(A(T(x)))``), so the refinement
    optimises the composed map ``A o T`` and the refined estimate is ``A^-1`` composed after it.
    Pairs are refined in groups that share their volumes."""
    from RigidResNetRegistrationLib.refine import refine_slices

    out = np.array(estimate, dtype=np.float64, copy=True)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, (subj, _, contrast, _) in enumerate(batch.sources):
        groups.setdefault((id(subj), contrast), []).append(i)
    for rows in groups.values():
        subj, contrast = batch.sources[rows[0]][0], batch.sources[rows[0]][2]
        motion = np.stack([batch.sources[i][3] for i in rows])
        slices = np.array([batch.sources[i][1] for i in rows])
        total = geo.compose_params_2d(out[rows], motion, "rigid")  # x -> A(T(x))
        res = refine_slices(subj.volumes[fixed_contrast], subj.ijk_to_ras[fixed_contrast], subj.volumes[contrast],
                            subj.ijk_to_ras[contrast], subj.frame, slices, total, size, spacing_mm, metric=metric)
        out[rows] = geo.compose_params_2d(res.params, geo.invert_params_2d(motion, "rigid"), "rigid")  # A^-1 after
    return out


def summarise(name: str, iterations: int, rot: np.ndarray, trans: np.ndarray, seconds: float, subjects: str = "",
              motion: str = "") -> EvalRow:
    return EvalRow(name, iterations, len(rot), float(np.median(rot)), float(np.percentile(rot, 90)),
                   float(np.median(trans)), float(np.percentile(trans, 90)),
                   float(np.mean((rot < 1.0) & (trans < 1.0))), 1000.0 * seconds / len(rot), subjects, motion)


def markdown_table(rows: list[EvalRow]) -> str:
    """One markdown table of the rows; with subject-group and motion columns where any row has them."""
    wide = any(r.subjects or r.motion for r in rows)
    head = ("| pairs | passes | n | rotation error median (deg) | rotation p90 | translation error median (mm) "
            "| translation p90 | success (<1 deg and <1 mm) | network ms / pair |")
    if wide:
        head = "| subjects | motion (deg / mm) " + head
    lines = [head, "|" + " --- |" * (11 if wide else 9)]
    for r in rows:
        first = f"| {r.subjects} | {r.motion} " if wide else ""
        lines.append(f"{first}| {r.pairs} | {r.iterations} | {r.n} | {r.rot_median:.3f} | {r.rot_p90:.3f} | {r.trans_median:.3f} "
                     f"| {r.trans_p90:.3f} | {100 * r.success:.1f}% | {r.ms_per_pair:.1f} |")
    return "\n".join(lines)


def parse_rows(specs: list[str], groups: set[str]) -> list[tuple[str, str]]:
    """``--rows`` ``GROUP:PAIRING`` -> ``(group, pairing)``; GROUP ``all`` or one of ``groups``."""
    out = []
    for spec in specs:
        group, _, pairing = spec.rpartition(":")
        group = group or "all"
        if pairing not in PAIRINGS:
            raise ValueError(f"--rows {spec}: the pairing must be one of {', '.join(PAIRINGS)}")
        if group != "all" and group not in groups:
            known = ", ".join(sorted(groups)) or "none: give --subjects-file with a group after each name"
            raise ValueError(f"--rows {spec}: no subject group {group!r} (groups: all, {known})")
        out.append((group, pairing))
    return out


def parse_motion(text: str) -> tuple[float, float]:
    """``--motions`` ``DEG/MM`` (e.g. ``30/30``) -> ``(deg, mm)``, both at least 0."""
    try:
        deg, mm = (float(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--motions takes DEG/MM pairs such as 5/5 or 30/30, not {text!r}") from None
    if not (deg >= 0 and mm >= 0 and np.isfinite(deg) and np.isfinite(mm)):
        raise ValueError(f"--motions {text}: both ranges must be at least 0")
    return deg, mm


def _volume_reader():
    """``volume(subject, contrast)``: the subject's volume of that contrast, read from its file the
    first time and kept for the calls after (one evaluation's subjects)."""
    from RigidResNetRegistrationLib.io import read_volume

    read: dict[tuple[str, str], object] = {}

    def volume(subj, contrast: str):
        if (subj.name, contrast) not in read:
            read[subj.name, contrast] = read_volume(subj.images[contrast])
        return read[subj.name, contrast]

    return volume


#: ``--volume-motion``: ``in-plane`` (rotation about the axial slice normal, translation in its
#: plane) or ``6dof`` (rotations about R, A and S through the volume centre and translations along
#: each, every one uniform in the ranges).
VOLUME_MOTIONS = ("in-plane", "6dof")


def evaluate_volumes(model: LoadedModel, subjects: list, fixed_contrast: str, moving_contrasts: list[str], n: int,
                     max_rot: float, max_trans: float, passes: list[int], seed: int, precision: str = "auto",
                     symmetric: bool = True, motion: str = "in-plane", refine: bool = True) -> list[EvalRow]:
    """Whole-volume registrations (engine, ``volume`` mode, its refinement on or off) of the moving
    contrast moved by known random motions (``motion``, :data:`VOLUME_MOTIONS`); one row per number of
    passes. ``n`` volumes, taking the subjects in turn. ``ms_per_pair`` is then ms per volume."""
    from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
    from RigidResNetRegistrationLib.sample import apply_known_motion, apply_known_transform

    volume = _volume_reader()  # a subject drawn again reuses its volumes
    rng = np.random.default_rng(seed)
    usable = [s for s in subjects if fixed_contrast in s.images and any(c in s.images for c in moving_contrasts)]
    if not usable:
        raise LookupError(f"no subject has {fixed_contrast} and one of {', '.join(moving_contrasts)}")
    errors: dict[int, list[tuple[float, float, float]]] = {p: [] for p in passes}
    for i in range(n):
        subj = usable[i % len(usable)]
        contrast = [c for c in moving_contrasts if c in subj.images][i % len([c for c in moving_contrasts if c in subj.images])]
        fixed, source = volume(subj, fixed_contrast), volume(subj, contrast)
        centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
        if motion == "6dof":
            truth = geo.rigid_matrix_3d(tuple(rng.uniform(-max_rot, max_rot, 3)), tuple(rng.uniform(-max_trans, max_trans, 3)), centre)
            moving = apply_known_transform(source, truth)
        else:
            params = np.r_[rng.uniform(-max_rot, max_rot), rng.uniform(-max_trans, max_trans, 2)]
            moving, truth = apply_known_motion(source, params)
        for p in passes:
            opts = RegistrationOptions(device=str(model.device), iterations=p, compute_registered=False, compute_difference=False,
                                       precision=precision, symmetric=symmetric, refine=refine)
            result = register_volumes(fixed, moving, model, opts)
            rot, trans = geo.rigid_error(result.fixed_to_moving_ras, truth, centre)
            errors[p].append((rot, trans, result.seconds))
    rows = []
    for p, e in errors.items():
        arr = np.array(e)
        rows.append(summarise("", p, arr[:, 0], arr[:, 1], float(arr[:, 2].sum())))
    return rows


#: ``--slices-mode`` rows: (label, fixed contrast, moving contrasts; ``t2-like``: the fixed T1 made
#: T2-like point by point, :func:`scans.t2_like_contrast`, exact truth).
SLICES_MODE_PAIRINGS = (("T1 -> T1", "t1", ["t1"]), ("T1 -> T2 / FLAIR", "t1", ["t2", "flair"]),
                        ("T1 -> T2-like (synthetic, exact)", "t1", ["t2-like"]))


def evaluate_slices_mode(model: LoadedModel, subjects: list, fixed_contrast: str, moving_contrasts: list[str], n: int,
                         max_rot: float, max_trans: float, seed: int, precision: str = "auto",
                         symmetric: bool = True) -> EvalRow:
    """The engine in ``slices`` mode (its defaults: one transform per slice, no refinement) on ``n``
    scans with motion *between* slices (:func:`scans.interslice_motion`: a common in-plane motion
    uniform in +-``max_rot`` deg / +-``max_trans`` mm, two steps during the scan, jitter per slice),
    made from each subject's moving contrast as delivered (it must lie on the fixed volume's grid)
    or from its T1 made T2-like (``t2-like``); the subjects taken in turn. One row over every
    registered slice: errors against each slice's own motion, ``iterations`` the engine's cap on the
    passes, ``ms_per_pair`` = engine ms per slice."""
    import torch

    from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
    from RigidResNetRegistrationLib.volume import Volume

    from .scans import apply_interslice_motion, interslice_motion, t2_like_contrast

    volume = _volume_reader()  # each volume read once: the grid check and the scans share it

    def on_fixed_grid(subj, contrast: str) -> bool:
        if contrast in ("t2-like", fixed_contrast):
            return True
        if contrast not in subj.images:
            return False
        a, b = volume(subj, fixed_contrast), volume(subj, contrast)
        return a.shape == b.shape and np.allclose(a.ijk_to_ras, b.ijk_to_ras, atol=1e-4)

    usable = [(s, c) for s in subjects if fixed_contrast in s.images for c in moving_contrasts if on_fixed_grid(s, c)]
    if not usable:
        raise LookupError(f"no subject has {fixed_contrast} and one of {', '.join(moving_contrasts)} on its grid")
    opts = RegistrationOptions(device=str(model.device), mode="slices", compute_registered=False, compute_difference=False,
                               precision=precision, symmetric=symmetric)
    rots, trans, seconds = [], [], 0.0
    for i in range(n):
        subj, contrast = usable[i % len(usable)]
        rng = np.random.default_rng([seed, i])
        fixed = volume(subj, fixed_contrast)
        if contrast == "t2-like":
            source = Volume(t2_like_contrast(torch.from_numpy(np.asarray(fixed.array, dtype=np.float32)), seed=i).numpy(),
                            fixed.ijk_to_ras.copy(), "T2-like")
        else:
            source = volume(subj, contrast)
        frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
        common = np.r_[rng.uniform(-max_rot, max_rot), rng.uniform(-max_trans, max_trans, 2)]
        params = interslice_motion(rng, fixed.shape[frame.axis], common)
        moving, _ = apply_interslice_motion(source, params)
        result = register_volumes(fixed, moving, model, opts)
        used = np.asarray(result.used, dtype=bool)
        r, t = geo.params_error_2d(np.asarray(result.slice_params)[used], params[used])
        rots.append(r)
        trans.append(t)
        seconds += result.seconds
    rot, tr = np.concatenate(rots), np.concatenate(trans)
    return summarise("", opts.iterations, rot, tr, seconds)  # passes: the engine's cap per slice


def main(argv: list[str] | None = None) -> int:
    """``rigid-resnet-evaluate``: every failure ends with one line ``error: ...`` and exit code 2."""
    from .train import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from RigidResNetRegistrationLib.model import DEFAULT_CARD, read_model_card, resolve_device

    from .train import TrainError, check_data_folders

    p = argparse.ArgumentParser(prog="rigid-resnet-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="held-out subject folders (or folders of subjects)")
    p.add_argument("--weights", help="model card (.json); default: the bundled model")
    p.add_argument("--pairs", type=int, default=200, help="pairs per row (default 200)")
    p.add_argument("--max-rotation-deg", type=float, default=5.0)
    p.add_argument("--max-translation-mm", type=float, default=5.0)
    p.add_argument("--iterations", type=int, nargs="+", default=[1], help="passes to report (e.g. 1 2 3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="network precision, as the engine's (default auto: bf16 where the device computes it natively)")
    p.add_argument("--no-symmetric", dest="symmetric", action="store_false",
                   help="predict each pair in one order only (the engine's --no-symmetric); by default each pair is "
                   "also predicted swapped and the two estimates combined inverse-consistently, as the engine does")
    p.add_argument("--refine-slices", action="store_true",
                   help="also report each pair refined on its image similarity after the passes (the engine's slices-mode "
                   "--refine-slices: NCC same contrast, MI across contrasts; rigid models only)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--volumes", type=int, default=0, metavar="N",
                   help="also register N whole volumes per contrast pairing (volume mode, engine) and report those errors "
                   "(per subject group with --subjects-file), at --max-rotation-deg / --max-translation-mm")
    p.add_argument("--volume-motion", default="in-plane", choices=VOLUME_MOTIONS,
                   help="the volumes' motions: in-plane (default) or 6dof (rotations about R, A, S and translations along "
                   "each, about the volume centre)")
    p.add_argument("--volume-no-refine", dest="volume_refine", action="store_false",
                   help="register the volumes without the engine's similarity refinement (its --no-refine: the network "
                   "and the start search alone)")
    p.add_argument("--slices-mode", type=int, default=0, metavar="N",
                   help="also run the engine in slices mode (its defaults) on N scans per pairing and subject group with "
                   "motion between slices (a common motion in --max-rotation-deg / --max-translation-mm, two steps, "
                   "jitter), and report the per-slice errors")
    p.add_argument("--subjects-file", help="evaluate only the subjects named in this file, one a line with an optional "
                   "group word after the name (e.g. training/holdout.txt: skull-stripped, whole-head)")
    p.add_argument("--subjects", nargs="+", default=[], help="evaluate only these subjects (names as the trainer's)")
    p.add_argument("--rows", nargs="+", default=None, metavar="GROUP:PAIRING",
                   help=f"rows to report: a subject group (all, or a group of --subjects-file) and a pairing "
                   f"({', '.join(PAIRINGS)}); default {' '.join(DEFAULT_ROWS)}")
    p.add_argument("--motions", nargs="+", default=None, metavar="DEG/MM",
                   help="motion ranges, each row at each (e.g. 5/5 30/30); default --max-rotation-deg/--max-translation-mm")
    p.add_argument("--orientations", nargs="+", default=["axial"], choices=ORIENTATIONS,
                   help="slice orientations to draw pairs from (default axial)")
    p.add_argument("--min-foreground", type=float, default=MIN_FOREGROUND,
                   help=f"draw only slices with at least this fraction of signal on the network grid (default {MIN_FOREGROUND:g}: "
                        "the slices the engine registers; tables before 2026-12-03 used 0.15)")
    a = p.parse_args(argv)
    for name, value, least in (("--pairs", a.pairs, 1), ("--threads", a.threads, 0), ("--volumes", a.volumes, 0),
                               ("--slices-mode", a.slices_mode, 0)):
        if value < least:
            raise TrainError(f"{name} must be at least {least}, not {value}")
    if any(not 1 <= it <= 10 for it in a.iterations):
        raise TrainError(f"--iterations must be from 1 to 10, not {' '.join(map(str, a.iterations))}")
    if not (a.max_rotation_deg >= 0 and a.max_translation_mm >= 0):
        raise TrainError("--max-rotation-deg and --max-translation-mm must be at least 0")
    if not 0.0 <= a.min_foreground < 1.0:
        raise TrainError(f"--min-foreground must be in [0, 1), not {a.min_foreground:g}")
    check_data_folders(a.data)
    resolve_device(a.device)  # CUDA asked for but absent: say so first
    if a.threads:
        torch.set_num_threads(a.threads)
    card = read_model_card(a.weights or DEFAULT_CARD)  # the grid; the network is loaded once subjects are found
    if a.refine_slices and card.transform != "rigid":
        raise TrainError("--refine-slices refines rigid estimates: this model is affine")
    groups: dict[str, str] = {}
    if a.subjects_file:
        if not Path(a.subjects_file).is_file():
            raise TrainError(f"--subjects-file not found: {a.subjects_file}")
        groups = read_holdout_file(a.subjects_file)
    wanted = set(a.subjects) | set(groups)
    try:
        row_specs = parse_rows(a.rows or DEFAULT_ROWS, {g for g in groups.values() if g})
        motions = [parse_motion(m) for m in a.motions] if a.motions else [(a.max_rotation_deg, a.max_translation_mm)]
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    wide = a.rows is not None or a.motions is not None  # the table names each row's subjects and motion
    subjects = []
    found = set()
    for root in a.data:
        for subj in find_subjects(Path(root)):
            if wanted and subj.name not in wanted:
                continue
            found.add(subj.name)
            subjects.extend(load_subject_views(subj, card.input_size, card.spacing_mm, a.orientations, a.min_foreground))
    if wanted - found:
        print(f"not found under {', '.join(a.data)}: {', '.join(sorted(wanted - found))}", file=sys.stderr)
    if not subjects:
        raise TrainError("no subjects with brain signal found under " + ", ".join(a.data)
                         + ": a subject is a folder of NIfTI volumes named by contrast (e.g. name_t1.nii.gz)")
    model = load_model(a.weights, a.device)
    card = model.card
    print(f"model {card.identity}, trained={card.trained}, device {model.device} "
          f"({resolve_precision(a.precision, torch.device(model.device))}, {'symmetric' if a.symmetric else 'one order'}), "
          f"subjects {sorted({s.name for s in subjects})} ({' '.join(a.orientations)}), motions "
          + ", ".join(f"+-{r:g} deg / +-{t:g} mm" for r, t in motions), flush=True)
    rows = []
    for (max_rot, max_trans), (group, pairing) in ((m, r) for m in motions for r in row_specs):
        name, fixed_c, moving_c = PAIRINGS[pairing]
        members = [s for s in subjects if group == "all" or groups.get(s.name) == group]
        try:
            batch = draw_pairs(members, model, a.pairs, max_rot, max_trans, fixed_c, moving_c, a.seed)
        except LookupError as exc:
            print(f"skipped {group + ': ' if wide else ''}{name}: {exc}", file=sys.stderr)
            continue
        contrast = None
        if pairing == "synth":
            batch, contrast = synthetic_pairs(batch, a.seed)
        label = {"subjects": group, "motion": f"+-{max_rot:g} / +-{max_trans:g}"} if wide else {}
        for it in a.iterations:
            rot, trans, seconds = evaluate_batch(model, batch, it, precision=a.precision, symmetric=a.symmetric,
                                                 moving_contrast=contrast)
            rows.append(summarise(name, it, rot, trans, seconds, **label))
            if a.refine_slices and fixed_c is not None:
                metric = "ncc" if moving_c == [fixed_c] else "mi"
                rot, trans, seconds = evaluate_batch(model, batch, it, precision=a.precision, symmetric=a.symmetric,
                                                     refine=(fixed_c, metric))
                # same contrast: both slices come from one volume, so at the truth the refinement's
                # sample points coincide exactly: an optimistic figure (the engine's moving volume is
                # another scan, or in the benchmark a resampled copy)
                note = "; one volume both sides, exact at the truth" if metric == "ncc" else ""
                rows.append(summarise(f"{name}, refined ({metric.upper()}{note})", it, rot, trans, seconds, **label))
    print(markdown_table(rows))
    by_group: dict[str, list] = {}  # the whole-volume rows: subjects (files) per --subjects-file group, else "all"
    if a.volumes or a.slices_mode:
        for subj in (s for root in a.data for s in find_subjects(Path(root)) if not wanted or s.name in wanted):
            by_group.setdefault(groups.get(subj.name) or "all", []).append(subj)
    if a.volumes:
        vrows = []
        motion = f"+-{a.max_rotation_deg:g} / +-{a.max_translation_mm:g}" + (" 6-DOF" if a.volume_motion == "6dof" else "")
        for group, members in sorted(by_group.items()):
            for name, fixed_c, moving_c in (("volumes T1 -> T1", "t1", ["t1"]), ("volumes T1 -> T2 / FLAIR", "t1", ["t2", "flair"])):
                try:
                    for row in evaluate_volumes(model, members, fixed_c, moving_c, a.volumes, a.max_rotation_deg,
                                                a.max_translation_mm, a.iterations, a.seed, a.precision, a.symmetric,
                                                a.volume_motion, a.volume_refine):
                        row.pairs = name + ("" if a.volume_refine else ", --no-refine")
                        if groups or a.volume_motion != "in-plane" or not a.volume_refine:  # else the table as it was
                            row.subjects, row.motion = group, motion
                        vrows.append(row)
                except LookupError as exc:
                    print(f"skipped {group + ': ' if groups else ''}{name}: {exc}", file=sys.stderr)
        print()
        print(markdown_table(vrows).replace("network ms / pair", "engine ms / volume"))
    if a.slices_mode:
        srows = []
        for group, members in sorted(by_group.items()):
            for name, fixed_c, moving_c in SLICES_MODE_PAIRINGS:
                try:
                    row = evaluate_slices_mode(model, members, fixed_c, moving_c, a.slices_mode, a.max_rotation_deg,
                                               a.max_translation_mm, a.seed, a.precision, a.symmetric)
                except LookupError as exc:
                    print(f"skipped {group}: slices mode {name}: {exc}", file=sys.stderr)
                    continue
                row.pairs = f"slices mode, motion between slices, {name}"
                row.subjects, row.motion = group, f"+-{a.max_rotation_deg:g} / +-{a.max_translation_mm:g}"
                srows.append(row)
        print()
        print(markdown_table(srows).replace("| passes | n |", "| passes | slices |")
              .replace("network ms / pair", "engine ms / slice"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
