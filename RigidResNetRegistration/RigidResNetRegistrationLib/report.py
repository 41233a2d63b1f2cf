"""Result summaries shared by the command line and the Slicer module: report dict, overview PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .engine import RegistrationResult, normalise_volume
from .geometry import params_to_ras
from .io import atomic_path
from .preprocess import Volume, as_float_tensor
from .resample import sample_slice_stack


def result_report(result: RegistrationResult, model_name: str, model_sha256: str | None, trained: bool) -> dict[str, Any]:
    """JSON-ready summary of a registration (the ``report.json`` written by the command line)."""
    names = (
        ["theta_deg", "tx_mm", "ty_mm"]
        if result.transform_kind == "rigid"
        else ["a11_minus_1", "a12", "a21", "a22_minus_1", "tx_mm", "ty_mm"]
    )
    return {
        "tool": f"RigidResNetRegistration {__version__}",
        "device": result.device,
        "seconds": round(result.seconds, 4),
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "mode": result.mode,
        "slice_orientation": result.frame.orientation,
        "slice_array_axis": result.frame.axis,
        "slices": {"total": int(len(result.used)), "used": int(result.used.sum()), "inliers": int(result.inlier.sum())},
        "model": {"name": model_name, "weights_sha256": model_sha256, "trained": trained, "transform": result.transform_kind},
        "parameters": {n: float(v) for n, v in zip(names, result.params)},
        "parameter_frame": {
            "ex_RAS": result.frame.ex.tolist(),
            "ey_RAS": result.frame.ey.tolist(),
            "normal_RAS": result.frame.n.tolist(),
            "centre_RAS": result.frame.centre.tolist(),
        },
        "similarity": {k: round(v, 6) for k, v in result.similarity.items()},
        "passes": result.passes,
        "precision": result.precision,
        "symmetric": result.symmetric,
        "refinement": None if result.refinement is None else {
            "metric": result.refinement["metric"],
            "similarity_before": round(float(result.refinement["similarity_before"]), 6),
            "similarity_after": round(float(result.refinement["similarity_after"]), 6),
            "steps": int(result.refinement["steps"]),
            **({"scope": "slices", "slices_refined": int(result.refinement["slices_refined"]),
                "slices_moved_over_1": int(result.refinement["slices_moved_over_1"]),
                "note": "each slice's in-plane transform was refined on its own image similarity (similarities: means "
                "over the refined slices; slices_moved_over_1: slices it moved more than 1 deg / 1 mm from the network's "
                "estimate, where the two disagree); slices.csv and 'parameters' hold the refined estimates"}
               if result.refinement.get("scope") == "slices" else
               {"note": "'parameters' are the network's in-plane estimate; the refinement changed all six rigid "
                "parameters and fixed_to_moving_RAS holds its result"}),
        },
        "quality": {"likely_failed": result.likely_failed, "warnings": list(result.warnings)},
        "init": None if result.initialisation is None else {
            **result.initialisation.as_report(),
            "meaning": "where the registration started (RAS resampling transform, fixed -> moving): the moving volume "
            "was placed by it before the network; 'parameters' and slices.csv are relative to it",
        },
        "fixed_to_moving_RAS": {
            "meaning": "resampling transform: maps fixed-image RAS points to moving-image RAS points "
            "(ITK direction; transform.tfm holds this matrix converted to LPS)",
            "matrix": result.fixed_to_moving_ras.tolist(),
        },
        "moving_to_fixed_RAS": {
            "meaning": "modeling transform: moves the moving image onto the fixed image "
            "(Slicer's 'to parent' transform for the moving volume)",
            "matrix": result.moving_to_fixed_ras.tolist(),
        },
    }


def overview_slices(result: RegistrationResult, count: int = 4) -> np.ndarray:
    """Indices of ``count`` used slices spread evenly through the volume."""
    used = np.flatnonzero(result.used)
    if len(used) == 0:
        return used
    pick = np.linspace(0, len(used) - 1, min(count, len(used)) + 2)[1:-1] if len(used) > count else np.arange(len(used))
    return used[np.round(pick).astype(int)]


def overview_figure(fixed: Volume, moving: Volume, result: RegistrationResult, path: str | Path, count: int = 4) -> None:
    """PNG with one row per slice: fixed | moving | registered | |fixed - registered| (like the
    paper's Fig. 3), sampled on the fixed slice frame at the fixed in-plane resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = result.frame
    rows = overview_slices(result, count)
    in_plane = [a for a in range(3) if a != frame.axis]
    spacing = float(np.min(fixed.spacing[in_plane]))
    side = int(min(512, np.ceil(np.max(np.asarray(fixed.shape, float)[in_plane] * fixed.spacing[in_plane]) / spacing)))
    size = (side, side)
    f_t, m_t = as_float_tensor(fixed), as_float_tensor(moving)
    start = result.initial_fixed_to_moving_ras
    per_slice = np.stack([start @ params_to_ras(result.slice_params[s], frame, result.transform_kind, int(s)) for s in rows]) if len(rows) else None
    f = normalise_volume(sample_slice_stack(f_t, fixed.ijk_to_ras, frame, size, spacing, rows), f_t)
    m = normalise_volume(sample_slice_stack(m_t, moving.ijk_to_ras, frame, size, spacing, rows), m_t)
    r = normalise_volume(sample_slice_stack(m_t, moving.ijk_to_ras, frame, size, spacing, rows, per_slice), m_t)
    d = (f - r).abs()
    titles = ["fixed", "moving", "registered", "|fixed - registered|"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * max(1, len(rows))), squeeze=False)
    for row, s in enumerate(rows):
        for col, img in enumerate((f[row], m[row], r[row], d[row])):
            ax = axes[row, col]
            ax.imshow(img.numpy(), cmap="gray" if col < 3 else "magma", origin="lower", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col])
        axes[row, 0].set_ylabel(f"slice {int(s)}")
    fig.suptitle(f"{frame.orientation} slices, mode={result.mode}; NCC {result.similarity['ncc_before']:.3f} -> {result.similarity['ncc_after']:.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
