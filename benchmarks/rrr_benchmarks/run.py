"""``rigid-resnet-benchmark``: this project's engine and classical rigid registration on the same
known-motion cases from held-out real volumes, with the same thread count.

    rigid-resnet-benchmark [--data FOLDER] [-o OUTDIR] [--methods ours sitk ants elastix]
                           [--motions normal hard [3d]] [--volumes N] [--pairs N] [--threads N]
                           [--device cpu|cuda] [--iterations N] [--quick]

Builds the cases once (3D: the fixed T1 volume and a moving T1 / T2 / FLAIR volume moved by a known
motion; 2D: network-grid slice pairs), runs every method in its own worker process (time per case,
peak memory) and writes ``benchmark.md``, ``benchmark.json`` and PNG plots to OUTDIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from .cases import HEADERS, MOTIONS, PAIRINGS
from .methods import METHOD_LABELS, METHODS_2D, Settings, set_thread_env

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "brats" / "BraTS2021_90004"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results"
QUICK = {"volumes": 1, "pairs": 4}


class BenchmarkError(Exception):
    """Bad input: reported as one line ``error: ...``."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rigid-resnet-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help=f"held-out subject folder(s) root (default: {DEFAULT_DATA.relative_to(REPO.parent)} beside the repository)")
    p.add_argument("-o", "--output", default=None, help="output folder (default: benchmarks/results in the repository)")
    p.add_argument("--methods", nargs="+", default=list(METHOD_LABELS), choices=list(METHOD_LABELS), metavar="METHOD",
                   help=f"methods to run (default: all): {', '.join(METHOD_LABELS)}")
    p.add_argument("--motions", "--motion", nargs="+", default=["normal", "hard"], choices=list(MOTIONS), metavar="KIND",
                   help="motion kinds: " + "; ".join(f"{k}: {m.description}" for k, m in MOTIONS.items()) + " (default: normal hard)")
    p.add_argument("--pairings", nargs="+", default=["same", "cross"], choices=list(PAIRINGS),
                   help="same: T1 -> T1; cross: T1 -> T2 / FLAIR alternating; synth: T1 -> a T2-like contrast made "
                        "from the same T1, exactly aligned (default: same cross)")
    p.add_argument("--headers", nargs="+", default=["shared"], choices=list(HEADERS),
                   help="3D cases: shared (the moving volume in the fixed one's frame, as delivered) and/or unshared "
                        "(the same cases with the moving header shifted by 50-150 mm and rotated by up to 30 deg "
                        "about each axis; peers then use their standard initialisers for such pairs) (default: shared)")
    p.add_argument("--volumes", type=int, default=None, metavar="N", help="3D cases per (motion, pairing) (default 6; 0: none)")
    p.add_argument("--pairs", type=int, default=None, metavar="N", help="2D slice pairs per (motion, pairing) (default 50; 0: none)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every method (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of our engine (peers run on the CPU)")
    p.add_argument("--iterations", type=int, default=None, help="our engine's passes (default: the engine's default)")
    p.add_argument("--pair-passes", type=int, default=None, metavar="N",
                   help="passes of our network on 2D slice pairs (default: --iterations, else the engine's default)")
    p.add_argument("--weights", default=None, help="model card (.json) for our engine (default: the bundled model)")
    p.add_argument("--batch-size", type=int, default=32, help="our network's batch size (default 32)")
    p.add_argument("--seed", type=int, default=2024, help="seed of the motions and slice draws (default 2024)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK['volumes']} volume and {QUICK['pairs']} pairs per (motion, pairing)")
    p.add_argument("--no-slices-mode", action="store_true", help="do not time our slices mode on the 3D cases")
    p.add_argument("--no-cli", action="store_true", help="do not time the whole rigid-resnet-register command")
    p.add_argument("--keep-cases", action="store_true", help="keep the case files (printed folder) instead of deleting them")
    return p


def machine_info(threads: int, device: str) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}",
            "threads": f"{threads} for every method (torch.set_num_threads, ITK/SimpleITK global threads, OMP/MKL/OpenBLAS and ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS)"}
    versions = []
    for dist in ("torch", "SimpleITK", "antspyx", "itk-elastix", "numpy"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    info["packages"] = ", ".join(versions)
    import torch

    info["torch"] = torch.__version__
    if device == "cuda":
        info["device"] = f"ours on CUDA: {torch.cuda.get_device_name(0)} (GPU figures are marked [GPU]); peers on the CPU"
    else:
        info["device"] = "CPU for every method"
    return info


def run_worker(spec: dict[str, Any], folder: Path, threads: int) -> dict[str, Any]:
    """Run one worker process; returns its result (or a failure record)."""
    name = f"{spec['method']}-{spec['kind']}"
    spec_path, result_path = folder / f"{name}.spec.json", folder / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = set_thread_env(threads, dict(os.environ))
    paths = [str(REPO / "benchmarks"), str(REPO / "RigidResNetRegistration"), str(REPO / "training")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, "-m", "rrr_benchmarks.worker", str(spec_path), str(result_path)], env=env)
    if not result_path.exists():
        return {"method": spec["method"], "kind": spec["kind"], "rows": [], "skipped": None,
                "failed": f"worker exited with code {proc.returncode} and no result", "peak_rss_mb": None}
    return json.loads(result_path.read_text())


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


def run_command(body: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a benchmark command's ``body(argv)``: a :class:`BenchmarkError` or an interrupt ends it
    with one line ``error: ...`` on stderr (exit 2 / 130) instead of a traceback."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        return body(args_list)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    volumes = a.volumes if a.volumes is not None else (QUICK["volumes"] if a.quick else 6)
    pairs = a.pairs if a.pairs is not None else (QUICK["pairs"] if a.quick else 50)
    if volumes < 0 or pairs < 0 or a.threads < 1:
        raise BenchmarkError("--volumes and --pairs must be at least 0 and --threads at least 1")
    for name, value in (("--iterations", a.iterations), ("--pair-passes", a.pair_passes)):
        if value is not None and not 1 <= value <= 20:
            raise BenchmarkError(f"{name} must be from 1 to 20, not {value}")
    data = Path(a.data) if a.data else DEFAULT_DATA
    if not data.is_dir():
        raise BenchmarkError(f"data folder not found: {data} (give held-out subjects with --data FOLDER)")
    out = Path(a.output) if a.output else DEFAULT_OUTPUT
    out.mkdir(parents=True, exist_ok=True)

    set_thread_env(a.threads)
    import torch

    from rrr_training.data import find_subjects

    from RigidResNetRegistrationLib.model_card import DEFAULT_CARD, read_model_card

    from . import cases as bench_cases
    from .report import markdown_report, plot

    torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda was asked for but CUDA is not available")
    subjects = find_subjects(data)
    if not any("t1" in s.images for s in subjects):
        raise BenchmarkError(f"no subject with a T1 volume under {data} (BraTS naming: NAME_t1.nii.gz, NAME_t2.nii.gz, ...)")
    card = read_model_card(a.weights or DEFAULT_CARD)
    settings = Settings(threads=a.threads, device=a.device, iterations=a.iterations, weights=a.weights,
                        batch_size=a.batch_size, pair_passes=a.pair_passes, slices_mode=not a.no_slices_mode)
    started = time.perf_counter()
    print(f"benchmark: data {data} ({', '.join(s.name for s in subjects)}), methods {' '.join(a.methods)}, motions "
          f"{' '.join(a.motions)}, {volumes} volumes and {pairs} slice pairs per (motion, pairing), {a.threads} threads, "
          f"ours on {a.device}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="rrr-benchmark-"))
    try:
        cases = (bench_cases.build_volume_cases(subjects, a.motions, a.pairings, volumes, a.seed, work, headers=tuple(a.headers))
                 if volumes else [])
        pair_sets = []
        if pairs and any(m in METHODS_2D for m in a.methods):
            pair_sets = bench_cases.build_pair_sets(data, card, a.motions, a.pairings, pairs, a.seed, work)
        common = {"settings": settings.__dict__, "data": str(data), "seed": a.seed}
        workers = []
        for method in a.methods:
            if cases:
                print(f"--- {METHOD_LABELS[method]}: {len(cases)} volumes", flush=True)
                workers.append(run_worker({**common, "method": method, "kind": "3d", "cases": cases}, work, a.threads))
                _say(workers[-1])
            if pair_sets and method in METHODS_2D:
                print(f"--- {METHOD_LABELS[method]}: {sum(s['n'] for s in pair_sets)} slice pairs", flush=True)
                workers.append(run_worker({**common, "method": method, "kind": "2d", "pair_sets": pair_sets}, work, a.threads))
                _say(workers[-1])
        if "ours" in a.methods and cases and not a.no_cli:
            workers.append(run_worker({**common, "method": "ours", "kind": "cli", "cli": _cli_files(cases[0], work)}, work, a.threads))
            _say(workers[-1])

        rows = [r for w in workers for r in w.get("rows", [])]
        meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": shlex.join(["rigid-resnet-benchmark", *argv]), **machine_info(a.threads, a.device),
                "data": f"{data} (subjects: {', '.join(s.name for s in subjects)}; held out: never used in training)",
                "cases": (f"{volumes} volumes and {pairs} slice pairs per (motion, pairing), seed {a.seed}; motions: "
                          + "; ".join(f"`{k}`: {MOTIONS[k].description}" for k in a.motions)
                          + ("" if a.headers == ["shared"] else f"; headers: {', '.join(a.headers)} (unshared: the moving "
                             "header shifted by 50-150 mm and rotated by up to 30 deg about each axis; peers start with their "
                             "standard initialisers for such pairs: SimpleITK MOMENTS, elastix CenterOfGravity, ANTs [fixed,moving,1])")),
                "model": f"{card.identity}; engine passes: {a.iterations or 'engine default'}; "
                         f"network passes on slice pairs: {a.pair_passes or a.iterations or 'engine default'}",
                "wall time of the benchmark": f"{time.perf_counter() - started:.0f} s"}
        meta["plots"] = plot(rows, workers, out, a.device)
        (out / "benchmark.md").write_text(markdown_report(meta, rows, workers, cases), encoding="utf-8")
        (out / "benchmark.json").write_text(json.dumps({"meta": meta, "cases": cases, "pair_sets": pair_sets,
                                                        "workers": [{k: v for k, v in w.items() if k != "rows"} for w in workers],
                                                        "rows": rows}, indent=1, default=float) + "\n", encoding="utf-8")
        print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'} and {', '.join(meta['plots'])}", flush=True)
    finally:
        if a.keep_cases:
            print(f"case files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _say(worker: dict[str, Any]) -> None:
    if worker.get("skipped"):
        print(f"skipped {worker['method']} ({worker['kind']}): {worker['skipped']}", flush=True)
    elif worker.get("failed"):
        print(f"FAILED {worker['method']} ({worker['kind']}): {worker['failed']}", flush=True)
    elif worker.get("peak_rss_mb") is not None:
        print(f"    peak RSS of the worker: {worker['peak_rss_mb']:.0f} MB", flush=True)


def _cli_files(case: dict[str, Any], work: Path) -> dict[str, Any]:
    """NIfTI files of one case for the command-line timing (written once)."""
    import numpy as np

    from RigidResNetRegistrationLib import geometry as geo
    from RigidResNetRegistrationLib.io import write_volume
    from RigidResNetRegistrationLib.preprocess import Volume

    from .cases import load_case

    fixed, moving, truth = load_case(case)
    paths = {}
    for role, vol in (("fixed", fixed), ("moving", moving)):
        paths[role] = str(work / f"cli_{role}.nii.gz")
        write_volume(Volume(vol.array, vol.ijk_to_ras, role), paths[role])
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    return {**paths, "case": case["id"], "truth": np.asarray(truth).tolist(), "centre": centre.tolist()}


if __name__ == "__main__":
    raise SystemExit(main())
