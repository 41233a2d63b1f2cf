"""Formats and frames: NRRD, MetaImage, DICOM series folders and NIfTI by content, read through
maintained readers; 2D images in the physical frame ITK gives them, so that SimpleITK applies our
``transform.tfm`` to the original files; ``--output-format``."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, moved_copy, phantom_volume, write_card
from PIL import Image

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.cli import main
from RigidResNetRegistrationLib.io import format_tfm, read_tfm, read_volume, write_tfm, write_volume
from RigidResNetRegistrationLib.preprocess import InputError
from RigidResNetRegistrationLib.resample import sample_slice_stack
from RigidResNetRegistrationLib.volume import Volume, volume_to_sitk

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a runtime dependency: pip install SimpleITK")

needs_data = pytest.mark.skipif(not (SHARED_DATA / "README.md").exists(),
                                reason=f"development data not found at {SHARED_DATA} (only in the development checkout)")
LPS = np.array([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- writers of the other formats


def write_sitk(volume: Volume, path: Path, dtype=np.int16) -> Path:
    """``volume`` written by SimpleITK in the format its suffix names (NRRD, MetaImage, NIfTI...)."""
    sitk.WriteImage(volume_to_sitk(volume, dtype), str(path))
    return path


def write_dicom_series(volume: Volume, folder: Path) -> Path:
    """``volume`` as a DICOM series (int16, one file a slice) with the tags that place each slice:
    SimpleITK's ImageSeriesWriter refuses DICOM, so one ImageFileWriter per slice, as in
    SimpleITK's "DICOM series from array" example."""
    image = volume_to_sitk(volume, np.int16)
    folder.mkdir(parents=True)
    d = image.GetDirection()
    tags = [("0008|0060", "MR"), ("0008|0008", "DERIVED\\SECONDARY"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"),
            ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])))]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in tags:
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


def int16_volume(volume: Volume) -> Volume:
    return Volume(np.round(volume.array * 10).astype(np.int16), volume.ijk_to_ras, volume.name)


def write_as(volume: Volume, kind: str, folder: Path, stem: str) -> Path:
    """``volume`` (int16) written as ``kind`` (nifti by nibabel, dicom, or a SimpleITK suffix)."""
    if kind == "nifti":
        path = folder / f"{stem}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(volume.array), volume.ijk_to_ras), str(path))
        return path
    if kind == "dicom":
        return write_dicom_series(volume, folder / stem)
    return write_sitk(volume, folder / f"{stem}.{kind}")


# --------------------------------------------------------------------------- reading


GRID = dict(codes="LPS", spacing=(1.7, 2.1, 3.0), rotation_deg=(4.0, -3.0, 8.0))


@pytest.mark.parametrize("kind", ["nrrd", "nhdr", "mha", "mhd", "dicom"])
def test_each_format_reads_the_voxels_and_frame_it_was_written_with(tmp_path, kind):
    vol = int16_volume(phantom_volume(shape=(30, 34, 12), **GRID))
    got = read_volume(write_as(vol, kind, tmp_path, "v"))
    assert got.shape == vol.shape and got.array.dtype == np.int16
    assert np.array_equal(got.array, vol.array)
    assert np.allclose(got.ijk_to_ras, vol.ijk_to_ras, atol=1e-3 if kind == "dicom" else 1e-6)
    # the slice axis and in-plane orientation follow from that frame, as for NIfTI
    assert geo.slice_frame(got.ijk_to_ras, got.shape).axis == 2


@pytest.mark.parametrize("fast_gzip", [True, False])
def test_nii_gz_written_with_either_gzip_is_read_by_nibabel_and_simpleitk(tmp_path, monkeypatch, fast_gzip):
    """.nii.gz files are compressed by io._gzip (ISA-L when installed, else the standard library):
    both give a gzip stream that nibabel and SimpleITK read back voxel for voxel, frame included."""
    import SimpleITK as sitk

    from RigidResNetRegistrationLib import io as rio

    if fast_gzip:
        pytest.importorskip("isal", reason="isal (ISA-L gzip) is not installed")
    else:
        monkeypatch.setattr(rio, "_gzip", lambda: gzip)
    vol = phantom_volume(shape=(20, 22, 18), codes="LAS", spacing=(2.0, 1.5, 2.5))
    path = tmp_path / "v.nii.gz"
    write_volume(vol, path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    # streamed into the compressor: exactly the bytes nibabel makes of the same image
    img = nib.Nifti1Image(vol.array.astype(np.float32), vol.ijk_to_ras)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    assert gzip.decompress(path.read_bytes()) == img.to_bytes()
    back = nib.load(str(path))
    assert np.array_equal(np.asarray(back.dataobj), vol.array.astype(np.float32))
    assert np.allclose(back.affine, vol.ijk_to_ras)
    itk = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), vol.array.astype(np.float32))
    assert np.allclose(read_volume(path).ijk_to_ras, vol.ijk_to_ras)


@pytest.mark.parametrize("name,compress", [("gz_named.nii", True), ("plain_named.nii.gz", False), ("no_suffix", True),
                                           ("named.nrrd", False)])
def test_nifti_is_recognised_by_its_content_whatever_its_name(tmp_path, name, compress):
    vol = phantom_volume(shape=(20, 22, 18), codes="LAS", spacing=(2.0, 1.5, 2.5))
    write_volume(vol, tmp_path / "ref.nii")
    raw = (tmp_path / "ref.nii").read_bytes()
    (tmp_path / name).write_bytes(gzip.compress(raw) if compress else raw)
    got = read_volume(tmp_path / name)
    assert np.array_equal(got.array, vol.array) and np.allclose(got.ijk_to_ras, vol.ijk_to_ras)


@needs_data
def test_nibabel_and_simpleitk_give_the_same_frame_for_the_shared_nifti_files():
    """NIfTI stays with nibabel (as the trainer reads it); ITK reads the same headers the same way,
    including the sagittal Kirby21 scan (RPS, qform only), the LAS SPM templates (code 4) and
    files whose qform and sform differ in code."""
    from RigidResNetRegistrationLib.volume import volume_from_sitk

    files = ["spm-templates/avg152T1.nii", "spm-templates/avg152PD.nii", "kirby21-113/kirby21-113-t1.nii.gz",
             "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz", "brats/BraTS2021_90003/BraTS2021_90003_t1.nii.gz",
             "brats/BraTS2021_90004/BraTS2021_90004_t2.nii.gz", "ixi-t1-2mm/IXI126-HH-1437_T1.nii.gz",
             "whole-head/niivue_MR_Gd_t1gd.nii.gz", "whole-head/torchio_fernando_t2.nii.gz"]
    for rel in files:
        ours = read_volume(SHARED_DATA / rel)
        itk = volume_from_sitk(sitk.ReadImage(str(SHARED_DATA / rel)))
        assert np.allclose(ours.ijk_to_ras, itk.ijk_to_ras, atol=1e-5), rel
        assert np.allclose(np.asarray(ours.array, np.float64), np.asarray(itk.array, np.float64), rtol=1e-6), rel


@needs_data
def test_the_slicer_nrrd_of_the_shared_data_is_read_with_its_header():
    vol = read_volume(SHARED_DATA / "whole-head/pyradiomics_brain1_t1gd.nrrd")
    assert vol.shape == (256, 256, 25)
    assert np.allclose(vol.spacing, [0.78125, 0.78125, 6.5], atol=1e-4)
    assert geo.slice_frame(vol.ijk_to_ras, vol.shape).axis == 2


def test_bad_inputs_of_the_new_readers_give_one_line(tmp_path):
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "without a DICOM series"))
    (tmp_path / "broken.nrrd").write_text("NRRD0004\ntype: what\n")
    cases.append((tmp_path / "broken.nrrd", "not a readable NRRD image"))
    four_d = sitk.JoinSeries([volume_to_sitk(phantom_volume(shape=(8, 9, 7)))] * 3)
    sitk.WriteImage(four_d, str(tmp_path / "4d.mha"))
    cases.append((tmp_path / "4d.mha", "4D or vector"))
    vec = sitk.Compose([volume_to_sitk(phantom_volume(shape=(8, 9, 7)))] * 2)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    cases.append((tmp_path / "vec.nrrd", "4D or vector"))
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "red.png")
    cases.append((tmp_path / "red.png", "colour"))
    (tmp_path / "x.txt").write_text("hello")
    cases.append((tmp_path / "x.txt", "unsupported file type .txt; use NIfTI"))
    for path, text in cases:
        with pytest.raises(InputError) as err:
            read_volume(path, f"moving image {path.name}")
        message = str(err.value)
        assert text in message and message.startswith(f"moving image {path.name}: ") and "\n" not in message, message


def test_a_four_d_file_with_one_volume_is_read_as_3d(tmp_path):
    vol = phantom_volume(shape=(8, 9, 7), **GRID)
    sitk.WriteImage(sitk.JoinSeries([volume_to_sitk(vol, np.float32)]), str(tmp_path / "one.nrrd"))
    got = read_volume(tmp_path / "one.nrrd")
    assert got.shape == vol.shape and np.allclose(got.ijk_to_ras, vol.ijk_to_ras, atol=1e-6)


@pytest.mark.parametrize("kind", ["rgb png", "bmp", "palette png"])
def test_grey_images_stored_as_colour_are_read_as_grey(tmp_path, kind):
    grey = (np.arange(30 * 40).reshape(30, 40) % 251).astype(np.uint8)
    path = tmp_path / ("g.bmp" if kind == "bmp" else "g.png")
    image = Image.fromarray(grey)
    (image.convert("RGB") if kind == "rgb png" else image.convert("P") if kind == "palette png" else image).save(path)
    assert sitk.ReadImage(str(path)).GetNumberOfComponentsPerPixel() == 3 or kind == "bmp"
    got = read_volume(path)
    assert np.array_equal(got.array[:, :, 0], grey.T)


# --------------------------------------------------------------------------- 2D frames


@pytest.mark.parametrize("suffix,dpi", [(".png", None), (".jpg", (254, 254)), (".tif", (127, 127)), (".tif", None),
                                        (".bmp", None)])
def test_2d_image_frame_is_the_one_simpleitk_gives_the_file(tmp_path, suffix, dpi):
    rows = (np.random.default_rng(0).random((37, 53)) * 255).astype(np.uint8)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(rows).save(path, **({"dpi": dpi} if dpi else {}))
    ours = read_volume(path)
    theirs = sitk.ReadImage(str(path))
    assert ours.shape == (53, 37, 1)
    for ij in [(0, 0), (52, 0), (0, 36), (17, 29)]:
        lps = np.array(theirs.TransformIndexToPhysicalPoint(ij))
        assert np.allclose(geo.apply_to_points(ours.ijk_to_ras, np.array([*ij, 0.0])), [*(lps * LPS[:2]), 0.0], atol=1e-9)
    values = sitk.GetArrayFromImage(theirs)
    assert np.array_equal(ours.array[:, :, 0], (values[..., 0] if values.ndim == 3 else values).T)
    if suffix == ".png":  # origin 0, 1 mm pixels, identity direction in LPS
        assert np.array_equal(ours.ijk_to_ras, np.diag([-1.0, -1.0, 1.0, 1.0]))
    if dpi:  # the file's stated pixel size: 25.4 mm / dpi
        assert np.allclose(ours.spacing[:2], 25.4 / np.array(dpi), rtol=1e-3)


def test_the_network_sees_a_png_as_it_sees_the_same_axial_slice_of_a_volume(tmp_path):
    """ITK's frame of a PNG is radiological (columns to the patient's left, rows to posterior):
    an axial slice saved as it is displayed (anterior up, patient right on the left) must reach
    the network grid exactly as the slice does from its RAS NIfTI volume, i.e. in the orientation
    the network was trained on (rows along A)."""
    vol = phantom_volume(shape=(70, 84, 1), codes="RAS", spacing=(1.0, 1.0, 1.0))
    vol.array[45:55, 55:70, 0] += 150.0  # a marker to the right and in front: mirror images differ
    a = vol.array[:, :, 0]
    displayed = a[::-1, ::-1].T  # row 0 = anterior, column 0 = patient right
    Image.fromarray(np.round(255 * displayed / a.max()).astype(np.uint8)).save(tmp_path / "slice.png")
    png = read_volume(tmp_path / "slice.png")
    size, spacing = (64, 64), 1.5

    def network_view(v: Volume) -> np.ndarray:
        frame = geo.slice_frame(v.ijk_to_ras, v.shape)
        return sample_slice_stack(torch.from_numpy(np.asarray(v.array, np.float32)), v.ijk_to_ras, frame, size, spacing)[0].numpy()

    ref, seen = network_view(vol), network_view(png)
    corr = np.corrcoef(ref.ravel(), seen.ravel())[0, 1]
    mirrored = np.corrcoef(ref.ravel(), seen[:, ::-1].ravel())[0, 1]
    flipped = np.corrcoef(ref.ravel(), seen[::-1].ravel())[0, 1]
    assert corr > 0.999 and mirrored < 0.95 and flipped < 0.95, (corr, mirrored, flipped)


def test_2d_transform_file_round_trip_and_simpleitk_reading(tmp_path):
    frame = geo.slice_frame(np.diag([-1.0, -1.0, 1.0, 1.0]), (60, 50, 1))
    m = geo.params_to_ras(np.array([7.0, 3.0, -2.0]), frame)
    write_tfm(m, tmp_path / "t.tfm", dimension=2)
    assert "AffineTransform_double_2_2" in (tmp_path / "t.tfm").read_text()
    assert np.allclose(read_tfm(tmp_path / "t.tfm"), m)
    t = sitk.ReadTransform(str(tmp_path / "t.tfm"))
    assert t.GetDimension() == 2
    p_lps = np.array([12.0, 31.0])
    assert np.allclose(t.TransformPoint(tuple(p_lps)), (geo.apply_to_points(m, np.array([*(p_lps * LPS[:2]), 0.0])) * LPS)[:2])
    assert "AffineTransform_double_3_3" in format_tfm(m)


# --------------------------------------------------------------------------- command line


def run_cli(*args: str) -> None:
    assert main([*map(str, args), "--quiet", "--no-overview", "--device", "cpu"]) == 0


def png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64)


def simpleitk_applies(tfm: Path, moving: Path, fixed: Path) -> np.ndarray:
    """``moving`` resampled onto ``fixed`` by SimpleITK with the transform file, as a user would."""
    out = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat32), sitk.ReadImage(str(fixed), sitk.sitkFloat32),
                        sitk.ReadTransform(str(tfm)), sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_simpleitk_applies_our_transform_to_the_png_files(tmp_path):
    """A constant network (5 deg, 3 mm, -2 mm): transform.tfm is 2D, and SimpleITK's resampling of
    the original moving PNG onto the fixed PNG with it is registered.png."""
    card = write_card(tmp_path, bias=[5.0, 3.0, -2.0])
    vol = phantom_volume(shape=(70, 84, 1), codes="RAS", spacing=(1.0, 1.0, 1.0))
    shown = vol.array[::-1, ::-1, 0].T
    for name, image in (("f.png", shown), ("m.png", np.roll(shown, (4, -3), axis=(0, 1)))):
        Image.fromarray(np.round(255 * image / image.max()).astype(np.uint8)).save(tmp_path / name)
    out = tmp_path / "o"
    run_cli(tmp_path / "f.png", tmp_path / "m.png", "-o", out, "--weights", card, "--iterations", "1", "--no-refine",
            "--no-symmetric")
    assert "AffineTransform_double_2_2" in (out / "transform.tfm").read_text()
    ours = png_pixels(out / "registered.png")
    theirs = simpleitk_applies(out / "transform.tfm", tmp_path / "m.png", tmp_path / "f.png")
    assert corr(ours, theirs) > 0.99
    assert corr(ours, png_pixels(tmp_path / "m.png")) < 0.95  # the transform did move the image
    report = json.loads((out / "report.json").read_text())
    assert np.isclose(report["parameters"]["theta_deg"], 5.0, atol=1e-3)


@needs_data
def test_a_real_t1_pd_slice_pair_as_png_registers_and_simpleitk_reproduces_it(tmp_path):
    """The issue's case: an axial slice of the SPM T1 and PD templates, saved as PNG as displayed,
    the PD rotated by 10 degrees (and shifted 3, -2 mm) by SimpleITK; the bundled model must
    recover it to within 1 degree, SimpleITK must reproduce registered.png from transform.tfm, and
    the same pixels given as NIfTI must give the same transform."""
    shown = {c: nib.load(SHARED_DATA / f"spm-templates/avg152{c}.nii").get_fdata()[:, :, 45].T[::-1] for c in ("T1", "PD")}
    u8 = {c: np.round(255 * a / a.max()).astype(np.uint8) for c, a in shown.items()}
    sitk.WriteImage(sitk.GetImageFromArray(u8["T1"]), str(tmp_path / "f.png"))
    pd = sitk.GetImageFromArray(u8["PD"].astype(np.float32))
    motion = sitk.Euler2DTransform()
    motion.SetCenter([(pd.GetWidth() - 1) / 2, (pd.GetHeight() - 1) / 2])
    motion.SetAngle(np.deg2rad(10.0))
    motion.SetTranslation([3.0, -2.0])
    moved = sitk.Resample(pd, pd, motion, sitk.sitkLinear, 0.0)  # moved(x) = pd(motion(x))
    sitk.WriteImage(sitk.Cast(sitk.Clamp(moved, lowerBound=0, upperBound=255), sitk.sitkUInt8), str(tmp_path / "m.png"))
    run_cli(tmp_path / "f.png", tmp_path / "m.png", "-o", tmp_path / "o")

    found = sitk.AffineTransform(sitk.ReadTransform(str(tmp_path / "o/transform.tfm")))
    truth = motion.GetInverse()  # registered(x) = moved(T(x)) = pd(x) needs T = motion^-1
    angle = np.degrees(np.arctan2(found.GetMatrix()[2], found.GetMatrix()[0]) - truth.GetAngle())
    centre = tuple(truth.GetCenter())
    shift = np.linalg.norm(np.subtract(found.TransformPoint(centre), truth.TransformPoint(centre)))
    assert abs(angle) < 1.0 and shift < 1.0, (angle, shift)
    ours = png_pixels(tmp_path / "o/registered.png")
    assert corr(ours, simpleitk_applies(tmp_path / "o/transform.tfm", tmp_path / "m.png", tmp_path / "f.png")) > 0.99

    for name in ("f", "m"):  # the same pixels, and ITK's frame, as one-slice NIfTI volumes
        sitk.WriteImage(sitk.JoinSeries(sitk.ReadImage(str(tmp_path / f"{name}.png"))), str(tmp_path / f"{name}.nii.gz"))
    run_cli(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", "-o", tmp_path / "n")
    assert "AffineTransform_double_3_3" in (tmp_path / "n/transform.tfm").read_text()
    assert np.allclose(read_tfm(tmp_path / "n/transform.tfm"), read_tfm(tmp_path / "o/transform.tfm"), atol=1e-4)


@pytest.fixture(scope="module")
def format_runs(tmp_path_factory):
    """A phantom pair with a known motion (in-plane 4 deg, 3, -2 mm and a 1.5 deg tilt), int16,
    registered from NIfTI files by a constant network (3, 2, -1) and the 6-DOF refinement (which
    reads both volumes' voxels and headers). Returns (folder, card, truth, NIfTI run's folder)."""
    root = tmp_path_factory.mktemp("formats")
    card = write_card(root, bias=[3.0, 2.0, -1.0])
    fixed = int16_volume(phantom_volume(shape=(48, 56, 30), codes="LPS", spacing=(2.0, 2.0, 2.5)))
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    truth = geo.params_to_ras(np.array([4.0, 3.0, -2.0]), frame) @ geo.rigid_matrix_3d((1.5, 0.0, 0.0), centre=frame.centre)
    moving = int16_volume(moved_copy(fixed, truth, shape=(44, 52, 28), codes="RAS", spacing=(2.1, 2.2, 2.7),
                                     rotation_deg=(0.0, 3.0, -5.0)))
    folder = root / "in"
    folder.mkdir()
    for kind in ("nifti", "nrrd", "mha", "dicom"):
        write_as(fixed, kind, folder, f"fixed_{kind}")
        write_as(moving, kind, folder, f"moving_{kind}")
    run_cli(folder / "fixed_nifti.nii.gz", folder / "moving_nifti.nii.gz", "-o", root / "nifti", "--weights", card,
            "--iterations", "1")
    return folder, card, truth, root / "nifti"


def _input(folder: Path, role: str, kind: str) -> Path:
    return next(p for p in folder.iterdir() if p.name.startswith(f"{role}_{kind}"))


@pytest.mark.parametrize("fixed_kind,moving_kind,written", [
    ("nrrd", "nrrd", "registered.nrrd"), ("mha", "mha", "registered.mha"),
    ("dicom", "nifti", "registered.nii.gz"), ("nifti", "dicom", "registered.nii.gz"), ("nrrd", "mha", "registered.nrrd"),
])
def test_nrrd_mha_and_dicom_inputs_give_the_transform_of_their_nifti_copies(tmp_path, format_runs, fixed_kind, moving_kind,
                                                                             written):
    folder, card, truth, nifti = format_runs
    out = tmp_path / "o"
    run_cli(_input(folder, "fixed", fixed_kind), _input(folder, "moving", moving_kind), "-o", out, "--weights", card,
            "--iterations", "1", "--output-format", "input")
    reference = read_tfm(nifti / "transform.tfm")
    found = read_tfm(out / "transform.tfm")
    fixed = read_volume(_input(folder, "fixed", "nifti"))
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    rot, mm = geo.rigid_error(found, reference, centre)
    # DICOM keeps the header as decimal strings: read back, its geometry is the NIfTI copy's to ~3e-5
    # (checked exactly here), and on this phantom, whose Mattes MI is nearly flat over a few tenths of
    # a degree of one rotation, the refinement's end may move by up to ~0.15 deg with that rounding
    # (numpy 2.4: 0.13 deg, ending 0.30 deg from the truth where the NIfTI run ends 0.41). A misread
    # header (axis order, sign, spacing, origin) is off by degrees or millimetres.
    rounded = "dicom" in (fixed_kind, moving_kind)
    for role, kind in (("fixed", fixed_kind), ("moving", moving_kind)):
        as_read, copy = read_volume(_input(folder, role, kind)), read_volume(_input(folder, role, "nifti"))
        assert np.array_equal(as_read.array, copy.array) and as_read.shape == copy.shape
        assert np.allclose(as_read.ijk_to_ras, copy.ijk_to_ras, atol=1e-4 if kind == "dicom" else 1e-6)
    assert rot < (0.2 if rounded else 0.01) and mm < 0.01, (rot, mm)
    # and it is the refinement's transform, much nearer the truth than the network's start (1.8 deg)
    start = geo.params_to_ras(np.array([3.0, 2.0, -1.0]), geo.slice_frame(fixed.ijk_to_ras, fixed.shape))
    rot, mm = geo.rigid_error(found, truth, centre)
    rot0, mm0 = geo.rigid_error(start, truth, centre)
    assert rot < min(0.6, rot0 / 3) and mm < min(0.6, mm0 / 3), (rot, mm, rot0, mm0)
    # --output-format input: the fixed image's own format (NIfTI for a DICOM fixed), on the fixed grid
    registered = read_volume(out / written)
    assert np.allclose(registered.ijk_to_ras, fixed.ijk_to_ras, atol=1e-3) and registered.shape == fixed.shape
    assert corr(registered.array, read_volume(nifti / "registered.nii.gz").array) > 0.999
    assert (out / written.replace("registered", "difference")).exists()
    assert json.loads((out / "report.json").read_text())["outputs"] == sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("output_format,suffix", [("nrrd", ".nrrd"), ("mha", ".mha"), ("nifti", ".nii.gz"),
                                                  ("input", ".nii.gz")])
def test_output_format_writes_readable_volumes_on_the_fixed_grid(tmp_path, format_runs, output_format, suffix):
    folder, card, _, nifti = format_runs
    out = tmp_path / "o"
    run_cli(folder / "fixed_nifti.nii.gz", folder / "moving_nifti.nii.gz", "-o", out, "--weights", card, "--iterations",
            "1", "--output-format", output_format)
    fixed = read_volume(folder / "fixed_nifti.nii.gz")
    for name in ("registered", "difference"):
        theirs = sitk.ReadImage(str(out / f"{name}{suffix}"))  # readable by ITK, with the fixed grid
        assert theirs.GetSize() == fixed.shape
        assert np.allclose(np.array(theirs.TransformIndexToPhysicalPoint((5, 7, 9))) * LPS,
                           geo.apply_to_points(fixed.ijk_to_ras, np.array([5.0, 7.0, 9.0])), atol=1e-4)
        assert np.allclose(read_volume(out / f"{name}{suffix}").array, read_volume(nifti / f"{name}.nii.gz").array, atol=1e-4)
    others = {".nii.gz", ".nrrd", ".mha"} - {suffix}
    assert not [p for p in out.iterdir() if any(p.name.endswith(s) for s in others)]
    assert read_tfm(out / "transform.tfm") == pytest.approx(read_tfm(nifti / "transform.tfm"))


@pytest.mark.parametrize("layout", ["C", "F", "flipped", "big-endian", "read-only"])
def test_fortran_order_gives_the_nifti_voxel_order_and_the_written_file_reads_back(tmp_path, layout):
    """NIfTI stores i fastest: an array in another order (the engine's outputs from C-ordered
    inputs, numpy arrays, flips) is reordered once (torch, every thread), a Fortran-ordered one is
    written as it is, and the file holds the same voxels whatever the input's layout."""
    from RigidResNetRegistrationLib.io import fortran_order, read_volume, write_volume
    from RigidResNetRegistrationLib.volume import Volume

    base = np.random.default_rng(5).random((7, 8, 9)).astype(np.float32)
    array = {"C": base, "F": np.asfortranarray(base), "flipped": base[::-1, :, ::-1],
             "big-endian": base.astype(">f4"), "read-only": base.copy()}[layout]
    array.flags.writeable = layout != "read-only"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on read-only views: never shown to a user
        out = fortran_order(array)
    assert out.flags.f_contiguous and out.dtype == np.float32 and np.array_equal(out, array.astype(np.float32))
    ijk_to_ras = np.diag([1.5, 2.0, 2.5, 1.0])
    write_volume(Volume(array, ijk_to_ras, layout), tmp_path / "v.nii.gz")
    back = read_volume(tmp_path / "v.nii.gz")
    assert np.array_equal(back.array, array.astype(np.float32)) and np.allclose(back.ijk_to_ras, ijk_to_ras)
