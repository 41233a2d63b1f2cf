"""One method on one set of cases, in its own process (``python -m rrr_benchmarks.worker SPEC RESULT``).

The parent sets the thread-count environment before this process starts; the worker sets each
library's thread count again, imports only what its method needs (peers never import torch), does
the method's one-off setup (imports, model load), runs one untimed warm-up call (its time is kept
as the *cold first call*), then times every case from arrays in memory to the transform and the
registered volume (file reading excluded), and reports per-case rows and its own peak resident
memory (Linux ``VmHWM``, else ``getrusage(RUSAGE_SELF).ru_maxrss``: interpreter, libraries, one
case's volumes, the method's work).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from RigidResNetRegistrationLib import geometry as geo

from . import cases as bench_cases
from .methods import METHOD_LABELS, SETUP, MethodUnavailable, Settings, set_thread_env, sitk_rigid_2d

SUCCESS_ROT_DEG = 1.0
SUCCESS_TRANS_MM = 1.0


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: ``VmHWM`` of ``/proc/self/status`` on Linux
    (the high-water mark of this program's own memory; ``getrusage``'s ``ru_maxrss`` would also
    count the parent's memory at the fork before ``exec``), else ``ru_maxrss``."""
    hwm = _proc_hwm_mb("self")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _proc_hwm_mb(pid: str | int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_watched(command: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run a command; also return its peak RSS in MB (its ``VmHWM``, polled while it runs)."""
    import threading

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: list[float] = []

    def watch() -> None:
        while proc.poll() is None:
            v = _proc_hwm_mb(proc.pid)
            if v is not None:
                peak.append(v)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), (max(peak) if peak else None)


def log(message: str) -> None:
    print(message, flush=True)


def _row(dimension: str, method: str, case: dict[str, Any], rot: float, trans: float, seconds: float,
         error: str | None = None, **extra: Any) -> dict[str, Any]:
    ok = error is None and rot < SUCCESS_ROT_DEG and trans < SUCCESS_TRANS_MM
    return {"dimension": dimension, "method": method, "motion": case["motion"], "pairing": case["pairing"],
            "case": case["id"], "rot_err_deg": float(rot), "trans_err_mm": float(trans), "success": bool(ok),
            "seconds": float(seconds), "error": error, **extra}


# --------------------------------------------------------------------------- 3D


def run_3d(method: str, settings: Settings, cases: list[dict[str, Any]], result: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    register = SETUP[method](settings)
    result["setup_s"] = time.perf_counter() - t0
    tag = f"[{method} 3d]"
    if not cases:
        return
    fixed, moving, _ = bench_cases.load_case(cases[0])
    t0 = time.perf_counter()
    register(fixed, moving)
    result["first_call_s"] = time.perf_counter() - t0
    log(f"{tag} warm-up (cold first call) {result['first_call_s']:.2f} s")
    del fixed, moving
    for n, case in enumerate(cases, 1):
        fixed, moving, truth = bench_cases.load_case(case)
        centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
        try:
            t0 = time.perf_counter()
            out = register(fixed, moving, **({"unshared": True} if case.get("headers") == "unshared" else {}))
            seconds = time.perf_counter() - t0
            if out.registered.shape != fixed.shape:
                raise RuntimeError(f"registered volume has shape {out.registered.shape}, not {fixed.shape}")
            rot, trans = geo.rigid_error(out.fixed_to_moving_ras, truth, centre)
            row = _row("3d", method, case, rot, trans, seconds, estimate=np.asarray(out.fixed_to_moving_ras).tolist())
        except Exception as exc:  # a failed registration is a failed case, not a failed benchmark
            row = _row("3d", method, case, float("nan"), float("nan"), float("nan"), f"{type(exc).__name__}: {exc}")
        result["rows"].append(row)
        log(f"{tag} {n}/{len(cases)} {case['id']} ({case['moving_contrast']}): rotation error {row['rot_err_deg']:.3f} deg, "
            f"translation error {row['trans_err_mm']:.3f} mm, {row['seconds']:.2f} s" + (f"  FAILED {row['error']}" if row["error"] else ""))
        del fixed, moving
    if method == "ours" and settings.slices_mode:
        result["peak_rss_mb"] = peak_rss_mb()  # the registrations above; slices mode holds more volumes at once
        _time_slices_mode(register, cases, result)
        result["slices_mode"]["peak_rss_mb"] = peak_rss_mb()  # high-water mark of the whole worker


def _time_slices_mode(register, cases: list[dict[str, Any]], result: dict[str, Any], runs: int = 3) -> None:
    """Our engine in ``slices`` mode (per-slice transforms only, no registered volume) with the
    engine's defaults (both orders on every ``symmetric_stride``-th slice), with every slice in
    both orders (``--symmetric-stride 1``), in one order (``--no-symmetric``) and with each slice
    refined on its image similarity (``--refine-slices``): on the first
    case, the median of ``runs`` warm runs' seconds / used slices = amortised time per slice
    pair, and each used slice's error against the case's truth; on the first case of each
    pairing, the per-slice errors on a scan with motion *between* slices made from that case's
    unmoved moving contrast (:func:`cases.interslice_motion`, seeded by the case id)."""
    from dataclasses import replace

    firsts: dict[str, dict[str, Any]] = {}  # the first case of each pairing
    for case in cases:
        firsts.setdefault(case["pairing"], case)
    summary: dict[str, Any] = {}
    base = replace(register.options, mode="slices", compute_registered=False, compute_difference=False)
    variants = {"default": base, "every_slice": replace(base, symmetric=True, symmetric_stride=1),
                "one_order": replace(base, symmetric=False), "refined": replace(base, refine_slices=True)}
    for key, options in variants.items():
        run = _slices_mode_run(register.model, cases[0], options, runs)
        for case in firsts.values():
            errors = _interslice_errors(register.model, case, options)
            if errors is not None:
                run["accuracy"][f"motion between slices, {case['pairing']}"] = errors
        for name, acc in run["accuracy"].items():
            log(f"[ours slices mode, {_variant_label(options)}] {name}: per-slice rotation error median {acc['rot_median']:.3f} "
                f"deg, translation {acc['trans_median']:.3f} mm, {100 * acc['success']:.0f}% within 1 deg / 1 mm ({acc['n']} slices)")
        if key == "default":
            summary = run
        else:
            summary[key] = run
    result["slices_mode"] = summary


def _variant_label(options) -> str:
    """How a ``slices``-mode run predicts its slice pairs: one order, or both orders on every
    ``symmetric_stride``-th slice."""
    if options.refine_slices:
        return "defaults + per-slice refinement"
    if not options.symmetric:
        return "one order"
    return "symmetric" if options.symmetric_stride == 1 else f"symmetric every {options.symmetric_stride} slices"


def _slices_mode_run(model, case: dict[str, Any], options, runs: int) -> dict[str, Any]:
    """Time ``slices`` mode with ``options`` on ``case`` (one warm-up, then ``runs`` runs) and
    measure its per-slice errors against the case's motion."""
    from RigidResNetRegistrationLib.engine import register_volumes
    from RigidResNetRegistrationLib.preprocess import Volume

    fixed, moving, truth = bench_cases.load_case(case)
    f = Volume(fixed.array, fixed.ijk_to_ras, "fixed volume")
    m = Volume(moving.array, moving.ijk_to_ras, "moving volume")
    register_volumes(f, m, model, options)  # warm (shapes differ from volume mode only in the end)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = register_volumes(f, m, model, options)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    used = int(np.count_nonzero(out.used))
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    motion = geo.ras_to_params(truth, frame)  # the case's in-plane motion, the same for every slice
    log(f"[ours slices mode, {_variant_label(options)}] {case['id']}: {seconds:.2f} s for {used} "
        f"used slices = {1000 * seconds / max(used, 1):.1f} ms per slice pair")
    return {"case": case["id"], "seconds": seconds, "runs_s": times, "used_slices": used,
            "ms_per_slice_pair": 1000.0 * seconds / max(used, 1), "iterations": options.iterations,
            "symmetric": options.symmetric, "symmetric_stride": options.symmetric_stride, "refine_slices": options.refine_slices,
            "engine_timings_s": {k: float(v) for k, v in getattr(out, "timings", {}).items()},
            "accuracy": {"one motion": slice_errors(out, np.tile(motion, (len(out.used), 1)))}}


def _interslice_errors(model, case: dict[str, Any], options) -> dict[str, float] | None:
    """Per-slice errors of ``slices`` mode on a scan with motion between slices: the case's unmoved
    moving contrast re-made slice by slice (the case's motion, two steps, jitter; seeded by the
    case id), registered to the case's fixed volume. None (logged) when that contrast is not on
    the fixed volume's grid: the slice-by-slice truth is exact only on one grid."""
    from RigidResNetRegistrationLib.engine import register_volumes
    from RigidResNetRegistrationLib.preprocess import Volume

    fixed, _, truth = bench_cases.load_case(case)
    source = bench_cases.load_moving_source(case)
    if source.shape != fixed.shape or not np.allclose(source.ijk_to_ras, fixed.ijk_to_ras):
        log(f"[ours slices mode] {case['id']}: no motion between slices ({case['moving_contrast']} is not on the fixed grid)")
        return None
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    rng = bench_cases.stable_rng(0, "interslice", case["id"])  # the same scan for the same case
    params = bench_cases.interslice_motion(rng, fixed.shape[frame.axis], geo.ras_to_params(truth, frame))
    moved, _ = bench_cases.apply_interslice_motion(source, params)
    out = register_volumes(Volume(fixed.array, fixed.ijk_to_ras, "fixed volume"),
                           Volume(moved.array, moved.ijk_to_ras, "moving volume"), model, options)
    return slice_errors(out, params)


def slice_errors(out, truth_params: np.ndarray) -> dict[str, float]:
    """Errors of a ``slices``-mode result's per-slice parameters against ``(S, 3)`` true slice-frame
    parameters, over the slices it registered: medians, 90th percentiles, share within 1 deg / 1 mm."""
    used = np.asarray(out.used, dtype=bool)
    rot, trans = geo.params_error_2d(np.asarray(out.slice_params)[used], np.asarray(truth_params)[used])
    return {"n": int(used.sum()), "rot_median": float(np.median(rot)), "rot_p90": float(np.percentile(rot, 90)),
            "trans_median": float(np.median(trans)), "trans_p90": float(np.percentile(trans, 90)),
            "success": float(np.mean((rot < SUCCESS_ROT_DEG) & (trans < SUCCESS_TRANS_MM)))}


# --------------------------------------------------------------------------- 2D


def run_2d(method: str, settings: Settings, sets: list[dict[str, Any]], spec: dict[str, Any], result: dict[str, Any]) -> None:
    if method == "ours":
        _run_2d_ours(settings, sets, spec, result)
    elif method == "sitk":
        _run_2d_sitk(settings, sets, result)
    else:
        raise MethodUnavailable(f"{method} has no 2D slice-pair variant")


def _run_2d_ours(settings: Settings, sets: list[dict[str, Any]], spec: dict[str, Any], result: dict[str, Any]) -> None:
    import torch

    from RigidResNetRegistrationLib.engine import RegistrationOptions
    from RigidResNetRegistrationLib.model import load_model
    from rrr_training.data import PairBatch
    from rrr_training.evaluate import evaluate_batch

    t0 = time.perf_counter()
    torch.set_num_threads(settings.threads)
    model = load_model(settings.weights, settings.device)
    result["setup_s"] = time.perf_counter() - t0
    iterations = settings.pair_passes or settings.iterations or RegistrationOptions().iterations
    loaded = bench_cases.load_subjects_2d(Path(spec["data"]), model.card)
    for k, one in enumerate(sets):
        batch = bench_cases.draw_pair_set(loaded, model.card, one["motion"], one["pairing_key"], one["n"], spec["seed"])
        saved = np.load(one["file"])
        if not (np.array_equal(saved["fixed"], batch.fixed.numpy()) and np.allclose(saved["truth"], batch.truth.double().numpy())):
            raise RuntimeError(f"slice pairs {one['id']} drawn again differ from the stored ones")
        if k == 0:
            few = slice(0, min(4, len(batch.truth)))
            warm = PairBatch(batch.fixed[few], batch.moving[few], batch.truth[few], batch.same_contrast[few], batch.sources[few])
            t0 = time.perf_counter()
            evaluate_batch(model, warm, iterations, settings.batch_size)
            result["first_call_s"] = time.perf_counter() - t0
            log(f"[ours 2d] warm-up (cold first call, {len(warm.truth)} pairs) {result['first_call_s']:.2f} s")
        rot, trans, seconds = evaluate_batch(model, batch, iterations, settings.batch_size)
        per_pair = seconds / len(rot)
        for i, (r, t) in enumerate(zip(rot, trans)):
            result["rows"].append(_row("2d", "ours", {**one, "id": f"{one['id']}-{i:03d}"}, r, t, per_pair,
                                       batch_seconds=seconds, iterations=iterations))
        log(f"[ours 2d] {one['id']}: {len(rot)} pairs, rotation error median {np.median(rot):.3f} deg, translation error "
            f"median {np.median(trans):.3f} mm, {1000 * per_pair:.1f} ms per pair ({iterations} passes, batches of {settings.batch_size})")


def _run_2d_sitk(settings: Settings, sets: list[dict[str, Any]], result: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise MethodUnavailable(f"SimpleITK does not import ({exc})") from None
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    result["setup_s"] = time.perf_counter() - t0
    for k, one in enumerate(sets):
        data = np.load(one["file"])
        fixed, moving, truth = data["fixed"], data["moving"], data["truth"]
        spacing = float(one["spacing_mm"])
        if k == 0:
            t0 = time.perf_counter()
            sitk_rigid_2d(fixed[0], moving[0], spacing)
            result["first_call_s"] = time.perf_counter() - t0
        for i in range(len(truth)):
            case = {**one, "id": f"{one['id']}-{i:03d}"}
            try:
                t0 = time.perf_counter()
                est = sitk_rigid_2d(fixed[i], moving[i], spacing)
                seconds = time.perf_counter() - t0
                r, t = geo.params_error_2d(est, truth[i])
                row = _row("2d", "sitk", case, float(r), float(t), seconds)
            except Exception as exc:
                row = _row("2d", "sitk", case, float("nan"), float("nan"), float("nan"), f"{type(exc).__name__}: {exc}")
            result["rows"].append(row)
            if (i + 1) % 10 == 0 or i + 1 == len(truth) or row["error"]:
                done = [x for x in result["rows"] if x["case"].startswith(one["id"])]
                log(f"[sitk 2d] {one['id']}: {i + 1}/{len(truth)} pairs, rotation error median "
                    f"{np.nanmedian([x['rot_err_deg'] for x in done]):.3f} deg, translation error median "
                    f"{np.nanmedian([x['trans_err_mm'] for x in done]):.3f} mm, {1000 * np.nanmedian([x['seconds'] for x in done]):.0f} ms per pair"
                    + (f"  FAILED pair {i}: {row['error']}" if row["error"] else ""))


# --------------------------------------------------------------------------- the command line


def command_line() -> list[str]:
    exe = shutil.which("rigid-resnet-register")
    return [exe] if exe else [sys.executable, "-m", "RigidResNetRegistrationLib"]


def run_cli(settings: Settings, spec: dict[str, Any], result: dict[str, Any], runs: int = 2) -> None:
    """The whole command (``rigid-resnet-register FIXED MOVING -o OUT --no-overview --quiet``) on
    NIfTI files written once: wall time per run (start, imports, model load, reading, registering,
    writing the outputs) and the peak memory of the command's processes."""
    from RigidResNetRegistrationLib.io import read_tfm

    cli = spec["cli"]
    cli_tail = ["--no-overview", "--quiet", "--device", settings.device]
    if settings.iterations:
        cli_tail += ["--iterations", str(settings.iterations)]
    if settings.weights:
        cli_tail += ["--weights", settings.weights]
    prefix = command_line()
    base = prefix + [cli["fixed"], cli["moving"], *cli_tail]
    env = set_thread_env(settings.threads, dict(os.environ))
    truth = np.array(cli["truth"])
    centre = np.array(cli["centre"])
    walls: list[float] = []
    peaks: list[float | None] = []
    for k in range(runs):
        out = Path(tempfile.mkdtemp(prefix="rrr-bench-cli-"))
        try:
            t0 = time.perf_counter()
            proc, rss = run_watched(base + ["-o", str(out)], env)
            wall = time.perf_counter() - t0
            peaks.append(rss)
            if proc.returncode != 0:
                raise RuntimeError(f"rigid-resnet-register failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            rot, trans = geo.rigid_error(read_tfm(out / "transform.tfm"), truth, centre)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        walls.append(wall)
        log(f"[ours command line] run {k + 1}/{runs} ({cli['case']}): {wall:.2f} s wall, rotation error {rot:.3f} deg, "
            f"translation error {trans:.3f} mm")
    result["cli"] = {"case": cli["case"], "wall_s": walls, "command": " ".join([Path(prefix[0]).name, *prefix[1:], "FIXED.nii.gz", "MOVING.nii.gz", *cli_tail, "-o", "OUT"]),
                     "rot_err_deg": rot, "trans_err_mm": trans,
                     "peak_rss_mb": max((p for p in peaks if p is not None), default=float("nan"))}


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    settings = Settings(**spec["settings"])
    set_thread_env(settings.threads)
    method, kind = spec["method"], spec["kind"]
    result: dict[str, Any] = {"method": method, "label": METHOD_LABELS.get(method, method), "kind": kind, "rows": [],
                              "skipped": None, "failed": None, "setup_s": None, "first_call_s": None, "pid": os.getpid()}
    try:
        if kind == "3d":
            run_3d(method, settings, spec["cases"], result)
        elif kind == "2d":
            run_2d(method, settings, spec["pair_sets"], spec, result)
        elif kind == "cli":
            run_cli(settings, spec, result)
        else:
            raise ValueError(f"unknown worker kind {kind}")
    except MethodUnavailable as exc:
        result["skipped"] = str(exc)
    except Exception as exc:
        result["failed"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if result.get("peak_rss_mb") is None:  # not already taken before extra work (ours in 3D: before slices mode)
        result["peak_rss_mb"] = peak_rss_mb()
    Path(args[1]).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
