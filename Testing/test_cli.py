"""The command line: outputs, the demo, 2D images, and one clear line for bad input."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, add_fine_stage, phantom_volume, write_phantom_pair
from PIL import Image

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.cli import input_files

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "RigidResNetRegistration"), str(ROOT / "training")])}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the command line in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "RigidResNetRegistrationLib.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_phantom_pair(tmp_path_factory.mktemp("pair"))


def test_demo_runs_end_to_end_and_reports_error_against_known_motion(tmp_path):
    out = tmp_path / "demo"
    r = cli("--demo", "-o", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for name in ("registered.nii.gz", "difference.nii.gz", "transform.tfm", "slices.csv", "report.json", "overview.png",
                 "fixed.nii.gz", "moving.nii.gz"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert "rotation error" in r.stdout and str(out.resolve()) in r.stdout
    assert report["demo"]["rotation_error_deg"] >= 0
    truth = np.array(report["demo"]["true_fixed_to_moving_RAS"])
    rot, trans = geo.rigid_error(np.array(report["fixed_to_moving_RAS"]["matrix"]), truth, np.zeros(3) + np.array(
        geo.volume_centre_ras(nib.load(out / "fixed.nii.gz").affine, nib.load(out / "fixed.nii.gz").shape)))
    assert np.isclose(rot, report["demo"]["rotation_error_deg"], atol=1e-6)
    assert np.isclose(trans, report["demo"]["translation_error_mm"], atol=1e-6)
    # the network alone, beside the final error: measured on report.json's network transform
    net = np.array(report["network_fixed_to_moving_RAS"]["matrix"])
    assert "the network alone" in r.stdout and report["demo"]["network_rotation_error_deg"] >= 0
    net_rot, _ = geo.rigid_error(net, truth, geo.volume_centre_ras(nib.load(out / "fixed.nii.gz").affine,
                                                                   nib.load(out / "fixed.nii.gz").shape))
    assert np.isclose(net_rot, report["demo"]["network_rotation_error_deg"], atol=1e-6)
    if report["model"]["trained"]:
        assert "UNTRAINED" not in r.stdout
        # the embedded sample is a symmetric template: its mirror is almost as similar, and that is no warning
        assert report["quality"]["verdict"] == "ok", report["quality"]
        assert "quality: ok" in r.stdout and "WARNING" not in r.stdout
        assert report["similarity"]["ncc_after"] > report["similarity"]["ncc_before"]
    else:
        assert "UNTRAINED" in r.stdout


def test_a_fine_stage_gives_the_small_estimates_and_is_in_the_report(tmp_path, pair, card_factory):
    """A card with a fine stage: a first estimate within its ``below`` is replaced by the fine
    network's; report.json names both weights files; the fine one counts as an input."""
    fine = card_factory(bias=[0.5, -0.25, 0.125], name="fine")
    card = add_fine_stage(card_factory(bias=[2.0, 1.0, 0.5], name="coarse"), fine, below=2.5)
    out = tmp_path / "o"
    r = cli(str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "-o", str(out), "--weights", str(card), "--iterations", "1",
            "--device", "cpu", "--mode", "slices", "--no-symmetric", "--no-overview")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["fine_stage"] == {"weights_sha256": json.loads(fine.read_text())["weights"]["sha256"], "below": 2.5}
    used = [r for r in csv.DictReader(open(out / "slices.csv")) if r["used"] == "True"]
    twice = geo.compose_params_2d(np.array([0.5, -0.25, 0.125]), np.array([0.5, -0.25, 0.125]))  # as the test below
    assert used and all(np.allclose([float(r[k]) for k in ("theta_deg", "tx_mm", "ty_mm")], twice, atol=1e-3) for r in used)
    # the fine weights file is one of the run's inputs (no output may take its name)
    args = argparse.Namespace(fixed="f.nii", moving="m.nii", demo=False, initial_transform=None)
    assert ("fine stage weights file", fine.with_suffix(".pt").resolve()) in input_files(args, card)


def test_outputs_and_report_contents(tmp_path, pair, card_factory):
    card = card_factory(bias=[2.0, 1.0, 0.5])
    out = tmp_path / "o"
    r = cli(str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "-o", str(out), "--weights", str(card), "--iterations", "1", "--device", "cpu",
            "--mode", "slices", "--batch-size", "5", "--no-symmetric")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["symmetric"] is False  # one order: the constant network's answer is kept as it is
    for key in ("device", "seconds", "mode", "similarity", "fixed_to_moving_RAS", "moving_to_fixed_RAS", "total_seconds"):
        assert key in report
    assert report["mode"] == "slices" and report["device"] == "cpu"
    assert report["model"]["weights_sha256"] == json.loads(card.read_text())["weights"]["sha256"]
    assert "fine_stage" not in report["model"]
    assert set(report["similarity"]) == {"ncc_before", "ncc_after", "mi_before", "mi_after"}
    rows = list(csv.DictReader(open(out / "slices.csv")))
    fixed_img = nib.load(pair / "fixed.nii.gz")
    assert len(rows) == fixed_img.shape[2]
    used = [r for r in rows if r["used"] == "True"]
    # slices mode: the common motion (a pass over a few slices), then each slice's own pass from
    # there; a network that always answers B gives B o B for every slice
    twice = geo.compose_params_2d(np.array([2.0, 1.0, 0.5]), np.array([2.0, 1.0, 0.5]))
    assert used and all(np.allclose([float(r[k]) for k in ("theta_deg", "tx_mm", "ty_mm")], twice, atol=1e-4) for r in used)
    reg = nib.load(out / "registered.nii.gz")
    assert reg.shape == fixed_img.shape and np.allclose(reg.affine, fixed_img.affine, atol=1e-5)
    diff = np.asanyarray(nib.load(out / "difference.nii.gz").dataobj)
    assert diff.min() >= 0 and diff.max() <= 1


def test_refine_slices_moves_each_slice_towards_its_truth_and_says_so(tmp_path, pair, card_factory):
    card = card_factory(bias=[2.0, 1.0, 0.5])  # answers B o B for every slice, about 1 deg / 1 mm off the motion
    out = tmp_path / "o"
    r = cli(str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "-o", str(out), "--weights", str(card), "--iterations", "1",
            "--device", "cpu", "--mode", "slices", "--no-symmetric", "--refine-slices", "--metric", "ncc", "--no-overview")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    ref = report["refinement"]
    assert ref["scope"] == "slices" and ref["metric"] == "ncc" and ref["slices_refined"] > 0
    assert ref["similarity_after"] > ref["similarity_before"]
    assert "slices' in-plane transforms (NCC)" in r.stdout
    assert ref["slices_moved_over_1"] > 0 and "moved more than 1 deg / 1 mm from the network's estimate" in r.stdout
    used = [row for row in csv.DictReader(open(out / "slices.csv")) if row["used"] == "True"]
    est = np.array([[float(row[k]) for k in ("theta_deg", "tx_mm", "ty_mm")] for row in used])
    truth = np.broadcast_to([3.0, 2.0, -1.0], est.shape)  # write_phantom_pair's motion
    start = np.broadcast_to(geo.compose_params_2d(np.array([2.0, 1.0, 0.5]), np.array([2.0, 1.0, 0.5])), est.shape)
    rot0, trans0 = geo.params_error_2d(start, truth)
    rot, trans = geo.params_error_2d(est, truth)
    assert np.median(trans) < 0.3 * np.median(trans0) and np.median(rot) < 0.5 * np.median(rot0)


def test_png_slices_are_registered_as_one_slice(tmp_path, card_factory):
    card = card_factory(bias=[3.0, 2.0, -1.0])
    vol = phantom_volume(shape=(60, 70, 1), codes="RAS", spacing=(1.5, 1.5, 1.5))
    img = vol.array[:, :, 0].T[::-1]  # rows top-down = anterior first
    for name in ("f.png", "m.png"):
        Image.fromarray((255 * img / img.max()).astype(np.uint8)).save(tmp_path / name)
    out = tmp_path / "o"
    r = cli(str(tmp_path / "f.png"), str(tmp_path / "m.png"), "-o", str(out), "--weights", str(card), "--iterations", "1", "--no-refine", "--device", "cpu",
            "--no-symmetric")  # a constant network answers the motion in one order only
    assert r.returncode == 0, r.stderr
    assert (out / "registered.png").exists() and (out / "difference.png").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["slices"]["total"] == 1 and report["slices"]["used"] == 1
    assert np.isclose(report["parameters"]["theta_deg"], 3.0, atol=1e-3)


def _write(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("case,expect", [
    ("missing", "file not found"),
    ("not_image", "not a readable NIfTI"),
    ("four_d", "3D scalar volume is needed"),
    ("constant", "constant"),
    ("nan", "NaN"),
    ("no_overlap", "do not overlap"),
    ("bad_suffix", "unsupported file type"),
    ("weights_missing", "model card not found"),
    ("cuda", "CUDA was requested"),
    ("no_output", "output folder"),
    ("bad_stride", "symmetric stride must be"),
    ("refine_slices_in_volume_mode", "--refine-slices refines each slice of --mode slices"),
])
def test_bad_input_gives_one_error_line(tmp_path, pair, case, expect, monkeypatch):
    fixed, moving = str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz")
    extra: list[str] = []
    if case == "missing":
        moving = str(tmp_path / "nope.nii.gz")
    elif case == "not_image":
        (tmp_path / "x.nii.gz").write_bytes(b"this is not a NIfTI file at all")
        moving = str(tmp_path / "x.nii.gz")
    elif case == "four_d":
        moving = str(_write(tmp_path / "4d.nii.gz", np.random.rand(8, 8, 8, 3).astype(np.float32)))
    elif case == "constant":
        moving = str(_write(tmp_path / "c.nii.gz", np.full((20, 20, 20), 7, np.int16)))
    elif case == "nan":
        a = np.random.rand(20, 20, 20).astype(np.float32)
        a[1, 2, 3] = np.nan
        moving = str(_write(tmp_path / "n.nii.gz", a))
    elif case == "no_overlap":
        img = nib.load(moving)
        aff = img.affine.copy()
        aff[:3, 3] += 9000
        moving = str(_write(tmp_path / "far.nii.gz", np.asanyarray(img.dataobj), aff))
        extra = ["--init", "header"]  # the headers as they are (the other starts align the two)
    elif case == "bad_suffix":
        (tmp_path / "x.txt").write_text("hello")
        moving = str(tmp_path / "x.txt")
    elif case == "weights_missing":
        extra = ["--weights", str(tmp_path / "missing.json")]
    elif case == "cuda":
        extra = ["--device", "cuda"]
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    elif case == "bad_stride":
        extra = ["--mode", "slices", "--symmetric-stride", "0"]
    elif case == "refine_slices_in_volume_mode":
        extra = ["--refine-slices"]
    elif case == "no_output":
        (tmp_path / "file").write_text("")
        extra = ["-o", str(tmp_path / "file" / "sub")]
    args = [fixed, moving, *(["-o", str(tmp_path / "out")] if case != "no_output" else []), *extra]
    r = cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout


def test_the_inputs_are_read_in_a_thread_while_torch_is_imported_and_errors_keep_their_order(pair, tmp_path, monkeypatch):
    """``run`` starts reading FIXED and MOVING before importing torch (``io`` needs no torch), in
    another thread; the volumes are those ``read_volume`` gives, a bad fixed file is reported
    before a bad moving one, and CUDA asked for but absent is still reported before either."""
    import threading

    import RigidResNetRegistrationLib.io as rio
    from RigidResNetRegistrationLib import cli as cli_module

    code = ("import sys; from RigidResNetRegistrationLib import cli, io; assert 'torch' not in sys.modules; "
            f"f = cli.read_in_background({str(pair / 'fixed.nii.gz')!r}, {str(pair / 'moving.nii.gz')!r}); "
            "import torch; fixed, moving = f.result(); print(fixed.shape, moving.shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    read_volume = rio.read_volume
    in_main: list[bool] = []

    def spy(*a):
        in_main.append(threading.current_thread() is threading.main_thread())
        return read_volume(*a)

    monkeypatch.setattr(rio, "read_volume", spy)
    fixed, moving = cli_module.read_in_background(str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz")).result()
    assert in_main == [False, False], "the inputs were read in the main thread"
    for got, name in ((fixed, "fixed.nii.gz"), (moving, "moving.nii.gz")):
        want = read_volume(pair / name)
        assert np.array_equal(got.array, want.array) and np.array_equal(got.ijk_to_ras, want.ijk_to_ras)
    assert r.stdout.strip() == f"{fixed.shape} {moving.shape}"
    missing = str(tmp_path / "nope.nii.gz")
    with pytest.raises(Exception, match="fixed image .*file not found"):
        cli_module.read_in_background(missing, missing).result()
    r = cli(missing, missing, "-o", str(tmp_path / "out"))
    assert r.returncode != 0 and r.stderr.startswith("error: fixed image") and "file not found" in r.stderr, r.stderr
    import torch

    if not torch.cuda.is_available():
        r = cli(missing, missing, "-o", str(tmp_path / "out"), "--device", "cuda")
        assert r.returncode != 0 and "CUDA was requested" in r.stderr and "file not found" not in r.stderr, r.stderr


def test_help_lists_the_documented_options():
    r = cli("--help")
    assert r.returncode == 0
    for option in ("--device", "--mode", "--axis", "--weights", "--batch-size", "--no-symmetric", "--symmetric-stride", "--refine-slices", "-o",
                   "--init", "--initial-transform"):
        assert option in r.stdout


def test_the_command_ends_its_process_at_once_after_flushing_with_mains_exit_code(monkeypatch, capsys):
    """``rigid-resnet-register`` (and ``python -m``) is :func:`cli.console_main`: :func:`cli.main`,
    its streams flushed, then ``os._exit`` with its code, skipping Python's 0.4-0.5 s shutdown of
    torch. Every test above that runs the command in a fresh process reads its output and exit
    code through this path."""
    import RigidResNetRegistrationLib.cli as cli_module

    ended: list[int] = []
    monkeypatch.setattr(cli_module, "main", lambda: print("the summary", end="") or 3)
    monkeypatch.setattr(cli_module.os, "_exit", ended.append)
    cli_module.console_main()
    assert ended == [3] and capsys.readouterr().out == "the summary"
    assert 'rigid-resnet-register = "RigidResNetRegistrationLib.cli:console_main"' in (ROOT / "pyproject.toml").read_text()
    assert "console_main()" in (ROOT / "RigidResNetRegistration/RigidResNetRegistrationLib/__main__.py").read_text()
