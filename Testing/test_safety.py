"""Nothing lost or touched (issue 18): an input an output would replace is refused before any work,
outputs get the usual permissions, a failed run leaves OUTDIR as it was (absent if it was absent),
every contradiction between options is one line, 2D against 3D has its own message, and a colour
image is read only when it is grey saved as colour.

Helpers (in-process command line, one-error-line check, the phantom pair and the constant model)
come from ``test_bad_input.py``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ConstantPredictor, phantom_volume, write_card
from PIL import Image
from test_bad_input import HAVE_SLICER, _fail, assert_one_error_line, cli_args, data, leftovers, models, run_cli, save, sha256  # noqa: F401

from RigidResNetRegistrationLib import cli
from RigidResNetRegistrationLib import io as rio
from RigidResNetRegistrationLib.engine import RegistrationOptions
from RigidResNetRegistrationLib.preprocess import InputError

if HAVE_SLICER:
    import slicer
    from test_slicer_logic import MOTION, ORACLE, case, module  # noqa: F401  (module: a fixture)

OUTPUTS = {"registered.nii.gz", "difference.nii.gz", "transform.tfm", "slices.csv", "report.json"}


def snapshot(folder: Path) -> dict[str, str] | None:
    """Everything in ``folder`` (recursively): relative path -> sha256 (files) or "folder"; None
    when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): ("folder" if p.is_dir() else sha256(p)) for p in sorted(folder.rglob("*"))}


def no_reading(monkeypatch) -> None:
    """Make reading an image fail loudly: an error that comes before any work wins over it."""
    def read_volume(*args, **kwargs):
        raise AssertionError("an input was read")

    monkeypatch.setattr(rio, "read_volume", read_volume)


# --------------------------------------------------------------------------- inputs an output would replace


@pytest.mark.parametrize("role,name,how", [
    ("moving", "registered.nii.gz", "same path"),
    ("fixed", "difference.nii.gz", "same path"),
    ("moving", "registered.nii.gz", "symlink to the output"),
    ("fixed", "registered.nii.gz", "hard link"),
    ("moving", "difference.nii.gz", "OUTDIR through a symlink"),
    ("moving", "registered.png", "same path"),
    ("moving", "overview.png", "same path"),
    ("model card", "report.json", "same path"),
])
def test_an_input_an_output_would_replace_is_refused_before_any_work(tmp_path, data, models, capsys, monkeypatch, role, name, how):
    out = tmp_path / "out"
    out.mkdir()
    inputs = {"fixed": data / "fixed.nii.gz", "moving": data / "moving.nii.gz", "model card": models}
    taken = out / name
    shutil.copy(inputs[role], taken)
    if role == "model card":
        shutil.copy(models.with_suffix(".pt"), out / models.with_suffix(".pt").name)  # the card names its weights beside it
    given = taken
    if how == "symlink to the output":
        given = tmp_path / "elsewhere.nii.gz"
        given.symlink_to(taken)
    elif how == "hard link":
        given = tmp_path / "elsewhere.nii.gz"
        os.link(taken, given)
    elif how == "OUTDIR through a symlink":
        (tmp_path / "alias").symlink_to(out)
        given = tmp_path / "alias" / name
    inputs[role] = given
    before = snapshot(out)
    no_reading(monkeypatch)
    extra = ["--no-overview"] if name != "overview.png" else []
    code, _, err = run_cli(capsys, str(inputs["fixed"]), str(inputs["moving"]), "-o", str(out), "--weights", str(inputs["model card"]),
                           "--iterations", "1", "--no-refine", "--device", "cpu", "--quiet", *extra)
    assert_one_error_line(code, err, f"the {role if role == 'model card' else role + ' image'} {given}",
                          f"would be overwritten by the output {name}", "choose another output folder")
    assert snapshot(out) == before


def test_a_previous_result_as_initial_transform_into_the_same_outdir_is_refused(tmp_path, data, models, capsys, monkeypatch):
    """Re-running with the last result's transform.tfm as the start, into the same OUTDIR, would
    replace the start file: refused before any work."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "transform.tfm").write_text(rio.format_tfm(np.eye(4)))
    before = snapshot(out)
    no_reading(monkeypatch)
    code, _, err = run_cli(capsys, *cli_args(data, models, out), "--initial-transform", str(out / "transform.tfm"))
    assert_one_error_line(code, err, "the initial transform", "would be overwritten by the output transform.tfm")
    assert snapshot(out) == before


def test_an_output_name_held_by_a_folder_is_refused_before_any_work(tmp_path, data, models, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "transform.tfm").mkdir(parents=True)
    no_reading(monkeypatch)
    code, _, err = run_cli(capsys, *cli_args(data, models, out))
    assert_one_error_line(code, err, f"{out / 'transform.tfm'} is a folder")
    assert leftovers(out) == ["transform.tfm"]


def test_inputs_inside_outdir_under_other_names_are_fine(tmp_path, data, models, capsys):
    """Only the names the outputs take are refused: OUTDIR may hold the inputs."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("fixed.nii.gz", "moving.nii.gz"):
        shutil.copy(data / name, out / name)
    before = snapshot(out)
    code, _, err = run_cli(capsys, *cli_args(data, models, out, out / "fixed.nii.gz", out / "moving.nii.gz"))
    assert code == 0, err
    after = snapshot(out)
    assert {k: after[k] for k in before} == before and set(after) == set(before) | OUTPUTS


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_outputs_get_the_usual_permissions(tmp_path, data, models, capsys, umask, file_mode, folder_mode):
    out = tmp_path / "new" / "out"
    previous = os.umask(umask)
    try:
        code, _, err = run_cli(capsys, *cli_args(data, models, out, None, None, "--mode", "slices"))
    finally:
        os.umask(previous)
    assert code == 0, err
    assert set(leftovers(out)) == OUTPUTS
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert modes == {name: oct(file_mode) for name in OUTPUTS}
    assert oct(stat.S_IMODE(out.stat().st_mode)) == oct(folder_mode)
    assert oct(stat.S_IMODE(out.parent.stat().st_mode)) == oct(folder_mode)


def test_each_writer_respects_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        rio.write_tfm(np.eye(4), tmp_path / "t.tfm")
        rio.write_json({"a": 1}, tmp_path / "r.json")
        rio.write_csv([{"a": 1}], tmp_path / "s.csv")
        rio.write_volume(phantom_volume(shape=(8, 8, 8)), tmp_path / "v.nii.gz")
        rio.write_image_2d(np.eye(8), tmp_path / "i.png")
    finally:
        os.umask(previous)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()} == {
        name: "0o640" for name in ("t.tfm", "r.json", "s.csv", "v.nii.gz", "i.png")}


# --------------------------------------------------------------------------- a failed run leaves OUTDIR as it was


def _failure(kind: str, tmp: Path, data: Path, monkeypatch) -> tuple[Path, str]:
    """(moving image, text of the error) for a run that fails at a given stage."""
    if kind == "bad moving file":
        (tmp / "junk.nii.gz").write_bytes(b"not an image")
        return tmp / "junk.nii.gz", "not a readable NIfTI"
    if kind == "constant volume":
        return save(tmp / "constant.nii.gz", np.full((20, 20, 20), 7, np.int16)), "constant"
    if kind == "no overlap":
        img = nib.load(data / "moving.nii.gz")
        affine = img.affine.copy()
        affine[:3, 3] += 9000
        return save(tmp / "far.nii.gz", np.asanyarray(img.dataobj), affine), "do not overlap"
    if kind == "writing fails":  # after the model ran: inside the staging folder
        monkeypatch.setattr(rio, "write_csv", _fail(OSError(28, "No space left on device")))
        return data / "moving.nii.gz", "No space left on device"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bad moving file", "constant volume", "no overlap", "writing fails"])
@pytest.mark.parametrize("outdir", ["absent", "absent with its parent", "holding files"])
def test_a_failed_run_leaves_outdir_exactly_as_it_was(tmp_path, data, models, capsys, monkeypatch, kind, outdir):
    moving, text = _failure(kind, tmp_path, data, monkeypatch)
    out = tmp_path / "parent" / "out" if outdir == "absent with its parent" else tmp_path / "out"
    if outdir == "holding files":
        (out / "earlier").mkdir(parents=True)
        (out / "notes.txt").write_text("the user's own file")
        (out / "earlier" / "report.json").write_text("{}")
        shutil.copy(data / "fixed.nii.gz", out / "registered.nii.gz")  # a previous run's output (not an input)
    before = snapshot(out)
    start = ["--init", "header"] if kind == "no overlap" else []  # the default start aligns such pairs
    code, _, err = run_cli(capsys, *cli_args(data, models, out, None, moving), *start)
    assert_one_error_line(code, err, text)
    assert snapshot(out) == before
    assert not (tmp_path / "parent").exists()


def test_staged_outputs_removes_the_folders_it_created_and_only_those(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError):
        with rio.staged_outputs(tmp_path / "a" / "b" / "c") as stage:
            (stage / "x.txt").write_text("x")
            raise RuntimeError("failed")
    assert leftovers(tmp_path) == ["a"]
    with rio.staged_outputs(tmp_path / "a" / "b" / "c") as stage:
        (stage / "x.txt").write_text("x")
    assert leftovers(tmp_path) == ["a", "a/b", "a/b/c", "a/b/c/x.txt"]


# --------------------------------------------------------------------------- contradictions between options

#: A representative setting of every option of build_parser (positionals FIXED MOVING as one).
SETTINGS = {
    "FIXED MOVING": ["f.nii.gz", "m.nii.gz"], "-o": ["-o", "out"], "--device": ["--device", "cpu"],
    "--mode volume": ["--mode", "volume"], "--mode slices": ["--mode", "slices"], "--axis": ["--axis", "coronal"],
    "--weights": ["--weights", "card.json"], "--batch-size": ["--batch-size", "4"], "--iterations 1": ["--iterations", "1"],
    "--iterations 3": ["--iterations", "3"], "--tolerance": ["--tolerance", "0.5"], "--max-slices": ["--max-slices", "4"],
    "--no-refine": ["--no-refine"], "--refine-slices": ["--refine-slices"], "--metric ncc": ["--metric", "ncc"],
    "--metric auto": ["--metric", "auto"], "--precision": ["--precision", "fp32"], "--no-symmetric": ["--no-symmetric"],
    "--symmetric-stride": ["--symmetric-stride", "2"], "--no-overview": ["--no-overview"], "--quiet": ["--quiet"],
    "--demo": ["--demo"], "--output-format": ["--output-format", "nrrd"],
    "--init": ["--init", "moments"], "--initial-transform": ["--initial-transform", "start.tfm"],
    "--batch": ["--batch", "pairs.csv"], "--profile": ["--profile"],
}

#: The contradictions, decided one by one: a set of settings (alone, default mode volume, or as a
#: pair) -> a text of its error. Any combination holding one of them is an error; all others pass.
CONTRADICTIONS = {
    frozenset({"--refine-slices"}): "--refine-slices refines each slice of --mode slices",  # volume mode by default
    frozenset({"--symmetric-stride"}): "--symmetric-stride is for --mode slices",
    frozenset({"--refine-slices", "--mode volume"}): "--refine-slices refines each slice of --mode slices",
    frozenset({"--symmetric-stride", "--mode volume"}): "--symmetric-stride is for --mode slices",
    frozenset({"--no-refine", "--mode slices"}): "--no-refine turns off volume mode's refinement",
    frozenset({"--metric ncc", "--no-refine"}): "--metric is the similarity a refinement maximises, but --no-refine refines nothing",
    frozenset({"--metric auto", "--no-refine"}): "--metric is the similarity a refinement maximises, but --no-refine refines nothing",
    frozenset({"--metric ncc", "--mode slices"}): "but --mode slices without --refine-slices refines nothing",
    frozenset({"--metric auto", "--mode slices"}): "but --mode slices without --refine-slices refines nothing",
    frozenset({"--tolerance", "--iterations 1"}): "--tolerance stops the passes early; --iterations 1 makes a single pass",
    frozenset({"--demo", "FIXED MOVING"}): "--demo registers the embedded sample: give FIXED and MOVING or --demo, not both",
    frozenset({"--batch", "FIXED MOVING"}): "--batch reads the pairs from PAIRS.csv: give FIXED and MOVING or --batch, not both",
    frozenset({"--batch", "--demo"}): "--demo registers the embedded sample: give --demo or --batch, not both",
    frozenset({"--profile", "--batch"}): "--profile prints one run's stages; with --batch each pair's report.json holds them",
}
SAME_OPTION = [{"--mode volume", "--mode slices"}, {"--iterations 1", "--iterations 3"}, {"--metric ncc", "--metric auto"}]


def _combinations():
    names = list(SETTINGS)
    for combo in itertools.chain(((n,) for n in names), itertools.combinations(names, 2)):
        if not any(pair <= set(combo) for pair in SAME_OPTION):
            yield combo
    yield from TRIPLES


#: Triples that lift a pair's contradiction, or show one that only slices mode can.
TRIPLES = {
    ("--mode slices", "--refine-slices", "--metric ncc"): [],
    ("--mode slices", "--refine-slices", "--metric auto"): [],
    ("--mode slices", "--symmetric-stride", "--no-symmetric"): [
        "--symmetric-stride picks the slices predicted in both orders; --no-symmetric predicts all in one order"],
    ("--mode slices", "--refine-slices", "--no-refine"): ["--no-refine turns off volume mode's refinement"],
}


def _expected(combo) -> list[str]:
    if combo in TRIPLES:
        return TRIPLES[combo]
    return [text for settings, text in CONTRADICTIONS.items()
            if settings <= set(combo) and not (len(settings) == 1 and "--mode slices" in combo)]


def test_every_pair_of_options_is_either_a_contradiction_or_accepted():
    """Every option of the parser, alone and with every other one: exactly the contradictions listed
    above are refused, with their message; everything else passes the check."""
    parser = cli.build_parser()
    assert {a.option_strings[0] if a.option_strings else a.dest for a in parser._actions} == {
        "-h", "--version", "fixed", "moving", *(name.split()[0] for name in SETTINGS if name != "FIXED MOVING")}, \
        "an option was added or removed: decide its contradictions here"
    seen = set()
    for combo in _combinations():
        argv = [word for name in combo for word in SETTINGS[name]]
        args = cli.parse_args(parser, argv)
        expected = _expected(combo)
        if not expected:
            cli.check_option_conflicts(args)
            continue
        with pytest.raises(cli.CliError) as caught:
            cli.check_option_conflicts(args)
        assert any(text in str(caught.value) for text in expected), (combo, str(caught.value))
        seen.add(str(caught.value))
    assert len(seen) == 11  # every rule fired, the --metric one in both modes


def test_given_options_are_told_apart_from_defaults():
    parser = cli.build_parser()
    args = cli.parse_args(parser, ["f", "m", "--metric", "auto", "--symmetric-stride", "3"])
    assert args.given == {"fixed", "moving", "metric", "symmetric_stride"}
    assert (args.metric, args.symmetric_stride, args.mode, args.refine) == ("auto", 3, "volume", True)
    assert vars(args).keys() == vars(parser.parse_args(["f", "m"])).keys() | {"given"}


@pytest.mark.parametrize("extra,text", [
    (["--mode", "slices", "--no-refine"], "--no-refine turns off volume mode's refinement"),
    (["--refine-slices"], "--refine-slices refines each slice of --mode slices"),
    (["--metric", "mi"], "--no-refine refines nothing"),
    (["--mode", "slices", "--symmetric-stride", "2", "--no-symmetric"], "--no-symmetric predicts all in one order"),
    (["--symmetric-stride", "1"], "--symmetric-stride is for --mode slices"),
    (["--tolerance", "0"], "--iterations 1 makes a single pass"),
    (["--demo"], "give FIXED and MOVING or --demo, not both"),
])
def test_contradictions_are_one_line_before_any_work(tmp_path, data, models, capsys, monkeypatch, extra, text):
    no_reading(monkeypatch)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *cli_args(data, models, out, None, None, *extra))  # --no-refine (volume mode), --iterations 1
    assert_one_error_line(code, err, text)
    assert not out.exists()


@pytest.mark.parametrize("extra,option", [(["--mode", "slices", "--refine-slices"], "--refine-slices"), (["--metric", "ncc"], "--metric"),
                                          (["--mode", "slices", "--refine-slices", "--metric", "mi"], "--refine-slices")])
def test_refinement_options_with_an_affine_model_are_a_contradiction(tmp_path, data, capsys, monkeypatch, extra, option):
    card = write_card(tmp_path, transform="affine", name="affine")
    no_reading(monkeypatch)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, str(data / "fixed.nii.gz"), str(data / "moving.nii.gz"), "-o", str(out), "--weights", str(card),
                           "--device", "cpu", "--quiet", *extra)
    assert_one_error_line(code, err, f"{option} is for rigid models; the model of --weights is affine (it is not refined)")
    assert not out.exists()


@pytest.mark.parametrize("options,text", [
    (dict(mode="volume", refine=False, metric="ncc"), "metric 'ncc' is the similarity a refinement maximises, but volume mode without refine"),
    (dict(mode="slices", metric="mi"), "but slices mode without refine_slices refines nothing"),
])
def test_registration_options_metric_without_a_refinement(options, text):
    with pytest.raises(InputError, match=text):
        RegistrationOptions(**options).validate()


def test_registration_options_ignore_the_other_modes_setting():
    """What a panel keeps for the mode not chosen (a stale checkbox) is no contradiction."""
    RegistrationOptions(mode="volume", refine_slices=True).validate()
    RegistrationOptions(mode="slices", refine=False).validate()
    RegistrationOptions(mode="slices", refine=False, refine_slices=True, metric="ncc").validate()
    RegistrationOptions(mode="volume", refine_slices=True, metric="mi").validate()
    assert RegistrationOptions(mode="volume", refine_slices=True).refined
    assert not RegistrationOptions(mode="slices", refine=True).refined


@pytest.mark.skipif(not HAVE_SLICER, reason="slicer-core (MRML for Python) is not installed")
def test_the_logic_ignores_the_other_modes_stale_checkbox(module):
    """The panel passes both refinement checkboxes whatever the mode: the one of the mode not chosen
    must neither fail the run nor change it."""
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "RAS")
    kw = dict(iterations=1, registeredVolume=False, differenceVolume=False, sliceTable=False, applyTransform=False)
    logic = module.RigidResNetRegistrationLogic()
    volume = logic.register(fixed_node, moving_node, mode="volume", refine=False, refineSlices=True,
                            predictor=ConstantPredictor(ORACLE, MOTION), **kw)
    assert volume.result.refinement is None
    slices = logic.register(fixed_node, moving_node, mode="slices", refine=False, refineSlices=True,
                            predictor=ConstantPredictor(ORACLE, MOTION), **kw)
    assert slices.result.refinement["scope"] == "slices"


# --------------------------------------------------------------------------- 2D against 3D


def _png(path: Path, rows: np.ndarray, mode: str = "L") -> Path:
    grey = (255 * rows / rows.max()).astype(np.uint8)
    if mode == "L":
        Image.fromarray(grey).save(path)
    elif mode == "RGB grey":
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    elif mode == "RGB colour":
        Image.fromarray(np.stack([grey, grey // 2, grey], axis=-1)).save(path)
    elif mode == "RGBA transparent":
        alpha = np.full_like(grey, 255)
        alpha[:5] = 0
        Image.fromarray(np.stack([grey] * 3 + [alpha], axis=-1)).save(path)
    elif mode == "P grey":
        Image.fromarray(grey).convert("P").save(path)
    return path


def _slice_rows() -> np.ndarray:
    vol = phantom_volume(shape=(60, 70, 1), codes="RAS", spacing=(1.5, 1.5, 1.5))
    return vol.array[:, :, 0].T[::-1]


@pytest.mark.parametrize("fixed_2d", [False, True])
def test_2d_against_3d_has_its_own_message(tmp_path, data, models, capsys, fixed_2d):
    png = _png(tmp_path / "slice.png", _slice_rows())
    volume = data / "fixed.nii.gz"
    fixed, moving = (png, volume) if fixed_2d else (volume, png)
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", fixed, moving))
    dims = ["2D (60 x 70 pixels)", "3D (44 x 50 x 30 voxels)"]
    first, second = dims if fixed_2d else dims[::-1]
    assert_one_error_line(code, err, f"the fixed image {fixed} is {first} but the moving image {moving} is {second}; "
                                     "register two 3D volumes or two 2D images")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_slices_across_a_2d_image_have_their_own_message(tmp_path, data, models, capsys, axis):
    """Not "field of view 60 x 1 mm is too small": the slice axis cuts the image across its plane."""
    f, m = _png(tmp_path / "f.png", _slice_rows()), _png(tmp_path / "m.png", _slice_rows())
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", f, m, "--axis", axis))
    assert_one_error_line(code, err, f"the fixed image {f} is 2D: it is registered in its own (axial) plane, not in {axis} "
                                     "slices across it; choose the axial slice axis")
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", f, m, "--axis", "axial"))
    assert code == 0, err


# --------------------------------------------------------------------------- colour images


@pytest.mark.parametrize("mode,text", [
    ("RGB colour", "a colour image (RGB) whose channels differ; a greyscale image is needed"),
    ("RGBA transparent", "an image with transparent pixels (RGBA); a greyscale image is needed"),
])
def test_a_colour_image_is_an_error_naming_it(tmp_path, data, models, capsys, mode, text):
    rows = _slice_rows()
    fixed, moving = _png(tmp_path / "f.png", rows), _png(tmp_path / "m.png", rows, mode)
    code, _, err = run_cli(capsys, *cli_args(data, models, tmp_path / "out", fixed, moving))
    assert_one_error_line(code, err, f"moving image {moving}: {text}")


@pytest.mark.parametrize("mode", ["RGB grey", "P grey"])
def test_grey_saved_as_colour_is_read_as_grey(tmp_path, mode):
    rows = _slice_rows()
    grey = rio.read_volume(_png(tmp_path / "grey.png", rows))
    colour = rio.read_volume(_png(tmp_path / "colour.png", rows, mode))
    assert colour.array.shape == grey.array.shape == (60, 70, 1)
    assert np.array_equal(colour.array, grey.array) and np.array_equal(colour.ijk_to_ras, grey.ijk_to_ras)
    assert len(np.unique(colour.array)) > 100  # every grey level kept, not a palette of a few


def test_the_command_line_takes_its_choices_and_defaults_from_the_options_module():
    """options.py is the one place for choices and defaults: the parser restates none of them."""
    from RigidResNetRegistrationLib import options

    parser = cli.build_parser()
    actions = {a.dest: a for a in parser._actions}
    for name in cli.CLI_OPTION_FIELDS:
        assert actions[name].default == options.default(name), name
    for name, choices in (("mode", options.MODES), ("axis", options.AXES), ("device", options.DEVICES),
                          ("precision", options.PRECISIONS), ("metric", options.METRICS), ("init", options.INIT_MODES)):
        assert tuple(actions[name].choices) == tuple(choices), name
    assert options.option_conflicts(options.RegistrationOptions(mode="slices"), {"refine"}, {"refine": "refine=False"}) \
        .startswith("refine=False turns off")
    assert options.option_conflicts(options.RegistrationOptions(), {"metric", "iterations"}) is None
