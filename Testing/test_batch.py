"""Many pairs: ``--batch PAIRS.csv -o OUTROOT``, ``batch.register_many``, the Logic's ``registerMany``
and the same cohort shared by two torchrun processes.

Small phantom pairs and a constant test network (no trained model): a registration takes well under
a second, so a cohort of five pairs costs a few seconds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    ConstantPredictor,
    phantom_volume,
    write_card,
    write_phantom_pair,
)
from RigidResNetRegistrationLib import batch, cli
from RigidResNetRegistrationLib.distributed import Distributed, distributed_from_env
from RigidResNetRegistrationLib.engine import RegistrationOptions
from RigidResNetRegistrationLib.model import ModelCard

ORACLE = ModelCard.from_dict({"name": "oracle", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0}})
MOTION = [3.0, 2.0, -1.0]  # write_phantom_pair's motion: what the test network answers

#: The fastest registration: one pass, one order, no refinement, no start search, no picture.
FAST = ["--device", "cpu", "--iterations", "1", "--no-refine", "--init", "header", "--no-symmetric", "--no-overview"]


def run_main(*argv: str) -> tuple[int, str, str]:
    """The command line in this process (the model stays cached): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def read_summary(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len({r["name"] for r in rows}) == len(rows), "a pair is in the summary twice"
    return {r["name"]: r for r in rows}


def write_pairs(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return write_card(tmp_path_factory.mktemp("model"), bias=MOTION)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """fixed.nii.gz, moving.nii.gz (the phantom moved by MOTION) and flat.nii.gz (constant)."""
    folder = write_phantom_pair(tmp_path_factory.mktemp("images"))
    img = nib.load(folder / "moving.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), folder / "flat.nii.gz")
    return folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, images, card):
    """A cohort of five pairs, run once: two bad ones (a missing file, a constant volume), one in
    slices mode and one refined by their rows; paths relative to the pairs file's folder."""
    pairs = write_pairs(images / "pairs.csv", "fixed,moving,name,mode,refine",
                        "fixed.nii.gz,moving.nii.gz,a,,", "fixed.nii.gz,nowhere.nii.gz,b,,",
                        f"{images / 'fixed.nii.gz'},flat.nii.gz,,,",  # an absolute path; named after the moving file
                        "fixed.nii.gz,moving.nii.gz,d,slices,no", "fixed.nii.gz,moving.nii.gz,e,,yes")
    root = tmp_path_factory.mktemp("cohort") / "out"
    code, out, err = run_main("--batch", str(pairs), "-o", str(root), "--weights", str(card), *FAST)
    return {"root": root, "pairs": pairs, "code": code, "out": out, "err": err}


# --------------------------------------------------------------------------- the command line


def test_a_failed_pair_is_recorded_and_the_others_are_done(cohort):
    root = cohort["root"]
    assert cohort["code"] == cli.EXIT_PAIRS_FAILED, cohort["err"]
    last = cohort["err"].strip().splitlines()[-1]
    assert last.startswith("error: 2 of 5 pairs failed: b, flat"), cohort["err"]
    summary = read_summary(root)
    assert list(summary) == ["a", "b", "flat", "d", "e"]  # the pairs file's order
    assert {name: r["status"] for name, r in summary.items()} == {"a": "ok", "b": "failed", "flat": "failed", "d": "ok", "e": "ok"}
    assert "file not found" in summary["b"]["error"] and "nowhere.nii.gz" in summary["b"]["error"]
    assert "the volume is constant" in summary["flat"]["error"]
    for name in ("a", "d", "e"):
        row = summary[name]
        assert row["error"] == "" and row["verdict"] in ("ok", "suspicious", "failed") and float(row["seconds"]) > 0
        assert float(row["ncc_before"]) > 0 and row["rank"] == "0"
        assert Path(row["fixed"]) == cohort["pairs"].parent / "fixed.nii.gz"  # relative to the pairs file
        assert (root / name / "report.json").is_file()
    assert not (root / "b").exists() and not (root / "flat").exists()  # a failed pair leaves no folder
    assert sorted(p.name for p in root.iterdir()) == ["a", "d", "e", "summary.csv"]  # no temporaries
    assert "FAILED b: " in cohort["out"] and "ok a: " in cohort["out"]
    assert not torch.distributed.is_initialized()  # one process: no process group


def test_a_pair_is_written_exactly_as_a_single_run_writes_it(cohort, images, card, tmp_path):
    single = tmp_path / "single"
    code, _, err = run_main(str(images / "fixed.nii.gz"), str(images / "moving.nii.gz"), "-o", str(single),
                            "--weights", str(card), *FAST, "--quiet")
    assert code == 0, err
    pair = cohort["root"] / "a"
    assert sorted(os.listdir(pair)) == sorted(os.listdir(single))
    for name in ("transform.tfm", "slices.csv"):
        assert (pair / name).read_text() == (single / name).read_text(), name
    a, b = (json.loads((d / "report.json").read_text()) for d in (pair, single))
    assert a.keys() == b.keys() and a["outputs"] == b["outputs"]
    assert a["fixed_to_moving_RAS"] == b["fixed_to_moving_RAS"]
    assert Path(a["inputs"]["moving"]) == images / "moving.nii.gz"


def test_row_options_override_the_command_line(cohort):
    reports = {n: json.loads((cohort["root"] / n / "report.json").read_text()) for n in ("a", "d", "e")}
    assert reports["a"]["mode"] == "volume" and reports["a"]["refinement"] is None  # --no-refine
    assert reports["d"]["mode"] == "slices" and reports["d"]["refinement"] is None  # mode=slices, refine=no
    assert reports["e"]["mode"] == "volume" and reports["e"]["refinement"] is not None  # refine=yes beats --no-refine
    assert reports["d"]["slices"]["used"] > reports["a"]["slices"]["used"]  # slices mode registers every slice


def test_a_rerun_skips_complete_pairs_and_redoes_the_others(cohort, card):
    root = cohort["root"]
    before = {n: (root / n / "report.json").stat().st_mtime_ns for n in ("a", "d", "e")}
    (root / "d" / "slices.csv").unlink()  # d is no longer complete
    code, out, err = run_main("--batch", str(cohort["pairs"]), "-o", str(root), "--weights", str(card), *FAST)
    assert code == cli.EXIT_PAIRS_FAILED and "2 of 5 pairs failed: b, flat" in err
    summary = read_summary(root)
    assert {n: r["status"] for n, r in summary.items()} == {"a": "skipped", "b": "failed", "flat": "failed", "d": "ok", "e": "skipped"}
    for name in ("a", "e"):
        assert (root / name / "report.json").stat().st_mtime_ns == before[name], f"{name} was registered again"
        assert float(summary[name]["seconds"]) == 0 and summary[name]["verdict"]  # the verdict read from its report
    assert (root / "d" / "report.json").stat().st_mtime_ns != before["d"] and (root / "d" / "slices.csv").is_file()
    assert "skipped a: outputs complete" in out and "5 pairs: 1 registered, 2 skipped" in out


def test_pairs_file_problems_are_one_line_errors_before_any_work(images, card, tmp_path):
    def error(*lines: str, extra: tuple[str, ...] = ()) -> str:
        pairs = write_pairs(tmp_path / "pairs.csv", *lines)
        out = tmp_path / "out"
        code, _, err = run_main("--batch", str(pairs), "-o", str(out), "--weights", str(card), *FAST, *extra)
        assert code == cli.EXIT_ERROR and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert not out.exists(), "an error before any work left a folder"
        return err

    assert "unknown column 'moving_image'" in error("fixed,moving_image", "fixed.nii.gz,moving.nii.gz")
    # default names: the moving file's name, twice
    assert "line 3: the name 'moving' is already used on line 2" in error(
        "fixed,moving", "fixed.nii.gz,moving.nii.gz", "fixed.nii.gz,moving.nii.gz")
    assert "already used" in error("fixed,moving,name", "fixed.nii.gz,moving.nii.gz,Sub1", "fixed.nii.gz,moving.nii.gz,sub1")
    assert "cannot be a folder name" in error("fixed,moving,name", "fixed.nii.gz,moving.nii.gz,../up")
    assert "taken by the cohort's summary file" in error("fixed,moving,name", "fixed.nii.gz,moving.nii.gz,summary.csv")
    assert "line 2 (x): mode must be one of volume, slices, not 'slice'" in error(
        "fixed,moving,name,mode", "fixed.nii.gz,moving.nii.gz,x,slice")
    assert "line 2 (x): refine must be yes or no" in error("fixed,moving,name,refine", "fixed.nii.gz,moving.nii.gz,x,maybe")
    # a row's option contradicting the command line's: named with its line
    assert "line 2 (x): --no-refine turns off volume mode's refinement" in error(
        "fixed,moving,name,mode", "fixed.nii.gz,moving.nii.gz,x,slices")
    assert "initial transform file not found" in error(
        "fixed,moving,name,initial_transform", "fixed.nii.gz,moving.nii.gz,x,start.tfm")
    assert "lists no pairs" in error("fixed,moving", "")
    assert "give FIXED and MOVING or --batch, not both" in error(
        "fixed,moving", "fixed.nii.gz,moving.nii.gz", extra=(str(images / "fixed.nii.gz"), str(images / "moving.nii.gz")))
    code, _, err = run_main("--batch", str(tmp_path / "absent.csv"), "-o", str(tmp_path / "o"), *FAST)
    assert code == cli.EXIT_ERROR and "pairs file not found" in err


def test_one_pair_under_torchrun_is_refused(images, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_main(str(images / "fixed.nii.gz"), str(images / "moving.nii.gz"), "-o", str(tmp_path / "o"), *FAST)
    assert code == cli.EXIT_ERROR and "under torchrun use --batch PAIRS.csv" in err


def test_the_split_gives_every_pair_to_exactly_one_process():
    items = list("abcdefg")
    shares = [batch.my_share(items, Distributed(3, rank, rank)) for rank in range(3)]
    assert [i for i, _ in shares[1]] == [1, 4]
    assert sorted(i for share in shares for i, _ in share) == list(range(len(items)))
    assert distributed_from_env({}) == Distributed() and distributed_from_env({"WORLD_SIZE": "1"}) == Distributed()
    assert distributed_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Distributed(4, 3, 1)


# --------------------------------------------------------------------------- the Python API


def test_register_many_records_a_failed_pair_and_reads_the_next_pair_while_one_computes(images):
    fixed = phantom_volume(shape=(44, 50, 30), codes="LPS")
    flat = type(fixed)(np.zeros_like(fixed.array), fixed.ijk_to_ras, "flat")
    main = threading.main_thread()
    read_threads, overlapped, niceness = {}, [], {}
    second_read = threading.Event()

    def read(pair):
        read_threads[pair.name] = threading.current_thread()
        niceness[pair.name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if pair.name == "second":
            second_read.set()
        return batch.read_pair(pair)

    class Waiting(ConstantPredictor):
        """While the first pair computes, wait for the second pair to be read (the prefetch)."""

        def __call__(self, pairs):
            if self.calls == 0:
                overlapped.append(second_read.wait(timeout=20))
            return super().__call__(pairs)

    pairs = [batch.Pair(fixed, images / "moving.nii.gz", "first"), (images / "fixed.nii.gz", images / "moving.nii.gz", "second"),
             (fixed, flat), batch.Pair(images / "fixed.nii.gz", images / "nowhere.nii.gz")]
    done = []
    options = RegistrationOptions(device="cpu", iterations=1, refine=False, symmetric=False, init="header")
    main_niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    results = batch.register_many(pairs, Waiting(ORACLE, MOTION), options, read=read, done=done.append)
    assert [r.name for r in results] == ["first", "second", "flat", "nowhere"] and done == results
    assert [r.status for r in results] == ["ok", "ok", "failed", "failed"]
    assert "the volume is constant" in results[2].error and "file not found" in results[3].error
    assert overlapped == [True], "the second pair was not read while the first one computed"
    assert read_threads["second"] is not main
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_niceness, "the main thread's priority changed"
    if sys.platform.startswith("linux"):  # the reading thread yields the CPU to the registration's threads
        assert niceness["second"] == batch.READER_NICENESS > main_niceness, niceness
    ok = results[1]
    assert ok.result is not None and ok.verdict == ok.result.verdict and ok.similarity == ok.result.similarity
    assert np.allclose(results[0].result.fixed_to_moving_ras, ok.result.fixed_to_moving_ras, atol=1e-4)
    row = results[2].summary_row()
    assert list(row) == list(batch.SUMMARY_COLUMNS) and row["status"] == "failed" and row["fixed"] == fixed.name


def test_a_threads_priority_is_lowered_only_on_linux_where_niceness_is_per_thread(monkeypatch):
    """Elsewhere ``setpriority`` takes a process id: a thread's id there could name another process."""
    calls = []
    monkeypatch.setattr(batch.os, "setpriority", lambda *a: calls.append(a))
    monkeypatch.setattr(batch.sys, "platform", "darwin")
    assert batch.lower_thread_priority() is False and calls == []
    monkeypatch.setattr(batch.sys, "platform", "linux")
    assert batch.lower_thread_priority(12) is True
    assert calls == [(os.PRIO_PROCESS, threading.get_native_id(), 12)]

    def refused(*a):
        raise PermissionError("not allowed")

    monkeypatch.setattr(batch.os, "setpriority", refused)
    assert batch.lower_thread_priority() is False


def test_a_fixed_file_named_by_consecutive_pairs_is_read_once_and_a_changed_one_again(images, tmp_path, monkeypatch):
    """A cohort registered to one template reads the template once: the default reader keeps the
    fixed image of the previous pair for the next one that names the same unchanged file; a file
    named again after another one, or rewritten, is read again. Every pair's result is as if each
    had been read on its own."""
    import shutil

    from RigidResNetRegistrationLib import io as rio

    reads: list[str] = []
    real = rio.read_volume
    monkeypatch.setattr(rio, "read_volume", lambda path, *a, **k: reads.append(Path(path).name) or real(path, *a, **k))
    other = tmp_path / "other.nii.gz"
    shutil.copy(images / "fixed.nii.gz", other)
    fixed, moving = images / "fixed.nii.gz", images / "moving.nii.gz"
    pairs = [(fixed, moving, "a"), (fixed, moving, "b"), (other, moving, "c"), (fixed, moving, "d"), (fixed, moving, "e")]
    options = RegistrationOptions(device="cpu", iterations=1, refine=False, symmetric=False, init="header")
    results = batch.register_many(pairs, ConstantPredictor(ORACLE, MOTION), options)
    assert [r.status for r in results] == ["ok"] * 5
    assert [r for r in reads if r != "moving.nii.gz"] == ["fixed.nii.gz", "other.nii.gz", "fixed.nii.gz"]
    assert reads.count("moving.nii.gz") == 5
    first = results[0].result.fixed_to_moving_ras
    assert all(np.array_equal(r.result.fixed_to_moving_ras, first) for r in results)
    # the cache itself: the same Volume while the file is unchanged, a new read once it is rewritten
    cache = batch.LastImage()
    one = cache.read(other, "fixed")
    assert cache.read(other, "fixed") is one
    vol = phantom_volume(shape=(10, 12, 8))
    rio.write_volume(vol, other)
    os.utime(other, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    again = cache.read(other, "fixed")
    assert again is not one and np.array_equal(again.array, vol.array.astype(np.float32))


@pytest.mark.parametrize("write_behind", [True, False])
def test_outputs_are_written_while_the_next_pair_computes_and_recorded_in_order(images, write_behind):
    """With ``write_behind`` pair i's outputs are written in another thread while pair i+1 is
    registered; pairs are still recorded (and ``done`` called) in order, each once written, and a
    write that fails marks only its pair failed. Without it, every write is made in the caller's
    thread before the next pair starts."""
    fixed = phantom_volume(shape=(44, 50, 30), codes="LPS")
    main = threading.main_thread()
    events, write_threads = [], {}

    def write(pair, inputs, result, started):
        write_threads[pair.name] = threading.current_thread()
        if pair.name == "first" and write_behind:  # held until the second pair's network has run
            assert second_computing.wait(timeout=20)
        events.append(f"written {pair.name}")
        if pair.name == "second":
            raise OSError("disk full")
        return pair.name.upper()

    second_computing = threading.Event()

    class Recording(ConstantPredictor):
        """One network call per pair here (one pass, one order): the second call is the second pair."""

        def __call__(self, pairs):
            events.append("compute")
            if events.count("compute") > 1:
                second_computing.set()
            return super().__call__(pairs)

    pairs = [batch.Pair(fixed, images / "moving.nii.gz", "first"), batch.Pair(fixed, images / "moving.nii.gz", "second"),
             batch.Pair(fixed, images / "moving.nii.gz", "third")]
    done = []
    options = RegistrationOptions(device="cpu", iterations=1, refine=False, symmetric=False, init="header")
    results = batch.register_many(pairs, Recording(ORACLE, MOTION), options, write=write, done=done.append,
                                  write_behind=write_behind)
    assert [r.name for r in results] == ["first", "second", "third"] and done == results
    assert [r.status for r in results] == ["ok", "failed", "ok"] and "disk full" in results[1].error
    assert [r.output for r in results] == ["FIRST", None, "THIRD"] and events.count("compute") == 3
    if write_behind:
        assert all(t is not main for t in write_threads.values())
        # the second pair's computing began before the first pair's write ended
        assert events.index("written first") > [i for i, e in enumerate(events) if e == "compute"][1]
    else:
        assert all(t is main for t in write_threads.values())
        assert events.index("written first") < [i for i, e in enumerate(events) if e == "compute"][1]


def test_outputs_are_written_behind_by_default_only_when_the_model_computes_on_a_gpu(images):
    from types import SimpleNamespace

    assert not batch.computes_off_the_cpu(SimpleNamespace(device=torch.device("cpu")))
    assert batch.computes_off_the_cpu(SimpleNamespace(device=torch.device("cuda", 1)))
    assert batch.computes_off_the_cpu(SimpleNamespace(device="cuda:0"))
    assert not batch.computes_off_the_cpu(ConstantPredictor(ORACLE, MOTION))  # no device: computes where it is called
    fixed = phantom_volume(shape=(44, 50, 30), codes="LPS")
    threads = []
    options = RegistrationOptions(device="cpu", iterations=1, refine=False, symmetric=False, init="header")
    pairs = [batch.Pair(fixed, images / "moving.nii.gz", name) for name in ("a", "b")]
    batch.register_many(pairs, ConstantPredictor(ORACLE, MOTION), options, write=lambda *a: threads.append(threading.current_thread()))
    assert threads == [threading.main_thread()] * 2


# --------------------------------------------------------------------------- the Slicer Logic


try:
    import slicer

    HAVE_SLICER = hasattr(slicer, "vtkMRMLScene")  # slicer-core, not another package named slicer
except ImportError:
    HAVE_SLICER = False
if HAVE_SLICER:
    from test_slicer_logic import MOTION as LOGIC_MOTION
    from test_slicer_logic import ORACLE as LOGIC_ORACLE
    from test_slicer_logic import case, module  # noqa: F401  (module: the fixture)


@pytest.mark.skipif(not HAVE_SLICER, reason="slicer-core (MRML for Python) is not installed")
def test_logic_register_many_registers_node_pairs_and_records_a_bad_one(module):
    from RigidResNetRegistrationLib import geometry as geo

    scene = slicer.vtkMRMLScene()
    fixed1, moving1, truth1 = case(scene, "LPS anisotropic", "oblique")
    fixed2, moving2, truth2 = case(scene, "RAS", None)
    moving2.SetName("moving two")
    logic = module.RigidResNetRegistrationLogic()
    oracle = ConstantPredictor(LOGIC_ORACLE, LOGIC_MOTION)
    fractions = []
    results = logic.registerMany([(fixed1, moving1), (fixed1, fixed1), (fixed2, moving2)], iterations=1, refine=False,
                                 device="cpu", predictor=oracle, sliceTable=False, progress=lambda f, m: fractions.append(f))
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "same node" in results[1].error and results[1].output is None
    assert [r.name for r in results] == ["moving", "fixed", "moving two"]
    for r, moving, truth in ((results[0], moving1, truth1), (results[2], moving2, truth2)):
        nodes = r.output
        assert np.allclose(nodes.moving_to_fixed_world, geo.invert(truth), atol=1e-5)
        assert moving.GetParentTransformNode() is nodes.transform_node  # applied
        assert nodes.registered_volume_node is not None and nodes.table_node is None
        assert r.verdict == nodes.verdict and r.similarity == nodes.similarity
    transforms = [scene.GetNthNodeByClass(i, "vtkMRMLLinearTransformNode") for i in
                  range(scene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode"))]
    assert len(transforms) == 2  # the failed pair made no node
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    with pytest.raises(ValueError, match="True .create one for each pair. or False"):
        logic.registerMany([(fixed1, moving1)], predictor=oracle, registeredVolume=moving2)
    with pytest.raises(TypeError, match="iteration"):
        logic.registerMany([(fixed1, moving1)], predictor=oracle, iteration=1)  # a misspelt keyword of register
    with pytest.raises(ValueError, match="mode must be one of volume, slices"):
        logic.registerMany([(fixed1, moving1)], predictor=oracle, mode="slice")


# --------------------------------------------------------------------------- torchrun


def test_torchrun_two_processes_share_the_cohort(images, card, tmp_path):
    """Two CPU processes (gloo) on four pairs: each pair registered by exactly one process,
    rank i % 2, the merged summary written once by rank 0."""
    names = ["p1", "p2", "p3", "p4"]
    pairs = write_pairs(tmp_path / "pairs.csv", "fixed,moving,name", *(f"{images / 'fixed.nii.gz'},{images / 'moving.nii.gz'},{n}"
                                                                        for n in names))
    root = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "RigidResNetRegistration"), str(ROOT / "training")]),
           "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "RigidResNetRegistrationLib", "--batch", str(pairs), "-o", str(root), "--weights", str(card), *FAST],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = read_summary(root)
    assert list(summary) == names
    assert [summary[n]["rank"] for n in names] == ["0", "1", "0", "1"]
    assert all(summary[n]["status"] == "ok" for n in names)
    for i, n in enumerate(names):
        assert run.stdout.count(f": ok {n}:") == 1, run.stdout  # done once
        assert f"rank {i % 2}: ok {n}:" in run.stdout
        assert (root / n / "transform.tfm").is_file() and (root / n / "report.json").is_file()
    assert run.stdout.count("4 pairs: 4 registered") == 1  # rank 0 alone reports the cohort
