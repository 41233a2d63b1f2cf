"""``python -m rrr_benchmarks.whole_head``: our engine, default options, on whole-head scans
(``whole-head/`` and held-out IXI subjects of the shared data), each registered to a copy of itself
moved by a known rigid motion; writes ``whole_head.md`` and ``whole_head.json``.

    python -m rrr_benchmarks.whole_head [--data ../shared/data] [--ixi 10] [--motions 3d capture30]
                                        [--headers shared unshared] [--weights CARD]
                                        [--subjects-file training/holdout.txt] [-o benchmarks/results-whole-head]

Scans: every ``whole-head/`` scan, and ``--ixi`` IXI T1 heads spread evenly over the IXI subjects that
``--subjects-file`` holds out of training (all 148 IXI names when the file is absent or names none).
Each scan is marked *held out* or *in training* by that file: the bundled model is trained with
``--holdout-file training/holdout.txt``, so the clinical ``whole-head/`` scans other than
studyforrest are in its training set (as whole scans; the motions here are new) and the summary
gives them their own rows.

Each case: fixed = the scan as stored; moving = the scan resampled on its own grid under a random
motion of the kind (:data:`cases.MOTIONS`, about the scan's centre), optionally with its header
moved (:func:`cases.unshare_header`); success = within 1 degree and 1 mm of the truth (measured at
the fixed volume's centre, as every benchmark here). Motions are seeded per (scan, motion).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from RigidResNetRegistrationLib import geometry as geo

from .cases import HEADERS, MOTIONS, apply_motion, draw_motion, stable_rng, unshare_header
from .methods import set_thread_env

REPO = Path(__file__).resolve().parents[2]
SUCCESS_DEG, SUCCESS_MM = 1.0, 1.0


def scans(data: Path, n_ixi: int, held_out: set[str] | None = None) -> list[tuple[Path, bool]]:
    """``(path, held out)`` for every ``whole-head/`` scan and ``n_ixi`` IXI T1 scans spread evenly
    over the sorted IXI scans whose subject (:func:`rrr_training.data.subject_key`) is in
    ``held_out`` (over all IXI scans when ``held_out`` is None or names none of them). A scan is
    held out when its subject is in ``held_out``; with ``held_out=None`` every scan counts as held out."""
    from rrr_training.data import subject_key

    def is_held_out(path: Path) -> bool:
        return held_out is None or subject_key(path) in held_out

    whole = sorted(p for p in (data / "whole-head").glob("*") if p.name.endswith((".nii.gz", ".nii", ".nrrd")))
    ixi = sorted((data / "ixi-t1-2mm").glob("*.nii.gz"))
    ixi = [p for p in ixi if is_held_out(p)] or ixi
    picks = [ixi[i] for i in np.linspace(0, len(ixi) - 1, min(n_ixi, len(ixi))).round().astype(int)] if n_ixi and ixi else []
    return [(p, is_held_out(p)) for p in whole + picks]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rrr_benchmarks.whole_head", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--ixi", type=int, default=10, help="IXI subjects (default 10)")
    p.add_argument("--motions", nargs="+", default=["3d", "capture30"], choices=[k for k, m in MOTIONS.items() if not m.in_plane])
    p.add_argument("--headers", nargs="+", default=["shared", "unshared"], choices=list(HEADERS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--weights", help="model card (.json) of the network (default: the bundled model)")
    p.add_argument("--subjects-file", default=str(REPO / "training" / "holdout.txt"),
                   help="hold-out file naming the subjects never trained on (default: training/holdout.txt)")
    p.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "results-whole-head"))
    a = p.parse_args(argv)
    set_thread_env(a.threads)
    import torch

    from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
    from RigidResNetRegistrationLib.io import read_volume
    from RigidResNetRegistrationLib.model import ModelError, load_model
    from rrr_training.data import read_holdout_file

    torch.set_num_threads(a.threads)
    try:
        model = load_model(a.weights, a.device)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    subjects_file = Path(a.subjects_file).resolve()
    shown = subjects_file.relative_to(REPO) if subjects_file.is_relative_to(REPO) else subjects_file
    held_out = set(read_holdout_file(subjects_file)) if subjects_file.is_file() else None
    if held_out is None:
        print(f"note: no subjects file {a.subjects_file}: IXI scans drawn from all, every scan counted as held out", file=sys.stderr)
    options = RegistrationOptions(device=a.device, compute_registered=False, compute_difference=False)
    rows = []
    for path, is_held_out in scans(Path(a.data), a.ixi, held_out):
        fixed = read_volume(path)
        centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
        for motion in a.motions:
            rng = stable_rng(a.seed, "whole-head", path.name, motion)
            params = draw_motion(MOTIONS[motion], rng)
            moved, truth = apply_motion(fixed, MOTIONS[motion], params)
            for header in a.headers:
                moving, case_truth = (moved, truth) if header == "shared" else unshare_header(moved, truth, rng)[:2]
                t0 = time.perf_counter()
                try:
                    result = register_volumes(fixed, moving, model, options)
                    rot, mm = geo.rigid_error(result.fixed_to_moving_ras, case_truth, centre)
                    init, error = result.initialisation.used + (" + search" if result.initialisation.searched else ""), None
                except Exception as exc:  # a failed case, reported
                    rot = mm = float("nan")
                    init, error = "", f"{type(exc).__name__}: {exc}"
                row = {"scan": path.name, "held_out": is_held_out, "shape": list(fixed.shape), "spacing_mm": [round(float(s), 2) for s in fixed.spacing],
                       "motion": motion, "headers": header, "params": np.round(params, 2).tolist(), "rot_err_deg": rot,
                       "trans_err_mm": mm, "success": bool(rot < SUCCESS_DEG and mm < SUCCESS_MM), "start": init,
                       "seconds": time.perf_counter() - t0, "error": error}
                rows.append(row)
                print(f"{path.name} {motion} {header}: {rot:.3f} deg {mm:.3f} mm ({init}) {row['seconds']:.1f} s"
                      + (f" FAILED {error}" if error else ""), flush=True)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    command = sys.argv if argv is None else argv
    (out / "whole_head.json").write_text(json.dumps({"command": command, "model": model.card.identity, "subjects_file": str(shown) if held_out is not None else None,
                                                     "rows": rows}, indent=1, default=float) + "\n")
    lines = ["# Whole-head scans: default options, known motion\n",
             f"Model: {model.card.identity}. Held out: subjects named in `{shown}`"
             + ("" if held_out is not None else " (absent: every scan counted as held out)")
             + "; the other scans are in the training set of models trained with it (as whole scans; these motions are new).\n",
             f"Success: within {SUCCESS_DEG:g} deg and {SUCCESS_MM:g} mm of the truth. Motions: "
             + "; ".join(f"`{m}`: {MOTIONS[m].description}" for m in a.motions)
             + ". Unshared headers: the moving header shifted by 50-150 mm and rotated by up to 30 deg about each axis.\n",
             "| scans | motion | headers | n | success | rotation error median (max) deg | translation error median (max) mm | s per case (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for kept, label in ((True, "held out"), (False, "in training")):
        for motion in a.motions:
            for header in a.headers:
                sel = [r for r in rows if r["motion"] == motion and r["headers"] == header and r["held_out"] == kept]
                if not sel:
                    continue
                rot = np.array([r["rot_err_deg"] for r in sel])
                mm = np.array([r["trans_err_mm"] for r in sel])
                ok = sum(r["success"] for r in sel)
                lines.append(f"| {label} | `{motion}` | {header} | {len(sel)} | {ok}/{len(sel)} ({100 * ok / len(sel):.0f}%) | "
                             f"{np.nanmedian(rot):.3f} ({np.nanmax(rot):.3f}) | {np.nanmedian(mm):.3f} ({np.nanmax(mm):.3f}) | "
                             f"{np.median([r['seconds'] for r in sel]):.1f} |")
    lines += ["", "| scan | held out | shape | spacing mm | motion | headers | rotation err deg | translation err mm | start |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scan']} | {'yes' if r['held_out'] else 'no'} | {r['shape']} | {r['spacing_mm']} | `{r['motion']}` {r['params']} | {r['headers']} | "
                     f"{r['rot_err_deg']:.3f} | {r['trans_err_mm']:.3f} | {r['start'] or r['error']} |")
    (out / "whole_head.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'whole_head.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
