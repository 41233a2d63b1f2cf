"""Bad input, faults and safety at every front door (issue 7).

The command line (``rigid-resnet-register``), the Slicer Logic (module Logic and its MRML adapter
``slicer_nodes``) and the trainer (``rigid-resnet-train`` / ``rigid-resnet-evaluate``) must each
answer bad input with one clear line (command lines: ``error: ...`` on stderr, exit code 2, no
traceback; Logic: ``ValueError`` / ``RuntimeError`` with the same text), never modify their inputs,
never leave half-written outputs, and keep memory bounded by batching, not by volume size.

Cases that already have tests elsewhere are not repeated here: missing file, text file named
``.nii.gz``, 4D NIfTI, constant and NaN volumes and volumes that do not overlap on the command
line (``test_cli.py``); vector / multi-component / label map / constant nodes, cancel and a failure
while writing output nodes in the Logic (``test_slicer_logic.py``); determinism and integer types
in the engine (``test_engine.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, ConstantPredictor, moved_copy, phantom_volume, write_card, write_phantom_pair

from RigidResNetRegistrationLib import cli
from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib import io as rio
from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
from RigidResNetRegistrationLib.model import ModelCard
from RigidResNetRegistrationLib.preprocess import InputError, Volume, check_in_plane_resolution

try:  # the Logic tests need real MRML (slicer-core); the rest of this file does not
    import slicer

    HAVE_SLICER = hasattr(slicer, "vtkMRMLScene")
except ImportError:  # pragma: no cover - slicer-core is a test dependency
    HAVE_SLICER = False
if HAVE_SLICER:
    import slicer.util
    from test_slicer_logic import MOTION, ORACLE, case, linear_transform, module, state  # noqa: F401

    from RigidResNetRegistrationLib import slicer_nodes

needs_slicer = pytest.mark.skipif(not HAVE_SLICER, reason="slicer-core (MRML for Python) is not installed")

BIAS = [2.0, 1.0, 0.5]  # what the constant test network predicts
CARD = ModelCard.from_dict({"name": "oracle", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0}})
OUTPUTS = {"registered.nii.gz", "difference.nii.gz", "transform.tfm", "slices.csv", "report.json"}


# --------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save(path: Path, data: np.ndarray, affine=None, dtype=None) -> Path:
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine, dtype=dtype)
    nib.save(img, str(path))
    return path


def save_volume(path: Path, volume: Volume, dtype=None) -> Path:
    return save(path, volume.array if dtype is None else volume.array.astype(dtype), volume.ijk_to_ras, dtype=dtype)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process (fast: the model stays cached); returns code, stdout, stderr."""
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *expected: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Everything in ``folder`` (recursively), as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def unwritable_folder(tmp_path: Path) -> Path:
    """An existing folder in which files cannot be created, even by root; skip if none exists."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        return d
    for candidate in (Path("/sys"), Path("/proc")):  # pseudo file systems refuse new files for everyone
        try:
            probe = candidate / f"rigid-resnet-probe-{os.getpid()}"
            probe.mkdir()
        except OSError:
            if candidate.is_dir():
                return candidate
            continue
        probe.rmdir()
    pytest.skip("running as root and no folder here refuses new files")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fixed and moving phantoms as NIfTI files."""
    return write_phantom_pair(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A real model card + fp16 weights whose network outputs BIAS for any input."""
    return write_card(tmp_path_factory.mktemp("model"), bias=BIAS)


def cli_args(data: Path, models: Path, out: Path, fixed: Path | None = None, moving: Path | None = None, *extra: str) -> list[str]:
    """The fastest command line: one pass, no refinement (``--no-refine`` is volume mode's own)."""
    no_refine = [] if "slices" in extra else ["--no-refine"]
    return [str(fixed or data / "fixed.nii.gz"), str(moving or data / "moving.nii.gz"), "-o", str(out), "--weights", str(models),
            "--iterations", "1", *no_refine, "--device", "cpu", "--quiet", "--no-overview", *extra]


# --------------------------------------------------------------------------- bad images: command line


def _bad_image(kind: str, tmp: Path, data: Path) -> tuple[Path, list[str]]:
    """(a bad moving image, the texts its error line must contain)."""
    affine = nib.load(data / "moving.nii.gz").affine
    if kind == "truncated":
        raw = (data / "moving.nii.gz").read_bytes()
        (tmp / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
        return tmp / "cut.nii.gz", ["moving image", "cut.nii.gz", "not a readable NIfTI"]
    if kind == "header only":
        raw = (data / "moving.nii.gz").read_bytes()
        (tmp / "stub.nii.gz").write_bytes(raw[:64])
        return tmp / "stub.nii.gz", ["moving image", "not a readable NIfTI"]
    if kind == "rgb voxels":
        rgb = np.zeros((20, 20, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        return save(tmp / "rgb.nii.gz", rgb), ["moving image", "vector", "3D scalar volume is needed"]
    if kind == "vector 5D":
        return save(tmp / "vec.nii.gz", np.random.rand(10, 10, 10, 1, 3).astype(np.float32)), \
            ["moving image", "vec.nii.gz", "3D scalar volume is needed", "4D or vector"]
    if kind == "empty":
        return save(tmp / "empty.nii.gz", np.zeros((0, 10, 10), np.float32)), ["moving image", "the volume is empty (shape (0, 10, 10))"]
    if kind == "all zero":
        return save(tmp / "zero.nii.gz", np.zeros((20, 20, 20), np.uint8)), ["moving image", "constant"]
    if kind == "infinite":
        a = nib.load(data / "moving.nii.gz").get_fdata().astype(np.float32)
        a[3, 4, 5] = np.inf
        a[6, 7, 8] = -np.inf
        return save(tmp / "inf.nii.gz", a, affine), ["moving image", "2 NaN or infinite"]
    if kind == "too small":
        return save(tmp / "tiny.nii.gz", np.random.rand(6, 6, 4).astype(np.float32)), ["too small for the network grid"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "header only", "rgb voxels", "vector 5D", "empty", "all zero", "infinite"])
def test_cli_bad_moving_image_gives_one_line_and_leaves_nothing(kind, tmp_path, data, models, capsys):
    bad, expected = _bad_image(kind, tmp_path, data)
    inputs = [data / "fixed.nii.gz", bad]
    before = [sha256(p) for p in inputs]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *cli_args(data, models, out, moving=bad))
    assert_one_error_line(code, err, *expected)
    assert [sha256(p) for p in inputs] == before
    assert leftovers(out) == []


def test_cli_fixed_volume_too_small_for_the_network_grid(tmp_path, data, models, capsys):
    bad, expected = _bad_image("too small", tmp_path, data)
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", fixed=bad))
    assert_one_error_line(code, err, "fixed image", *expected)
    assert leftovers(tmp_path / "out") == []


def test_cli_unreadable_file(tmp_path, data, models, capsys, monkeypatch):
    locked = tmp_path / "locked.nii.gz"
    shutil.copy(data / "moving.nii.gz", locked)
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked and mode & os.R_OK
                            else real_access(p, mode, *a, **k))
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", moving=locked))
    assert_one_error_line(code, err, "moving image", "not readable", "locked.nii.gz")


# --------------------------------------------------------------------------- anisotropy


def test_in_plane_rule_thick_slices_along_the_slice_axis_are_fine_in_plane_ones_are_not():
    """The documented rule (README, "Bad input and safety"), with the 2 mm network grid of CARD:
    voxel footprint along the slice plane's axes <= 6 grid pixels (12 mm) and the long side <= 4x
    the short one (a side finer than the grid counts as 2 mm). Slice thickness is not limited."""
    def check(spacing, axis="auto", rotation=(0.0, 0.0, 0.0), name="fixed volume"):
        """The volume checked on its own slice frame, or (``rotation``) as a moving volume tilted
        against an axis-aligned 1 mm fixed volume's frame."""
        v = phantom_volume(shape=(8, 8, 8), spacing=spacing, rotation_deg=rotation)
        ref = phantom_volume(shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0)) if any(rotation) else v
        frame = geo.slice_frame(ref.ijk_to_ras, ref.shape, axis)
        check_in_plane_resolution(Volume(v.array, v.ijk_to_ras, name), frame, 2.0)

    check((1.0, 1.0, 1.0))
    check((0.5, 0.5, 12.0))  # thick axial slices, registered axially
    check((0.9, 1.2, 6.0))
    check((1.0, 6.0, 1.0), axis="coronal")  # thick coronal slices, registered coronally
    check((0.5, 0.5, 5.0), rotation=(20.0, 0.0, 0.0))  # thick moving slices tilted 20 deg into the plane: 0.5 x 2.2 mm
    check((0.5, 0.5, 10.0), rotation=(45.0, 0.0, 0.0), name="moving volume")  # 0.5 x 7.42 mm: within 4 x 2 mm
    with pytest.raises(InputError, match=r"moving volume: .* \(0.5 x 10.3 mm"):
        check((0.5, 0.5, 14.0), rotation=(45.0, 0.0, 0.0), name="moving volume")  # thick slices at 45 deg
    check((2.0, 8.0, 2.0))  # 8 mm = 4 x 2 mm: at the limit
    with pytest.raises(InputError, match=r"fixed volume: voxel spacing 1 x 9 x 1 mm is too coarse in the axial slice plane "
                                         r"\(1 x 9 mm, one side over 4 times the other.*thick coronal slices cross the slice plane"):
        check((1.0, 9.0, 1.0))
    with pytest.raises(InputError, match=r"13 x 13 mm, longer than 12 mm.*resample it to finer voxels"):
        check((13.0, 13.0, 13.0))
    with pytest.raises(InputError, match="moving volume: .*thick sagittal slices cross"):
        check((9.0, 1.0, 1.0), name="moving volume")


def _aniso_files(tmp: Path, spacing, shape, rotation=(0.0, 0.0, 0.0)) -> Path:
    v = phantom_volume(shape=shape, spacing=spacing, codes="RAS", rotation_deg=rotation)
    return save_volume(tmp / f"v{'x'.join(map(str, spacing))}.nii.gz", v)


def test_cli_in_plane_anisotropy_is_refused_with_the_volume_and_spacing(tmp_path, data, models, capsys):
    fixed = _aniso_files(tmp_path, (1.0, 9.0, 1.0), (60, 10, 50))  # thick slices along A
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "a", fixed=fixed, moving=fixed))
    assert_one_error_line(code, err, "fixed image", "voxel spacing 1 x 9 x 1 mm", "axial slice plane", "thick coronal slices cross")
    coarse = _aniso_files(tmp_path, (13.0, 13.0, 13.0), (8, 8, 6))
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "b", moving=coarse))
    assert_one_error_line(code, err, "moving image", "13 x 13 x 13 mm", "longer than 12 mm")
    assert leftovers(tmp_path / "a") == [] and leftovers(tmp_path / "b") == []


@pytest.mark.parametrize("fixed_spacing,fixed_shape,moving_spacing,moving_shape,axis", [
    ((2.0, 2.0, 8.0), (44, 50, 8), (2.0, 2.0, 2.0), (44, 50, 30), "auto"),  # thick axial slices
    ((1.0, 7.0, 1.0), (60, 12, 50), (1.0, 7.0, 1.0), (60, 12, 50), "coronal"),  # thick coronal slices, coronal axis
    ((2.0, 2.0, 2.0), (44, 50, 30), (1.0, 1.0, 5.0), (80, 90, 12), "auto"),  # thick moving slices tilted below
])
def test_cli_thick_slices_along_the_slice_axis_keep_working(tmp_path, models, capsys, fixed_spacing, fixed_shape,
                                                              moving_spacing, moving_shape, axis):
    fixed = _aniso_files(tmp_path, fixed_spacing, fixed_shape)
    rotation = (15.0, 0.0, 0.0) if moving_spacing == (1.0, 1.0, 5.0) else (0.0, 0.0, 0.0)
    moving = save_volume(tmp_path / "moving.nii.gz", phantom_volume(shape=moving_shape, spacing=moving_spacing, rotation_deg=rotation))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *cli_args(tmp_path, models, out, fixed, moving, "--axis", axis))
    assert code == 0, err
    assert OUTPUTS <= set(leftovers(out))


# --------------------------------------------------------------------------- integer types


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64])
def test_cli_integer_types_near_their_maximum_do_not_overflow(tmp_path, data, models, capsys, dtype):
    top = float(np.iinfo(dtype).max)
    vols = {}
    for role in ("fixed", "moving"):
        img = nib.load(data / f"{role}.nii.gz")
        a = img.get_fdata()
        scaled = np.round(a / a.max() * top * 0.999).astype(np.float64)
        scaled = np.clip(scaled, 0, np.nextafter(top, 0)).astype(dtype)
        vols[role] = save(tmp_path / f"{role}.nii.gz", scaled, img.affine, dtype=dtype)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *cli_args(data, models, out, vols["fixed"], vols["moving"]))
    assert code == 0, err
    registered = nib.load(out / "registered.nii.gz").get_fdata()
    moving_max = float(np.asanyarray(nib.load(vols["moving"]).dataobj).max())
    assert np.isfinite(registered).all()
    assert registered.min() >= 0 and registered.max() <= moving_max * (1 + 1e-6)  # no wrap-around
    assert registered.max() > 0.5 * moving_max
    report = json.loads((out / "report.json").read_text())
    assert all(np.isfinite(v) for v in report["similarity"].values())
    assert report["similarity"]["ncc_before"] > 0.2


def test_engine_boolean_and_extreme_integer_volumes():
    fixed = phantom_volume(shape=(44, 50, 30), codes="LPS")
    mask = Volume(fixed.array > 60, fixed.ijk_to_ras, "fixed mask")
    huge = Volume((fixed.array / fixed.array.max() * (2**62)).astype(np.int64), fixed.ijk_to_ras, "moving int64")
    result = register_volumes(mask, huge, ConstantPredictor(CARD, [0.0, 0.0, 0.0]), RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert np.isfinite(result.registered.array).all()
    assert result.registered.array.min() >= 0 and result.registered.array.max() <= 2.0**62 * (1 + 1e-6)
    assert 0 <= result.difference.array.min() and result.difference.array.max() <= 1
    assert result.similarity["ncc_before"] > 0.5  # the mask and the image agree


# --------------------------------------------------------------------------- output folder


def test_cli_output_folder_not_writable(tmp_path, data, models, capsys):
    folder = unwritable_folder(tmp_path)
    before = leftovers(folder) if folder.parent == tmp_path else None
    code, _, err = run_cli(capsys, *cli_args(data, models, folder))
    assert_one_error_line(code, err, "output folder", str(folder))
    if before is not None:
        assert leftovers(folder) == before


def test_cli_output_path_is_a_file(tmp_path, data, models, capsys):
    (tmp_path / "taken").write_text("mine")
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "taken"))
    assert_one_error_line(code, err, "exists and is not a folder")
    assert (tmp_path / "taken").read_text() == "mine"


# --------------------------------------------------------------------------- atomic outputs


def _fail(exc):
    def broken(*args, **kwargs):
        raise exc

    return broken


@pytest.mark.parametrize("writer,exc,code_expected", [
    ("write_tfm", OSError(28, "No space left on device"), 2),  # after registered/difference.nii.gz were written
    ("write_csv", OSError(28, "No space left on device"), 2),
    ("write_json", RuntimeError("disk went away"), 2),
    ("write_csv", KeyboardInterrupt(), 130),  # Ctrl-C while writing: the cancel of a command line
])
def test_cli_failure_while_writing_leaves_no_partial_outputs(tmp_path, data, models, capsys, monkeypatch, writer, exc, code_expected):
    """Outputs appear all together or not at all: a later write failing removes the earlier ones
    (they are written into a private folder inside OUTDIR and moved into place at the end)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    inputs = [data / "fixed.nii.gz", data / "moving.nii.gz"]
    before = [sha256(p) for p in inputs]
    monkeypatch.setattr(rio, writer, _fail(exc))
    code, _, err = run_cli(capsys, *cli_args(data, models, out))
    assert code == code_expected
    if code_expected == 2:
        assert_one_error_line(code, err, str(exc).split("] ")[-1])
    else:
        assert err.strip() == "error: interrupted"
    assert leftovers(out) == ["notes.txt"]  # no registered.nii.gz, no *.tmp / *.part, no staging folder
    assert [sha256(p) for p in inputs] == before


def test_cli_failed_run_keeps_the_previous_outputs_and_success_leaves_no_temporaries(tmp_path, data, models, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *cli_args(data, models, out))
    assert code == 0, err
    assert set(leftovers(out)) == OUTPUTS  # nothing else: no temporary files or folders
    previous = {name: sha256(out / name) for name in OUTPUTS}
    monkeypatch.setattr(rio, "write_csv", _fail(OSError(5, "Input/output error")))
    code, _, err = run_cli(capsys, *cli_args(data, models, out, None, None, "--mode", "slices"))
    assert_one_error_line(code, err, "Input/output error")
    assert {name: sha256(out / name) for name in OUTPUTS} == previous
    assert set(leftovers(out)) == OUTPUTS


def test_cli_inputs_are_byte_identical_after_a_successful_run(tmp_path, data, models, capsys):
    inputs = [data / "fixed.nii.gz", data / "moving.nii.gz", models, models.with_suffix(".pt")]
    before = [(sha256(p), p.stat().st_mtime_ns) for p in inputs]
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", None, None, "--mode", "slices"))
    assert code == 0, err
    assert [(sha256(p), p.stat().st_mtime_ns) for p in inputs] == before


def test_cli_two_runs_give_identical_transform_files(tmp_path, data, capsys):
    card = write_card(tmp_path, seed=5, name="random")  # input-dependent predictions
    for run in ("a", "b"):
        code, _, err = run_cli(capsys, *cli_args(data, card, tmp_path / run))
        assert code == 0, err
    for name in ("transform.tfm", "slices.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# --------------------------------------------------------------------------- weights and model cards


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: loading it with a full unpickler creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _card_variant(kind: str, base: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A model card folder with one fault; returns (card path, texts its error must contain)."""
    folder = tmp / kind.replace(" ", "_")
    folder.mkdir()
    card = json.loads(base.read_text())
    weights = folder / "w.pt"
    shutil.copy(base.with_suffix(".pt"), weights)
    card["weights"]["file"] = "w.pt"
    expected: list[str]
    if kind == "missing weights":
        weights.unlink()
        expected = ["weights file missing", "w.pt"]
    elif kind == "truncated weights":  # the card's sha256 matches the cut file: torch must reject it
        weights.write_bytes(weights.read_bytes()[:100_000])
        card["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        expected = ["weights file w.pt cannot be loaded"]
    elif kind == "tampered weights":  # one byte changed, the card's sha256 unchanged
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        weights.write_bytes(bytes(raw))
        expected = ["w.pt does not match its model card"]
    elif kind == "relative escape":
        card["weights"]["file"] = "../../x.pt"
        expected = ["'../../x.pt' outside its folder"]
    elif kind == "absolute path":
        card["weights"]["file"] = str(base.with_suffix(".pt").resolve())
        expected = ["outside its folder"]
    elif kind == "symlink out":
        weights.unlink()
        outside = tmp / "elsewhere.pt"
        shutil.copy(base.with_suffix(".pt"), outside)
        weights.symlink_to(outside)
        expected = ["outside the model folder"]
    elif kind == "wrong architecture":
        torch.save({"regressor.2.weight": torch.zeros(2, 2)}, weights)
        card["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        expected = ["does not fit the model card's architecture"]
    else:
        raise AssertionError(kind)
    path = folder / "card.json"
    path.write_text(json.dumps(card))
    return path, expected


WEIGHT_FAULTS = ["missing weights", "truncated weights", "tampered weights", "relative escape", "absolute path", "symlink out",
                 "wrong architecture"]


@pytest.mark.parametrize("kind", WEIGHT_FAULTS)
def test_cli_model_card_and_weights_faults(kind, tmp_path, data, models, capsys):
    card, expected = _card_variant(kind, models, tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *cli_args(data, card, out))
    assert_one_error_line(code, err, *expected)
    assert leftovers(out) == []


def _malicious_card(tmp: Path) -> tuple[Path, Path]:
    """A weights file that runs code when unpickled without ``weights_only`` (it would create
    ``marker``), listed in a model card with its correct sha256."""
    folder = tmp / "evil"
    folder.mkdir()
    marker = tmp / "MARKER_code_was_executed"
    torch.save({"regressor.2.bias": torch.zeros(3), "payload": _Payload(marker)}, folder / "evil.pt")
    card = {"name": "evil", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0},
            "weights": {"file": "evil.pt", "sha256": hashlib.sha256((folder / "evil.pt").read_bytes()).hexdigest()}}
    (folder / "evil.json").write_text(json.dumps(card))
    return folder / "evil.json", marker


def test_a_weights_file_with_code_in_it_is_never_executed(tmp_path, data, capsys):
    card, marker = _malicious_card(tmp_path)
    # sanity: the payload is live (a plain unpickler would run it) - checked in a throw-away process
    probe = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(card.with_suffix('.pt'))!r}, weights_only=False)"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert marker.exists(), probe.stderr[-2000:]
    marker.unlink()
    code, _, err = run_cli(capsys, *cli_args(data, card, tmp_path / "out"))
    assert_one_error_line(code, err, "weights file evil.pt cannot be loaded", "UnpicklingError")
    assert not marker.exists()


def test_cuda_requested_but_unavailable_on_the_command_line(tmp_path, data, models, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out"), "--device", "cuda")
    assert_one_error_line(code, err, "CUDA was requested but is not available")
    assert leftovers(tmp_path / "out") == []


def test_cli_bad_numbers(tmp_path, data, models, capsys):
    for option, value, text in (("--batch-size", "0", "batch size must be a positive integer"),
                                ("--iterations", "0", "iterations must be an integer from 1 to 20")):
        code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", None, None, option, value))
        assert_one_error_line(code, err, text)


def test_debug_variable_shows_the_traceback(tmp_path, data, models, monkeypatch):
    monkeypatch.setenv("RIGID_RESNET_DEBUG", "1")
    with pytest.raises(InputError, match="file not found"):
        cli.main(cli_args(data, models, tmp_path / "out", None, tmp_path / "nope.nii.gz"))


def test_command_line_process_prints_no_traceback(tmp_path, data, models):
    """One real process (what a user runs) for a failure deep inside: a truncated image."""
    bad, _ = _bad_image("truncated", tmp_path, data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "RigidResNetRegistration"), str(ROOT / "training")])}
    env.pop("RIGID_RESNET_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "RigidResNetRegistrationLib", *cli_args(data, models, tmp_path / "out", moving=bad)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert_one_error_line(r.returncode, r.stderr, "not a readable NIfTI")
    assert r.stdout == ""


# --------------------------------------------------------------------------- the Slicer Logic


def world_state(node):
    """A volume node's voxels, IJKToRAS, parent transform id and name, and its parent chain's matrices."""
    chain = []
    parent = node.GetParentTransformNode()
    while parent is not None:
        chain.append((parent.GetID(), slicer.util.arrayFromTransformMatrix(parent).copy()))
        parent = parent.GetParentTransformNode()
    return state(node), chain


def assert_same_world_state(a, b):
    (voxels_a, ijk_a, *rest_a), (voxels_b, ijk_b, *rest_b) = a[0], b[0]
    assert np.array_equal(voxels_a, voxels_b, equal_nan=True) and np.array_equal(ijk_a, ijk_b) and rest_a == rest_b
    assert [i for i, _ in a[1]] == [i for i, _ in b[1]]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a[1], b[1]))


def _logic_case(scene, kind):
    """(fixed node, moving node, extra register() arguments, text of the expected error) for one bad input."""
    fixed_node, moving_node, _ = case(scene)
    extra: dict = {}
    if kind in ("nan", "inf"):
        a = slicer.util.arrayFromVolume(moving_node).astype(np.float32)
        a[5, 6, 7] = np.nan if kind == "nan" else np.inf
        moving_node = slicer_nodes.add_volume_node(scene, np.transpose(a, (2, 1, 0)), slicer_nodes.ijk_to_ras_of(moving_node), "bad")
        return fixed_node, moving_node, extra, "moving volume 'bad': contains 1 NaN or infinite"
    if kind == "no overlap":
        far = slicer_nodes.ijk_to_ras_of(moving_node)
        far[:3, 3] += 5000.0
        moving_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(far))
        return fixed_node, moving_node, {"init": "header"}, "do not overlap"  # other starts align them
    if kind == "no overlap by parent transform":
        moving_node.SetAndObserveTransformNodeID(linear_transform(scene, geo.rigid_matrix_3d(translation_mm=(0, 0, 4000.0))).GetID())
        return fixed_node, moving_node, {"init": "header"}, "do not overlap"
    if kind == "too small":
        tiny = phantom_volume(shape=(8, 8, 6), spacing=(1.0, 1.0, 1.0))
        return slicer_nodes.add_volume_node(scene, tiny.array, tiny.ijk_to_ras, "tiny"), moving_node, extra, \
            "fixed volume 'tiny': in-plane field of view 8 x 8 mm is too small for the network grid"
    if kind == "in-plane anisotropy":
        v = phantom_volume(shape=(60, 10, 50), spacing=(1.0, 9.0, 1.0))
        node = slicer_nodes.add_volume_node(scene, v.array, v.ijk_to_ras, "thick coronal")
        return node, moving_node, extra, "fixed volume 'thick coronal': voxel spacing 1 x 9 x 1 mm is too coarse in the axial slice plane"
    if kind == "coarse moving":
        v = phantom_volume(shape=(8, 8, 6), spacing=(13.0, 13.0, 13.0))
        return fixed_node, slicer_nodes.add_volume_node(scene, v.array, v.ijk_to_ras, "coarse"), extra, "moving volume 'coarse': voxel spacing 13 x 13 x 13 mm"
    if kind == "batch size":
        return fixed_node, moving_node, {"batchSize": 0}, "batch size must be a positive integer"
    if kind == "axis":
        return fixed_node, moving_node, {"axis": "oblique"}, "axis must be"
    raise AssertionError(kind)


LOGIC_BAD = ["nan", "inf", "no overlap", "no overlap by parent transform", "too small", "in-plane anisotropy", "coarse moving",
             "batch size", "axis"]


@needs_slicer
@pytest.mark.parametrize("kind", LOGIC_BAD)
def test_logic_bad_volumes_raise_value_error_and_change_nothing(module, kind):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, extra, message = _logic_case(scene, kind)
    before = world_state(fixed_node), world_state(moving_node)
    n0 = scene.GetNumberOfNodes()
    with pytest.raises(ValueError) as caught:
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cpu",
                                                       predictor=ConstantPredictor(ORACLE, MOTION), **extra)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert scene.GetNumberOfNodes() == n0
    assert_same_world_state(world_state(fixed_node), before[0])
    assert_same_world_state(world_state(moving_node), before[1])


@needs_slicer
@pytest.mark.parametrize("spacing,shape,axis", [((2.0, 2.0, 8.0), (44, 50, 8), "auto"), ((1.0, 7.0, 1.0), (60, 12, 50), "coronal")])
def test_logic_thick_slices_along_the_slice_axis_keep_working(module, spacing, shape, axis):
    scene = slicer.vtkMRMLScene()
    v = phantom_volume(shape=shape, spacing=spacing)
    fixed_node = slicer_nodes.add_volume_node(scene, v.array, v.ijk_to_ras, "thick")
    moving_node = case(scene)[1]
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, axis=axis, device="cpu",
                                                         predictor=ConstantPredictor(ORACLE, MOTION))
    assert out.result.frame.orientation == ("axial" if axis == "auto" else axis)
    assert out.registered_volume_node.GetImageData().GetDimensions() == fixed_node.GetImageData().GetDimensions()


@needs_slicer
def test_logic_the_same_message_as_the_command_line(module, tmp_path, capsys, models):
    """One message text for one problem: the Logic's ValueError and the command line's error line."""
    v = phantom_volume(shape=(60, 10, 50), spacing=(1.0, 9.0, 1.0))
    scene = slicer.vtkMRMLScene()
    fixed_node = slicer_nodes.add_volume_node(scene, v.array, v.ijk_to_ras, "thick")
    with pytest.raises(ValueError) as caught:
        module.RigidResNetRegistrationLogic().register(fixed_node, case(scene)[1], iterations=1, refine=False, device="cpu", model=str(models))
    save_volume(tmp_path / "thick.nii.gz", v)
    code, _, err = run_cli(capsys, *cli_args(tmp_path, models, tmp_path / "out", tmp_path / "thick.nii.gz", tmp_path / "thick.nii.gz"))
    line = assert_one_error_line(code, err)
    logic_text = str(caught.value).split(": ", 1)[1]  # after the volume's name
    assert line.split(": ", 2)[2] == logic_text


@needs_slicer
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_logic_integer_volumes_near_their_maximum(module, dtype):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    top = np.iinfo(dtype).max
    for node in (fixed_node, moving_node):
        a = slicer.util.arrayFromVolume(node)
        slicer.util.updateVolumeFromArray(node, np.round(a.astype(np.float64) / a.max() * top * 0.999).astype(dtype))
    before = world_state(fixed_node), world_state(moving_node)
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cpu",
                                                         predictor=ConstantPredictor(ORACLE, MOTION), applyTransform=False)
    reg = slicer.util.arrayFromVolume(out.registered_volume_node)
    assert np.isfinite(reg).all() and reg.min() >= 0 and reg.max() <= top * (1 + 1e-6) and reg.max() > 0.5 * top
    assert out.similarity["ncc_after"] > out.similarity["ncc_before"] > 0
    assert_same_world_state(world_state(fixed_node), before[0])
    assert_same_world_state(world_state(moving_node), before[1])


@needs_slicer
@pytest.mark.parametrize("kind", WEIGHT_FAULTS)
def test_logic_model_card_and_weights_faults(module, tmp_path, models, kind):
    card, expected = _card_variant(kind, models, tmp_path)
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    n0 = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError) as caught:
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cpu", model=str(card))
    assert all(text in str(caught.value) for text in expected), str(caught.value)
    assert scene.GetNumberOfNodes() == n0


@needs_slicer
def test_logic_never_executes_code_in_a_weights_file(module, tmp_path):
    card, marker = _malicious_card(tmp_path)
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    with pytest.raises(RuntimeError, match="weights file evil.pt cannot be loaded"):
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cpu", model=str(card))
    assert not marker.exists()


@needs_slicer
def test_logic_cuda_requested_but_unavailable(module, models, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    n0 = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="CUDA was requested but is not available"):
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cuda", model=str(models))
    assert scene.GetNumberOfNodes() == n0


@needs_slicer
@pytest.mark.parametrize("outcome", ["success", "failure", "cancel"])
def test_logic_inputs_and_their_parent_transforms_are_unchanged(module, outcome):
    """Voxels, IJKToRAS, parent transform nodes and their matrices of both inputs, after a
    successful, a failing and a cancelled run (the transform is not applied)."""
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "oblique", "LPS anisotropic")
    outer = linear_transform(scene, geo.rigid_matrix_3d((0, 0, 3), (1, 2, 0), np.zeros(3)), "outer")
    inner = linear_transform(scene, geo.rigid_matrix_3d((2, 0, 0), (0, -1, 1), np.zeros(3)), "inner")
    inner.SetAndObserveTransformNodeID(outer.GetID())
    moving_node.SetAndObserveTransformNodeID(inner.GetID())
    fixed_node.SetAndObserveTransformNodeID(linear_transform(scene, geo.rigid_matrix_3d((0, 2, 0)), "fixed pose").GetID())
    before = world_state(fixed_node), world_state(moving_node)
    n0 = scene.GetNumberOfNodes()
    logic = module.RigidResNetRegistrationLogic()
    kwargs = dict(iterations=1, refine=False, device="cpu", predictor=ConstantPredictor(ORACLE, MOTION), applyTransform=False)
    if outcome == "success":
        logic.register(fixed_node, moving_node, **kwargs)
        assert scene.GetNumberOfNodes() > n0
    elif outcome == "failure":
        with pytest.raises(ValueError, match="batch size"):
            logic.register(fixed_node, moving_node, batchSize=-3, **kwargs)
    else:
        calls = []
        with pytest.raises(RuntimeError, match="cancelled"):
            logic.register(fixed_node, moving_node, progress=lambda f, m: calls.append(f), cancel=lambda: len(calls) > 1, **kwargs)
    if outcome != "success":
        assert scene.GetNumberOfNodes() == n0
    assert_same_world_state(world_state(fixed_node), before[0])
    assert_same_world_state(world_state(moving_node), before[1])


# --------------------------------------------------------------------------- out of memory


class _SmallDevice:
    """A predictor whose device 'runs out of memory' on batches larger than ``limit`` slices."""

    def __init__(self, limit: int, params=(1.0, 0.5, -0.5)) -> None:
        self.card, self.limit, self.sizes = CARD, limit, []
        self.params = torch.tensor(params, dtype=torch.float32)

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor:
        self.sizes.append(pairs.shape[0])
        if pairs.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.params.repeat(pairs.shape[0], 1)


def test_out_of_memory_retries_with_smaller_batches_then_says_what_to_do():
    import RigidResNetRegistrationLib.engine as engine

    if "_is_out_of_memory" not in vars(engine):
        pytest.skip("the engine has no out-of-memory handling yet")
    fixed = phantom_volume(shape=(44, 50, 30), codes="LPS")
    moving = moved_copy(fixed, np.eye(4))
    messages: list[str] = []
    small = _SmallDevice(limit=3)
    opts = RegistrationOptions(device="cpu", iterations=1, refine=False, batch_size=16, max_slices=0, symmetric=False)
    result = register_volumes(fixed, moving, small, opts, progress=lambda f, m: messages.append(m))
    assert result.used.sum() > 16  # more slices than one batch: the halving is exercised
    assert small.sizes[0] == 16 and small.sizes[-1] <= small.limit
    assert any("out of memory" in m and "retrying" in m for m in messages)
    assert np.allclose(result.params, [1.0, 0.5, -0.5])
    # symmetric prediction (the default): a batch holds batch_size // 2 pairs and their swapped
    # copies, so the network's batches never exceed batch_size; halving works the same way
    small = _SmallDevice(limit=3)
    register_volumes(fixed, moving, small, replace(opts, symmetric=True))
    assert small.sizes[0] == 16 and max(small.sizes[1:]) <= 8 and small.sizes[-1] == 2
    for symmetric in (False, True):
        with pytest.raises(RuntimeError, match="out of memory .* even with one slice pair per batch") as caught:
            register_volumes(fixed, moving, _SmallDevice(limit=0), replace(opts, symmetric=symmetric))
        assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- huge volumes


MEMORY_PROBE = textwrap.dedent('''
    import json, sys, threading, time
    import numpy as np, torch
    sys.path[:0] = sys.argv[2:]
    from conftest import ConstantPredictor
    from RigidResNetRegistrationLib.engine import RegistrationCancelled, RegistrationOptions, register_volumes
    from RigidResNetRegistrationLib.model import ModelCard
    from RigidResNetRegistrationLib.preprocess import Volume

    mode = sys.argv[1]
    torch.set_num_threads(2)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    # a 400 x 400 x 300 int16 head (1 mm): built slice by slice, never as a float array
    shape = (400, 400, 300)
    a = np.zeros(shape, np.int16)
    x = (np.arange(shape[0], dtype=np.float32) - 199.5)[:, None]
    y = (np.arange(shape[1], dtype=np.float32) - 199.5)[None, :]
    for k in range(shape[2]):
        z = k - 149.5
        inside = (x / 150) ** 2 + (y / 180) ** 2 + (z / 140) ** 2 < 1
        a[:, :, k] = np.where(inside, 1000 + 300 * np.sin(x / 9) * np.cos(y / 7 + z / 11), 0).astype(np.int16)
    affine = np.eye(4)
    affine[:3, 3] = -(np.array(shape) - 1) / 2.0
    moved = affine.copy()
    moved[:3, 3] += [1.0, -2.0, 0.5]
    fixed, moving = Volume(a, affine, "fixed"), Volume(a, moved, "moving")  # one array, two headers
    card = ModelCard.from_dict({"name": "stand-in", "transform": "rigid", "input": {"size": [256, 256], "spacing_mm": 1.0}})
    opts = RegistrationOptions(device="cpu", iterations=1, refine=False, mode=mode, batch_size=32, compute_registered=False,
                               compute_difference=False)
    small = Volume(np.ascontiguousarray(a[::4, ::4, ::4]), affine @ np.diag([4.0, 4.0, 4.0, 1.0]), "small")
    register_volumes(small, small, ConstantPredictor(card, [1.0, 0.5, 0.0]), opts)  # warm-up: libraries, thread pools

    base = status("VmRSS")
    try:  # reset the kernel's peak-RSS mark to now (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False
    peak, stop = [base], [False]

    def poll():  # fallback when the peak mark cannot be reset
        while not stop[0]:
            peak[0] = max(peak[0], status("VmRSS"))
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    seen = []
    # slices mode: stop after the first network batch, once every slice stack was prepared
    cancel = (lambda: len(seen) > 2) if mode == "slices" else None
    t0 = time.perf_counter()
    used = None
    try:
        result = register_volumes(fixed, moving, ConstantPredictor(card, [1.0, 0.5, 0.0]), opts,
                                  progress=lambda f, m: seen.append(f), cancel=cancel)
        used = int(result.used.sum())
    except RegistrationCancelled:
        pass
    seconds = time.perf_counter() - t0
    stop[0] = True
    thread.join()
    top = status("VmHWM") if exact else peak[0]
    print(json.dumps({"growth": top - base, "voxels": int(a.size), "slices": shape[2], "grid": 256 * 256,
                      "used": used, "seconds": seconds, "exact": exact}))
''')


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
@pytest.mark.parametrize("mode", ["volume", "slices"])
def test_huge_volume_memory_is_bounded_by_batching_not_by_volume_size(mode):
    """Peak memory while registering a 400 x 400 x 300 int16 volume (stand-in model: no network)
    may grow by the float32 copies of both volumes plus 256 MiB of working memory for batches;
    the float64 network-grid point cloud of all slices (256 x 256 grid, 300 slices: 450 MiB)
    must never be materialised. Runs in its own process so the peak is this run's alone (~20 s)."""
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode, str(Path(__file__).parent)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    mib = 2**20
    float_copies = 2 * 4 * m["voxels"]  # float32 fixed + moving: what the engine works on
    bound = float_copies + 256 * mib
    point_cloud = m["slices"] * m["grid"] * 3 * 8  # float64 RAS points of every slice's network grid
    assert float_copies + point_cloud > bound  # the bound catches a full point cloud
    print(f"{mode}: peak growth {m['growth'] / mib:.0f} MiB (bound {bound / mib:.0f} MiB, full point cloud "
          f"{point_cloud / mib:.0f} MiB), {m['seconds']:.1f} s")
    assert m["growth"] < bound, f"peak memory grew by {m['growth'] / mib:.0f} MiB > {bound / mib:.0f} MiB"


# --------------------------------------------------------------------------- trainer front door


def _train_main(capsys, *args: str) -> tuple[int, str]:
    from rrr_training.train import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _evaluate_main(capsys, *args: str) -> tuple[int, str]:
    from rrr_training.evaluate import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def subject_folder(tmp_path_factory):
    """One good subject (T1 and T2) and nothing else."""
    root = tmp_path_factory.mktemp("subjects")
    (root / "case0").mkdir()
    v = phantom_volume(shape=(36, 40, 14), spacing=(2.0, 2.0, 4.0))
    save_volume(root / "case0" / "case0_t1.nii.gz", v)
    save_volume(root / "case0" / "case0_t2.nii.gz", Volume(v.array.max() - v.array, v.ijk_to_ras))
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--holdout", "case0", "--out", str(out), "--size", "32", "--spacing-mm", "2.5",
            "--steps", "2", "--batch-size", "2", "--val-every", "1", "--val-pairs", "2", "--device", "cpu", *extra]


def test_trainer_missing_data_folder(tmp_path, capsys):
    code, err = _train_main(capsys, *_train_args(tmp_path / "nowhere", tmp_path / "run"))
    assert_one_error_line(code, err, "data folder not found", "nowhere")
    assert not (tmp_path / "run").exists()


def test_trainer_folder_without_subjects(tmp_path, capsys):
    (tmp_path / "data" / "notes").mkdir(parents=True)
    (tmp_path / "data" / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "data" / "notes" / "mask.nii.gz").write_bytes(b"unknown contrast: ignored")
    code, err = _train_main(capsys, *_train_args(tmp_path / "data", tmp_path / "run"))
    assert_one_error_line(code, err, "no subjects found under", "named by contrast")


def test_trainer_corrupt_image_inside(tmp_path, subject_folder, capsys):
    data = tmp_path / "data"
    shutil.copytree(subject_folder, data)
    bad = data / "case1" / "case1_t1.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes((data / "case0" / "case0_t1.nii.gz").read_bytes()[:300])
    code, err = _train_main(capsys, *_train_args(data, tmp_path / "run"))
    assert_one_error_line(code, err, str(bad), "not a readable NIfTI")


@pytest.mark.parametrize("option,value,text", [
    ("--steps", "-5", "--steps must be an integer of at least 1"),
    ("--batch-size", "0", "--batch-size must be an integer of at least 2"),
    ("--size", "8", "--size must be an integer of at least 32"),
    ("--lr", "nan", "--lr must be a number"),
    ("--spacing-mm", "0", "--spacing-mm must be a number in [0.1, 10]"),
    ("--transform", "elastic", "--transform must be rigid or affine"),
])
def test_trainer_bad_numbers(tmp_path, subject_folder, capsys, option, value, text):
    code, err = _train_main(capsys, *_train_args(subject_folder, tmp_path / "run", option, value))
    assert_one_error_line(code, err, text)
    assert not (tmp_path / "run").exists()


def test_trainer_cuda_requested_without_cuda(tmp_path, subject_folder, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _train_main(capsys, *_train_args(subject_folder, tmp_path / "run"), "--device", "cuda")
    assert_one_error_line(code, err, "CUDA was requested but is not available")


def test_trainer_output_folder_not_writable(tmp_path, subject_folder, capsys):
    folder = unwritable_folder(tmp_path)
    code, err = _train_main(capsys, *_train_args(subject_folder, folder / "run"))
    assert_one_error_line(code, err, "output folder is not writable", str(folder / "run"))
    (tmp_path / "file").write_text("")
    code, err = _train_main(capsys, *_train_args(subject_folder, tmp_path / "file"))
    assert_one_error_line(code, err, "exists and is not a folder")


def test_trainer_export_of_a_missing_checkpoint(tmp_path, capsys):
    code, err = _train_main(capsys, "export", str(tmp_path / "best.pt"), "--models-dir", str(tmp_path / "models"))
    assert_one_error_line(code, err, "No such file or directory", "best.pt")


def test_trainer_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    from rrr_training.train import TrainError, main

    monkeypatch.setenv("RIGID_RESNET_DEBUG", "1")
    with pytest.raises(TrainError, match="data folder not found"):
        main(_train_args(tmp_path / "nowhere", tmp_path / "run"))


def test_evaluate_missing_folder_and_no_subjects(tmp_path, capsys):
    code, err = _evaluate_main(capsys, "--data", str(tmp_path / "nowhere"), "--pairs", "4")
    assert_one_error_line(code, err, "data folder not found")
    (tmp_path / "empty").mkdir()
    code, err = _evaluate_main(capsys, "--data", str(tmp_path / "empty"), "--pairs", "4")
    assert_one_error_line(code, err, "no subjects with brain signal found under")
    code, err = _evaluate_main(capsys, "--data", str(tmp_path / "empty"), "--pairs", "0")
    assert_one_error_line(code, err, "--pairs must be at least 1")


def test_trainer_processes_print_no_traceback(tmp_path):
    """The installed console scripts' modules, in real processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "RigidResNetRegistration"), str(ROOT / "training")])}
    env.pop("RIGID_RESNET_DEBUG", None)
    for module_name, args in (("rrr_training.train", _train_args(tmp_path / "nowhere", tmp_path / "run")),
                              ("rrr_training.evaluate", ["--data", str(tmp_path / "nowhere")])):
        r = subprocess.run([sys.executable, "-m", module_name, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert_one_error_line(r.returncode, r.stderr, "data folder not found")
