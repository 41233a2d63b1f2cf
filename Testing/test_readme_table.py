"""The README's bad-input table (section "Bad input and safety") is the behaviour, row by row.

The table is read from README.md. Each row's first column names a scenario below; every backticked
text in its second column is the error of one case of that scenario, in order (a row without one
must run without error). Adding, removing or rewording a row without its scenario fails here, and
so does a scenario whose error no longer says what the table says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, ConstantPredictor, moved_copy, phantom_volume, write_card
from test_bad_input import (  # noqa: F401  (fixtures)
    HAVE_SLICER,
    _aniso_files,
    _bad_image,
    _card_variant,
    _fail,
    _malicious_card,
    _SmallDevice,
    _train_args,
    _train_main,
    cli_args,
    data,
    models,
    run_cli,
    save,
    save_volume,
    subject_folder,
    unwritable_folder,
)
from test_safety import _png, _slice_rows

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib import io as rio
from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes

if HAVE_SLICER:
    import slicer
    import slicer.util
    from test_slicer_logic import MOTION, ORACLE, case, linear_transform, module  # noqa: F401



def read_table(readme: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    """(input, what happens) of every row of the first table under the "Bad input and safety" heading."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"#+ Bad input and safety\s*$", line))
    first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[first + 2:]:  # below the header and its --- line
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 2, line
        rows.append((cells[0], cells[1]))
    return rows


ROWS = read_table()


class Case:
    """What a scenario needs: pytest's fixtures and a one-line-error runner."""

    def __init__(self, request, tmp_path, capsys, monkeypatch):
        self.request, self.tmp, self.capsys, self.monkeypatch = request, tmp_path, capsys, monkeypatch
        self.data = request.getfixturevalue("data")
        self.models = request.getfixturevalue("models")
        self.n = 0

    def out(self) -> Path:
        self.n += 1
        return self.tmp / f"out{self.n}"

    def error(self, *argv: str, code: int = 2) -> str:
        """The command line's one error line for ``argv``."""
        exit_code, _, err = run_cli(self.capsys, *argv)
        lines = err.strip().splitlines()
        assert exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (exit_code, err)
        return lines[0]

    def bad(self, fixed: Path | None = None, moving: Path | None = None, *extra: str) -> str:
        return self.error(*cli_args(self.data, self.models, self.out(), fixed, moving, *extra))

    def ok(self, fixed: Path | None = None, moving: Path | None = None, *extra: str, out: Path | None = None) -> Path:
        out = out or self.out()
        code, _, err = run_cli(self.capsys, *cli_args(self.data, self.models, out, fixed, moving, *extra))
        assert code == 0, err
        return out

    def logic_error(self, scene, fixed_node, moving_node, **kw) -> str:
        logic = self.request.getfixturevalue("module").RigidResNetRegistrationLogic()
        with pytest.raises(ValueError) as caught:
            logic.register(fixed_node, moving_node, iterations=1, refine=False, device="cpu",
                           predictor=ConstantPredictor(ORACLE, MOTION), **kw)
        assert "\n" not in str(caught.value)
        return str(caught.value)


def _needs_slicer():
    if not HAVE_SLICER:
        pytest.skip("slicer-core (MRML for Python) is not installed")


# --------------------------------------------------------------------------- one scenario a row


def missing_unreadable_folder(c: Case) -> list[str]:
    locked = c.tmp / "locked.nii.gz"
    shutil.copy(c.data / "moving.nii.gz", locked)
    locked.chmod(0)
    real_access = os.access  # root reads anything: make the permission check see what a user would
    c.monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked and mode & os.R_OK
                          else real_access(p, mode, *a, **k))
    return [c.bad(None, c.tmp / "nope.nii.gz"), c.bad(None, locked), c.bad(None, c.data)]


def not_an_image(c: Case) -> list[str]:
    (c.tmp / "text.nii.gz").write_text("this is not a NIfTI file")
    (c.tmp / "notes.txt").write_text("hello")
    truncated, _ = _bad_image("truncated", c.tmp, c.data)
    return [c.bad(None, c.tmp / "text.nii.gz"), c.bad(None, truncated), c.bad(None, c.tmp / "notes.txt")]


def four_d_file(c: Case) -> list[str]:
    return [c.bad(None, _bad_image("vector 5D", c.tmp, c.data)[0])]


def vector_and_label_nodes(c: Case) -> list[str]:
    _needs_slicer()
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vector, np.ones((4, 5, 6, 3), np.float32))
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    return [c.logic_error(scene, fixed_node, vector), c.logic_error(scene, label, moving_node)]


def colour_images(c: Case) -> list[str]:
    rows = _slice_rows()
    fixed = _png(c.tmp / "f.png", rows)
    return [c.bad(fixed, _png(c.tmp / "rgb.png", rows, "RGB colour")), c.bad(fixed, _png(c.tmp / "rgba.png", rows, "RGBA transparent"))]


def grey_saved_as_colour(c: Case) -> list[str]:
    rows = _slice_rows()
    fixed = _png(c.tmp / "f.png", rows)
    for mode in ("RGB grey", "P grey"):
        out = c.ok(fixed, _png(c.tmp / f"{mode}.png", rows, mode))
        assert json.loads((out / "report.json").read_text())["similarity"]["ncc_before"] > 0.99  # the same grey image
    return []


def empty_or_constant(c: Case) -> list[str]:
    return [c.bad(None, _bad_image(kind, c.tmp, c.data)[0]) for kind in ("empty", "all zero")]


def nan_or_inf(c: Case) -> list[str]:
    return [c.bad(None, _bad_image("infinite", c.tmp, c.data)[0])]


def three_d_against_two_d(c: Case) -> list[str]:
    png = _png(c.tmp / "slice.png", _slice_rows())
    return [c.bad(None, png), c.bad(png, None)]


def two_d_sliced_across(c: Case) -> list[str]:
    png = _png(c.tmp / "slice.png", _slice_rows())
    return [c.bad(png, png, "--axis", "coronal")]


def no_overlap(c: Case) -> list[str]:
    _needs_slicer()
    img = nib.load(c.data / "moving.nii.gz")
    affine = img.affine.copy()
    affine[:3, 3] += 9000
    far = save(c.tmp / "far.nii.gz", np.asanyarray(img.dataobj), affine)
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    moving_node.SetAndObserveTransformNodeID(linear_transform(scene, geo.rigid_matrix_3d(translation_mm=(0, 0, 4000.0))).GetID())
    return [c.bad(None, far, "--init", "header"), c.logic_error(scene, fixed_node, moving_node, init="header")]


def field_of_view(c: Case) -> list[str]:
    return [c.bad(_bad_image("too small", c.tmp, c.data)[0], None)]


def in_plane_resolution(c: Case) -> list[str]:
    fixed = _aniso_files(c.tmp, (1.0, 9.0, 1.0), (60, 10, 50))
    return [c.bad(fixed, fixed)]


def thick_slices(c: Case) -> list[str]:
    fixed = _aniso_files(c.tmp, (2.0, 2.0, 8.0), (44, 50, 8))
    moving = _aniso_files(c.tmp, (2.0, 2.0, 2.0), (44, 50, 30))
    c.ok(fixed, moving)
    return []


def integer_voxels(c: Case) -> list[str]:
    img = nib.load(c.data / "moving.nii.gz")
    a = img.get_fdata()
    top = float(np.iinfo(np.uint16).max)
    moving = save(c.tmp / "u16.nii.gz", np.round(a / a.max() * top).astype(np.uint16), img.affine, dtype=np.uint16)
    registered = nib.load(c.ok(None, moving) / "registered.nii.gz").get_fdata()
    assert 0 <= registered.min() and 0.5 * top < registered.max() <= top * (1 + 1e-6)
    return []


def output_folder_missing(c: Case) -> list[str]:
    out = c.ok(out=c.tmp / "new" / "deeper" / "out")
    assert (out / "transform.tfm").is_file()
    return []


def output_path_file_or_not_writable(c: Case) -> list[str]:
    (c.tmp / "taken").write_text("mine")
    folder = unwritable_folder(c.tmp)
    return [c.error(*cli_args(c.data, c.models, c.tmp / "taken")), c.error(*cli_args(c.data, c.models, folder))]


def input_an_output_would_replace(c: Case) -> list[str]:
    out = c.tmp / "o"
    out.mkdir()
    shutil.copy(c.data / "moving.nii.gz", out / "registered.nii.gz")
    return [c.error(*cli_args(c.data, c.models, out, None, out / "registered.nii.gz"))]


def output_name_taken_by_a_folder(c: Case) -> list[str]:
    out = c.tmp / "o"
    (out / "transform.tfm").mkdir(parents=True)
    return [c.error(*cli_args(c.data, c.models, out))]


def failure_while_writing(c: Case) -> list[str]:
    c.monkeypatch.setattr(rio, "write_csv", _fail(OSError(28, "No space left on device")))
    disk = c.bad()
    c.monkeypatch.setattr(rio, "write_csv", _fail(KeyboardInterrupt()))
    return [disk, c.error(*cli_args(c.data, c.models, c.out()), code=130)]


def model_card_missing_or_not_json(c: Case) -> list[str]:
    (c.tmp / "broken.json").write_text("{not json")
    return [c.error(*cli_args(c.data, c.tmp / name, c.out())) for name in ("missing.json", "broken.json")]


def weights_faults(c: Case) -> list[str]:
    return [c.error(*cli_args(c.data, _card_variant(kind, c.models, c.tmp)[0], c.out()))
            for kind in ("missing weights", "tampered weights", "truncated weights", "wrong architecture")]


def weights_with_code(c: Case) -> list[str]:
    card, marker = _malicious_card(c.tmp)
    error = c.error(*cli_args(c.data, card, c.out()))
    assert not marker.exists()
    return [error]


def weights_outside(c: Case) -> list[str]:
    return [c.error(*cli_args(c.data, _card_variant(kind, c.models, c.tmp)[0], c.out()))
            for kind in ("relative escape", "absolute path", "symlink out")]


def cuda_unavailable(c: Case) -> list[str]:
    c.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return [c.bad(None, None, "--device", "cuda")]


def out_of_memory(c: Case) -> list[str]:
    fixed = phantom_volume(shape=(44, 50, 30), codes="LPS")
    moving = moved_copy(fixed, np.eye(4))
    opts = RegistrationOptions(device="cpu", iterations=1, refine=False, batch_size=16, max_slices=0, symmetric=False)
    small = _SmallDevice(limit=3)
    register_volumes(fixed, moving, small, opts)
    assert small.sizes[0] == 16 and small.sizes[-1] <= 3  # halved and retried
    with pytest.raises(RuntimeError) as caught:
        register_volumes(fixed, moving, _SmallDevice(limit=0), opts)
    return [str(caught.value)]


def bad_numbers(c: Case) -> list[str]:
    folder = c.request.getfixturevalue("subject_folder")
    cli = [c.bad(None, None, option, value) for option, value in (("--batch-size", "0"), ("--iterations", "0"))]
    trainer = []
    for option, value in (("--steps", "-5"), ("--lr", "nan")):
        code, err = _train_main(c.capsys, *_train_args(folder, c.tmp / "run", option, value))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        trainer.append(err.strip())
    return cli + trainer


def contradicting_options(c: Case) -> list[str]:
    cases = [["--mode", "slices", "--no-refine"], ["--refine-slices"], ["--metric", "mi"],
             ["--mode", "slices", "--symmetric-stride", "2", "--no-symmetric"], ["--symmetric-stride", "2"], ["--tolerance", "0.1"],
             ["--demo"], ["--batch", "pairs.csv"]]
    errors = [c.bad(None, None, *extra) for extra in cases]  # cli_args has --no-refine (volume mode) and --iterations 1
    affine = write_card(c.tmp, transform="affine", name="affine")
    return errors + [c.error("--batch", str(c.tmp / "pairs.csv"), "--profile", "-o", str(c.out())),
                     c.error(str(c.data / "fixed.nii.gz"), str(c.data / "moving.nii.gz"), "-o", str(c.out()), "--weights", str(affine),
                             "--metric", "ncc")]


def _batch(c: Case, *lines: str, code: int = 2) -> str:
    """The one error line of ``--batch`` on a pairs file of ``lines`` (the fastest options, --quiet)."""
    pairs = c.tmp / "pairs.csv"
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return c.error("--batch", str(pairs), *cli_args(c.data, c.models, c.out())[2:], code=code)


def pairs_file(c: Case) -> list[str]:
    f, m = c.data / "fixed.nii.gz", c.data / "moving.nii.gz"
    return [_batch(c, "fixed,moving_image", f"{f},{m}"), _batch(c, "fixed,moving", f"{f},{m}", f"{f},{m}"),
            _batch(c, "fixed,moving,name", f"{f},{m},a/b"), _batch(c, "fixed,moving,name,mode", f"{f},{m},x,slices")]


def failed_pair_of_a_cohort(c: Case) -> list[str]:
    f, m = c.data / "fixed.nii.gz", c.data / "moving.nii.gz"
    error = _batch(c, "fixed,moving,name", f"{f},{m},good", f"{f},{c.tmp / 'nope.nii.gz'},bad", code=1)
    summary = (c.tmp / f"out{c.n}" / "summary.csv").read_text()
    rows = {line.split(",")[0]: line.split(",")[3] for line in summary.splitlines()[1:]}
    assert rows == {"good": "ok", "bad": "failed"} and "file not found" in summary
    return [error]


def trainer_data(c: Case) -> list[str]:
    folder = c.request.getfixturevalue("subject_folder")
    (c.tmp / "empty" / "notes").mkdir(parents=True)
    corrupt = c.tmp / "corrupt"
    shutil.copytree(folder, corrupt)
    (corrupt / "case1").mkdir()
    (corrupt / "case1" / "case1_t1.nii.gz").write_bytes((corrupt / "case0" / "case0_t1.nii.gz").read_bytes()[:300])
    errors = []
    for data in (c.tmp / "nowhere", c.tmp / "empty", corrupt):
        code, err = _train_main(c.capsys, *_train_args(data, c.tmp / "run"))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        errors.append(err.strip())
    return errors


SCENARIOS = {
    "missing file, unreadable file (no permission), folder without a DICOM series (a folder is read as one DICOM series)":
        missing_unreadable_folder,
    "not an image: text renamed `.nii.gz`, truncated `.nii.gz`, unknown suffix": not_an_image,
    "4D or vector volume file": four_d_file,
    "vector (multi-component) volume node, label map node (Slicer)": vector_and_label_nodes,
    "colour 2D image: RGB whose channels differ, transparent pixels": colour_images,
    "grey 2D image saved as RGB or as a palette PNG": grey_saved_as_colour,
    "empty (a zero-length axis) or constant volume (all zero included)": empty_or_constant,
    "NaN or +-inf voxels": nan_or_inf,
    "a 3D volume against a 2D image, either way round": three_d_against_two_d,
    "a 2D image sliced across its plane (`--axis coronal` for a PNG)": two_d_sliced_across,
    "with `--init header` (Logic `init=\"header\"`): fixed and moving do not overlap in space (origins; parent transforms of "
    "nodes). The default `--init auto` aligns such pairs by their foregrounds": no_overlap,
    "fixed field of view smaller than a quarter of the network grid (or 16 grid pixels)": field_of_view,
    "coarse or anisotropic voxels *in the slice plane* (rule below)": in_plane_resolution,
    "thick slices *along* the slice axis": thick_slices,
    "integer voxels near their maximum (uint16, uint32, int64), bool": integer_voxels,
    "output folder missing": output_folder_missing,
    "output path is a file; output folder not writable": output_path_file_or_not_writable,
    "an input (FIXED, MOVING, the model card, its weights) that an output would replace: in OUTDIR under an output's name, "
    "or a link to such a file": input_an_output_would_replace,
    "an output's name in OUTDIR taken by a folder": output_name_taken_by_a_folder,
    "a failure while writing outputs; Ctrl-C": failure_while_writing,
    "model card missing or not JSON": model_card_missing_or_not_json,
    "weights file missing, changed, truncated or of another architecture": weights_faults,
    "weights file holding pickled code": weights_with_code,
    "model card naming weights outside its folder (`../../x.pt`, an absolute path, a symlink out)": weights_outside,
    "CUDA requested but unavailable": cuda_unavailable,
    "CUDA out of memory": out_of_memory,
    "bad numbers (`--batch-size 0`, `--iterations 0`, trainer `--steps -5`, `--lr nan`)": bad_numbers,
    "options that contradict each other (`--mode slices --no-refine`, `--refine-slices` without `--mode slices`, `--metric` when "
    "nothing is refined, `--symmetric-stride` with `--no-symmetric` or in volume mode, `--tolerance` with `--iterations 1`, "
    "`--demo` with FIXED MOVING, `--batch` with FIXED MOVING, `--profile` with `--batch`, `--refine-slices` or `--metric` with an affine model)":
        contradicting_options,
    "pairs file of `--batch`: an unknown column, a name used twice, a name that cannot be a folder, a row whose option "
    "contradicts the command line's": pairs_file,
    "a pair of `--batch` that fails while the cohort runs (an image missing, unreadable or constant)": failed_pair_of_a_cohort,
    "trainer: data folder missing, no recognisable subjects, a corrupt image inside": trainer_data,
}


def test_every_row_has_a_scenario_and_every_scenario_a_row():
    assert [row for row, _ in ROWS] == list(SCENARIOS)


@pytest.mark.parametrize("row,behaviour", ROWS, ids=[row[:40] for row, _ in ROWS])
def test_the_row_is_what_happens(row, behaviour, request, tmp_path, capsys, monkeypatch):
    if row not in SCENARIOS:
        pytest.fail(f"no scenario for the README row {row!r}")
    expected = re.findall(r"`([^`]+)`", behaviour)
    errors = SCENARIOS[row](Case(request, tmp_path, capsys, monkeypatch))
    assert len(errors) == len(expected), (errors, expected)
    for text, error in zip(expected, errors):
        assert text in error, (text, error)
