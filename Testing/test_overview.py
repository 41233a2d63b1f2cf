"""overview.png: panels from the final transform's registered volume, orientation letters that tell
the truth, Pillow only (no matplotlib on the command line's path)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, ConstantPredictor, make_affine, moved_copy, phantom_volume, write_card, write_phantom_pair
from PIL import Image

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
from RigidResNetRegistrationLib.model import ModelCard
from RigidResNetRegistrationLib.overview import (
    direction_letters,
    edge_labels,
    overview_figure,
    panel_layout,
    panel_pixels,
    stored_layout,
)
from RigidResNetRegistrationLib.preprocess import Volume, as_float_tensor, intensity_range
from RigidResNetRegistrationLib.resample import resample_volume

CARD = ModelCard.from_dict({"name": "oracle", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0}})
MOTION = np.array([4.0, 3.0, -2.0])
STANDARD = {  # Slicer's slice views: the letters on the left, right, top and bottom edges
    "axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
    "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
    "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
}


# --------------------------------------------------------------------------- orientation letters


def test_direction_letters():
    assert [direction_letters(v) for v in np.eye(3)] == ["R", "A", "S"]
    assert [direction_letters(-v) for v in np.eye(3)] == ["L", "P", "I"]
    assert direction_letters([0.9, -0.2, 0.1]) == "R"  # 13 degrees off R: one letter
    assert direction_letters([0.5, -1.0, 0.0]) == "PR"  # 27 degrees off P: the second letter too
    assert direction_letters([1.0, 1.0, 1.0]) == "RAS"


def _marker_volume(codes: str, shape=(20, 24, 22), spacing=(1.5, 2.0, 2.5), rotation_deg=(0.0, 0.0, 0.0)) -> Volume:
    """Zero except one octant in RAS: x > 0 (right), y > 0 (anterior), z > 0 (superior)."""
    aff = make_affine(spacing=spacing, codes=codes, rotation_deg=rotation_deg, shape=shape)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    ras = geo.apply_to_points(aff, ijk)
    return Volume(np.all(ras > 2.0, axis=-1).astype(np.float32), aff, f"marker {codes}")


@pytest.mark.parametrize("codes,orientation", [
    ("RAS", "axial"), ("LPS", "axial"), ("PSR", "axial"), ("PSR", "sagittal"), ("RPS", "sagittal"),
    ("LPS", "coronal"), ("RPS", "coronal"),
])
def test_standard_view_letters_match_the_pixels(codes, orientation):
    """Whatever the voxel order (LPS, a sagittal acquisition PSR/RPS), slices are shown as Slicer
    shows them and the letters say so; the marker octant (right, anterior, superior) appears in
    the panel corner between the edges labelled with its letters."""
    vol = _marker_volume(codes)
    axis = geo.slice_axis(vol.ijk_to_ras, orientation)
    layout = panel_layout(vol.ijk_to_ras, axis, orientation)
    labels = edge_labels(vol.ijk_to_ras, layout)
    assert labels == STANDARD[orientation]
    # a plane inside the octant along the slice normal (x, y or z > 0)
    normal = geo.ANATOMICAL_DIRECTIONS[geo.ORIENTATION_AXES[orientation][0]]
    plane_ras = np.asarray(vol.ijk_to_ras)[:3, axis] @ normal
    index = 3 * vol.shape[axis] // 4 if plane_ras > 0 else vol.shape[axis] // 4
    image = panel_pixels(np.take(vol.array, index, axis), layout)
    h, w = image.shape
    quadrants = {(v, u): image[v * h // 2:(v + 1) * h // 2, u * w // 2:(u + 1) * w // 2].mean() for v in (0, 1) for u in (0, 1)}
    # the octant's two in-plane letters: top/bottom and left/right
    vertical = 0 if labels["top"] in "RAS" else 1
    horizontal = 0 if labels["left"] in "RAS" else 1
    assert quadrants[(vertical, horizontal)] > 0.5
    assert all(value < 0.05 for key, value in quadrants.items() if key != (vertical, horizontal))


def test_letters_follow_the_layout_and_oblique_grids():
    """The letters come from the grid and the layout, not from the orientation's name."""
    ras = make_affine(codes="RAS")
    assert edge_labels(ras, stored_layout(2)) == {"left": "L", "right": "R", "top": "P", "bottom": "A"}
    lps = make_affine(codes="LPS")
    assert edge_labels(lps, stored_layout(2)) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    # 30 degrees about S: the in-plane axes lie between R/L and A/P
    oblique = make_affine(codes="RAS", rotation_deg=(0.0, 0.0, 30.0))
    labels = edge_labels(oblique, panel_layout(oblique, 2, "axial"))
    assert labels == {"left": "RA", "right": "LP", "top": "AL", "bottom": "PR"}


# --------------------------------------------------------------------------- the registered panel


@pytest.fixture(scope="module")
def network_differs():
    """A registration whose network estimate (injected, 8 deg / 6 mm off) differs from the final
    transform that made ``registered`` (the true one)."""
    fixed = phantom_volume(shape=(44, 50, 30))
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    truth = geo.params_to_ras(MOTION, frame)
    moving = moved_copy(fixed, truth)
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, MOTION),
                              RegistrationOptions(device="cpu", iterations=1, refine=False, symmetric=False))
    assert np.allclose(result.fixed_to_moving_ras, truth, atol=1e-5)
    wrong = MOTION + np.array([8.0, 6.0, -5.0])
    result = dataclasses.replace(result, params=wrong, slice_params=np.broadcast_to(wrong, result.slice_params.shape).copy(),
                                 network_fixed_to_moving_ras=geo.params_to_ras(wrong, frame))
    return fixed, moving, result


def _expected_panel(plane: np.ndarray, value_range, box) -> np.ndarray:
    """A RAS axial plane ``[i, j]`` as the overview shows it (R on the left, A up), scaled to
    [0, 1] by ``value_range`` and resized to ``box``, in grey levels."""
    lo, hi = value_range
    image = np.clip((plane.T[::-1, ::-1] - lo) / (hi - lo), 0, 1).astype(np.float32)
    size = (box[2] - box[0], box[3] - box[1])
    return np.clip(np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), 0, 1) * 255


def test_registered_panel_is_the_final_registered_volume(network_differs, tmp_path):
    fixed, moving, result = network_differs
    boxes = overview_figure(fixed, moving, result, tmp_path / "overview.png")
    png = np.asarray(Image.open(tmp_path / "overview.png").convert("RGB"), dtype=np.float64)
    m_t = as_float_tensor(moving)
    m_range = intensity_range(m_t)
    # the ranges the difference volume was scaled by travel with the result (the overview uses them)
    assert result.intensity_ranges == (intensity_range(as_float_tensor(fixed)), m_range)
    slices = sorted({s for s, _ in boxes})
    assert len(slices) == 4 and all(result.used[s] for s in slices)
    for s in slices:
        box = boxes[(s, "registered")]
        shown = png[box[1]:box[3], box[0]:box[2], 0]
        final = _expected_panel(result.registered.array[:, :, s], m_range, box)
        grid = fixed.ijk_to_ras @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, s], [0, 0, 0, 1.0]])
        by_network = resample_volume(m_t, moving.ijk_to_ras, (44, 50, 1), grid, result.network_fixed_to_moving_ras)
        network = _expected_panel(by_network[:, :, 0].numpy(), m_range, box)
        assert np.abs(shown - final).mean() < 0.6, s  # rounding to grey levels
        assert np.abs(shown - network).mean() > 8 * np.abs(shown - final).mean() + 5, s  # the check can tell them apart
        # the moving panel: the moving volume as given (same grid: its own voxels)
        box = boxes[(s, "moving")]
        shown = png[box[1]:box[3], box[0]:box[2], 0]
        assert np.abs(shown - _expected_panel(moving.array[:, :, s], m_range, box)).mean() < 0.6, s
        # differences: large before, small after (the final transform is the true one)
        before, after = (png[b[1]:b[3], b[0]:b[2]].mean() for b in (boxes[(s, "difference before")], boxes[(s, "difference after")]))
        assert after < 0.5 * before, s


def test_overview_refuses_a_result_without_the_registered_volume(network_differs, tmp_path):
    fixed, moving, result = network_differs
    with pytest.raises(ValueError, match="registered volume"):
        overview_figure(fixed, moving, dataclasses.replace(result, registered=None), tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists()


def test_command_line_draws_the_overview_without_matplotlib(tmp_path):
    """The command line writes overview.png with Pillow; matplotlib is never imported."""
    pair = write_phantom_pair(tmp_path)
    card = write_card(tmp_path, bias=[3.0, 2.0, -1.0])
    out = tmp_path / "out"
    code = ("import sys; from RigidResNetRegistrationLib.cli import main; "
            f"rc = main([{str(pair / 'fixed.nii.gz')!r}, {str(pair / 'moving.nii.gz')!r}, '-o', {str(out)!r}, "
            f"'--weights', {str(card)!r}, '--iterations', '1', '--no-refine', '--no-symmetric', '--device', 'cpu', '--quiet']); "
            "print('matplotlib' in sys.modules); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "RigidResNetRegistration"), str(ROOT / "training")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout + r.stderr
    with Image.open(out / "overview.png") as im:
        assert im.format == "PNG" and im.width > 900 and im.height > 400
