"""Training data: subjects on disk -> random (fixed, moving) slice pairs with known motion.

Every pixel is produced by the product's own code: volumes are read by
``RigidResNetRegistrationLib.io.read_volume`` (header-aware, any orientation), slices are taken
on the fixed volume's slice frame (``geometry.slice_frame``) on the network grid
(``geometry.network_grid_points``), and the moving slice is the same (or another contrast's)
slice sampled at points moved by a random in-plane transform embedded with
``geometry.params_to_ras``, through ``resample.sample_volume_at_ras``: exactly how the engine
sees a moving volume at inference time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.io import IMAGE_SUFFIXES, ITK_VOLUME_SUFFIXES, NIFTI_SUFFIXES, read_volume
from RigidResNetRegistrationLib.options import MIN_FOREGROUND
from RigidResNetRegistrationLib.preprocess import foreground_threshold, normalise_slices
from RigidResNetRegistrationLib.resample import sample_volume_at_ras

from .synth import DEFAULT_SYNTH, SynthOptions, intensity_curve, random_curve_values, synthetic_contrast

#: File-name endings of each contrast: BraTS 2021 (_t1 _t1ce _t2 _flair), BraTS 2023
#: (-t1n -t1c -t2w -t2f) and generic names (t1, t2, flair, pd, ...).
CONTRAST_PATTERNS: dict[str, tuple[str, ...]] = {
    "t1": ("t1", "t1n", "t1w", "mprage"),
    "t1ce": ("t1ce", "t1c", "t1gd"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f"),
    "pd": ("pd", "pdw"),
}


def _stem(path: Path) -> str:
    """File name without its image suffix (``.nii.gz``, ``.nrrd``, ``.png``, ...)."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *ITK_VOLUME_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


#: SPM's templates name their contrast inside the last token: ``avg152T1`` is ``avg152``'s T1.
_SPM_TEMPLATES = {"avg152t1": "t1", "avg152t2": "t2", "avg152pd": "pd"}


def _split_contrast(stem: str) -> tuple[str, str] | None:
    """``(contrast, rest of the stem)`` of a file stem split at ``_ - .``: the last token if it
    names a contrast (``BraTS2021_00001_t1ce``, ``IXI012-HH-1211_T1``), else the last token that
    does (``Flair_subtrMeanDivStd``, ``studyforrest_t1w_2mm``); the rest is the stem without that
    token and the separator before it (after it, when it comes first). None: no contrast named."""
    if stem.lower() in _SPM_TEMPLATES:
        return _SPM_TEMPLATES[stem.lower()], stem[:-2]
    parts = re.split(r"([_\-.])", stem)  # tokens at even places, separators between
    for index in range(len(parts) - 1, -1, -2):
        for contrast, endings in CONTRAST_PATTERNS.items():
            if parts[index].lower() in endings:
                start = index if index == 0 else index - 1
                return contrast, "".join(parts[:start] + parts[start + 2 :])
    return None


def contrast_of(path: Path) -> str | None:
    """Canonical contrast name of an image file from its name (see :func:`_split_contrast`), or None."""
    found = _split_contrast(_stem(path))
    return found[0] if found else None


def subject_key(path: Path) -> str:
    """The part of a file's name that names the scanned person: the stem without its contrast
    token (``BraTS2021_00001_t1ce`` -> ``BraTS2021_00001``, ``studyforrest_t1w_2mm`` ->
    ``studyforrest_2mm``). Files of one folder with the same key are one subject's contrasts."""
    stem = _stem(path)
    found = _split_contrast(stem)
    return found[1] if found else stem


@dataclass
class Subject:
    """One subject: co-registered images of one or more contrasts (``contrast -> path``)."""

    name: str
    images: dict[str, Path] = field(default_factory=dict)


VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")


def find_subjects(root: str | Path) -> list[Subject]:
    """Subjects under ``root``. In each folder, the volumes (NIfTI, NRRD, MetaImage) of known
    contrasts are grouped by :func:`subject_key`: a folder of one person's contrasts (BraTS 2021/2023,
    generic naming) is one subject named after the folder; a folder of several people's scans (one
    contrast each, e.g. ``IXI012-HH-1211_T1.nii.gz``, ``IXI013-HH-1212_T1.nii.gz``) gives one subject
    per key, named by the key. A folder of 2D images gives one single-contrast subject per image
    (contrast ``t1`` unless named), named ``folder/stem``."""
    root = Path(root)
    subjects: list[Subject] = []
    folders = sorted({p.parent for p in root.rglob("*") if p.is_file()})
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        volumes = [p for p in files if p.name.lower().endswith(VOLUME_SUFFIXES) and contrast_of(p) is not None]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        groups: dict[str, Subject] = {}
        for p in volumes:
            key = subject_key(p)
            subject = groups.setdefault(key, Subject(key))
            subject.images.setdefault(contrast_of(p), p)
        if len(groups) == 1:
            next(iter(groups.values())).name = folder.name
        subjects.extend(groups.values())
        for p in images:
            subjects.append(Subject(f"{folder.name}/{p.stem}", {contrast_of(p) or "t1": p}))
    return subjects


#: Subjects with several contrasts that are *not* co-registered as delivered, with the
#: measurement: each contrast registered to the subject's T1 *without* a motion (the truth is the
#: identity; the engine's defaults, 2026-12-04; elastix agrees on BraTS2021_90003,
#: benchmarks/README.md). Across their contrasts a known motion is no truth: the speed benchmark
#: leaves them out, and the trainer's ``--cross-loss ncc`` scores their cross-contrast pairs by MI
#: (:attr:`PairBatch.counterpart_exact`). The other multi-contrast subjects measured 0.01-0.19 deg /
#: 0.01-0.33 mm the same way.
NOT_CO_REGISTERED = {
    "BraTS2021_90003": "its T2, FLAIR and T1ce lie 0.7-1.9 deg / 1.0-1.5 mm from its T1 as delivered "
                       "(ours and elastix alike, registered without motion): no known truth",
    "spm-templates": "its T2 and PD templates lie 0.3-0.5 deg / 0.4-0.6 mm from its T1 template (ours, registered "
                     "without motion)",
}

#: Slice orientations a subject can be seen in (``--orientations``).
ORIENTATIONS = ("axial", "coronal", "sagittal")


@dataclass
class LoadedSubject:
    """Voxels (float32 tensors) of one subject's contrasts, the slice frame of one orientation
    and that orientation's usable slices. The views of one subject in several orientations
    (:func:`load_subject_views`) share their voxel tensors."""

    name: str
    volumes: dict[str, torch.Tensor]
    ijk_to_ras: dict[str, np.ndarray]
    frame: geo.SliceFrame
    slices: np.ndarray  # slice indices with enough brain signal on the network grid
    thresholds: dict[str, float]
    orientation: str = "axial"


def load_subject_views(
    subject: Subject, size: tuple[int, int], spacing_mm: float, orientations: tuple[str, ...] | list[str] = ("axial",),
    min_foreground: float = MIN_FOREGROUND,
) -> list[LoadedSubject]:
    """Read a subject's volumes once and return one view per orientation that has slices with
    signal (``min_foreground`` of the network grid above the first contrast's foreground
    threshold; by default the engine's own rule, so that training sees every slice it registers): slices on the first contrast's slice frame of that orientation. A 2D image
    (a volume with a size-1 axis) is seen only across that axis."""
    volumes, affines, thresholds = {}, {}, {}
    for contrast, path in subject.images.items():
        vol = read_volume(path, str(path))  # errors name the whole path
        volumes[contrast] = torch.from_numpy(np.asarray(vol.array, dtype=np.float32).copy())
        affines[contrast] = vol.ijk_to_ras
        thresholds[contrast] = foreground_threshold(volumes[contrast])
    first = next(iter(subject.images))
    shape = tuple(volumes[first].shape)
    views = []
    for orientation in orientations:
        frame = geo.slice_frame(affines[first], shape, orientation)
        if min(shape) == 1 and shape[frame.axis] != 1:
            continue  # a 2D image has no slices across its plane
        pts = geo.network_grid_points(frame, size, spacing_mm)
        stack = sample_volume_at_ras(volumes[first], affines[first], pts)
        fg = (stack > thresholds[first]).float().mean(dim=(1, 2)).numpy()
        slices = np.flatnonzero(fg >= min_foreground)
        if len(slices):
            views.append(LoadedSubject(subject.name, volumes, affines, frame, slices, thresholds, orientation))
    return views


def load_subject(
    subject: Subject, size: tuple[int, int], spacing_mm: float, min_foreground: float = MIN_FOREGROUND, orientation: str = "axial"
) -> LoadedSubject | None:
    """Read a subject's volumes and find its slices of one orientation with brain signal (None if none)."""
    views = load_subject_views(subject, size, spacing_mm, (orientation,), min_foreground)
    return views[0] if views else None


@dataclass
class PairBatch:
    """A batch of training pairs. ``fixed``/``moving``: raw network-grid slices ``(B, H, W)``;
    ``truth``: ``(B, P)`` parameters that register them (used for validation metrics only);
    ``same_contrast``: ``(B,)`` bool. ``counterpart`` (drawn on request, else None): ``(B, H, W)``,
    the moving slice's anatomy in the *fixed* slice's contrast (the subject's fixed contrast
    sampled at the moving slice's points), where ``counterpart_exact`` ``(B,)`` is True: a
    same-contrast pair (the moving slice itself) or a cross-contrast pair of a subject whose
    contrasts are co-registered (not in :data:`NOT_CO_REGISTERED`); elsewhere the moving slice."""

    fixed: torch.Tensor
    moving: torch.Tensor
    truth: torch.Tensor
    same_contrast: torch.Tensor
    sources: list[tuple[LoadedSubject, int, str, np.ndarray]] = field(default_factory=list)
    counterpart: torch.Tensor | None = None
    counterpart_exact: torch.Tensor | None = None

    def resample_moving(self, estimates: np.ndarray, kind: str, size: tuple[int, int], spacing_mm: float) -> torch.Tensor:
        """Moving slices re-sampled from their volumes after applying the current estimates
        ``(B, P)``: ``image(A(T(x)))``, for iterative (warp, re-predict, compose) evaluation."""
        points = []
        for (subj, s, contrast, motion), est in zip(self.sources, estimates):
            pts = geo.network_grid_points(subj.frame, size, spacing_mm, np.array([s]))[0]
            both = geo.params_to_ras(motion, subj.frame, kind, s) @ geo.params_to_ras(est, subj.frame, kind, s)
            points.append(geo.apply_to_points(both, pts))
        out = torch.empty((len(points), *size), dtype=torch.float32)
        # one sampling call per source volume, for all its pairs at once
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (subj, _, contrast, _) in enumerate(self.sources):
            groups.setdefault((id(subj), contrast), []).append(i)
        for rows in groups.values():
            subj, contrast = self.sources[rows[0]][0], self.sources[rows[0]][2]
            out[rows] = sample_volume_at_ras(subj.volumes[contrast], subj.ijk_to_ras[contrast], np.stack([points[i] for i in rows])).float()
        return out


SMALL_MOTION_SCALE = 0.2  # "small" pairs move within a fifth of the ranges: what a second pass sees


def random_motion(rng: np.random.Generator, n: int, kind: str, max_rotation_deg: float, max_translation_mm: float,
                  max_affine: float = 0.05, small_fraction: float = 0.0) -> np.ndarray:
    """``(n, P)`` uniform random slice-frame parameters (rigid: +-deg, +-mm; affine adds +-max_affine).

    A share ``small_fraction`` of the rows (drawn at random) has its rotation and translation ranges
    scaled by :data:`SMALL_MOTION_SCALE`, so that training also sees the small residual motions the
    engine's later passes predict. With 0 no extra random numbers are drawn (earlier runs reproduce).
    """
    rot = rng.uniform(-max_rotation_deg, max_rotation_deg, n)
    tr = rng.uniform(-max_translation_mm, max_translation_mm, (n, 2))
    if small_fraction > 0:
        small = rng.random(n) < small_fraction
        rot[small] *= SMALL_MOTION_SCALE
        tr[small] *= SMALL_MOTION_SCALE
    if kind == "rigid":
        return np.column_stack([rot, tr])
    rig = geo.params_to_matrix_2d(np.column_stack([rot, tr]), "rigid")
    extra = np.eye(3)[None].repeat(n, 0)
    extra[:, :2, :2] += rng.uniform(-max_affine, max_affine, (n, 2, 2))
    return geo.matrix_to_params_2d(rig @ extra, "affine")


def sample_pairs(
    subjects: list[LoadedSubject],
    rng: np.random.Generator,
    batch_size: int,
    size: tuple[int, int],
    spacing_mm: float,
    kind: str = "rigid",
    max_rotation_deg: float = 5.0,
    max_translation_mm: float = 5.0,
    cross_contrast: float = 0.5,
    fixed_contrast: str | None = None,
    moving_contrasts: list[str] | None = None,
    small_motion: float = 0.0,
    multi_contrast_share: float = 0.0,
    counterparts: bool = False,
) -> PairBatch:
    """Draw a batch: random slice (all subjects' slices equally likely), contrast pair and motion
    (a share ``small_motion`` of the pairs within a fifth of the ranges, see :func:`random_motion`).
    ``multi_contrast_share`` > 0: that share of the pairs comes from subjects with several
    contrasts (the only real cross-contrast pairs), every slice equally likely within each group.
    ``counterparts``: also sample each pair's :attr:`PairBatch.counterpart` (one more slice per
    cross-contrast pair; the random draws are the same either way)."""
    motion = random_motion(rng, batch_size, kind, max_rotation_deg, max_translation_mm, small_fraction=small_motion)
    fixed, moving, same, sources, counterpart, exact = [], [], [], [], [], []
    weights = slice_weights(subjects, multi_contrast_share)
    for b in range(batch_size):
        subj = subjects[int(rng.choice(len(subjects), p=weights))]
        s = int(rng.choice(subj.slices))
        contrasts = list(subj.volumes)
        if fixed_contrast is not None:  # evaluation: roles given
            c_fixed = fixed_contrast
            options = [c for c in (moving_contrasts or [fixed_contrast]) if c in subj.volumes]
            c_moving = options[int(rng.integers(len(options)))]
        else:
            c_fixed = contrasts[int(rng.integers(len(contrasts)))]
            c_moving = c_fixed
            if len(contrasts) > 1 and rng.random() < cross_contrast:
                c_moving = [c for c in contrasts if c != c_fixed][int(rng.integers(len(contrasts) - 1))]
        pts = geo.network_grid_points(subj.frame, size, spacing_mm, np.array([s]))[0]
        motion_ras = geo.params_to_ras(motion[b], subj.frame, kind, s)
        moved_pts = geo.apply_to_points(motion_ras, pts)
        fixed.append(sample_volume_at_ras(subj.volumes[c_fixed], subj.ijk_to_ras[c_fixed], pts))
        moving.append(sample_volume_at_ras(subj.volumes[c_moving], subj.ijk_to_ras[c_moving], moved_pts))
        same.append(c_fixed == c_moving)
        sources.append((subj, s, c_moving, motion[b]))
        if counterparts:
            exact.append(c_fixed == c_moving or subj.name not in NOT_CO_REGISTERED)
            counterpart.append(moving[-1] if c_fixed == c_moving or not exact[-1] else
                               sample_volume_at_ras(subj.volumes[c_fixed], subj.ijk_to_ras[c_fixed], moved_pts))
    # moving(x) = image(A x): the registering (resampling) transform is A^-1
    truth = torch.as_tensor(geo.invert_params_2d(motion, kind), dtype=torch.float32)
    return PairBatch(torch.stack(fixed), torch.stack(moving), truth, torch.tensor(same), sources,
                     torch.stack(counterpart) if counterparts else None, torch.tensor(exact) if counterparts else None)


def slice_weights(subjects: list[LoadedSubject], multi_contrast_share: float = 0.0) -> np.ndarray:
    """Probability of drawing each subject (view): proportional to its slices, so every slice is
    equally likely; with ``multi_contrast_share`` > 0 (and subjects of both kinds) the subjects
    with several contrasts together get that share, the single-contrast ones the rest."""
    weights = np.array([len(s.slices) for s in subjects], dtype=np.float64)
    multi = np.array([len(s.volumes) > 1 for s in subjects])
    if multi_contrast_share > 0 and multi.any() and (~multi).any():
        weights[multi] *= multi_contrast_share / weights[multi].sum()
        weights[~multi] *= (1.0 - multi_contrast_share) / weights[~multi].sum()
    return weights / weights.sum()


def read_holdout_file(path: str | Path) -> dict[str, str]:
    """Subject names of a hold-out file (``training/holdout.txt``): one per line, an optional
    second word naming its evaluation group (``skull-stripped``, ``whole-head``), ``#`` comments.
    Returns ``name -> group`` (``""`` where none is given), in file order."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out[words[0]] = words[1] if len(words) > 1 else ""
    return out


def random_contrast(images: torch.Tensor, generator: torch.Generator, knots: int = 6) -> torch.Tensor:
    """A new random contrast per image ``(B, H, W)``: each image normalised to ``[0, 1]`` (1st/99th
    percentiles) and passed through its own random piecewise-linear map (``knots`` values uniform in
    [0.05, 1], not monotone; :func:`synth.intensity_curve`), background (below 0.02) kept at 0 as in
    every skull-stripped MRI. A point-wise map keeps the anatomy exactly where it was: with a moved
    copy of the fixed slice this makes a cross-contrast pair whose alignment is exact."""
    v = normalise_slices(images)
    mapped = intensity_curve(v, random_curve_values(generator, v.shape[0], knots), "linear")
    return torch.where(v > 0.02, mapped, torch.zeros_like(v))


def remap_same_contrast(batch: PairBatch, generator: torch.Generator, probability: float, synth: float = 0.0,
                        synth_options: SynthOptions = DEFAULT_SYNTH) -> PairBatch:
    """New contrasts for same-contrast pairs, which become cross-contrast pairs (MI loss) with their
    alignment exact. Each same-contrast pair, with ``probability`` (``--remap``), has its moving
    slice given a :func:`random_contrast`; with ``synth`` (``--synth``, one draw decides between the
    two: ``probability + synth <= 1``) both its slices get independent
    :func:`synth.synthetic_contrast` s (two new contrasts of one scan, whole heads included). Other
    pairs are unchanged. With both 0 nothing is drawn (earlier runs reproduce)."""
    if probability <= 0 and synth <= 0:
        return batch
    draw = torch.rand(len(batch.same_contrast), generator=generator)
    pick = (draw < probability) & batch.same_contrast
    both = (draw >= probability) & (draw < probability + synth) & batch.same_contrast
    if not pick.any() and not both.any():
        return batch
    fixed, moving = batch.fixed, batch.moving.clone()
    if pick.any():
        moving[pick] = random_contrast(batch.moving[pick], generator)
    if both.any():
        fixed = batch.fixed.clone()
        fixed[both] = synthetic_contrast(batch.fixed[both], generator, synth_options)
        moving[both] = synthetic_contrast(batch.moving[both], generator, synth_options)
    return replace(batch, fixed=fixed, moving=moving, same_contrast=batch.same_contrast & ~pick & ~both)


def augment_intensity(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random gamma, smooth multiplicative bias field and Gaussian noise on ``[0, 1]`` images
    ``(B, H, W)``, renormalised to ``[0, 1]``; the network must not learn one scanner's contrast."""
    b, h, w = images.shape
    if strength <= 0:
        return images
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    gamma = torch.exp((u(b, 1, 1) - 0.5) * 0.8 * strength)  # ~[0.67, 1.5]
    out = images.clamp(0, 1) ** gamma
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    basis = torch.stack([xx, yy, xx * yy, xx**2, yy**2])  # (5, H, W)
    coeffs = (u(b, 5) - 0.5) * 0.6 * strength
    out = out * torch.exp(torch.einsum("bk,khw->bhw", coeffs, basis))
    out = out + torch.randn(out.shape, generator=generator) * (u(b, 1, 1) * 0.03 * strength)
    return normalise_slices(out)
