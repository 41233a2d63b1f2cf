"""Training throughput on this machine: steps/s for each precision and batch size, a few steps each.

    rigid-resnet-train throughput --data ../shared/data/ixi-t1-2mm --batch-sizes 8 16 32 \
        --precisions fp32 bf16 --steps 5 --warmup 2 --threads 2

Each configuration runs the trainer's own step (:func:`train.draw_training_batch` then
:func:`train.optimisation_step`: pairs drawn, forward, loss, backward, AdamW) on a fresh model
and prints a markdown table: seconds per step (drawing the pairs and the network's part
separately), steps/s and pairs/s. On a shared machine the figures are rough: run it when the
machine is quiet, or more than once.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.model import ResNetRegressor

from .data import LoadedSubject
from .train import TRAIN_PRECISIONS, TrainConfig, TrainError, draw_training_batch, load_subjects, optimisation_step


@dataclass
class Throughput:
    precision: str
    batch_size: int
    steps: int
    data_s: float  # per step: drawing and preparing the pairs
    network_s: float  # per step: forward, loss, backward, optimiser

    @property
    def step_s(self) -> float:
        return self.data_s + self.network_s

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.step_s

    @property
    def pairs_per_s(self) -> float:
        return self.batch_size / self.step_s


def measure(cfg: TrainConfig, subjects: list[LoadedSubject], precision: str, batch_size: int, steps: int, warmup: int,
            device: torch.device) -> Throughput:
    """Time ``steps`` training steps (after ``warmup`` untimed ones) at ``precision`` and ``batch_size``."""
    run = replace(cfg, batch_size=batch_size, precision=precision)
    torch.manual_seed(run.seed)
    net = ResNetRegressor(geo.N_PARAMS[run.transform], run.hidden).to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    rng = np.random.default_rng(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    data_s = network_s = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, f, m, same = draw_training_batch(subjects, rng, gen, run, i)
        t1 = time.perf_counter()
        optimisation_step(net, opt, scaler, x, f, m, same, run, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s += t1 - t0
            network_s += t2 - t1
    return Throughput(precision, batch_size, steps, data_s / steps, network_s / steps)


def markdown_table(rows: list[Throughput]) -> str:
    lines = ["| precision | batch | steps timed | pairs s / step | network s / step | s / step | steps / s | pairs / s |",
             "|" + " --- |" * 8]
    for r in rows:
        lines.append(f"| {r.precision} | {r.batch_size} | {r.steps} | {r.data_s:.3f} | {r.network_s:.3f} | {r.step_s:.3f} "
                     f"| {r.steps_per_s:.3f} | {r.pairs_per_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from RigidResNetRegistrationLib.model import resolve_device

    from .train import check_data_folders

    p = argparse.ArgumentParser(prog="rigid-resnet-train throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="folders of subjects to draw pairs from (a small one will do)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=[c for c in TRAIN_PRECISIONS if c != "auto"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--spacing-mm", type=float, default=1.5)
    p.add_argument("--orientations", nargs="+", default=["axial", "coronal", "sagittal"])
    p.add_argument("--synth", type=float, default=0.3, help="share of pairs given synthetic contrasts (default 0.3)")
    p.add_argument("--max-rotation-deg", type=float, default=30.0)
    p.add_argument("--max-translation-mm", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or any(b < 2 for b in a.batch_sizes):
        raise TrainError("--steps must be at least 1, --warmup at least 0 and every batch size at least 2")
    check_data_folders(a.data)
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = TrainConfig(data=list(a.data), out="", holdout=[], size=a.size, spacing_mm=a.spacing_mm, orientations=list(a.orientations),
                      synth=a.synth, max_rotation_deg=a.max_rotation_deg, max_translation_mm=a.max_translation_mm, device=a.device)
    cfg.validate()
    subjects, _ = load_subjects(cfg, need_validation=False)
    print(f"{len(subjects)} subject views, device {device}, {torch.get_num_threads()} threads, grid {a.size} x {a.size} at "
          f"{a.spacing_mm} mm", flush=True)
    rows = []
    for precision in a.precisions:
        for batch_size in a.batch_sizes:
            rows.append(measure(cfg, subjects, precision, batch_size, a.steps, a.warmup, device))
            print(f"{precision} batch {batch_size}: {rows[-1].step_s:.3f} s / step", flush=True)
    print(markdown_table(rows))
    return 0
