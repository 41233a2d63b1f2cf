"""Development checks on real MRI from ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.io import read_volume

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "README.md").exists(),
                                reason=f"development data not found at {SHARED_DATA} (only in the development checkout)")


def test_real_headers_give_axial_slices_whatever_the_acquisition():
    cases = {
        "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz": 2,  # LPS
        "brats/BraTS2021_90003/BraTS2021_90003_t1.nii.gz": 2,  # RAS
        "kirby21-113/kirby21-113-t1.nii.gz": 2,  # sagittal acquisition (RPS, 1.2 mm along R)
        "spm-templates/avg152T1.nii": 2,  # LAS, 2 mm
    }
    for rel, axis in cases.items():
        vol = read_volume(SHARED_DATA / rel)
        frame = geo.slice_frame(vol.ijk_to_ras, vol.shape)
        assert frame.axis == axis and frame.orientation == "axial", rel
        assert frame.ex[0] > 0.9 and frame.ey[1] > 0.9 and frame.n[2] > 0.9, rel
        sag = geo.slice_frame(vol.ijk_to_ras, vol.shape, "sagittal")
        assert abs(sag.n[0]) > 0.9


def test_training_subjects_are_found_with_all_contrasts():
    from rrr_training.data import find_subjects

    found = {s.name: set(s.images) for s in find_subjects(SHARED_DATA)}
    for name in ("BraTS-GLI-00001-000", "BraTS-GLI-90002-000", "BraTS2021_90003", "BraTS2021_90004"):
        assert found[name] == {"t1", "t1ce", "t2", "flair"}, name
    assert found["kirby21-113"] == {"t1", "t2", "flair"}
    assert found["spm-templates"] == {"t1", "t2", "pd"}


def test_sagittal_acquisition_transform_file_reproduces_registered_volume(tmp_path, card_factory):
    sitk = pytest.importorskip("SimpleITK")
    from RigidResNetRegistrationLib.cli import main

    fixed = SHARED_DATA / "kirby21-113" / "kirby21-113-t1.nii.gz"
    moving = SHARED_DATA / "kirby21-113" / "kirby21-113-t2.nii.gz"
    card = card_factory(bias=[3.0, -2.0, 1.5])
    out = tmp_path / "o"
    assert main([str(fixed), str(moving), "-o", str(out), "--weights", str(card), "--iterations", "1", "--no-refine", "--quiet", "--no-overview", "--device", "cpu"]) == 0
    ref = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat32), sitk.ReadImage(str(fixed), sitk.sitkFloat32),
                        sitk.ReadTransform(str(out / "transform.tfm")), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "registered.nii.gz"), sitk.sitkFloat32))
    theirs = sitk.GetArrayFromImage(ref)
    scale = float(np.percentile(np.abs(theirs), 99))
    assert np.mean(np.abs(ours - theirs)) < 2e-3 * scale
