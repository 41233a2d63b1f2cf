"""``python -m rrr_benchmarks.whole_head``: our engine, default options, on whole-head scans the
model never saw (``whole-head/`` and IXI subjects of the shared data), each registered to a copy
of itself moved by a known rigid motion; writes ``whole_head.md`` and ``whole_head.json``.

    python -m rrr_benchmarks.whole_head [--data ../shared/data] [--ixi 10] [--motions 3d capture30]
                                        [--headers shared unshared] [-o benchmarks/results-whole-head]

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


def scans(data: Path, n_ixi: int) -> list[Path]:
    """Every ``whole-head/`` scan and ``n_ixi`` IXI T1 scans spread evenly over the sorted list."""
    whole = sorted(p for p in (data / "whole-head").glob("*") if p.name.endswith((".nii.gz", ".nii", ".nrrd")))
    ixi = sorted((data / "ixi-t1-2mm").glob("*.nii.gz"))
    picks = [ixi[i] for i in np.linspace(0, len(ixi) - 1, n_ixi).round().astype(int)] if n_ixi and ixi else []
    return whole + picks


def read_any(path: Path):
    """NIfTI through the engine's reader; NRRD through SimpleITK (LPS -> RAS)."""
    from RigidResNetRegistrationLib.io import read_volume
    from RigidResNetRegistrationLib.volume import Volume

    if not path.name.endswith(".nrrd"):
        return read_volume(path)
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = d, img.GetOrigin()
    return Volume(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)).copy(), geo.lps_to_ras(m), path.name)


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
    p.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "results-whole-head"))
    a = p.parse_args(argv)
    set_thread_env(a.threads)
    import torch

    from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
    from RigidResNetRegistrationLib.model import load_model

    torch.set_num_threads(a.threads)
    model = load_model(None, a.device)
    options = RegistrationOptions(device=a.device, compute_registered=False, compute_difference=False)
    rows = []
    for path in scans(Path(a.data), a.ixi):
        fixed = read_any(path)
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
                row = {"scan": path.name, "shape": list(fixed.shape), "spacing_mm": [round(float(s), 2) for s in fixed.spacing],
                       "motion": motion, "headers": header, "params": np.round(params, 2).tolist(), "rot_err_deg": rot,
                       "trans_err_mm": mm, "success": bool(rot < SUCCESS_DEG and mm < SUCCESS_MM), "start": init,
                       "seconds": time.perf_counter() - t0, "error": error}
                rows.append(row)
                print(f"{path.name} {motion} {header}: {rot:.3f} deg {mm:.3f} mm ({init}) {row['seconds']:.1f} s"
                      + (f" FAILED {error}" if error else ""), flush=True)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "whole_head.json").write_text(json.dumps({"command": sys.argv if argv is None else argv, "rows": rows}, indent=1, default=float) + "\n")
    lines = [f"# Whole-head scans never trained on: default options, known motion\n",
             f"Success: within {SUCCESS_DEG:g} deg and {SUCCESS_MM:g} mm of the truth. Motions: "
             + "; ".join(f"`{m}`: {MOTIONS[m].description}" for m in a.motions)
             + ". Unshared headers: the moving header shifted by 50-150 mm and rotated by up to 30 deg about each axis.\n",
             "| motion | headers | n | success | rotation error median (max) deg | translation error median (max) mm | s per case (median) |",
             "|---|---|---|---|---|---|---|"]
    for motion in a.motions:
        for header in a.headers:
            sel = [r for r in rows if r["motion"] == motion and r["headers"] == header]
            if not sel:
                continue
            rot = np.array([r["rot_err_deg"] for r in sel])
            mm = np.array([r["trans_err_mm"] for r in sel])
            ok = sum(r["success"] for r in sel)
            lines.append(f"| `{motion}` | {header} | {len(sel)} | {ok}/{len(sel)} ({100 * ok / len(sel):.0f}%) | "
                         f"{np.nanmedian(rot):.3f} ({np.nanmax(rot):.3f}) | {np.nanmedian(mm):.3f} ({np.nanmax(mm):.3f}) | "
                         f"{np.median([r['seconds'] for r in sel]):.1f} |")
    lines += ["", "| scan | shape | spacing mm | motion | headers | rotation err deg | translation err mm | start |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scan']} | {r['shape']} | {r['spacing_mm']} | `{r['motion']}` {r['params']} | {r['headers']} | "
                     f"{r['rot_err_deg']:.3f} | {r['trans_err_mm']:.3f} | {r['start'] or r['error']} |")
    (out / "whole_head.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'whole_head.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
