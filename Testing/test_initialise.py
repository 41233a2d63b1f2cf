"""Initialisation without a shared header (initialise.py) and its use by the engine, the command line
and the Slicer Logic: centres of mass, principal axes, the auto rule, initial transforms."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA, ConstantPredictor, make_affine, moved_copy, phantom_volume

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
from RigidResNetRegistrationLib.initialise import (
    foreground_moments,
    initial_transform,
    place_moving,
)
from RigidResNetRegistrationLib.io import read_tfm, write_tfm, write_volume
from RigidResNetRegistrationLib.model import ModelCard
from RigidResNetRegistrationLib.preprocess import InputError
from RigidResNetRegistrationLib.volume import Volume

CARD = ModelCard.from_dict({"name": "oracle", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0}})
FIXED_SHAPE = (48, 56, 40)
#: 90 degrees about S and 100+ mm away: the headers share nothing
FAR = geo.rigid_matrix_3d((0.0, 0.0, 90.0), (100.0, -40.0, 30.0))


def _centre(v: Volume) -> np.ndarray:
    return geo.volume_centre_ras(v.ijk_to_ras, v.shape)


@pytest.fixture(scope="module")
def far_pair():
    """An axial (RAS) phantom and the same head turned 90 degrees about S and 112 mm away, stored
    sagittally (PSR) on a grid of its own whose origin has nothing to do with the fixed one's."""
    fixed = phantom_volume(shape=FIXED_SHAPE)
    moving = moved_copy(fixed, FAR, shape=(40, 56, 48), codes="PSR", centre=tuple(FAR[:3, 3] + [3.0, -5.0, 2.0]))
    return fixed, moving


def test_moments_follow_a_rigid_motion():
    fixed = phantom_volume(shape=FIXED_SHAPE)
    truth = geo.rigid_matrix_3d((12.0, -8.0, 20.0), (6.0, -4.0, 3.0))
    moving = moved_copy(fixed, truth, shape=(56, 56, 48), codes="LPS")
    fm, mm = foreground_moments(fixed), foreground_moments(moving)
    # the moving head's centre is where the truth takes the fixed head's centre (to a block of 6 mm's sampling)
    assert np.linalg.norm(geo.apply_to_points(truth, fm.centre_ras) - mm.centre_ras) < 1.0
    # each principal axis is turned by the truth's rotation, up to its sign
    turned = truth[:3, :3] @ fm.axes_ras
    assert np.all(np.abs(np.sum(turned * mm.axes_ras, axis=0)) > 0.99)
    assert np.isclose(np.linalg.det(mm.axes_ras), 1.0) and np.all(np.diff(mm.spread_mm) <= 0)


def test_header_and_centre_modes():
    fixed = phantom_volume(shape=FIXED_SHAPE)
    truth = geo.rigid_matrix_3d(translation_mm=(70.0, -50.0, 20.0))
    moving = moved_copy(fixed, truth, codes="LPS", centre=(70.0, -50.0, 20.0))
    header = initial_transform(fixed, moving, "header")
    assert header.used == "header" and np.array_equal(header.fixed_to_moving_ras, np.eye(4))
    centre = initial_transform(fixed, moving, "centre")
    rot, mm = geo.rigid_error(centre.fixed_to_moving_ras, truth, _centre(fixed))
    assert centre.used == "centre" and rot == 0.0 and mm < 1.0
    with pytest.raises(ValueError, match="init must be one of"):
        initial_transform(fixed, moving, "geometry")


@pytest.mark.parametrize("mode", ["moments", "auto"])
def test_moments_and_auto_start_from_90_degrees_and_100_mm(far_pair, mode):
    fixed, moving = far_pair
    init = initial_transform(fixed, moving, mode)
    assert init.used == "moments"
    assert np.linalg.norm(FAR[:3, 3]) > 100 and init.signals["header_overlap"] == 0.0
    rot, mm = geo.rigid_error(init.fixed_to_moving_ras, FAR, _centre(fixed))
    assert rot < 2.0 and mm < 2.0, (rot, mm)
    # centres alone leave the 90 degrees
    rot_c, _ = geo.rigid_error(initial_transform(fixed, moving, "centre").fixed_to_moving_ras, FAR, _centre(fixed))
    assert rot_c > 80


def test_auto_keeps_the_headers_exactly_when_they_overlap_and_the_motion_is_small():
    fixed = phantom_volume(shape=FIXED_SHAPE)
    moving = moved_copy(fixed, geo.rigid_matrix_3d((3.0, 0.0, -4.0), (2.0, 3.0, 0.0)))
    init = initial_transform(fixed, moving, "auto")
    assert init.used == "header" and not init.searched
    assert np.array_equal(init.fixed_to_moving_ras, np.eye(4))
    assert init.signals["header_overlap"] > 0.8
    assert "overlap well" in init.reason


def test_auto_on_a_thin_stack_does_not_search_in_3d():
    fixed = phantom_volume(shape=(48, 56, 3))
    far = moved_copy(fixed, geo.rigid_matrix_3d(translation_mm=(60.0, 0.0, 0.0)), codes="RAS", shape=(48, 56, 3), centre=(60.0, 0.0, 0.0))
    init = initial_transform(fixed, far, "auto")
    assert init.used == "centre" and not init.searched and "thin" in init.reason
    assert abs(init.fixed_to_moving_ras[0, 3] - 60.0) < 1.5 and np.allclose(init.fixed_to_moving_ras[:3, :3], np.eye(3))


def test_place_moving_composes_a_given_transform_first(far_pair):
    fixed, moving = far_pair
    placed, init = place_moving(fixed, moving, "header", FAR)
    assert init.used == "given" and np.allclose(init.fixed_to_moving_ras, FAR)
    assert placed.array is moving.array  # the voxels are shared, only the header moves
    assert np.allclose(placed.ijk_to_ras, geo.invert(FAR) @ moving.ijk_to_ras)
    assert init.as_report()["initial_transform_given"] == FAR.tolist()


def test_engine_registers_from_100_mm_and_90_degrees_apart(far_pair):
    """End to end: the start (auto: moments) and the refinement recover the motion; the network
    here answers the identity, so the start is what makes it work."""
    fixed, moving = far_pair
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, [0.0, 0.0, 0.0]),
                              RegistrationOptions(device="cpu", iterations=1, compute_difference=False))
    rot, mm = geo.rigid_error(result.fixed_to_moving_ras, FAR, _centre(fixed))
    assert rot < 1.0 and mm < 1.0, (rot, mm)
    assert result.initialisation.used == "moments" and result.initialisation.requested == "auto"
    assert result.refinement is not None and not result.warnings
    # the network's transform is the start composed with its (identity) estimate
    assert np.allclose(result.network_fixed_to_moving_ras, result.initial_fixed_to_moving_ras)
    # the registered volume shows the fixed head
    f, r = fixed.array, result.registered.array
    inside = f > 0.1 * f.max()
    assert np.corrcoef(f[inside], r[inside])[0, 1] > 0.98
    with pytest.raises(InputError, match="do not overlap in space"):
        register_volumes(fixed, moving, ConstantPredictor(CARD, [0.0, 0.0, 0.0]),
                         RegistrationOptions(device="cpu", iterations=1, init="header"))


def test_engine_initial_transform_is_the_start_and_part_of_the_result(far_pair):
    fixed, moving = far_pair
    opts = RegistrationOptions(device="cpu", iterations=1, refine=False, init="header", initial_transform=FAR,
                               compute_registered=False, compute_difference=False)
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, [0.0, 0.0, 0.0]), opts)
    assert np.allclose(result.fixed_to_moving_ras, FAR, atol=1e-9)
    # the network's estimate acts in the fixed slice frame after the start: T0 @ params_to_ras(p)
    p = np.array([4.0, 2.0, -1.0])
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, p), opts)
    assert np.allclose(result.fixed_to_moving_ras, FAR @ geo.params_to_ras(p, result.frame), atol=1e-6)
    with pytest.raises(InputError, match="initial transform must be"):
        register_volumes(fixed, moving, ConstantPredictor(CARD, p), RegistrationOptions(initial_transform=np.zeros((4, 4))))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "RigidResNetRegistration"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "RigidResNetRegistrationLib.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)


def test_cli_init_and_initial_transform(tmp_path, far_pair, card_factory):
    fixed, moving = far_pair
    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(moving, tmp_path / "moving.nii.gz")
    card = card_factory(bias=[0.0, 0.0, 0.0])
    base = [str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--weights", str(card), "--device", "cpu",
            "--iterations", "1", "--no-overview"]
    # the headers as they are: the existing error
    r = _cli(*base, "-o", str(tmp_path / "h"), "--init", "header")
    assert r.returncode != 0 and "do not overlap in space" in r.stderr
    # an ITK transform file as the tool writes it (LPS, fixed -> moving): the start, in that direction
    write_tfm(FAR, tmp_path / "start.tfm")
    r = _cli(*base, "-o", str(tmp_path / "t"), "--init", "header", "--initial-transform", str(tmp_path / "start.tfm"), "--no-refine")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["init"]["used"] == "given" and np.allclose(report["init"]["initial_transform_given"], FAR)
    assert np.allclose(read_tfm(tmp_path / "t" / "transform.tfm"), FAR, atol=1e-5)
    # the inverse file (the wrong direction) does not bring the volumes together
    write_tfm(geo.invert(FAR), tmp_path / "wrong.tfm")
    r = _cli(*base, "-o", str(tmp_path / "w"), "--init", "header", "--initial-transform", str(tmp_path / "wrong.tfm"))
    assert r.returncode != 0 and "do not overlap" in r.stderr
    # the default (auto) registers the pair by itself and says how it started
    r = _cli(*base, "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["init"]["requested"] == "auto" and report["init"]["used"] == "moments" and report["init"]["reason"]
    rot, mm = geo.rigid_error(read_tfm(tmp_path / "a" / "transform.tfm"), FAR, _centre(fixed))
    assert rot < 1.0 and mm < 1.0, (rot, mm)
    assert "start: moments" in r.stdout


def test_cli_initial_transform_matches_simpleitk_resampling(tmp_path, far_pair):
    """The file is read as ITK reads it: SimpleITK resampling the moving image through it gives
    the fixed head, as our own resampling through the matrix read does."""
    sitk = pytest.importorskip("SimpleITK")
    fixed, moving = far_pair
    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(moving, tmp_path / "moving.nii.gz")
    write_tfm(FAR, tmp_path / "start.tfm")
    f_img = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"), sitk.sitkFloat32)
    m_img = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat32)
    out = sitk.GetArrayFromImage(sitk.Resample(m_img, f_img, sitk.ReadTransform(str(tmp_path / "start.tfm")), sitk.sitkLinear, 0.0))
    f = sitk.GetArrayFromImage(f_img)
    inside = f > 0.1 * f.max()
    assert np.corrcoef(f[inside], out[inside])[0, 1] > 0.98
    assert np.allclose(read_tfm(tmp_path / "start.tfm"), FAR, atol=1e-9)


needs_brats = pytest.mark.skipif(not (SHARED_DATA / "brats" / "BraTS2021_90004").is_dir(),
                                 reason=f"needs the shared data: {SHARED_DATA / 'brats' / 'BraTS2021_90004'} is absent")


@needs_brats
@pytest.mark.parametrize("contrast", ["t1", "t2"])
def test_real_scan_from_a_foreign_header_and_30_degrees(contrast):
    """Held-out BraTS volume; moving = its T1 (or T2) with a header turned by 90 degrees about R
    and moved by 120 mm, plus a resampled 6-DOF motion of 30 degrees / 30 mm: default options
    (the bundled model) recover it within 1 degree / 1 mm."""
    from RigidResNetRegistrationLib.io import read_volume
    from RigidResNetRegistrationLib.model import load_model
    from RigidResNetRegistrationLib.preprocess import as_float_tensor
    from RigidResNetRegistrationLib.resample import resample_volume

    d = SHARED_DATA / "brats" / "BraTS2021_90004"
    fixed = read_volume(d / "BraTS2021_90004_t1.nii.gz")
    source = read_volume(d / f"BraTS2021_90004_{contrast}.nii.gz")
    motion = geo.rigid_matrix_3d((30.0, -25.0, 20.0), (-30.0, 25.0, 30.0), _centre(fixed))
    data = resample_volume(as_float_tensor(source), source.ijk_to_ras, source.shape, source.ijk_to_ras, geo.invert(motion))
    header = geo.rigid_matrix_3d((90.0, 0.0, 0.0), (120.0, -60.0, 40.0))
    moving = Volume(data.numpy(), header @ source.ijk_to_ras, "moving")
    truth = header @ motion
    result = register_volumes(fixed, moving, load_model(None, "cpu"), RegistrationOptions(device="cpu"))
    rot, mm = geo.rigid_error(result.fixed_to_moving_ras, truth, _centre(fixed))
    assert rot < 1.0 and mm < 1.0, (rot, mm, result.initialisation.reason)
    assert result.initialisation.used == "moments"
