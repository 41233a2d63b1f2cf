"""Result summary shared by the command line and the Slicer module: the report dict (the picture: overview.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import __version__
from .engine import RegistrationResult
from .model_card import ModelCard


def result_report(result: RegistrationResult, card: ModelCard) -> dict[str, Any]:
    """JSON-ready summary of a registration (the ``report.json`` written by the command line) by
    the model of ``card``."""
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
        "model": {"name": card.name, "weights_sha256": card.sha256, "trained": card.trained, "transform": result.transform_kind,
                  **({"fine_stage": {"weights_sha256": card.fine.sha256, "below": card.fine.below}} if card.fine else {}),
                  **({"mirror": True} if card.mirror else {})},
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
        "quality": quality_report(result),
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
        **({} if result.network_fixed_to_moving_ras is None else {"network_fixed_to_moving_RAS": {
            "meaning": "the network's passes alone (the start included), before any refinement: a resampling "
            "transform as fixed_to_moving_RAS",
            "matrix": np.asarray(result.network_fixed_to_moving_ras).tolist(),
        }}),
    }


def quality_report(result: RegistrationResult) -> dict[str, Any]:
    """The ``quality`` entry of report.json: the verdict (``ok`` / ``suspicious`` / ``failed``, see
    :mod:`quality`), its reasons, the signals it was decided from, and ``likely_failed``
    (``verdict != "ok"``, kept for readers of earlier reports)."""
    out: dict[str, Any] = result.quality.as_dict() if result.quality is not None else {"verdict": result.verdict, "reasons": []}
    out["reasons"] = list(result.warnings)
    out["likely_failed"] = result.likely_failed
    return out
