"""The benchmark command (benchmarks/rrr_benchmarks): conventions of the ITK bridge against
SimpleITK reading our files, the classical peers on known motions, the report, a quick run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, moved_copy, phantom_ras, phantom_volume

if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from RigidResNetRegistrationLib import geometry as geo  # noqa: E402
from RigidResNetRegistrationLib.io import write_volume  # noqa: E402
from RigidResNetRegistrationLib.resample import resample_volume, warp_images_2d  # noqa: E402

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a test dependency: pip install SimpleITK")

from rrr_benchmarks import itk_bridge as bridge  # noqa: E402
from rrr_benchmarks import cases, methods, report  # noqa: E402
from rrr_benchmarks.run import main  # noqa: E402

GRIDS = {
    "LPS anisotropic": dict(codes="LPS", spacing=(1.7, 2.1, 3.0)),
    "oblique": dict(codes="LAS", spacing=(2.2, 1.9, 2.5), rotation_deg=(8.0, -6.0, 15.0)),
    "sagittal": dict(codes="SRA", spacing=(1.8, 2.4, 2.0), rotation_deg=(0.0, 3.0, 0.0)),
}


def _header(img) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array(img.GetOrigin()), np.array(img.GetSpacing()), np.array(img.GetDirection()).reshape(3, 3)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_volume_to_sitk_equals_sitk_reading_our_nifti(tmp_path, grid):
    vol = phantom_volume(shape=(20, 22, 18), **GRIDS[grid])
    write_volume(vol, tmp_path / "v.nii.gz")
    ref = sitk.ReadImage(str(tmp_path / "v.nii.gz"), sitk.sitkFloat32)
    ours = bridge.volume_to_sitk(vol)
    for a, b in zip(_header(ours), _header(ref)):
        assert np.allclose(a, b, atol=1e-4)
    assert ours.GetSize() == ref.GetSize() == vol.shape
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(ref))
    assert np.array_equal(bridge.sitk_to_array(ref), vol.array)
    assert np.allclose(bridge.sitk_ijk_to_ras(ref), vol.ijk_to_ras, atol=1e-4)


def test_ras_transform_through_sitk_resample_equals_our_resampler():
    fixed = phantom_volume(shape=(40, 44, 36), **GRIDS["oblique"])
    moving = phantom_volume(shape=(42, 38, 34), seed=1, **GRIDS["LPS anisotropic"])
    t = geo.rigid_matrix_3d((4.0, -3.0, 6.0), (2.5, -1.5, 3.0), geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape))
    tfm = bridge.ras_to_sitk_affine(t)
    assert np.allclose(bridge.sitk_transform_to_ras(tfm), t, atol=1e-9)
    ref = bridge.sitk_to_array(sitk.Resample(bridge.volume_to_sitk(moving), bridge.volume_to_sitk(fixed), tfm,
                                             sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = resample_volume(torch.from_numpy(moving.array), moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, t).numpy()
    scale = float(np.abs(moving.array).max())
    assert np.count_nonzero(ours) > 0.3 * ours.size
    assert np.mean(np.abs(ours - ref)) < 1e-3 * scale
    # a centred Euler transform (what registration returns) converts the same way
    centre_lps = np.array([10.0, -20.0, 5.0])
    e = sitk.Euler3DTransform(tuple(centre_lps), 0.1, -0.05, 0.2, (3.0, -2.0, 1.0))
    p_lps = np.array([7.0, 3.0, -11.0])
    ras = bridge.sitk_transform_to_ras(e)
    assert np.allclose(geo.apply_to_points(ras, p_lps * [-1, -1, 1]) * [-1, -1, 1], e.TransformPoint(tuple(p_lps)))


@pytest.mark.parametrize("zyx", [False, True])
def test_elastix_euler_parameters_match_itk_euler3d(zyx):
    angles, trans, centre = np.array([0.12, -0.21, 0.33]), np.array([4.0, -6.0, 2.5]), np.array([-20.0, 35.0, 12.0])
    e = sitk.Euler3DTransform(tuple(centre), *angles, tuple(trans))
    e.SetComputeZYX(zyx)
    m_lps = bridge.matrix_offset(np.array(e.GetMatrix()).reshape(3, 3), np.array(e.GetTranslation()), np.array(e.GetCenter()))
    assert np.allclose(bridge.euler_rotation(angles, zyx), np.array(e.GetMatrix()).reshape(3, 3), atol=1e-12)
    assert np.allclose(bridge.elastix_euler_to_ras(np.r_[angles, trans], centre, zyx), geo.lps_to_ras(m_lps), atol=1e-9)


def test_ants_bridge_matches_ants_reading_our_nifti(tmp_path):
    ants = pytest.importorskip("ants", reason="ANTsPy (antspyx) not installed")
    vol = phantom_volume(shape=(20, 22, 18), **GRIDS["oblique"])
    write_volume(vol, tmp_path / "v.nii.gz")
    ref = ants.image_read(str(tmp_path / "v.nii.gz"))
    ours = bridge.volume_to_ants(vol)
    assert np.allclose(ours.origin, ref.origin, atol=1e-4)
    assert np.allclose(ours.spacing, ref.spacing, atol=1e-5)
    assert np.allclose(ours.direction, ref.direction, atol=1e-5)
    assert np.array_equal(bridge.ants_to_array(ours), bridge.ants_to_array(ref))
    # a centred affine ANTs transform -> RAS matrix, checked point by point in LPS
    a = geo.rigid_matrix_3d((5.0, -3.0, 8.0))[:3, :3]
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=a,
                                    translation=(2.0, -1.0, 4.0), center=(10.0, 5.0, -7.0))
    p = np.array([3.0, -8.0, 21.0])
    ras = bridge.ants_transform_to_ras(tx)
    assert np.allclose(geo.apply_to_points(ras, p * [-1, -1, 1]) * [-1, -1, 1], tx.apply_to_point(tuple(p)), atol=1e-4)


def _sitk_phantom_case():
    """(fixed phantom, its centre, a small known 6-DOF motion, the moved phantom), SimpleITK on 2 threads."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    fixed = phantom_volume(shape=(48, 56, 40))
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    truth = geo.rigid_matrix_3d((2.0, -1.5, 4.0), (2.5, -2.0, 1.5), centre)
    return fixed, centre, truth, moved_copy(fixed, truth)


def test_sitk_peer_recovers_a_known_motion_on_the_phantom():
    fixed, centre, truth, moving = _sitk_phantom_case()
    out = methods.sitk_rigid_3d(fixed, moving)
    rot, trans = geo.rigid_error(out.fixed_to_moving_ras, truth, centre)
    assert rot < 0.5 and trans < 0.5, (rot, trans)
    # its registered volume is the moving volume resampled with the transform it returned
    ours = resample_volume(torch.from_numpy(moving.array), moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras,
                           out.fixed_to_moving_ras).numpy()
    assert out.registered.shape == fixed.shape
    assert np.mean(np.abs(out.registered - ours)) < 1e-3 * float(np.abs(moving.array).max())


@pytest.mark.parametrize("motion", [(6.0, 4.0, -2.5), (-3.0, -5.0, 3.0)])
def test_sitk_2d_peer_speaks_the_slice_frame_convention(motion):
    """A known motion applied with the product's 2D warp (centred mm, x = columns, y = rows,
    resampling direction) is recovered by the SimpleITK slice-pair method in our parameters."""
    n, s = 128, 1.5
    xs = (np.arange(n) - (n - 1) / 2.0) * s
    gy, gx = np.meshgrid(xs, xs, indexing="ij")
    image = phantom_ras(np.stack([gx, gy, np.full_like(gx, 3.0)], axis=-1) * 0.45).astype(np.float32)
    warp = geo.params_to_matrix_2d(np.array(motion))  # moving(p) = image(warp p)
    moving = warp_images_2d(torch.from_numpy(image)[None, None], torch.from_numpy(warp)[None].float(), s)[0, 0].numpy()
    truth = geo.invert_params_2d(np.array(motion))  # registered(p) = moving(A p) = image(p)
    est = methods.sitk_rigid_2d(image, moving, s)
    rot, trans = geo.params_error_2d(est, truth)
    assert rot < 0.2 and trans < 0.2, (est, truth)


def test_motion_none_leaves_the_contrasts_as_delivered():
    fixed = phantom_volume(shape=(48, 56, 40))
    params = cases.draw_motion(cases.MOTIONS["none"], cases.stable_rng(7, "none"))
    moving, truth = cases.apply_motion(fixed, cases.MOTIONS["none"], params)
    assert np.all(params == 0) and np.allclose(truth, np.eye(4))
    assert np.allclose(moving.array, fixed.array, atol=1e-4)


@pytest.mark.parametrize("kind", [k for k in cases.MOTIONS if k != "none"])
def test_motion_kinds_move_the_volume_as_their_truth_says(kind):
    """Each motion kind's moving volume, resampled with its true transform, is the fixed volume
    again; in-plane kinds are the demo's ``apply_known_motion`` (rotation about the slice normal)."""
    motion = cases.MOTIONS[kind]
    fixed = phantom_volume(shape=(48, 56, 40))
    params = cases.draw_motion(motion, cases.stable_rng(7, kind))
    assert len(params) == (3 if motion.in_plane else 6)
    assert np.all(np.abs(params[: 1 if motion.in_plane else 3]) <= motion.max_rotation_deg)
    moving, truth = cases.apply_motion(fixed, motion, params)
    assert moving.shape == fixed.shape and not np.allclose(moving.array, fixed.array)
    inner = (slice(8, -8), slice(8, -8), slice(6, -6))

    def residual(transform):  # relative mean |moving resampled with transform - fixed| inside
        back = resample_volume(torch.from_numpy(moving.array), moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, transform)
        return np.mean(np.abs(back.numpy()[inner] - fixed.array[inner])) / np.mean(np.abs(fixed.array[inner]))

    # the truth registers (up to two linear interpolations on a 2 mm grid); doing nothing or the
    # inverse direction does not
    assert residual(truth) < 0.07
    assert residual(truth) < 0.3 * min(residual(np.eye(4)), residual(geo.invert(truth)))
    if motion.in_plane:  # the true transform rotates about the axial normal only
        frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
        assert np.allclose(geo.ras_to_params(truth, frame), params, atol=1e-9)
    # seeds are per (motion, pairing): another kind's draws do not shift these
    assert np.allclose(cases.draw_motion(motion, cases.stable_rng(7, kind)), params)


def test_unshared_header_moves_only_the_header_and_its_truth_still_registers():
    fixed = phantom_volume(shape=(48, 56, 40))
    params = cases.draw_motion(cases.MOTIONS["3d"], cases.stable_rng(3, "3d"))
    moved, truth = cases.apply_motion(fixed, cases.MOTIONS["3d"], params)
    moving, new_truth, h = cases.unshare_header(moved, truth, cases.stable_rng(3, "headers"))
    assert moving.array is moved.array and np.allclose(moving.ijk_to_ras, h @ moved.ijk_to_ras)
    shift = np.linalg.norm(h[:3, 3])
    assert cases.UNSHARED_SHIFT_MM[0] - 1e-9 <= shift <= cases.UNSHARED_SHIFT_MM[1] + 1e-9  # the rotation is about the origin
    inner = (slice(8, -8), slice(8, -8), slice(6, -6))
    back = resample_volume(torch.from_numpy(moving.array), moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, new_truth).numpy()
    old = resample_volume(torch.from_numpy(moving.array), moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, truth).numpy()
    scale = np.mean(np.abs(fixed.array[inner]))
    assert np.mean(np.abs(back[inner] - fixed.array[inner])) / scale < 0.07
    assert np.mean(np.abs(old[inner] - fixed.array[inner])) / scale > 0.5  # the old truth no longer applies


def test_sitk_peer_starts_unshared_headers_from_the_moments():
    fixed, centre, truth, moved = _sitk_phantom_case()
    h = geo.rigid_matrix_3d((0.0, 0.0, 0.0), (90.0, -60.0, 30.0))
    moving = type(moved)(moved.array, h @ moved.ijk_to_ras, "far")
    out = methods.sitk_rigid_3d(fixed, moving, unshared=True)
    rot, trans = geo.rigid_error(out.fixed_to_moving_ras, h @ truth, centre)
    assert rot < 0.5 and trans < 0.5, (rot, trans)


def test_motion_between_slices_moves_each_slice_as_its_own_truth_says():
    """``interslice_motion``/``apply_interslice_motion``: slice s of the moving volume is the fixed
    slice s moved by params[s]; resampled slice by slice with the per-slice truths it is the fixed
    volume again, which neither the common motion alone nor the inverse transforms achieve."""
    from RigidResNetRegistrationLib.resample import resample_per_slice

    fixed = phantom_volume(shape=(48, 56, 40))
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    common = np.array([2.0, 1.5, -1.0])
    params = cases.interslice_motion(cases.stable_rng(5, "interslice"), fixed.shape[frame.axis], common, 8.0, 6.0)
    assert params.shape == (fixed.shape[frame.axis], 3)
    assert np.ptp(params, axis=0).max() > 3.0  # the head moved during the scan (large steps: a smooth phantom)
    assert np.all(np.abs(params - common) <= 2 * np.r_[8.0, 6.0, 6.0] + 0.3 + 1e-9)
    before = fixed.array.copy()
    moving, truth = cases.apply_interslice_motion(fixed, params)
    assert np.array_equal(fixed.array, before) and truth.shape == (len(params), 4, 4)
    for s in (3, 20, 35):
        assert np.allclose(geo.ras_to_params(truth[s], frame), params[s], atol=1e-9)
    inner = (slice(8, -8), slice(8, -8), slice(4, -4))

    def residual(transforms):
        back = resample_per_slice(torch.from_numpy(moving.array), moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras,
                                  frame.axis, transforms)
        return np.mean(np.abs(back.numpy()[inner] - fixed.array[inner])) / np.mean(np.abs(fixed.array[inner]))

    one = np.stack([geo.params_to_ras(common, frame, "rigid", s) for s in range(len(params))])
    assert residual(truth) < 0.07
    assert residual(truth) < 0.5 * min(residual(one), residual(np.stack([geo.invert(t) for t in truth])))


def test_slice_errors_measure_each_used_slice_against_its_truth():
    from types import SimpleNamespace

    from rrr_benchmarks.worker import slice_errors

    truth = np.zeros((5, 3))
    est = np.array([[0.5, 0.0, 0.0], [0.0, 0.3, 0.4], [2.0, 0.0, 0.0], [0.1, 0.0, 0.0], [9.0, 9.0, 9.0]])
    out = SimpleNamespace(used=np.array([True, True, True, True, False]), slice_params=est)
    acc = slice_errors(out, truth)
    assert acc["n"] == 4 and acc["success"] == 0.75  # the unused slice (9 deg off) does not count
    assert np.isclose(acc["rot_median"], 0.3) and np.isclose(acc["trans_median"], 0.0)  # of 0.5, 0, 2, 0.1 and 0, 0.5, 0, 0
    assert np.isclose(acc["rot_p90"], 1.55) and np.isclose(acc["trans_p90"], 0.35)


def _rows():
    rows = []
    for method, errs in (("ours", [(0.1, 0.2), (0.3, 0.1), (2.0, 0.5)]), ("sitk", [(0.01, 0.02), (float("nan"), float("nan"))])):
        for i, (r, t) in enumerate(errs):
            err = None if r == r else "RuntimeError: diverged"
            rows.append({"dimension": "3d", "method": method, "motion": "normal", "pairing": "T1 -> T1", "case": f"c{i}",
                         "rot_err_deg": r, "trans_err_mm": t, "success": err is None and r < 1 and t < 1,
                         "seconds": 2.0 + i, "error": err})
    rows.append({"dimension": "2d", "method": "ours", "motion": "hard", "pairing": "T1 -> T2 / FLAIR", "case": "p0",
                 "rot_err_deg": 0.5, "trans_err_mm": 0.4, "success": True, "seconds": 0.012, "error": None})
    return rows


def test_markdown_report_has_the_expected_columns_and_rows():
    workers = [{"method": "ours", "kind": "3d", "peak_rss_mb": 1234.0, "rows": [], "setup_s": 1.0, "first_call_s": 3.0},
               {"method": "sitk", "kind": "3d", "peak_rss_mb": 321.0, "rows": [], "setup_s": 0.1, "first_call_s": 9.0}]
    text = report.markdown_report({"date": "today", "command": "rigid-resnet-benchmark --quick"}, _rows(), workers)
    lines = text.splitlines()
    head_3d = "| " + " | ".join(report.COLUMNS_3D) + " |"
    head_2d = "| " + " | ".join(report.COLUMNS_2D) + " |"
    assert head_3d in lines and head_2d in lines
    assert "seconds / volume (median)" in head_3d and "ms / slice pair (median)" in head_2d and "peak RSS (MB)" in head_3d
    ours = next(x for x in lines if x.startswith("| ours") and "T1 -> T1" in x).split(" | ")
    assert ours[2] == "3" and ours[3] == "0.300" and ours[7] == "67%" and ours[8] == "3.00" and ours[9].startswith("1234")
    sitk_row = next(x for x in lines if x.startswith("| SimpleITK")).split(" | ")
    assert sitk_row[2] == "2 (1 failed)" and sitk_row[3] == "0.010" and sitk_row[7] == "50%"
    row_2d = next(x for x in lines if "T2 / FLAIR" in x).split(" | ")
    assert row_2d[8] == "12.0"  # ms per slice pair
    assert "Python interpreter" in text and "`normal`" in text and "`hard`" in text


def test_method_agreement_measures_estimates_against_each_other_not_the_truth():
    """Two methods' 3D estimates on the same cases: the angle between them and how far apart they
    send the case's centre, whichever comes first; cases without both estimates are left out."""
    centre = np.array([10.0, -20.0, 5.0])
    one_deg = geo.rigid_matrix_3d((0.0, 0.0, 1.0), (0.0, 0.0, 0.0), centre)  # about the centre: it stays put
    shifted = geo.rigid_matrix_3d((0.0, 0.0, 0.0), (0.0, 0.3, 0.4), centre)
    cases_ = [{"id": f"c{i}", "centre_ras": centre.tolist()} for i in range(3)]

    def row(method, case, estimate, error=""):
        return {"dimension": "3d", "method": method, "motion": "normal", "pairing": "T1 -> T1", "case": case,
                "estimate": None if estimate is None else estimate.tolist(), "error": error}

    rows = [row("ours", "c0", one_deg), row("sitk", "c0", np.eye(4)),
            row("ours", "c1", shifted), row("sitk", "c1", np.eye(4)),
            row("ours", "c2", np.eye(4)), row("sitk", "c2", None, "failed")]
    (agree,) = report.method_agreement(rows, cases_)
    assert agree["methods"] == ("ours", "sitk") and agree["n"] == 2
    assert agree["rot_max"] == pytest.approx(1.0) and agree["trans_max"] == pytest.approx(0.5)
    assert agree["rot_median"] == pytest.approx(0.5) and agree["trans_median"] == pytest.approx(0.25)
    flipped = report.method_agreement(rows[1::2][:2] + rows[0::2][:2], cases_)[0]  # sitk's rows first
    assert flipped["methods"] == ("sitk", "ours") and flipped["rot_max"] == pytest.approx(1.0) and flipped["trans_max"] == pytest.approx(0.5)
    text = report.markdown_agreement([agree])
    assert "### Agreement between methods (3D)" in text and "| `normal` | T1 -> T1 | ours vs SimpleITK | 2 | 0.500 (1.000) | 0.250 (0.500) |" in text
    assert report.method_agreement(rows, []) == [] and report.markdown_agreement([]) == ""


def _write_brats_like(folder):
    folder.mkdir(parents=True)
    t1 = phantom_volume(shape=(48, 56, 40))
    brain = t1.array > 5
    contrasts = {"t1": t1.array, "t1ce": t1.array * 1.1, "t2": np.where(brain, 260.0 - t1.array, 0.0),
                 "flair": np.where(brain, np.sqrt(np.abs(t1.array)) * 12.0, 0.0)}
    for name, arr in contrasts.items():
        write_volume(type(t1)(arr.astype(np.float32), t1.ijk_to_ras, name), folder / f"BraTS2021_00000_{name}.nii.gz")


def test_quick_run_writes_the_report(tmp_path, card_factory):
    data = tmp_path / "BraTS2021_00000"
    _write_brats_like(data)
    card = card_factory(size=48, spacing=2.0)
    out = tmp_path / "out"
    code = main(["--data", str(data), "-o", str(out), "--quick", "--methods", "ours", "sitk", "--motions", "normal", "--pairings", "same", "cross",
                 "--weights", str(card), "--threads", "1"])
    assert code == 0
    text = (out / "benchmark.md").read_text()
    table_3d = text.split("### Whole volumes (3D), motion `normal`")[1].split("###")[0]
    table_2d = text.split("### Slice pairs (2D, 128 x 128 network grid), motion `normal`")[1].split("###")[0]
    for table in (table_3d, table_2d):
        body = [x for x in table.splitlines() if x.startswith("| ") and not x.startswith(("| method", "| ---"))]
        assert len(body) == 4, table  # one row per method and pairing
        assert sum(x.startswith("| ours") for x in body) == 2 and sum(x.startswith("| SimpleITK") for x in body) == 2
    assert "slices` mode" in text and "rigid-resnet-register" in text
    assert "Per-slice error, one motion" in text and "Per-slice error, motion between slices" in text
    assert "| `normal` | T1 -> T2 / FLAIR | ours vs SimpleITK | 1 |" in text  # the methods' agreement
    raw = json.loads((out / "benchmark.json").read_text())
    assert {r["method"] for r in raw["rows"]} == {"ours", "sitk"}
    sitk_3d = [r for r in raw["rows"] if r["method"] == "sitk" and r["dimension"] == "3d"]
    assert len(sitk_3d) == 2 and all(r["success"] for r in sitk_3d), sitk_3d  # the peer works on the phantom
    assert all(w["peak_rss_mb"] > 10 for w in raw["workers"] if w["kind"] in ("3d", "2d"))
    slices_mode = next(w["slices_mode"] for w in raw["workers"] if w.get("slices_mode"))
    expected = {"one motion", "motion between slices, T1 -> T1", "motion between slices, T1 -> T2 / FLAIR"}
    assert slices_mode["symmetric_stride"] > 1 and slices_mode["every_slice"]["symmetric_stride"] == 1
    assert slices_mode["symmetric"] and not slices_mode["one_order"]["symmetric"]
    assert slices_mode["refined"]["refine_slices"] and not slices_mode["refine_slices"]
    # the defaults, every slice, one order, the defaults with the per-slice refinement
    for run in (slices_mode, slices_mode["every_slice"], slices_mode["one_order"], slices_mode["refined"]):
        assert set(run["accuracy"]) == expected
        assert all(a["n"] > 0 and 0 <= a["success"] <= 1 and np.isfinite(a["rot_median"]) for a in run["accuracy"].values())
        assert run["ms_per_slice_pair"] > 0 and run["used_slices"] > 0
    assert "The same in one order (`--no-symmetric`)" in text and "every slice in both orders (`--symmetric-stride 1`)" in text
    assert "each slice refined on its image similarity (`--refine-slices`)" in text
    for png in ("errors_3d.png", "errors_2d.png", "time.png"):
        assert (out / png).stat().st_size > 1000


def test_missing_data_folder_is_one_line_error(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data folder not found") and "\n" not in err


def test_synthetic_contrast_is_another_contrast_exactly_aligned_with_its_t1(tmp_path, card_factory):
    """The `synth` pairing: moving = a T2-like contrast made point by point from the fixed T1 (own
    noise), so its truth is exact; the engine must treat it as cross contrast (MI)."""
    from RigidResNetRegistrationLib.engine import choose_metric
    from RigidResNetRegistrationLib.similarity import mutual_information

    t1 = phantom_volume(shape=(48, 56, 40))
    before = t1.array.copy()
    src = torch.from_numpy(t1.array.astype(np.float32))
    synth = cases.synthetic_contrast(src)
    assert np.array_equal(t1.array, before)  # input untouched
    assert torch.equal(synth, cases.synthetic_contrast(src)) and not torch.equal(synth, cases.synthetic_contrast(src, seed=1))
    assert torch.all(synth[src <= 0] == 0) and synth.max() > 0
    fixed_slices, synth_slices = src.permute(2, 0, 1)[8:32], synth.permute(2, 0, 1)[8:32]
    assert choose_metric(fixed_slices, fixed_slices) == "ncc" and choose_metric(fixed_slices, synth_slices) == "mi"
    # aligned where it was made: MI is highest unshifted
    def mi(shift):
        f = (fixed_slices - fixed_slices.min()) / (fixed_slices.max() - fixed_slices.min())
        m = torch.roll(synth_slices, shift, dims=1)
        return float(mutual_information(f, (m - m.min()) / (m.max() - m.min())).mean())
    assert mi(0) > max(mi(1), mi(-1), mi(2)) + 0.02

    # 3D cases: the moving volume is the synthetic contrast moved by the case's truth
    data = tmp_path / "BraTS2021_00000"
    _write_brats_like(data)
    from rrr_training.data import find_subjects

    built = cases.build_volume_cases(find_subjects(data), ["normal"], ["synth"], 1, 3, tmp_path / "work", log=lambda *_: None)
    assert len(built) == 1 and built[0]["moving_contrast"] == cases.SYNTHETIC
    fixed, moving, truth = cases.load_case(built[0])
    expected = cases.synthetic_contrast(torch.from_numpy(np.asarray(fixed.array, dtype=np.float32)))
    # it is exactly the synthetic contrast of the fixed T1 moved by the case's motion (whose truth
    # test_motion_kinds_move_the_volume_as_their_truth_says checks), and not the T1 itself moved
    made = type(fixed)(expected.numpy(), fixed.ijk_to_ras, "synthetic")
    moved, moved_truth = cases.apply_motion(made, cases.MOTIONS["normal"], np.array(built[0]["params"]), fixed)
    assert np.allclose(moving.array, moved.array, atol=1e-3) and np.allclose(truth, moved_truth)
    moved_t1, _ = cases.apply_motion(fixed, cases.MOTIONS["normal"], np.array(built[0]["params"]), fixed)
    assert not np.allclose(moving.array, moved_t1.array, atol=1.0)

    # 2D pairs: drawn (and re-sampled for later passes) from the synthetic volume, as cross contrast
    from RigidResNetRegistrationLib.model_card import read_model_card
    from RigidResNetRegistrationLib.resample import sample_volume_at_ras

    card = read_model_card(card_factory(size=32, spacing=2.5))
    loaded = cases.load_subjects_2d(data, card)
    batch = cases.draw_pair_set(loaded, card, "normal", "synth", 6, 3)
    assert len(batch.truth) == 6 and not batch.same_contrast.any()
    assert {src[2] for src in batch.sources} == {cases.SYNTHETIC}
    assert torch.allclose(batch.resample_moving(np.zeros((6, 3)), "rigid", (32, 32), 2.5), batch.moving, atol=1e-4)
    at_truth = batch.resample_moving(batch.truth.double().numpy(), "rigid", (32, 32), 2.5)
    for i, (subject, s, contrast, _) in enumerate(batch.sources):  # at the truth: the fixed slice's synthetic contrast
        pts = geo.network_grid_points(subject.frame, (32, 32), 2.5, np.array([s]))[0]
        made = sample_volume_at_ras(subject.volumes[contrast], subject.ijk_to_ras[contrast], pts)
        assert torch.allclose(at_truth[i], made.float(), atol=1e-2), i
        assert not torch.allclose(batch.moving[i], made.float(), atol=1.0)


# --------------------------------------------------------------------------- rrr_benchmarks.speed


def _speed_measures(**over):
    """Measurements of every speed row that meet every goal (``over`` replaces rows)."""
    from rrr_benchmarks import speed

    def timed(median):
        return speed.stats([median * 0.9, median, median * 1.2])

    good = [speed.error_row("p1", 0.1, 0.2)]
    m = {"engine": {"ours": timed(0.3), "elastix": timed(3.0), "ratio": 10.0, "accuracy": {"ours": good, "elastix": good}},
         "process": {"ours": timed(5.0), "elastix": timed(8.0), "ratio": 1.6, "accuracy": {"ours": good, "elastix": good}},
         "batch": {"n": 2, "ours_total_s": 2.0, "ours_per_pair_s": 1.0, "elastix_total_s": 16.0, "elastix_per_pair_s": 8.0,
                   "ratio": 8.0, "accuracy": {"ours": good * 2, "elastix": good * 2}},
         "slices": {"ms_per_slice": 7.5, "used_slices": 140, "seconds": timed(1.05),
                    "slice_accuracy": {"n": 140, "rot_median": 0.05, "trans_median": 0.1, "success": 0.97}},
         "memory": {"ours_mb": 900.0, "elastix_mb": 500.0, "accuracy": {"ours": good, "elastix": good}}}
    m.update(over)
    return m


def test_speed_goal_verdicts_follow_the_measurements():
    """Every row of the speed table is judged from its numbers: met, not met (time, ratio or memory),
    not met because ours was inaccurate on its timed pairs, not available, not measured."""
    from rrr_benchmarks import speed

    verdicts = {r["key"]: r["verdict"] for r in speed.goal_rows(_speed_measures())}
    assert verdicts == {"engine": "met", "process": "met", "batch": "met", "slices": "met", "memory": "met"}
    base = _speed_measures()
    slow_engine = {**base["engine"], "ours": speed.stats([0.36, 0.40])}  # 10x elastix but over 0.35 s
    few_x = {**base["engine"], "ratio": 7.9}  # fast but under 8x elastix
    slower_process = {**base["process"], "ours": speed.stats([8.0, 8.1])}  # not faster than elastix (tie at the median)
    bad_pair = {**base["batch"], "accuracy": {"ours": [speed.error_row("p1", 0.1, 0.2), speed.error_row("p2", 2.0, 0.1)],
                                              "elastix": []}}
    failed_pair = {**base["batch"], "accuracy": {"ours": [speed.error_row("p1", error="RuntimeError: boom")], "elastix": []}}
    cases_ = {
        "engine": [(slow_engine, "not met"), (few_x, "not met"), ({**base["engine"], "ratio": float("nan")}, "not measured")],
        "process": [(slower_process, "not met"), ({"failed": "hyperfine exit 1"}, "not measured (hyperfine exit 1)")],
        "batch": [({**base["batch"], "ratio": 4.99}, "not met"), (bad_pair, "not met (ours outside 1 deg / 1 mm or failed on 1 of 2 pairs)"),
                  (failed_pair, "not met (ours outside 1 deg / 1 mm or failed on 1 of 1 pairs)"),
                  ({**base["batch"], "unavailable": "no --batch"}, "not available (no --batch)")],
        "slices": [({**base["slices"], "ms_per_slice": 10.01}, "not met"),
                   ({**base["slices"], "slice_accuracy": {**base["slices"]["slice_accuracy"], "trans_median": 1.2}}, "not met (")],
        "memory": [({**base["memory"], "ours_mb": 1500.5}, "not met"), ({**base["memory"], "ours_mb": None}, "not measured")],
    }
    for key, variants in cases_.items():
        for m, expected in variants:
            got = next(r["verdict"] for r in speed.goal_rows(_speed_measures(**{key: m})) if r["key"] == key)
            assert got == expected or (expected.endswith("(") and got.startswith(expected)), (key, m, got)
    assert speed.verdict("batch", None) == "not available"
    # the table: one row per goal, the goal column says the goal and the verdict
    table = speed.goal_table(speed.goal_rows(_speed_measures(memory={**base["memory"], "ours_mb": 2000.0})))
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(speed.GOAL_COLUMNS) + " |" and len(lines) == 2 + len(speed.GOALS)
    engine_row = next(x for x in lines if x.startswith("| engine call"))
    assert engine_row.endswith("<= 0.35 s and >= 8x elastix: **met** |") and "0.30 s (0.27-0.36, 3 runs)" in engine_row
    assert "10.0x faster" in engine_row and "1/1 within 1 deg / 1 mm" in engine_row
    assert next(x for x in lines if x.startswith("| peak memory")).endswith("<= 1.5 GB: **not met** |")
    assert "8.0x faster per pair" in next(x for x in lines if x.startswith("| `--batch`"))
    assert speed.faster_text(1.0, 2.0) == "2.0x slower" and speed.faster_text(None, 2.0) == "—"
    # without --batch the row is "not available" and still shows elastix's figure
    rows = speed.goal_rows(_speed_measures(batch={**base["batch"], "ours_unavailable": "no --batch", "unavailable": "no --batch",
                                                  "ours_per_pair_s": None, "ratio": float("nan")}))
    batch_row = next(r for r in rows if r["key"] == "batch")
    assert batch_row["ours"].startswith("not available") and batch_row["elastix"].startswith("8.00 s / pair")
    stages = speed.stage_table([{"prepare": 0.1, "refine": 0.2}, {"prepare": 0.3, "refine": 0.2}])
    assert "| prepare | 0.200 | 0.100-0.300 |" in stages and "| total (sum of the stages) | 0.400 | 0.300-0.500 |" in stages


def test_speed_helpers_stats_csv_parsers_and_commands(tmp_path):
    import csv

    from rrr_benchmarks import speed

    s = speed.stats([3.0, 1.0, 2.0, float("nan")])
    assert (s["n"], s["min"], s["median"], s["max"]) == (3, 1.0, 2.0, 3.0)
    assert speed.stats([])["n"] == 0 and np.isnan(speed.stats([])["median"]) and speed.fmt_stats(speed.stats([])) == "—"
    assert speed.ratio(8.0, 2.0) == 4.0 and np.isnan(speed.ratio(8.0, None)) and np.isnan(speed.ratio(8.0, 0.0))
    # the --batch pairs file: fixed, moving, name with absolute paths
    pairs = [{"fixed": str(tmp_path / "f.nii.gz"), "moving": str(tmp_path / "m,1.nii.gz"), "name": "01-a-t1-t2"},
             {"fixed": str(tmp_path / "f.nii.gz"), "moving": str(tmp_path / "m2.nii.gz"), "name": "02-a-t1-flair"}]
    with open(speed.write_pairs_csv(pairs, tmp_path / "pairs.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["fixed", "moving", "name"] and [r["name"] for r in rows] == ["01-a-t1-t2", "02-a-t1-flair"]
    assert rows[0]["moving"] == str(tmp_path / "m,1.nii.gz")
    # --batch interleaved with elastix: each run of ours followed by its consecutive share of the pairs
    assert speed.batch_schedule(20, 2) == [list(range(10)), list(range(10, 20))]
    assert speed.batch_schedule(5, 2) == [[0, 1, 2], [3, 4]] and speed.batch_schedule(2, 5) == [[0], [1]]
    assert speed.batch_schedule(3, 1) == [[0, 1, 2]] and speed.batch_schedule(3, 0) == [[0, 1, 2]]
    batch_row = dict(_speed_measures()["batch"], ours_runs_s=[2.2, 1.8], ours_total_s=2.0)
    ours_cell = speed.measured_cells("batch", batch_row)[0]
    assert ours_cell == "1.00 s / pair (mean 2.0 s of 2.2, 1.8 s for 2, one process)", ours_cell
    assert speed.measured_cells("batch", _speed_measures()["batch"])[0] == "1.00 s / pair (2.0 s for 2, one process)"
    # --batch is told apart from --batch-size
    assert not speed.batch_available("  --batch-size N        slices per network batch (default 32)")
    assert speed.batch_available("  --batch-size N  ...\n  --batch PAIRS.csv     register every pair of PAIRS.csv")
    assert speed.parse_max_rss_mb("\tUser time (seconds): 1.0\n\tMaximum resident set size (kbytes): 1000000\n") == pytest.approx(1024.0)
    assert speed.parse_max_rss_mb("nothing") is None
    # pairs: T1 (else T1ce) fixed, the other contrasts moving, in the subjects' order, then again
    plan = speed.pair_plan([("held", ["flair", "t1", "t2"]), ("no-t1", ["flair"]), ("b15", ["t1ce", "flair"])], 5)
    assert plan == [("held", "t1", "t2", 0), ("held", "t1", "flair", 0), ("b15", "t1ce", "flair", 0),
                    ("held", "t1", "t2", 1), ("held", "t1", "flair", 1)]
    assert speed.pair_plan([("x", ["t1"])], 3) == []
    # hyperfine: one call, a prepare per command, in order
    argv = speed.hyperfine_argv([("a", "cmd a", "prep a"), ("b", "cmd b", "prep b")], 1, 5, tmp_path / "h.json")
    assert argv[:5] == ["hyperfine", "--warmup", "1", "--runs", "5"] and argv[-2:] == ["cmd a", "cmd b"]
    assert [argv[i + 1] for i, x in enumerate(argv) if x == "--prepare"] == ["prep a", "prep b"]
    assert [argv[i + 1] for i, x in enumerate(argv) if x == "--command-name"] == ["a", "b"]
    # the elastix command line's transform file (LPS Euler about its centre) -> RAS, as the bridge reads itk-elastix
    params, centre = np.array([0.05, -0.03, 0.08, 2.0, -1.5, 3.0]), np.array([119.5, -119.5, 77.0])
    (tmp_path / "TransformParameters.0.txt").write_text(
        '(Transform "EulerTransform")\n(NumberOfParameters 6)\n(TransformParameters ' + " ".join(map(str, params)) + ")\n"
        "// EulerTransform specific\n(CenterOfRotationPoint " + " ".join(map(str, centre)) + ')\n(ComputeZYX "false")\n')
    assert np.allclose(speed.read_elastix_transform(tmp_path / "TransformParameters.0.txt"),
                       bridge.elastix_euler_to_ras(params, centre, False))
    (tmp_path / "affine.txt").write_text('(Transform "AffineTransform")\n')
    with pytest.raises(ValueError, match="EulerTransform"):
        speed.read_elastix_transform(tmp_path / "affine.txt")


def test_speed_cases_come_from_the_shared_data_held_out_subject_first():
    from conftest import SHARED_DATA

    from rrr_benchmarks import speed

    if not (SHARED_DATA / "brats" / speed.HELD_OUT).is_dir():
        pytest.skip(f"shared data not found ({SHARED_DATA / 'brats' / speed.HELD_OUT})")
    subjects = speed.source_subjects(SHARED_DATA)
    assert subjects[0][0] == speed.HELD_OUT and {"t1", "t2", "flair", "t1ce"} <= set(subjects[0][1])
    # a subject whose contrasts are not co-registered as delivered has no known truth: never a case
    assert "BraTS2021_90003" in speed.NOT_CO_REGISTERED
    assert not {k for k, _ in subjects} & set(speed.NOT_CO_REGISTERED)
    if (SHARED_DATA / "brats" / "BraTS2021_90003").is_dir():  # in the data, and left out by the filter
        from rrr_training.data import find_subjects

        assert "BraTS2021_90003" in {s.name for s in find_subjects(SHARED_DATA / "brats")}
    plan = speed.pair_plan([(k, list(v)) for k, v in subjects], 20)
    assert len(plan) == 20 and [p[:3] for p in plan[:3]] == [(speed.HELD_OUT, "t1", c) for c in speed.MOVING_CONTRASTS]
    if (SHARED_DATA / "brats2015").is_dir():  # no T1 there: T1ce -> FLAIR
        assert any(f == "t1ce" and m == "flair" for _, f, m, _ in plan)


def test_speed_elastix_command_line_result_reads_back_as_the_known_motion(tmp_path):
    """The elastix command line with itk-elastix's default rigid map written to a file, on a phantom
    moved by a known 6-DOF motion: its TransformParameters.0.txt reads back as that motion."""
    import shutil
    import subprocess

    from rrr_benchmarks import speed

    elastix = shutil.which("elastix")
    if elastix is None:
        pytest.skip("the elastix command line is not installed (Debian package elastix)")
    pytest.importorskip("itk", reason="itk-elastix not installed")
    text = speed.write_elastix_map(tmp_path / "rigid.txt")
    assert '(Transform "EulerTransform")' in text and "AdvancedMattesMutualInformation" in text
    fixed = phantom_volume(shape=(48, 56, 40), codes="LPS")
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    truth = geo.rigid_matrix_3d((3.0, -2.0, 4.0), (2.0, -3.0, 1.5), centre)
    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(moved_copy(fixed, truth), tmp_path / "moving.nii.gz")
    (tmp_path / "out").mkdir()
    proc = subprocess.run([elastix, "-f", str(tmp_path / "fixed.nii.gz"), "-m", str(tmp_path / "moving.nii.gz"), "-p",
                           str(tmp_path / "rigid.txt"), "-out", str(tmp_path / "out"), "-threads", "1"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:]
    pair = {"name": "phantom", "truth": truth.tolist(), "centre_ras": centre.tolist()}
    err = speed.pair_error(pair, speed.read_elastix_transform(tmp_path / "out" / "TransformParameters.0.txt"))
    assert err["success"] and err["rot_err_deg"] < 0.5 and err["trans_err_mm"] < 0.5, err


def test_speed_missing_tools_or_data_are_one_line_errors(tmp_path, capsys):
    from rrr_benchmarks import speed

    assert speed.main(["--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data folder not found") and "\n" not in err
    assert speed.main(["--data", str(tmp_path), "-o", str(tmp_path / "o"), "--elastix", str(tmp_path / "no-elastix")]) == 2
    assert "elastix command is not found" in capsys.readouterr().err
    assert speed.main(["--data", str(tmp_path), "--pairs", "0"]) == 2


def test_whole_head_benchmark_takes_a_card_and_names_which_scans_were_held_out(tmp_path, card_factory, capsys):
    """``rrr_benchmarks.whole_head``: ``--weights`` picks the network (named in both reports); IXI
    scans come only from the subjects ``--subjects-file`` holds out; every scan is marked held out or
    in training by that file; a missing card is one error line and exit code 2."""
    from RigidResNetRegistrationLib.io import write_volume as write
    from rrr_benchmarks import whole_head

    data = tmp_path / "data"
    (data / "whole-head").mkdir(parents=True)
    (data / "ixi-t1-2mm").mkdir()
    vol = phantom_volume(shape=(40, 44, 36), spacing=(2.0, 2.0, 2.0))
    write(vol, data / "whole-head" / "clinic_t1.nii.gz")
    for name in ("IXI001-HH-0001", "IXI002-HH-0002", "IXI003-HH-0003"):
        write(vol, data / "ixi-t1-2mm" / f"{name}_T1.nii.gz")
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("# held out\nIXI002-HH-0002 whole-head\nIXI003-HH-0003 whole-head\n")
    assert [(p.name, kept) for p, kept in whole_head.scans(data, 1, {"IXI002-HH-0002", "IXI003-HH-0003"})] == [
        ("clinic_t1.nii.gz", False), ("IXI002-HH-0002_T1.nii.gz", True)]
    assert [p.name for p, _ in whole_head.scans(data, 5, {"IXI002-HH-0002", "IXI003-HH-0003"})][1:] == [
        "IXI002-HH-0002_T1.nii.gz", "IXI003-HH-0003_T1.nii.gz"]
    assert all(kept for _, kept in whole_head.scans(data, 3, None))  # no file: every scan counts as held out

    assert whole_head.main(["--weights", str(tmp_path / "missing.json"), "--data", str(data)]) == 2
    assert capsys.readouterr().err.strip() == f"error: model card not found: {tmp_path / 'missing.json'}"

    card = card_factory(bias=[0.0, 0.0, 0.0], name="named_model")
    out = tmp_path / "out"
    assert whole_head.main(["--data", str(data), "--ixi", "1", "--motions", "3d", "--headers", "shared",
                            "--weights", str(card), "--subjects-file", str(holdout), "-o", str(out)]) == 0
    report = json.loads((out / "whole_head.json").read_text())
    assert report["model"].startswith("named_model")
    assert [(r["scan"], r["held_out"]) for r in report["rows"]] == [("clinic_t1.nii.gz", False), ("IXI002-HH-0002_T1.nii.gz", True)]
    md = (out / "whole_head.md").read_text()
    assert "named_model" in md
    assert "| held out | `3d` | shared | 1 |" in md and "| in training | `3d` | shared | 1 |" in md
