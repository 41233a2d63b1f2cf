"""``python3 -m rrr_benchmarks.speed``: the speed a user gets, ours and elastix in the same run, on
the same files and threads; writes ``speed.md`` and ``speed.json``.

    python3 -m rrr_benchmarks.speed [--data ../shared/data] [-o benchmarks/results-speed] [--pairs 20]
                                    [--runs 5] [--batch-rounds 2] [--threads 2] [--seed 2024] [--quick]
                                    [--keep-cases]

Cases: real 240x240x155 BraTS pairs: fixed = a subject's T1 (brats2015: its T1ce, the only T1 there),
moving = another contrast of the same subject (T2, FLAIR, T1ce) resampled under a known random rigid
motion (+-5 deg about each axis, +-5 mm along each, seeded per pair), both written as ``.nii.gz``
into a temporary folder. ``brats/BraTS2021_90004`` (held out from training) comes first, then the
other ``brats/`` subjects, then ``brats2015/``; past the last pair the list starts again with new
motions.

Measures (each with its goal, judged met / not met from the measurement; a row whose timed pairs
ours did not register within 1 deg / 1 mm of the known motion is *not met* whatever its time):

1. engine call, in this process, default options and outputs (registered and difference volumes,
   as the command line), after one warm-up call, against itk-elastix in memory with the default
   rigid map; ``--runs`` each, interleaved; the engine's stage table;
2. the whole ``rigid-resnet-register F M -o DIR --quiet`` process against the ``elastix`` command
   line (``-p rigid.txt -threads N``, the same map written from itk-elastix), with ``hyperfine``;
3. ``rigid-resnet-register --batch PAIRS.csv`` over all pairs (whole process / N, the mean of
   ``--batch-rounds`` runs) against the elastix command line run once per pair (sum / N), each of
   our runs followed by its share of elastix's pairs (this machine's speed drifts over minutes);
   "not available" where the installed command has no ``--batch``;
4. ``slices`` mode per used slice pair (default options);
5. the peak memory (``/usr/bin/time -v``, maximum RSS) of one single-pair process, elastix's for
   reference.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from RigidResNetRegistrationLib import geometry as geo
from rrr_training.data import NOT_CO_REGISTERED

from . import itk_bridge as bridge
from .cases import MOTIONS, MotionKind, apply_motion, draw_motion, stable_rng
from .methods import Settings, set_thread_env
from .report import _f, markdown_table
from .run import BenchmarkError, machine_info, run_command
from .worker import SUCCESS_ROT_DEG, SUCCESS_TRANS_MM, command_line

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results-speed"
HELD_OUT = "BraTS2021_90004"
QUICK = {"pairs": 2, "runs": 1, "warmup": 0, "batch_rounds": 1}

#: The known motion of every pair: 6-DOF about the fixed volume's centre.
MOTION = MotionKind("speed", 5.0, 5.0, False, "3D: rotations about R, A and S, each uniform in +-5 deg about the volume "
                    "centre; translations along R, A and S, each uniform in +-5 mm")
# Subjects left out of the cases: ``NOT_CO_REGISTERED`` (rrr_training.data, with the measurements;
# benchmarks/README.md, "Speed a user feels"). The known motion is the truth only where a subject's
# contrasts are co-registered as delivered.
#: Moving contrasts, in order, for a subject's fixed T1.
MOVING_CONTRASTS = ("t2", "flair", "t1ce")
#: ``brats2015/`` file names (DeepMedic's z-scored data, which ``rrr_training.data.contrast_of`` does
#: not name); it has no T1: its T1ce is the fixed image.
BRATS2015_FILES = {"t1ce": "T1c_subtrMeanDivStd.nii.gz", "flair": "Flair_subtrMeanDivStd.nii.gz"}

#: Goals (the issue's table).
ENGINE_MAX_S, ENGINE_MIN_RATIO, BATCH_MIN_RATIO, SLICE_MAX_MS, PEAK_MAX_MB = 0.35, 8.0, 5.0, 10.0, 1500.0


@dataclass(frozen=True)
class Goal:
    key: str
    measure: str
    goal: str


GOALS = (
    Goal("engine", "engine call, default options and outputs, 240x240x155", f"<= {ENGINE_MAX_S:g} s and >= {ENGINE_MIN_RATIO:g}x elastix"),
    Goal("process", "whole `rigid-resnet-register` process on one pair, default outputs",
         "faster than the `elastix` command line on the same files, whole process"),
    Goal("batch", "`--batch` of N pairs, per pair, files read and written", f">= {BATCH_MIN_RATIO:g}x faster than the elastix command line per pair"),
    Goal("slices", "`slices` mode per slice pair", f"<= {SLICE_MAX_MS:g} ms"),
    Goal("memory", "peak memory, one pair", f"<= {PEAK_MAX_MB / 1000:g} GB"),
)


class SpeedError(BenchmarkError):
    """Bad input or a missing tool: reported as one line ``error: ...`` (``run.run_command``)."""


# --------------------------------------------------------------------------- pure helpers


def stats(values: Sequence[float]) -> dict[str, Any]:
    """``n``, ``min``, ``median``, ``max`` of some timings (NaN when there are none) and the values."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not a.size:
        return {"n": 0, "min": math.nan, "median": math.nan, "max": math.nan, "values": []}
    return {"n": int(a.size), "min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "values": a.tolist()}


def ratio(slow: float | None, fast: float | None) -> float:
    """How many times ``fast`` is faster than ``slow`` (NaN when either is missing or not positive)."""
    if slow is None or fast is None or not (math.isfinite(slow) and math.isfinite(fast)) or fast <= 0 or slow <= 0:
        return math.nan
    return float(slow / fast)


def fmt_stats(s: dict[str, Any] | None, scale: float = 1.0, unit: str = "s", digits: int = 2) -> str:
    """``median unit (min-max, n runs)``; a dash when nothing was measured."""
    if not s or not s.get("n"):
        return "—"
    med, lo, hi = (scale * s[k] for k in ("median", "min", "max"))
    return f"{med:.{digits}f} {unit} ({lo:.{digits}f}-{hi:.{digits}f}, {s['n']} run{'s' if s['n'] != 1 else ''})"


def error_row(pair: str, rot: float | None = None, trans: float | None = None, error: str | None = None) -> dict[str, Any]:
    """One registration's error against the known motion (``error``: why there is none)."""
    rot = math.nan if rot is None else float(rot)
    trans = math.nan if trans is None else float(trans)
    ok = error is None and rot < SUCCESS_ROT_DEG and trans < SUCCESS_TRANS_MM
    return {"pair": pair, "rot_err_deg": rot, "trans_err_mm": trans, "success": bool(ok), "error": error}


def accuracy_text(errors: list[dict[str, Any]] | None) -> str:
    """``k/n within 1 deg / 1 mm; median rot deg / trans mm (max ...)`` of some error rows."""
    if not errors:
        return "—"
    ok = sum(e["success"] for e in errors)
    rot = np.array([e["rot_err_deg"] for e in errors], float)
    trans = np.array([e["trans_err_mm"] for e in errors], float)
    text = f"{ok}/{len(errors)} within {SUCCESS_ROT_DEG:g} deg / {SUCCESS_TRANS_MM:g} mm"
    if np.isfinite(rot).any():
        text += (f"; {np.nanmedian(rot):.3f} deg / {np.nanmedian(trans):.3f} mm"
                 + (f" (max {np.nanmax(rot):.3f} / {np.nanmax(trans):.3f})" if len(errors) > 1 else ""))
    failed = [e for e in errors if e["error"]]
    if failed:
        text += f"; failed: {failed[0]['pair']}: {failed[0]['error'][:120]}" + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else "")
    return text


def _needed(m: dict[str, Any], key: str) -> list[float | None]:
    """The numbers a row's verdict is computed from."""
    if key == "engine":
        return [m.get("ours", {}).get("median"), m.get("ratio")]
    if key == "process":
        return [m.get("ours", {}).get("median"), m.get("elastix", {}).get("median")]
    if key == "batch":
        return [m.get("ratio")]
    if key == "slices":
        return [m.get("ms_per_slice")]
    if key == "memory":
        return [m.get("ours_mb")]
    raise KeyError(key)


def goal_met(key: str, m: dict[str, Any]) -> bool:
    """Whether a row's measurement meets its speed or memory goal (:data:`GOALS`)."""
    if key == "engine":
        return m["ours"]["median"] <= ENGINE_MAX_S and m["ratio"] >= ENGINE_MIN_RATIO
    if key == "process":
        return m["ours"]["median"] < m["elastix"]["median"]
    if key == "batch":
        return m["ratio"] >= BATCH_MIN_RATIO
    if key == "slices":
        return m["ms_per_slice"] <= SLICE_MAX_MS
    if key == "memory":
        return m["ours_mb"] <= PEAK_MAX_MB
    raise KeyError(key)


def accuracy_failure(m: dict[str, Any]) -> str | None:
    """Why ours' accuracy on a row's timed pairs makes its figure no success (None: it does not):
    a pair outside 1 deg / 1 mm or failed; for ``slices`` mode (per-slice errors) a median
    per-slice error outside 1 deg / 1 mm."""
    per_slice = m.get("slice_accuracy")
    if per_slice:
        if not (per_slice["rot_median"] < SUCCESS_ROT_DEG and per_slice["trans_median"] < SUCCESS_TRANS_MM):
            return (f"ours' median per-slice error {per_slice['rot_median']:.2f} deg / {per_slice['trans_median']:.2f} mm "
                    f"is outside {SUCCESS_ROT_DEG:g} deg / {SUCCESS_TRANS_MM:g} mm")
        return None
    ours = (m.get("accuracy") or {}).get("ours") or []
    bad = [e for e in ours if not e["success"]]
    if bad:
        return f"ours outside {SUCCESS_ROT_DEG:g} deg / {SUCCESS_TRANS_MM:g} mm or failed on {len(bad)} of {len(ours)} pairs"
    return None


def verdict(key: str, m: dict[str, Any] | None) -> str:
    """``met``, ``not met`` (with why, when ours was inaccurate), ``not available`` (the tool or
    option is missing) or ``not measured`` (a run failed)."""
    if not m or m.get("unavailable"):
        return "not available" + (f" ({m['unavailable']})" if m and m.get("unavailable") else "")
    if m.get("failed"):
        return f"not measured ({m['failed']})"
    if any(v is None or not math.isfinite(v) for v in _needed(m, key)):
        return "not measured"
    why = accuracy_failure(m)
    if why:
        return f"not met ({why})"
    return "met" if goal_met(key, m) else "not met"


def faster_text(slow: float | None, fast: float | None, what: str = "") -> str:
    """``4.2x faster`` (or ``1.3x slower``) of ``fast`` against ``slow``; a dash when unknown."""
    r = ratio(slow, fast)
    if not math.isfinite(r):
        return "—"
    return (f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower") + what


def measured_cells(key: str, m: dict[str, Any] | None) -> tuple[str, str, str]:
    """The ours, elastix and comparison cells of a row."""
    if not m or m.get("failed"):
        return "—", "—", "—"
    if key in ("engine", "process"):
        return (fmt_stats(m.get("ours")), fmt_stats(m.get("elastix")),
                faster_text(m.get("elastix", {}).get("median"), m.get("ours", {}).get("median"), " (medians)"))
    if key == "batch":
        ours = (f"not available ({m['ours_unavailable']})" if m.get("ours_unavailable") else
                "—" if m.get("ours_per_pair_s") is None else
                f"{m['ours_per_pair_s']:.2f} s / pair ({_batch_runs_text(m)} for {m['n']}, one process)")
        elx = ("—" if m.get("elastix_per_pair_s") is None else
               f"{m['elastix_per_pair_s']:.2f} s / pair ({m['elastix_total_s']:.1f} s for {m['n']}, one process each)")
        return ours, elx, faster_text(m.get("elastix_per_pair_s"), m.get("ours_per_pair_s"), " per pair")
    if key == "slices":
        return (f"{_f(m.get('ms_per_slice'), 1)} ms per slice pair ({m.get('used_slices')} slices, "
                f"{fmt_stats(m.get('seconds'))} per call)"), "—", "—"
    if key == "memory":
        return f"{_f(m.get('ours_mb'), 0)} MB", f"{_f(m.get('elastix_mb'), 0)} MB", "—"
    raise KeyError(key)


def _batch_runs_text(m: dict[str, Any]) -> str:
    """Our batch's time for all pairs: ``26.3 s``, or with several runs ``mean 25.6 s of 26.3, 24.9 s``."""
    runs = m.get("ours_runs_s") or [m["ours_total_s"]]
    if len(runs) == 1:
        return f"{m['ours_total_s']:.1f} s"
    return f"mean {m['ours_total_s']:.1f} s of " + ", ".join(f"{v:.1f}" for v in runs) + " s"


def goal_rows(measures: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One row per goal: its measure, cells, accuracy and verdict."""
    rows = []
    for g in GOALS:
        m = measures.get(g.key)
        ours, elastix, compare = measured_cells(g.key, m)
        acc = (m or {}).get("accuracy") or {}
        if (m or {}).get("slice_accuracy"):
            sa = m["slice_accuracy"]
            ours_acc = (f"per slice: {100 * sa['success']:.0f}% within {SUCCESS_ROT_DEG:g} deg / {SUCCESS_TRANS_MM:g} mm; "
                        f"median {sa['rot_median']:.3f} deg / {sa['trans_median']:.3f} mm ({sa['n']} slices)")
        else:
            ours_acc = accuracy_text(acc.get("ours"))
        rows.append({"key": g.key, "measure": g.measure, "goal": g.goal, "ours": ours, "elastix": elastix, "compare": compare,
                     "accuracy_ours": ours_acc, "accuracy_elastix": accuracy_text(acc.get("elastix")),
                     "verdict": verdict(g.key, m)})
    return rows


GOAL_COLUMNS = ["measure", "ours", "elastix", "ours vs elastix", "accuracy, ours", "accuracy, elastix", "goal"]


def goal_table(rows: list[dict[str, Any]]) -> str:
    """The goals table: the goal column says the goal and whether it is met."""
    cells = [[r["measure"], r["ours"], r["elastix"], r["compare"], r["accuracy_ours"], r["accuracy_elastix"],
              f"{r['goal']}: **{r['verdict']}**"] for r in rows]
    return markdown_table(GOAL_COLUMNS, cells)


def stage_table(stage_runs: list[dict[str, float]]) -> str:
    """Our engine's stages (``RegistrationResult.timings``), median and range over the timed runs;
    ``total``: their sum."""
    stages = list(dict.fromkeys(k for run in stage_runs for k in run))
    rows = []
    for k in stages + ["total"]:
        values = [sum(run.values()) if k == "total" else run.get(k, 0.0) for run in stage_runs]
        s = stats(values)
        rows.append(["total (sum of the stages)" if k == "total" else k, f"{s['median']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}"])
    return markdown_table(["stage", "median (s)", "min-max (s)"], rows)


def write_pairs_csv(pairs: Sequence[dict[str, Any]], path: Path) -> Path:
    """The ``--batch`` pairs file: columns ``fixed,moving,name`` (absolute paths)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "name"])
        for p in pairs:
            w.writerow([str(Path(p["fixed"]).resolve()), str(Path(p["moving"]).resolve()), p["name"]])
    return path


def batch_available(help_text: str) -> bool:
    """Whether a ``rigid-resnet-register --help`` text offers ``--batch`` (not ``--batch-size``)."""
    return re.search(r"--batch(?![-\w])", help_text) is not None


def parse_max_rss_mb(time_v_stderr: str) -> float | None:
    """Maximum resident set size in MB (10^6 bytes) from ``/usr/bin/time -v``'s report (KiB)."""
    found = re.findall(r"Maximum resident set size \(kbytes\):\s*(\d+)", time_v_stderr)
    return int(found[-1]) * 1024 / 1e6 if found else None


def read_elastix_parameters(path: Path | str) -> dict[str, list[str]]:
    """An elastix parameter or transform-parameter file: ``(Name value ...)`` lines -> values (quotes
    removed; ``//`` comments skipped)."""
    out: dict[str, list[str]] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"^\s*\((\w+)\s*(.*?)\)\s*(//.*)?$", line)
        if m:
            out[m.group(1)] = [v.strip('"') for v in shlex.split(m.group(2), posix=False)]
    return out


def read_elastix_transform(path: Path | str) -> np.ndarray:
    """4x4 RAS resampling matrix (fixed -> moving) of the elastix command line's
    ``TransformParameters.0.txt`` (an ``EulerTransform``: ``itk_bridge.elastix_euler_to_ras``)."""
    p = read_elastix_parameters(path)
    kind = (p.get("Transform") or ["?"])[0]
    if kind != "EulerTransform":
        raise ValueError(f"expected an elastix EulerTransform in {path}, got {kind}")
    compute_zyx = (p.get("ComputeZYX") or ["false"])[0].lower() == "true"
    return bridge.elastix_euler_to_ras([float(v) for v in p["TransformParameters"]],
                                       [float(v) for v in p["CenterOfRotationPoint"]], compute_zyx)


def pair_plan(subjects: Sequence[tuple[str, Sequence[str]]], n: int) -> list[tuple[str, str, str, int]]:
    """``n`` pairs ``(subject, fixed contrast, moving contrast, round)`` from subjects given in order
    as ``(name, contrasts)``: the fixed contrast is ``t1`` (else ``t1ce``), the moving ones
    :data:`MOVING_CONTRASTS` that the subject has; past the last pair the list starts again
    (``round`` 1, 2, ...: new motions)."""
    base = []
    for name, contrasts in subjects:
        fixed = "t1" if "t1" in contrasts else ("t1ce" if "t1ce" in contrasts else None)
        if fixed is None:
            continue
        base += [(name, fixed, c) for c in MOVING_CONTRASTS if c in contrasts and c != fixed]
    if not base:
        return []
    return [(*base[i % len(base)], i // len(base)) for i in range(n)]


def hyperfine_argv(commands: Sequence[tuple[str, str, str]], warmup: int, runs: int, json_path: Path) -> list[str]:
    """``hyperfine`` timing ``commands`` ``(name, command, prepare)`` in one call (a prepare per command)."""
    argv = ["hyperfine", "--warmup", str(warmup), "--runs", str(runs), "--export-json", str(json_path), "--style", "basic"]
    for _, _, prepare in commands:
        argv += ["--prepare", prepare]
    for name, _, _ in commands:
        argv += ["--command-name", name]
    return argv + [command for _, command, _ in commands]


# --------------------------------------------------------------------------- cases


def source_subjects(data: Path) -> list[tuple[str, dict[str, Path]]]:
    """Subjects with their images, in the order pairs are made: ``brats/BraTS2021_90004`` (held out)
    first, the other ``brats/`` subjects, then ``brats2015/``; none of :data:`NOT_CO_REGISTERED`."""
    from rrr_training.data import find_subjects

    brats = find_subjects(data / "brats") if (data / "brats").is_dir() else []
    brats = [s for s in brats if s.name not in NOT_CO_REGISTERED]
    brats.sort(key=lambda s: (s.name != HELD_OUT, s.name))
    out = [(s.name, dict(s.images)) for s in brats]
    for folder in sorted((data / "brats2015").glob("*")) if (data / "brats2015").is_dir() else []:
        images = {c: folder / f for c, f in BRATS2015_FILES.items() if (folder / f).is_file()}
        if images:
            out.append((folder.name, images))
    return out


def build_pairs(data: Path, n: int, seed: int, folder: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Write ``n`` pairs as ``.nii.gz`` into ``folder`` (each subject's fixed volume once) and return
    their descriptions (files, motion, true RAS resampling transform fixed -> moving, centre)."""
    from RigidResNetRegistrationLib.io import read_volume, write_volume

    subjects = dict(source_subjects(data))
    plan = pair_plan([(k, list(v)) for k, v in subjects.items()], n)
    if not plan:
        raise SpeedError(f"no subject with a T1 (or T1ce) and another contrast under {data}/brats or {data}/brats2015")
    folder.mkdir(parents=True, exist_ok=True)
    fixed_cache: dict[str, tuple[Any, Path]] = {}
    pairs = []
    for i, (subject, fc, mc, rnd) in enumerate(plan):
        if subject not in fixed_cache:
            vol = read_volume(subjects[subject][fc])
            path = folder / f"{subject}_{fc}.nii.gz"
            write_volume(vol, path)
            fixed_cache[subject] = (vol, path)
        fixed, fixed_path = fixed_cache[subject]
        name = f"{i + 1:02d}-{subject}-{fc}-{mc}" + (f"-r{rnd}" if rnd else "")
        params = draw_motion(MOTION, stable_rng(seed, "speed", subject, mc, str(rnd)))
        source = read_volume(subjects[subject][mc])
        moving, truth = apply_motion(source, MOTION, params, fixed)
        moving_path = folder / f"{name}_moving.nii.gz"
        write_volume(moving, moving_path)
        pairs.append({"name": name, "subject": subject, "fixed_contrast": fc, "moving_contrast": mc,
                      "fixed": str(fixed_path), "moving": str(moving_path), "moving_source": str(subjects[subject][mc]),
                      "shape": list(fixed.shape), "params": [float(v) for v in params], "truth": np.asarray(truth).tolist(),
                      "centre_ras": geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape).tolist(),
                      "held_out": subject == HELD_OUT})
        log(f"pair {name}: {fc} -> {mc} {tuple(fixed.shape)}, motion {np.round(params, 2).tolist()} (deg, deg, deg, mm, mm, mm)")
    return pairs


def pair_error(pair: dict[str, Any], estimate: np.ndarray) -> dict[str, Any]:
    rot, trans = geo.rigid_error(estimate, np.array(pair["truth"]), np.array(pair["centre_ras"]))
    return error_row(pair["name"], rot, trans)


def _error_from_file(pair: dict[str, Any], path: Path, reader: Callable[[Path], np.ndarray]) -> dict[str, Any]:
    try:
        return pair_error(pair, reader(path))
    except Exception as exc:  # a missing or unreadable result is that pair's failure
        return error_row(pair["name"], error=f"{type(exc).__name__}: {exc}")


def _ours_tfm(folder: Path) -> np.ndarray:
    from RigidResNetRegistrationLib.io import read_tfm

    return read_tfm(folder / "transform.tfm")


def _elastix_tfm(folder: Path) -> np.ndarray:
    return read_elastix_transform(folder / "TransformParameters.0.txt")


# --------------------------------------------------------------------------- measures


def log(message: str) -> None:
    print(message, flush=True)


def write_elastix_map(path: Path) -> str:
    """The default rigid map of itk-elastix (``GetDefaultParameterMap("rigid")``, what
    ``methods.setup_elastix`` runs in memory) written for the elastix command line; returns its text."""
    import itk

    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
    params.WriteParameterFile(str(path))
    return path.read_text()


def measure_engine(pair: dict[str, Any], model, runs: int, threads: int) -> dict[str, Any]:
    """Our engine (default options and outputs) and itk-elastix in memory on one pair's volumes
    (read once): one warm-up call each, then ``runs`` of each, interleaved."""
    from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
    from RigidResNetRegistrationLib.io import read_volume

    from .methods import setup_elastix

    fixed, moving = read_volume(pair["fixed"]), read_volume(pair["moving"])
    options = RegistrationOptions()  # the command line's defaults: registered and difference volumes computed
    elastix = setup_elastix(Settings(threads=threads))
    t0 = time.perf_counter()
    register_volumes(fixed, moving, model, options)
    warm_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    elastix(fixed, moving)
    warm_elastix = time.perf_counter() - t0
    log(f"[engine] warm-up: ours {warm_ours:.2f} s, elastix {warm_elastix:.2f} s")
    ours_s, elastix_s, stage_runs = [], [], []
    for k in range(runs):
        t0 = time.perf_counter()
        result = register_volumes(fixed, moving, model, options)
        ours_s.append(time.perf_counter() - t0)
        stage_runs.append({key: float(v) for key, v in result.timings.items()})
        t0 = time.perf_counter()
        out = elastix(fixed, moving)
        elastix_s.append(time.perf_counter() - t0)
        log(f"[engine] run {k + 1}/{runs}: ours {ours_s[-1]:.3f} s, elastix {elastix_s[-1]:.2f} s")
    ours, elx = stats(ours_s), stats(elastix_s)
    measure = {"pair": pair["name"], "ours": ours, "elastix": elx, "ratio": ratio(elx["median"], ours["median"]),
               "warmup_s": {"ours": warm_ours, "elastix": warm_elastix}, "stages": stage_runs,
               "outputs": {"registered": result.registered is not None, "difference": result.difference is not None},
               "accuracy": {"ours": [pair_error(pair, result.fixed_to_moving_ras)],
                            "elastix": [pair_error(pair, out.fixed_to_moving_ras)]}}
    log(stage_table(stage_runs))
    return measure


def measure_slices(pair: dict[str, Any], model, runs: int, seed: int, folder: Path) -> dict[str, Any]:
    """``slices`` mode (default options) on the pair's fixed volume and its moving contrast moved by a
    known in-plane motion (``cases.MOTIONS["normal"]``: one motion for every slice, so each
    slice's error is known): ``worker._slices_mode_run`` (one warm-up, median of ``runs``)."""
    from RigidResNetRegistrationLib.engine import RegistrationOptions
    from RigidResNetRegistrationLib.io import read_volume

    from .worker import _slices_mode_run

    fixed, source = read_volume(pair["fixed"]), read_volume(pair["moving_source"])
    kind = MOTIONS["normal"]
    params = draw_motion(kind, stable_rng(seed, "speed-slices", pair["name"]))
    moving, truth = apply_motion(source, kind, params, fixed)
    case = {"id": f"{pair['name']} (in-plane {np.round(params, 2).tolist()})", "truth": np.asarray(truth).tolist(),
            "fixed": str(folder / "slices_fixed.npy"), "fixed_ijk_to_ras": np.asarray(fixed.ijk_to_ras).tolist(),
            "moving": str(folder / "slices_moving.npy"), "moving_ijk_to_ras": np.asarray(moving.ijk_to_ras).tolist()}
    np.save(case["fixed"], np.asarray(fixed.array, dtype=np.float32))
    np.save(case["moving"], np.asarray(moving.array, dtype=np.float32))
    run = _slices_mode_run(model, case, RegistrationOptions(mode="slices"), runs)
    return {"pair": pair["name"], "motion": [float(v) for v in params], "used_slices": run["used_slices"],
            "seconds": stats(run["runs_s"]), "ms_per_slice": run["ms_per_slice_pair"], "stages": run["engine_timings_s"],
            "slice_accuracy": run["accuracy"]["one motion"]}


def elastix_argv(elastix: str, fixed: str, moving: str, elastix_map: Path, out: Path, threads: int) -> list[str]:
    """The elastix command line every measure times: ``elastix -f F -m M -p MAP -out DIR -threads N``."""
    return [elastix, "-f", fixed, "-m", moving, "-p", str(elastix_map), "-out", str(out), "-threads", str(threads)]


def measure_process(pair: dict[str, Any], ours_cmd: list[str], elastix: str, elastix_map: Path, threads: int, warmup: int,
                    runs: int, work: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """The whole ``rigid-resnet-register F M -o DIR --quiet`` against ``elastix -f F -m M -p MAP
    -out DIR -threads N``, in one ``hyperfine`` call (fresh output folders before every run)."""
    ours_dir, elastix_dir = work / "process-ours", work / "process-elastix"
    ours = shlex.join([*ours_cmd, pair["fixed"], pair["moving"], "-o", str(ours_dir), "--quiet"])
    elx = shlex.join(elastix_argv(elastix, pair["fixed"], pair["moving"], elastix_map, elastix_dir, threads))
    json_path = out / "hyperfine-process.json"
    argv = hyperfine_argv([("rigid-resnet-register", ours, f"rm -rf {shlex.quote(str(ours_dir))}"),
                           ("elastix", elx, f"rm -rf {shlex.quote(str(elastix_dir))} && mkdir {shlex.quote(str(elastix_dir))}")],
                          warmup, runs, json_path)
    log(f"[process] {shlex.join(argv)}")
    proc = subprocess.run(argv, env=env, text=True, capture_output=True, check=False)
    print(proc.stdout, end="", flush=True)
    measure: dict[str, Any] = {"pair": pair["name"], "commands": {"ours": ours, "elastix": elx}, "hyperfine": shlex.join(argv)}
    if proc.returncode != 0 or not json_path.is_file():
        measure["failed"] = f"hyperfine exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return measure
    results = json.loads(json_path.read_text())["results"]
    ours_s, elx_s = stats(results[0]["times"]), stats(results[1]["times"])
    measure.update({"ours": ours_s, "elastix": elx_s, "ratio": ratio(elx_s["median"], ours_s["median"]),
                    "accuracy": {"ours": [_error_from_file(pair, ours_dir, _ours_tfm)],
                                 "elastix": [_error_from_file(pair, elastix_dir, _elastix_tfm)]}})
    return measure


def measure_memory(pair: dict[str, Any], ours_cmd: list[str], elastix: str, elastix_map: Path, threads: int, work: Path,
                   env: dict[str, str]) -> dict[str, Any]:
    """Maximum RSS (``/usr/bin/time -v``) of one single-pair ``rigid-resnet-register`` process and,
    for reference, of one elastix command line."""
    measure: dict[str, Any] = {"pair": pair["name"], "accuracy": {"ours": [], "elastix": []}}
    runs = {"ours": ([*ours_cmd, pair["fixed"], pair["moving"], "-o", str(work / "memory-ours"), "--quiet"], work / "memory-ours", _ours_tfm),
            "elastix": (elastix_argv(elastix, pair["fixed"], pair["moving"], elastix_map, work / "memory-elastix", threads),
                        work / "memory-elastix", _elastix_tfm)}
    for who, (argv, folder, reader) in runs.items():
        shutil.rmtree(folder, ignore_errors=True)
        if who == "elastix":
            folder.mkdir(parents=True)
        proc = subprocess.run(["/usr/bin/time", "-v", *argv], env=env, text=True, capture_output=True, check=False)
        mb = parse_max_rss_mb(proc.stderr)
        measure[f"{who}_mb"] = mb
        if proc.returncode != 0:
            measure["accuracy"][who].append(error_row(pair["name"], error=f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"))
        else:
            measure["accuracy"][who].append(_error_from_file(pair, folder, reader))
        log(f"[memory] {who}: maximum RSS {_f(mb, 0)} MB")
    if measure.get("ours_mb") is None:
        measure["failed"] = "no maximum RSS from /usr/bin/time -v"
    return measure


def batch_schedule(n: int, rounds: int) -> list[list[int]]:
    """The elastix pairs (indices) timed after each of ``rounds`` runs of our ``--batch``: the ``n``
    pairs in ``rounds`` consecutive groups as equal as can be (at most ``n`` rounds, at least one),
    so that both methods' times come from the same stretches of a machine whose speed drifts
    over minutes."""
    rounds = max(1, min(int(rounds), n))
    return [[int(i) for i in part] for part in np.array_split(np.arange(n), rounds)]


def measure_batch(pairs: list[dict[str, Any]], ours_cmd: list[str], has_batch: bool, elastix: str, elastix_map: Path,
                  threads: int, work: Path, env: dict[str, str], rounds: int = 2) -> dict[str, Any]:
    """``rigid-resnet-register --batch PAIRS.csv -o OUTROOT --quiet`` (one process, timed whole, / N)
    against the elastix command line once per pair (sum / N), interleaved: ``rounds`` runs of our
    batch (each into a fresh folder), each followed by its group of the elastix pairs
    (:func:`batch_schedule`); ours per pair is the mean of its runs / N. Ours is "not available"
    without ``--batch``, elastix is measured all the same."""
    n = len(pairs)
    measure: dict[str, Any] = {"n": n, "accuracy": {"ours": [], "elastix": []}}
    schedule = batch_schedule(n, rounds)
    csv_path = write_pairs_csv(pairs, work / "pairs.csv") if has_batch else None
    if not has_batch:
        measure["ours_unavailable"] = "the installed rigid-resnet-register has no --batch"
        log(f"[batch] ours: not available ({measure['ours_unavailable']})")
    ours_s: list[float] = []
    elastix_s: list[float] = []
    root = work / "batch-ours"  # every run of ours writes here afresh
    for r, group in enumerate(schedule, 1):
        if has_batch:
            shutil.rmtree(root, ignore_errors=True)
            argv = [*ours_cmd, "--batch", str(csv_path), "-o", str(root), "--quiet"]
            log(f"[batch] round {r}/{len(schedule)}: {shlex.join(argv)}")
            t0 = time.perf_counter()
            proc = subprocess.run(argv, env=env, text=True, capture_output=True, check=False)
            ours_s.append(time.perf_counter() - t0)
            measure["ours_command"] = shlex.join(argv)
            if proc.returncode != 0 and not measure.get("ours_exit"):  # the first failing run's status is kept
                measure["ours_stderr"] = proc.stderr.strip()[-500:]
            measure["ours_exit"] = measure.get("ours_exit") or proc.returncode
            log(f"[batch] ours: {ours_s[-1]:.1f} s for {n} pairs = {ours_s[-1] / n:.2f} s / pair (exit {proc.returncode})")
        for k in group:
            p = pairs[k]
            folder = work / "batch-elastix" / p["name"]
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            t0 = time.perf_counter()
            proc = subprocess.run(elastix_argv(elastix, p["fixed"], p["moving"], elastix_map, folder, threads), env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
            elastix_s.append(time.perf_counter() - t0)
            err = (_error_from_file(p, folder, _elastix_tfm) if proc.returncode == 0 else
                   error_row(p["name"], error=f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"))
            measure["accuracy"]["elastix"].append(err)
            log(f"[batch] elastix {k + 1}/{n} {p['name']}: {elastix_s[-1]:.2f} s, error {err['rot_err_deg']:.3f} deg / "
                f"{err['trans_err_mm']:.3f} mm")
    if ours_s:  # the runs are alike (deterministic): the last one's transforms are read
        measure["accuracy"]["ours"] = [_error_from_file(p, root / p["name"], _ours_tfm) for p in pairs]
        total = float(np.mean(ours_s))
        measure.update({"ours_runs_s": ours_s, "ours_total_s": total, "ours_per_pair_s": total / n})
    measure.update({"elastix_runs_s": elastix_s, "elastix_total_s": float(sum(elastix_s)), "elastix_per_pair_s": float(sum(elastix_s)) / n})
    measure["ratio"] = ratio(measure["elastix_per_pair_s"], measure.get("ours_per_pair_s"))
    if not has_batch:
        measure["unavailable"] = measure["ours_unavailable"]
    return measure


# --------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m rrr_benchmarks.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help=f"the shared data folder (default: {DEFAULT_DATA.relative_to(REPO.parent)} beside the repository)")
    p.add_argument("-o", "--output", default=None, help="output folder (default: benchmarks/results-speed)")
    p.add_argument("--pairs", type=int, default=None, metavar="N", help="pairs for --batch and the accuracy (default 20; --quick 2)")
    p.add_argument("--runs", type=int, default=None, metavar="R", help="timed runs of the engine call, the whole process and "
                   "slices mode (default 5; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="hyperfine warm-up runs of each command (default 1; --quick 0)")
    p.add_argument("--batch-rounds", type=int, default=None, metavar="K",
                   help="runs of our --batch, each followed by its share of the elastix pairs (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every tool (default 2)")
    p.add_argument("--seed", type=int, default=2024, help="seed of the motions (default 2024)")
    p.add_argument("--elastix", default=None, help="the elastix command (default: elastix on PATH)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK['pairs']} pairs, {QUICK['runs']} run, no hyperfine warm-up")
    p.add_argument("--keep-cases", action="store_true", help="keep the case files and outputs (printed folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    n = a.pairs if a.pairs is not None else (QUICK["pairs"] if a.quick else 20)
    runs = a.runs if a.runs is not None else (QUICK["runs"] if a.quick else 5)
    warmup = a.warmup if a.warmup is not None else (QUICK["warmup"] if a.quick else 1)
    rounds = a.batch_rounds if a.batch_rounds is not None else (QUICK["batch_rounds"] if a.quick else 2)
    if n < 1 or runs < 1 or warmup < 0 or a.threads < 1 or rounds < 1:
        raise SpeedError("--pairs, --runs, --batch-rounds and --threads must be at least 1 and --warmup at least 0")
    data = Path(a.data) if a.data else DEFAULT_DATA
    if not data.is_dir():
        raise SpeedError(f"data folder not found: {data} (give the shared data folder with --data FOLDER)")
    elastix = a.elastix or shutil.which("elastix")
    if not elastix or not shutil.which(elastix):
        raise SpeedError("the elastix command is not found (Debian package elastix, or give --elastix PATH)")
    for tool in ("hyperfine", "/usr/bin/time"):
        if not shutil.which(tool):
            raise SpeedError(f"{tool} is not found (hyperfine: Debian package hyperfine; /usr/bin/time: package time)")
    out = Path(a.output) if a.output else DEFAULT_OUTPUT
    out.mkdir(parents=True, exist_ok=True)

    set_thread_env(a.threads)  # before torch and ITK start; the commands inherit it
    env = set_thread_env(a.threads, dict(os.environ))
    import torch

    from RigidResNetRegistrationLib.model import load_model

    torch.set_num_threads(a.threads)
    started, load_start = time.perf_counter(), _load()
    ours_cmd = command_line()
    help_text = subprocess.run([*ours_cmd, "--help"], env=env, text=True, capture_output=True, check=False).stdout
    has_batch = batch_available(help_text)
    log(f"speed: data {data}, {n} pairs, {runs} runs, {a.threads} threads; ours: {shlex.join(ours_cmd)} "
        f"(--batch {'available' if has_batch else 'not available'}); elastix: {elastix}")

    work = Path(tempfile.mkdtemp(prefix="rrr-speed-"))
    try:
        pairs = build_pairs(data, n, a.seed, work / "cases")
        elastix_map = out / "elastix_rigid.txt"
        map_text = write_elastix_map(elastix_map)
        model = load_model(None, "auto")
        device = f"{model.device} (the command line's default, --device auto)"
        measures: dict[str, Any] = {}
        log("--- engine call (in memory)")
        measures["engine"] = measure_engine(pairs[0], model, runs, a.threads)
        log("--- slices mode")
        measures["slices"] = measure_slices(pairs[0], model, runs, a.seed, work)
        log("--- whole process (hyperfine)")
        measures["process"] = measure_process(pairs[0], ours_cmd, elastix, elastix_map, a.threads, warmup, runs, work, out, env)
        log("--- peak memory (/usr/bin/time -v)")
        measures["memory"] = measure_memory(pairs[0], ours_cmd, elastix, elastix_map, a.threads, work, env)
        log(f"--- batch of {n} pairs")
        measures["batch"] = measure_batch(pairs, ours_cmd, has_batch, elastix, elastix_map, a.threads, work, env, rounds)

        rows = goal_rows(measures)
        meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": shlex.join(["python3", "-m", "rrr_benchmarks.speed", *argv]),
                **machine_info(a.threads, "cpu"), "our device": device,
                "elastix": f"{elastix} ({_version([elastix, '--version'])}), default rigid map of itk-elastix written to "
                           f"`{elastix_map.name}`", "hyperfine": _version(["hyperfine", "--version"]),
                "ours": f"{shlex.join(ours_cmd)} (--batch {'available' if has_batch else 'not available'})",
                "data": f"{data}: {n} pairs, first {pairs[0]['name']}",
                "left out": "; ".join(f"{k}: {v}" for k, v in NOT_CO_REGISTERED.items() if (data / "brats" / k).is_dir())
                            or "none", "motion": MOTION.description + f"; seed {a.seed}",
                "runs": f"{runs} timed runs (engine call: after one warm-up call each, interleaved; hyperfine: --warmup {warmup}); "
                        f"--batch: {len(batch_schedule(n, rounds))} runs of ours, each followed by its share of elastix's pairs",
                "wall time of the benchmark": f"{time.perf_counter() - started:.0f} s",
                "load average (1, 5, 15 min)": f"{load_start} at the start, {_load()} at the end (anything else running skews the times)"}
        text = markdown(meta, rows, measures, pairs)
        (out / "speed.md").write_text(text, encoding="utf-8")
        (out / "speed.json").write_text(json.dumps({"meta": meta, "goals": [asdict(g) for g in GOALS], "rows": rows,
                                                    "measures": measures, "pairs": pairs, "elastix_map": map_text},
                                                   indent=1, default=float) + "\n", encoding="utf-8")
        log("\n" + goal_table(rows))
        log(f"wrote {out / 'speed.md'} and {out / 'speed.json'}")
    finally:
        if a.keep_cases:
            log(f"case files and outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, text=True, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"version unknown ({exc})"
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else "version unknown"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], measures: dict[str, Any], pairs: list[dict[str, Any]]) -> str:
    """The whole ``speed.md``: header, the goals table, the engine's stages, the per-pair errors."""
    lines = ["# Speed a user feels: ours and elastix in one run", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()] + [""]
    lines += [goal_table(rows), "",
              ("Times: median (min-max, runs). Accuracy: against the known motion (rotation angle of R_est^T R_true; distance "
              "at the fixed volume's centre), success within 1 deg and 1 mm; a row whose timed pairs ours did not register "
              "within it is *not met* whatever its time. Memory in MB = 10^6 bytes (`/usr/bin/time -v` maximum RSS). "
              "`slices` mode runs on the first pair's moving contrast moved in-plane (`normal`: +-5 deg, +-5 mm), so that every "
              "slice has a known truth; it is timed with its default outputs as the engine call."), ""]
    engine = measures.get("engine") or {}
    if engine.get("stages"):
        lines += [f"## Engine stages (`RegistrationResult.timings`, pair {engine['pair']})", "", stage_table(engine["stages"]), ""]
    batch = measures.get("batch") or {}
    acc = batch.get("accuracy") or {}
    if acc.get("elastix") or acc.get("ours"):
        ours = {e["pair"]: e for e in acc.get("ours", [])}
        elx = {e["pair"]: e for e in acc.get("elastix", [])}
        secs = dict(zip([p["name"] for p in pairs], batch.get("elastix_runs_s", [])))

        def cell(e):
            if not e:
                return "—"
            return e["error"][:80] if e["error"] else f"{e['rot_err_deg']:.3f} / {e['trans_err_mm']:.3f}" + ("" if e["success"] else " **x**")

        table = [[p["name"] + (" (held out)" if p["held_out"] else ""), f"{p['fixed_contrast']} -> {p['moving_contrast']}",
                  " ".join(f"{v:.1f}" for v in p["params"]), cell(ours.get(p["name"])), cell(elx.get(p["name"])),
                  _f(secs.get(p["name"]), 2)] for p in pairs]
        lines += ["## Pairs of the batch (errors deg / mm; **x**: outside 1 deg / 1 mm)", "",
                  markdown_table(["pair", "contrasts", "motion (rx ry rz deg, tx ty tz mm)", "ours (--batch)",
                                  "elastix command line", "elastix s"], table), ""]
    not_run = [f"- {r['measure']}: {r['verdict']}" for r in rows if r["verdict"].startswith("not available") or r["verdict"].startswith("not measured")]
    if not_run:
        lines += ["## Not measured", "", *not_run, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
