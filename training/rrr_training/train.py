"""Train the slice regressor without parameter labels, then export weights + model card.

    rigid-resnet-train --data ../shared/data --holdout BraTS2021_90004 --out runs/rigid
    rigid-resnet-train --data ../shared/data --holdout-file training/holdout.txt --out runs/wide \
        --orientations axial coronal sagittal --synth 0.4 --max-rotation-deg 30 --max-translation-mm 30 \
        --curriculum-steps 10000 --stop-after 2000            # one session of a long run
    rigid-resnet-train --resume ... --out runs/wide       # continue from runs/wide/last.pt
    rigid-resnet-train export runs/rigid/best.pt          # -> RigidResNetRegistration/Resources/Models
    rigid-resnet-train throughput --data ../shared/data/ixi-t1-2mm   # steps/s per precision and batch size
    torchrun --nproc_per_node 4 -m rrr_training.train --data ... --holdout ... --out runs/rigid   # 4 GPUs

Defaults run on a laptop CPU (128x128 grid at 1.5 mm, batch 16); ``--precision auto`` trains under
bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16 / AMX), where it was measured
faster. ``OUT/compute.csv`` logs each session's steps, wall hours, device, threads and precision.
Under ``torchrun`` every process trains on its own GPU (cuda:LOCAL_RANK; gloo processes on CPU)
with DistributedDataParallel: ``--batch-size`` is per process, the global batch is batch size x
number of processes; only rank 0 validates and writes the run folder.
Bad input (missing data folder, no subjects, a corrupt image, bad numbers, CUDA asked for but
absent, an output folder that cannot be written) ends with one line ``error: ...`` on stderr and
exit code 2, no traceback (set ``RIGID_RESNET_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from RigidResNetRegistrationLib import distributed as lib_distributed
from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.distributed import Distributed, DistributedError
from RigidResNetRegistrationLib.engine import resolve_precision
from RigidResNetRegistrationLib.model import MODELS_DIR, ModelCard, ResNetRegressor, save_weights
from RigidResNetRegistrationLib.options import MIN_FOREGROUND
from RigidResNetRegistrationLib.preprocess import normalise_slices

from .data import (
    ORIENTATIONS,
    LoadedSubject,
    PairBatch,
    augment_intensity,
    find_subjects,
    load_subject_views,
    read_holdout_file,
    remap_same_contrast,
    sample_pairs,
)
from .losses import similarity_loss

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: How a cross-contrast pair is scored, for ``--remap-loss`` (remapped and synthetic pairs) and
#: ``--cross-loss`` (real ones): by MI, or by NCC against the moving anatomy in the fixed contrast
#: (:func:`training_inputs`).
PAIR_LOSSES = ("mi", "ncc")
#: ``--precision``: the network's arithmetic in training (bf16: autocast, on CUDA or the CPU).
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
#: The default hold-out list (``--holdout-file``): subjects never trained on, named in the model card.
DEFAULT_HOLDOUT_FILE = Path(__file__).resolve().parents[1] / "holdout.txt"


class TrainError(ValueError):
    """Bad trainer input: the message is one clear line, shown as ``error: <message>``."""


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    holdout: list[str]
    transform: str = "rigid"
    size: int = 128
    spacing_mm: float = 1.5
    hidden: int = 256
    batch_size: int = 16
    steps: int = 20000
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_rotation_deg: float = 5.0
    max_translation_mm: float = 5.0
    cross_contrast: float = 0.5
    small_motion: float = 0.0
    remap: float = 0.0
    remap_loss: str = "mi"
    cross_loss: str = "mi"
    synth: float = 0.0
    multi_contrast_share: float = 0.0
    orientations: list[str] = field(default_factory=lambda: ["axial"])
    min_foreground: float = MIN_FOREGROUND
    curriculum_steps: int = 0
    curriculum_start_rotation_deg: float = 5.0
    curriculum_start_translation_mm: float = 5.0
    precision: str = "auto"
    freeze_bn: bool = False
    augment: float = 1.0
    flip: float = 0.5
    init: str = ""
    val_every: int = 250
    val_pairs: int = 128
    patience: int = 20
    seed: int = 0
    threads: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`TrainError` for values training cannot run with (one line per problem)."""
        if self.transform not in geo.N_PARAMS:
            raise TrainError(f"--transform must be rigid or affine, not {self.transform!r}")
        positive_int = {"size": 32, "hidden": 1, "batch_size": 2, "steps": 1, "val_every": 1, "val_pairs": 1, "patience": 1,
                        "curriculum_steps": 0}
        for key, least in positive_int.items():
            value = getattr(self, key)
            if not isinstance(value, int) or value < least:
                raise TrainError(f"--{key.replace('_', '-')} must be an integer of at least {least}, not {value!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise TrainError(f"--threads must be 0 (all cores) or a positive integer, not {self.threads!r}")
        ranges = {"spacing_mm": (0.1, 10.0), "lr": (0.0, 1.0), "weight_decay": (0.0, 1.0), "max_rotation_deg": (0.0, 45.0),
                  "max_translation_mm": (0.0, 100.0), "cross_contrast": (0.0, 1.0), "small_motion": (0.0, 1.0), "remap": (0.0, 1.0), "augment": (0.0, 10.0), "flip": (0.0, 1.0),
                  "synth": (0.0, 1.0), "multi_contrast_share": (0.0, 1.0), "curriculum_start_rotation_deg": (0.0, 45.0),
                  "curriculum_start_translation_mm": (0.0, 100.0), "min_foreground": (0.0, 0.99)}
        for key, (lo, hi) in ranges.items():
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi) or (key == "lr" and value == 0):
                raise TrainError(f"--{key.replace('_', '-')} must be a number in [{lo:g}, {hi:g}]"
                                 f"{' above 0' if key == 'lr' else ''}, not {value!r}")
        if self.remap + self.synth > 1.0 + 1e-9:
            raise TrainError(f"--remap and --synth are shares of the same-contrast pairs: their sum must be at most 1, "
                             f"not {self.remap:g} + {self.synth:g}")
        if not self.orientations or any(o not in ORIENTATIONS for o in self.orientations) or len(set(self.orientations)) < len(self.orientations):
            raise TrainError(f"--orientations must name distinct orientations among {', '.join(ORIENTATIONS)}, not {self.orientations!r}")
        if self.precision not in TRAIN_PRECISIONS:
            raise TrainError(f"--precision must be {', '.join(TRAIN_PRECISIONS)}, not {self.precision!r}")
        if self.remap_loss not in PAIR_LOSSES:
            raise TrainError(f"--remap-loss must be {' or '.join(PAIR_LOSSES)}, not {self.remap_loss!r}")
        if self.cross_loss not in PAIR_LOSSES:
            raise TrainError(f"--cross-loss must be {' or '.join(PAIR_LOSSES)}, not {self.cross_loss!r}")
        if not isinstance(self.freeze_bn, bool):
            raise TrainError(f"freeze_bn must be True or False, not {self.freeze_bn!r}")
        if not self.data:
            raise TrainError("give at least one data folder: --data FOLDER")


def check_data_folders(folders: list[str]) -> None:
    """Every ``--data`` entry must be an existing folder."""
    for folder in folders:
        p = Path(folder)
        if not p.exists():
            raise TrainError(f"data folder not found: {p}")
        if not p.is_dir():
            raise TrainError(f"data path is not a folder: {p}")


def prepare_run_folder(out: str | Path) -> Path:
    """Create the run folder and check that files can be written in it (before any heavy work)."""
    import tempfile

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise TrainError(f"output path exists and is not a folder: {p}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise TrainError(f"output folder is not writable: {p} ({exc.strerror or exc.__class__.__name__})") from None
    return p


def initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict to start from (``--init``): a training checkpoint (``best.pt``/``last.pt``) or an
    exported weights file (``.pt`` beside its model card); tensors only, no code is unpickled."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"--init weights not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        raise TrainError(f"--init is not a readable weights file: {p} ({exc.__class__.__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainError(f"--init holds no state dict: {p}")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def mirror_pairs(x: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Mirror both slices of some pairs ``(B, 2, H, W)`` left-right (along ex, the width axis).

    A mirrored pair is another valid training pair (the loss needs no labels): its registering
    transform is the mirror image of the original one (theta and tx change sign, ty does not).
    Seeing both teaches the network that symmetry, which removes a constant bias in theta and tx.
    """
    if probability <= 0:
        return x
    flip = torch.rand(x.shape[0], generator=generator) < probability
    if not flip.any():
        return x
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_subjects(cfg: TrainConfig, need_validation: bool = True) -> tuple[list[LoadedSubject], list[LoadedSubject]]:
    """Load all subjects found under ``cfg.data``, one view per orientation of ``cfg.orientations``;
    those named in ``cfg.holdout`` validate."""
    train, val = [], []
    size = (cfg.size, cfg.size)
    found = 0
    for root in cfg.data:
        for subj in find_subjects(root):
            found += 1
            views = load_subject_views(subj, size, cfg.spacing_mm, cfg.orientations, cfg.min_foreground)  # a corrupt image: InputError naming the file
            (val if any(h == subj.name for h in cfg.holdout) else train).extend(views)
    if not found:
        raise TrainError(
            "no subjects found under " + ", ".join(cfg.data) + ": a subject is a folder of NIfTI volumes named by "
            "contrast (e.g. name_t1.nii.gz, name-t2w.nii.gz, sub-01_T1w.nii.gz) or a folder of 2D images"
        )
    if not train:
        raise TrainError("no training subjects with brain signal found under " + ", ".join(cfg.data)
                         + " (every subject found is held out or has no slice with signal)")
    if not val and need_validation:
        raise TrainError("no validation subject: name one with --holdout (a subject folder name)")
    return train, val


def prepare_inputs(batch: PairBatch, generator: torch.Generator | None, augment: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise a batch; returns (network input (B,2,H,W), clean fixed, clean moving)."""
    f = normalise_slices(batch.fixed)
    m = normalise_slices(batch.moving)
    if generator is not None and augment > 0:
        x = torch.stack([augment_intensity(f, generator, augment), augment_intensity(m, generator, augment)], 1)
    else:
        x = torch.stack([f, m], 1)
    return x, f, m


def training_inputs(batch: PairBatch, remapped: PairBatch, generator: torch.Generator | None, augment: float,
                    remap_loss: str = "mi", cross_loss: str = "mi") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's network input ``(B, 2, H, W)``, loss images (fixed, moving) and ``(B,)``
    same-contrast flags (NCC loss where True, MI where False). ``remapped`` is ``batch`` after
    :func:`data.remap_same_contrast`. ``remap_loss`` ``mi``: a remapped pair is a cross-contrast
    pair in the input and in the loss. ``ncc``: the network sees the remapped moving slice, but the
    loss compares the *original* moving slice (the fixed one's contrast, the same anatomy) by NCC:
    a cross-contrast input scored as sharply as a same-contrast pair, still without labels.
    ``cross_loss`` ``ncc`` does the same for the *real* cross-contrast pairs (a T2 slice moved
    against a T1 slice) whose subject's contrasts are co-registered: the loss compares the moving
    slice's counterpart in the fixed contrast (``batch.counterpart``, drawn with
    ``sample_pairs(..., counterparts=True)``) by NCC; ``mi`` (and pairs without an exact
    counterpart) keep MI on the moving slice itself."""
    x, f, m = prepare_inputs(remapped, generator, augment)
    same = remapped.same_contrast
    if remap_loss == "ncc":  # --synth also gives the fixed slice a new contrast: score the original
        f = f if remapped.fixed is batch.fixed else normalise_slices(batch.fixed)
        m, same = normalise_slices(batch.moving), batch.same_contrast
    if cross_loss == "ncc" and batch.counterpart is not None:  # drawn with counterpart_exact
        real = ~batch.same_contrast & batch.counterpart_exact  # never remapped: remapping takes same-contrast pairs
        if real.any():
            m = torch.where(real[:, None, None], normalise_slices(batch.counterpart), m)
            same = same | real
    return x, f, m, same


def motion_ranges(cfg: TrainConfig, step: int) -> tuple[float, float]:
    """``(rotation deg, translation mm)`` ranges of the motions drawn at ``step`` (0-based).
    Without a curriculum (``curriculum_steps`` 0): the maximum ranges. With one: widening linearly
    from the start ranges at step 0 to the maximum ranges at ``curriculum_steps``, then kept."""
    if cfg.curriculum_steps <= 0:
        return cfg.max_rotation_deg, cfg.max_translation_mm
    t = min(1.0, step / cfg.curriculum_steps)
    return (cfg.curriculum_start_rotation_deg + t * (cfg.max_rotation_deg - cfg.curriculum_start_rotation_deg),
            cfg.curriculum_start_translation_mm + t * (cfg.max_translation_mm - cfg.curriculum_start_translation_mm))


#: Whether ``--precision auto`` trains in bf16 on a CPU that computes bf16 natively (AVX-512 BF16 /
#: AMX): set from the measurement in training/README.md ("Throughput on the CPU").
CPU_AUTO_BF16 = True


def training_precision(name: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` (autocast) for training on ``device``: ``auto`` is bf16 on CUDA GPUs
    that support it, and on CPUs with native bf16 when :data:`CPU_AUTO_BF16` says it was measured
    faster there; fp32 elsewhere. An explicit choice is kept."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and CPU_AUTO_BF16:
        return resolve_precision("auto", device)
    return "fp32"


def draw_training_batch(subjects: list[LoadedSubject], rng: np.random.Generator, gen: torch.Generator, cfg: TrainConfig,
                        step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's pairs: network input ``(B, 2, H, W)``, loss images (fixed, moving) and
    same-contrast flags, drawn at the motion ranges of ``step`` (:func:`motion_ranges`), with
    ``--remap`` / ``--synth`` contrasts, intensity augmentation and ``--flip`` mirroring."""
    rot, trans = motion_ranges(cfg, step)
    batch = sample_pairs(subjects, rng, cfg.batch_size, (cfg.size, cfg.size), cfg.spacing_mm, cfg.transform, rot, trans,
                         cfg.cross_contrast, small_motion=cfg.small_motion, multi_contrast_share=cfg.multi_contrast_share,
                         counterparts=cfg.cross_loss == "ncc")
    remapped = remap_same_contrast(batch, gen, cfg.remap, cfg.synth)
    x, f, m, same = training_inputs(batch, remapped, gen, cfg.augment, cfg.remap_loss, cfg.cross_loss)
    both = mirror_pairs(torch.cat([x, torch.stack([f, m], 1)], 1), gen, cfg.flip)  # same mirror for inputs and loss images
    return both[:, :2], both[:, 2], both[:, 3], same


def optimisation_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
                      f: torch.Tensor, m: torch.Tensor, same: torch.Tensor, cfg: TrainConfig, device: torch.device,
                      precision: str) -> tuple[float, dict[str, float]]:
    """Forward (bf16 autocast when ``precision`` is bf16), loss, backward, clipped optimiser
    step; returns the loss and its NCC / MI."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        pred = model(x.to(device))
    loss, stats = similarity_loss(f.to(device), m.to(device), pred.float(), same, cfg.transform, cfg.spacing_mm)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # DDP: gradients averaged over ranks here
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    scaler.step(opt)
    scaler.update()
    return loss.item(), stats


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


COMPUTE_FIELDS = ["session_start", "session_end", "step_start", "step_end", "saved_step", "wall_hours", "steps_per_hour",
                  "device", "processes", "threads", "precision", "batch_size", "host", "torch"]


class ComputeLog:
    """``OUT/compute.csv``: one row per training session (a fresh run starts the file, each
    ``--resume`` appends a row): start and end time (UTC), the steps it began and ended at, the
    step of the last checkpoint it saved (what a later ``--resume`` continues from), wall hours,
    device, processes, threads, precision, batch size per process, host and torch version. The
    row is rewritten at every checkpoint and when the session ends, so a killed session keeps
    the time up to its last checkpoint. ``started``: when the session began (before reading the
    data), now if not given."""

    def __init__(self, path: Path, resume: bool, step: int, device: torch.device, precision: str, cfg: TrainConfig,
                 processes: int, started: datetime.datetime | None = None) -> None:
        import platform

        self.path = path
        self.start = started or utc_now()
        self.rows: list[dict] = []
        if resume and path.exists():
            with open(path, newline="") as fh:
                self.rows = list(csv.DictReader(fh))
        self.row = {"session_start": self.start.isoformat(timespec="seconds"), "step_start": step, "device": str(device),
                    "processes": processes, "threads": torch.get_num_threads(), "precision": precision,
                    "batch_size": cfg.batch_size, "host": platform.node(), "torch": torch.__version__}
        self.rows.append(self.row)
        self.update(step, step)

    def update(self, step: int, saved_step: int) -> None:
        end = utc_now()
        hours = (end - self.start).total_seconds() / 3600.0
        done = saved_step - int(self.row["step_start"])
        self.row.update({"session_end": end.isoformat(timespec="seconds"), "step_end": step, "saved_step": saved_step,
                         "wall_hours": f"{hours:.4f}", "steps_per_hour": f"{done / hours:.1f}" if hours > 0 else ""})
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COMPUTE_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """``model.train()``; with ``freeze_bn`` every batch norm stays in evaluation mode: it
    normalises with its running statistics and does not update them (its scale and shift still
    learn), so a fine-tune on another mix of pairs cannot move the statistics the network was
    trained with."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def evaluate_batch(model: torch.nn.Module, batch: PairBatch, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Validation metrics: loss, and median rotation/translation errors (same / cross contrast)."""
    model.eval()
    x, f, m = prepare_inputs(batch, None, 0.0)
    with torch.inference_mode():
        pred = torch.cat([model(x[i : i + 32].to(device)).float().cpu() for i in range(0, len(x), 32)])
        loss, _ = similarity_loss(f, m, pred, batch.same_contrast, cfg.transform, cfg.spacing_mm)
    rot, tr = geo.params_error_2d(pred.double().numpy(), batch.truth.double().numpy(), cfg.transform)
    same = batch.same_contrast.numpy()
    out = {"val_loss": float(loss)}
    for name, sel in (("same", same), ("cross", ~same)):
        out[f"rot_med_{name}"] = float(np.median(rot[sel])) if sel.any() else float("nan")
        out[f"trans_med_{name}"] = float(np.median(tr[sel])) if sel.any() else float("nan")
    out["score"] = float(np.median(rot) + np.median(tr))
    set_train_mode(model, cfg.freeze_bn)
    return out


def plot_curves(log_path: Path, png_path: Path) -> None:
    """PNG of the training/validation curves from the CSV log (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = list(csv.DictReader(open(log_path)))
    if not rows:
        return
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(step, [float(r["train_loss"]) for r in rows], label="train loss")
    ax[0].plot(step, [float(r["val_loss"]) for r in rows], label="val loss")
    ax[0].set_xlabel("step")
    ax[0].legend()
    for key in ("rot_med_same", "trans_med_same", "rot_med_cross", "trans_med_cross"):
        ax[1].plot(step, [float(r[key]) for r in rows], label=key)
    ax[1].set_yscale("log")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("median error (deg / mm)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def distributed_from_env(environ: dict | None = None) -> Distributed:
    """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``); absent or 1: one process."""
    try:
        return lib_distributed.distributed_from_env(environ)
    except DistributedError as exc:
        raise TrainError(str(exc)) from None


def training_device(name: str, dist_info: Distributed) -> torch.device:
    """``--device`` resolved; under ``torchrun`` on CUDA each process takes cuda:LOCAL_RANK."""
    try:
        return lib_distributed.process_device(name, dist_info)
    except DistributedError as exc:
        raise TrainError(str(exc)) from None


_GROUPS_STARTED = 0  # process groups this process has started (the same count on every rank)


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run training; returns the path of the best checkpoint. ``stop_after`` ends this run (a
    session) after that many steps, validated and checkpointed there (``--resume`` continues; the
    pairs drawn are those of an uninterrupted run).

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) every process joins a process group (nccl on
    CUDA, gloo on CPU), trains a DistributedDataParallel copy of the model on its own pairs
    (random streams seeded with ``seed + rank``; ``batch_size`` is per process, so the global batch
    is ``batch_size x WORLD_SIZE``) and only rank 0 validates, prints and writes the run folder.
    Rank 0 decides early stopping for all; checkpoints hold the plain model's state dict and the
    random state of every rank, so that ``--resume`` with the same number of processes continues
    exactly."""
    cfg.validate()
    check_data_folders(cfg.data)
    dist_info = distributed_from_env()
    device = training_device(cfg.device, dist_info)
    out = prepare_run_folder(cfg.out)
    if not dist_info.enabled:
        return _train(cfg, resume, stop_after, device, out, dist_info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        # torchrun's store outlives the group: a fresh key prefix per group lets one process call
        # train() again (a plain init_process_group would reuse the keys of the destroyed group)
        global _GROUPS_STARTED
        _GROUPS_STARTED += 1
        store, rank, world_size = next(dist.rendezvous("env://"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                store=dist.PrefixStore(f"rigid_resnet_train/{_GROUPS_STARTED}", store))
    try:
        return _train(cfg, resume, stop_after, device, out, dist_info)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _gather(obj, dist_info: Distributed) -> list:
    """``obj`` of every rank, in rank order (just ``[obj]`` in a single process)."""
    if not dist_info.enabled:
        return [obj]
    objs: list = [None] * dist_info.world_size
    dist.all_gather_object(objs, obj)
    return objs


def _train(cfg: TrainConfig, resume: bool, stop_after: int | None, device: torch.device, out: Path,
           dist_info: Distributed) -> Path:
    main_rank = dist_info.is_main
    started = utc_now()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)  # same on every rank: the same initial model (DDP also broadcasts rank 0's)
    train_subjects, val_subjects = load_subjects(cfg)
    if main_rank:
        print(f"train subjects: {[s.name for s in train_subjects]}; validation: {[s.name for s in val_subjects]}", flush=True)
        if dist_info.enabled:
            print(f"distributed: {dist_info.world_size} processes on {device.type}, "
                  f"global batch {cfg.batch_size * dist_info.world_size}", flush=True)
    size = (cfg.size, cfg.size)
    val_batch = None
    if main_rank:
        val_batch = sample_pairs(val_subjects, np.random.default_rng(12345), cfg.val_pairs, size, cfg.spacing_mm,
                                 cfg.transform, cfg.max_rotation_deg, cfg.max_translation_mm, 0.5)

    net = ResNetRegressor(geo.N_PARAMS[cfg.transform], cfg.hidden)
    if cfg.init:
        try:
            net.load_state_dict(initial_weights(cfg.init))
        except RuntimeError:
            raise TrainError(f"--init weights do not fit a {cfg.transform} model with --hidden {cfg.hidden}: {cfg.init}") from None
        if main_rank:
            print(f"initialised from {cfg.init}", flush=True)
    net = net.to(device)
    precision = training_precision(cfg.precision, device)
    if main_rank:
        print(f"training on {device.type} ({precision}, {torch.get_num_threads()} threads), "
              f"{sum(len(s.slices) for s in train_subjects)} training slices in {len(train_subjects)} subject views", flush=True)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    seed = cfg.seed + dist_info.rank  # each rank draws its own pairs
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    step, best, bad = 0, float("inf"), 0
    last = out / "last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=True)  # tensors, numbers, dicts only: no code
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, best, bad = ck["step"], ck["best"], ck["bad"]
        rng_states = ck.get("rng_ranks") or [ck["rng"]]
        gen_states = ck.get("gen_ranks") or [ck["gen"]]
        if len(rng_states) == dist_info.world_size:
            rng.bit_generator.state = rng_states[dist_info.rank]
            gen.set_state(gen_states[dist_info.rank])
        else:  # another number of processes: new streams, still reproducible
            sequence = np.random.SeedSequence([cfg.seed, dist_info.rank, step])
            rng = np.random.default_rng(sequence)
            gen.manual_seed(int(sequence.generate_state(1)[0]))
            if main_rank:
                print(f"{last} was written by {len(rng_states)} process(es), this run has {dist_info.world_size}: "
                      "random streams re-seeded from seed, rank and step", flush=True)
        if main_rank:
            print(f"resumed from {last} at step {step}", flush=True)
    model: torch.nn.Module = net
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    log_path = out / "log.csv"
    fields = ["step", "time_s", "lr", "train_loss", "train_ncc", "train_mi", "val_loss",
              "rot_med_same", "trans_med_same", "rot_med_cross", "trans_med_cross", "score"]
    if main_rank:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if not (resume and log_path.exists()):
            with open(log_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writeheader()
    compute = ComputeLog(out / "compute.csv", resume, step, device, precision, cfg, dist_info.world_size, started) if main_rank else None
    saved_step = step
    t0 = time.time()
    running: list[float] = []
    ncc_run: list[float] = []
    mi_run: list[float] = []
    set_train_mode(model, cfg.freeze_bn)
    stop_at = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    try:
        while step < stop_at:
            x, f, m, same = draw_training_batch(train_subjects, rng, gen, cfg, step)
            loss_value, stats = optimisation_step(model, opt, scaler, x, f, m, same, cfg, device, precision)
            sched.step()
            step += 1
            running.append(loss_value)
            ncc_run.append(stats["ncc"])
            mi_run.append(stats["mi"])
            if main_rank and step % 25 == 0:
                print(f"step {step}/{cfg.steps} loss {np.mean(running[-25:]):.4f} {time.time() - t0:.0f}s", flush=True)
            if step % cfg.val_every == 0 or step == cfg.steps or step == stop_at:  # a session's end is a checkpoint too
                train_means = [float(np.mean(running)), float(np.mean(ncc_run)), float(np.mean(mi_run))]
                random_states = _gather((rng.bit_generator.state, gen.get_state()), dist_info)
                stop = False
                if dist_info.enabled:  # train metrics of all ranks' pairs
                    t = torch.tensor(train_means, dtype=torch.float64, device=device)
                    dist.all_reduce(t)
                    train_means = (t / dist_info.world_size).tolist()
                running, ncc_run, mi_run = [], [], []
                if main_rank:
                    metrics = evaluate_batch(net, val_batch, cfg, device)
                    row = {"step": step, "time_s": round(time.time() - t0, 1), "lr": opt.param_groups[0]["lr"],
                           "train_loss": train_means[0], "train_ncc": train_means[1], "train_mi": train_means[2], **metrics}
                    with open(log_path, "a", newline="") as fh:
                        csv.DictWriter(fh, fieldnames=fields).writerow({k: row[k] for k in fields})
                    print("val " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
                    if metrics["score"] < best:
                        best, bad = metrics["score"], 0
                        torch.save({"model": net.state_dict(), "config": asdict(cfg), "step": step, "metrics": metrics}, out / "best.pt")
                    else:
                        bad += 1
                    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                "step": step, "best": best, "bad": bad, "rng": rng.bit_generator.state,
                                "gen": gen.get_state(), "world_size": dist_info.world_size,
                                "rng_ranks": [r for r, _ in random_states], "gen_ranks": [g for _, g in random_states],
                                "config": asdict(cfg)}, last)
                    plot_curves(log_path, out / "curves.png")
                    saved_step = step
                    compute.update(step, saved_step)
                    stop = bad >= cfg.patience
                    if stop:
                        print(f"early stop: no validation improvement in {bad} checks", flush=True)
                if dist_info.enabled:  # every rank follows rank 0's decision
                    flag = torch.tensor([int(stop)], device=device)
                    dist.broadcast(flag, 0)
                    stop = bool(flag.item())
                if stop:
                    break
    finally:
        if compute is not None:  # the session's row, also when interrupted
            compute.update(step, saved_step)
    return out / "best.pt"


def _training_facts(ck: dict) -> dict:
    """The model card's ``training`` entry for a checkpoint: its run's options and validation."""
    cfg = ck["config"]
    return {"data": cfg["data"], "holdout": cfg["holdout"], "steps": ck["step"],
            "batch_size": cfg["batch_size"], "ranges": {"rotation_deg": cfg["max_rotation_deg"], "translation_mm": cfg["max_translation_mm"]},
            "cross_contrast_fraction": cfg["cross_contrast"], "small_motion_fraction": cfg.get("small_motion", 0.0),
            "remap_fraction": cfg.get("remap", 0.0), "remap_loss": cfg.get("remap_loss", "mi"),
            "cross_loss": cfg.get("cross_loss", "mi"),
            "batch_norm_frozen": cfg.get("freeze_bn", False),
            "synthetic_contrast_fraction": cfg.get("synth", 0.0),
            "multi_contrast_share": cfg.get("multi_contrast_share", 0.0),
            "orientations": cfg.get("orientations", ["axial"]),
            "min_foreground": cfg.get("min_foreground", 0.15),  # runs before it was an option drew at 0.15
            "curriculum": {"steps": cfg.get("curriculum_steps", 0),
                           "start_rotation_deg": cfg.get("curriculum_start_rotation_deg", 5.0),
                           "start_translation_mm": cfg.get("curriculum_start_translation_mm", 5.0)},
            "precision": cfg.get("precision", "auto"),
            "losses": "1-NCC same contrast, -MI (Parzen, 32 bins) cross contrast" + (
                "; real cross-contrast pairs of co-registered subjects: 1-NCC against the moving slice's counterpart "
                "in the fixed contrast" if cfg.get("cross_loss", "mi") == "ncc" else ""),
            "validation_at_checkpoint": ck.get("metrics", {})}


def _checkpoint_network(ck: dict) -> ResNetRegressor:
    cfg = ck["config"]
    model = ResNetRegressor(geo.N_PARAMS[cfg["transform"]], cfg["hidden"])
    model.load_state_dict(ck["model"])
    return model


def export(checkpoint: str | Path, models_dir: str | Path = MODELS_DIR, name: str | None = None, extra: dict | None = None,
           fine: str | Path | None = None, fine_below: float = 3.0, mirror: bool = False) -> Path:
    """Write fp16 weights and the model card for a checkpoint into ``models_dir``. ``fine``: a
    second checkpoint of the same architecture and grid, written beside as ``NAME_fine.pt`` and
    named in the card as its fine stage (:class:`model_card.FineStage`, re-predicting the pairs
    whose first estimate is within ``fine_below`` deg / mm). ``mirror``: the card's ``"mirror":
    true`` (every pair also predicted mirrored and the estimates averaged, :class:`model.LoadedModel`)."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = ck["config"]
    name = name or f"{cfg['transform']}_resnet34"
    model = _checkpoint_network(ck)
    folder = Path(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    sha = save_weights(model, folder / f"{name}.pt", half=True)
    fine_entry = None
    if fine is not None:
        fine_ck = torch.load(fine, map_location="cpu", weights_only=True)
        grid = ("transform", "hidden", "size", "spacing_mm")
        if any(fine_ck["config"][k] != cfg[k] for k in grid):
            raise TrainError(f"the fine checkpoint's {', '.join(grid)} must be the checkpoint's")
        fine_sha = save_weights(_checkpoint_network(fine_ck), folder / f"{name}_fine.pt", half=True)
        fine_entry = {"file": f"{name}_fine.pt", "sha256": fine_sha, "below": float(fine_below), "dtype": "float16",
                      "use": f"pairs whose first estimate is within {fine_below:g} deg and {fine_below:g} mm are predicted again by it",
                      "training": _training_facts(fine_ck)}
    names = ["theta_deg", "tx_mm", "ty_mm"] if cfg["transform"] == "rigid" else ["a11_minus_1", "a12", "a21", "a22_minus_1", "tx_mm", "ty_mm"]
    card = {
        "name": name,
        "architecture": f"torchvision resnet34 (2-channel conv1) + Linear(512,{cfg['hidden']})-ReLU-Linear({cfg['hidden']},{len(names)})",
        "transform": cfg["transform"],
        "hidden": cfg["hidden"],
        "trained": True,
        "input": {"size": [cfg["size"], cfg["size"]], "spacing_mm": cfg["spacing_mm"], "channels": ["fixed", "moving"],
                  "normalisation": "per slice: 1st/99th percentile -> [0, 1], clipped"},
        "parameters": {"names": names,
                       "direction": "resampling: fixed-slice point -> moving-slice point, about the grid centre",
                       "frame": "slice frame of the fixed volume (ex ~ R, ey ~ A for axial slices), see geometry.py"},
        "weights": {"file": f"{name}.pt", "sha256": sha, "dtype": "float16"},
        "training": _training_facts(ck),
    }
    if fine_entry is not None:
        card["fine"] = fine_entry
    if mirror:
        card["mirror"] = True
    if extra:
        card.update(extra)
    ModelCard.from_dict(card)  # the card we write must be one we can read
    (folder / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return folder / f"{name}.json"


def main(argv: list[str] | None = None) -> int:
    """``rigid-resnet-train``: every failure ends with one line ``error: ...`` and exit code 2."""
    return run_main(_main, argv)


def run_main(entry, argv: list[str] | None) -> int:
    """Call ``entry(argv)``; turn any failure into one ``error:`` line on stderr (no traceback
    unless ``RIGID_RESNET_DEBUG`` is set) and exit code 2 (130 when interrupted)."""
    try:
        return entry(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("RIGID_RESNET_DEBUG"):
            raise
        text = str(exc).strip()
        message = text.splitlines()[0] if text else exc.__class__.__name__
        if isinstance(exc, MemoryError):
            message = "out of memory (try a smaller --batch-size)"
        elif isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) and exc.filename:
            message = f"{exc.strerror or exc.__class__.__name__}: {exc.filename}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "throughput":
        from .throughput import main as throughput_main

        return throughput_main(argv[1:])
    if argv and argv[0] == "export":
        p = argparse.ArgumentParser(prog="rigid-resnet-train export")
        p.add_argument("checkpoint")
        p.add_argument("--models-dir", default=str(MODELS_DIR))
        p.add_argument("--name")
        p.add_argument("--fine", help="a second checkpoint, the card's fine stage: the pairs whose first estimate is "
                       "within --fine-below deg / mm are predicted again by it")
        p.add_argument("--fine-below", type=float, default=3.0, help="default 3 (degrees and mm)")
        p.add_argument("--mirror", action="store_true", help="the card asks for every pair to be predicted also mirrored "
                       "(both slices' columns reversed) and the two estimates averaged: twice the network work, cancels "
                       "an error that turns with the image (a rotation bias across contrasts)")
        a = p.parse_args(argv[1:])
        print(export(a.checkpoint, a.models_dir, a.name, fine=a.fine, fine_below=a.fine_below, mirror=a.mirror))
        return 0
    p = argparse.ArgumentParser(prog="rigid-resnet-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig(data=[], out="", holdout=[])
    p.add_argument("--data", nargs="+", required=True, help="folders of subjects (BraTS 2021/2023 or generic naming)")
    p.add_argument("--holdout", nargs="+", default=[], help="subject names kept out for validation (a folder's name, or a "
                   "scan's name without its contrast, e.g. IXI012-HH-1211)")
    p.add_argument("--holdout-file", help="a file of subject names kept out, one a line (# comments), e.g. "
                   f"{DEFAULT_HOLDOUT_FILE}; added to --holdout")
    p.add_argument("--orientations", nargs="+", default=list(d.orientations), choices=ORIENTATIONS,
                   help="slice orientations to train on (default axial)")
    p.add_argument("--min-foreground", type=float, default=d.min_foreground,
                   help="draw only slices with at least this fraction of the network grid above the foreground threshold "
                        f"(default {d.min_foreground:g}: the engine's own rule, so the network learns every slice it is given)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="end this session after N more steps, with a checkpoint (a session of a long run; --resume "
                   "continues it)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep every batch norm's running statistics as they are (for fine-tunes from --init)")
    for key in ("transform", "size", "spacing_mm", "hidden", "batch_size", "steps", "lr", "weight_decay", "max_rotation_deg",
                "max_translation_mm", "cross_contrast", "small_motion", "remap", "remap_loss", "cross_loss", "synth",
                "multi_contrast_share", "curriculum_steps", "curriculum_start_rotation_deg", "curriculum_start_translation_mm", "precision",
                "augment", "flip", "init", "val_every", "val_pairs", "patience", "seed", "threads", "device"):
        default = getattr(d, key)
        choices = {"remap_loss": PAIR_LOSSES, "cross_loss": PAIR_LOSSES, "precision": TRAIN_PRECISIONS}.get(key)
        p.add_argument("--" + key.replace("_", "-"), type=type(default), default=default, choices=choices, help=f"default {default}")
    a = p.parse_args(argv)
    if a.stop_after is not None and a.stop_after < 1:
        raise TrainError(f"--stop-after must be at least 1, not {a.stop_after}")
    holdout = list(a.holdout)
    if a.holdout_file:
        if not Path(a.holdout_file).is_file():
            raise TrainError(f"--holdout-file not found: {a.holdout_file}")
        holdout += [name for name in read_holdout_file(a.holdout_file) if name not in holdout]
    if not holdout:
        raise TrainError(f"name the held-out subjects: --holdout NAME ... or --holdout-file FILE (e.g. {DEFAULT_HOLDOUT_FILE})")
    cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k not in ("resume", "holdout_file", "stop_after")})
    cfg.holdout = holdout
    best = train(cfg, resume=a.resume, stop_after=a.stop_after)
    if distributed_from_env().is_main:
        print(f"best checkpoint: {best}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
