"""The trainer: dataset discovery, losses, a few steps learn, resume, export round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import moved_copy, phantom_volume
from PIL import Image

from RigidResNetRegistrationLib.model import ResNetRegressor, load_model, read_model_card, sha256_of
from RigidResNetRegistrationLib.preprocess import normalise_slices
from rrr_training.data import (
    SMALL_MOTION_SCALE,
    contrast_of,
    find_subjects,
    load_subject,
    random_contrast,
    random_motion,
    remap_same_contrast,
    sample_pairs,
)
from rrr_training.losses import similarity_loss
from rrr_training.train import TrainConfig, TrainError, export, main, prepare_inputs, train


def _save(vol, path: Path) -> None:
    nib.save(nib.Nifti1Image(vol.array, vol.ijk_to_ras), str(path))


def test_contrast_names_of_both_brats_schemes_and_generic():
    expect = {"BraTS2021_00001_t1.nii.gz": "t1", "BraTS2021_00001_t1ce.nii.gz": "t1ce", "BraTS2021_00001_t2.nii.gz": "t2",
              "BraTS2021_00001_flair.nii.gz": "flair", "BraTS-GLI-00001-000-t1n.nii.gz": "t1",
              "BraTS-GLI-00001-000-t1c.nii.gz": "t1ce", "BraTS-GLI-00001-000-t2w.nii.gz": "t2",
              "BraTS-GLI-00001-000-t2f.nii.gz": "flair", "sub-01_T1w.nii.gz": "t1", "avg152PD.nii": "pd",
              "kirby21-113-flair.nii.gz": "flair", "mask.nii.gz": None}
    for name, contrast in expect.items():
        assert contrast_of(Path(name)) == contrast, name


def test_find_subjects_in_mixed_layouts(tmp_path):
    vol = phantom_volume(shape=(20, 22, 16))
    layouts = {"BraTS2021_00007": ["_t1", "_t1ce", "_t2", "_flair"], "BraTS-GLI-00002-000": ["-t1n", "-t1c", "-t2w", "-t2f"],
               "generic/subj3": ["_T1", "_T2", "_PD"]}
    for folder, suffixes in layouts.items():
        (tmp_path / folder).mkdir(parents=True)
        for suffix in suffixes:
            _save(vol, tmp_path / folder / f"{Path(folder).name}{suffix}.nii.gz")
    (tmp_path / "slices").mkdir()
    Image.fromarray(np.uint8(np.random.rand(40, 40) * 255)).save(tmp_path / "slices" / "a.png")
    found = {s.name: sorted(s.images) for s in find_subjects(tmp_path)}
    assert found["BraTS2021_00007"] == ["flair", "t1", "t1ce", "t2"]
    assert found["BraTS-GLI-00002-000"] == ["flair", "t1", "t1ce", "t2"]
    assert found["subj3"] == ["pd", "t1", "t2"]
    assert found["slices/a"] == ["t1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for i, codes in enumerate(["RAS", "LPS", "LPS"]):
        d = root / f"case{i}"
        d.mkdir()
        t1 = phantom_volume(shape=(36, 40, 14), seed=i, codes=codes, spacing=(2.0, 2.0, 4.0))
        _save(t1, d / f"case{i}_t1.nii.gz")
        t2 = t1.array.max() - t1.array
        t2[t1.array < 5] = 0
        nib.save(nib.Nifti1Image(t2, t1.ijk_to_ras), str(d / f"case{i}_t2.nii.gz"))
    return root


def test_pairs_carry_the_registering_truth(tiny_data):
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(0), 8, (32, 32), 2.5, cross_contrast=0.0)
    _, f, m = prepare_inputs(batch, None, 0.0)
    at_truth, _ = similarity_loss(f, m, batch.truth, batch.same_contrast, "rigid", 2.5)
    at_identity, _ = similarity_loss(f, m, torch.zeros_like(batch.truth), batch.same_contrast, "rigid", 2.5)
    assert at_truth < at_identity - 0.02


def test_small_motion_share_draws_that_many_pairs_within_a_fifth_of_the_ranges():
    """``--small-motion F``: about F of the motions lie within SMALL_MOTION_SCALE of the ranges, the rest
    span them; with 0 the draws are exactly those of earlier runs (no extra random numbers)."""
    n, rot, tr = 4000, 6.0, 6.0
    plain = random_motion(np.random.default_rng(3), n, "rigid", rot, tr)
    assert np.array_equal(random_motion(np.random.default_rng(3), n, "rigid", rot, tr, small_fraction=0.0), plain)
    mixed = random_motion(np.random.default_rng(3), n, "rigid", rot, tr, small_fraction=0.4)
    scaled = np.all(np.isclose(mixed, plain * SMALL_MOTION_SCALE), axis=1)
    kept = np.all(mixed == plain, axis=1)
    assert np.all(scaled | kept)
    assert 0.36 < scaled.mean() < 0.44
    assert np.abs(mixed[scaled]).max() <= SMALL_MOTION_SCALE * 6.0
    assert np.abs(mixed[kept]).max() > 5.5  # the rest still spans the ranges
    with pytest.raises(Exception, match="--small-motion"):
        TrainConfig(data=["x"], out="o", holdout=["h"], small_motion=1.5).validate()


def test_remapped_pairs_are_new_contrasts_of_the_same_anatomy(tiny_data):
    """``--remap P``: a share of the same-contrast pairs gets a random point-wise contrast on the
    moving slice and is scored as cross contrast (MI); the anatomy (and so the truth) is unchanged,
    so MI is still higher at the truth than without registering; background stays 0."""
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(2), 24, (32, 32), 2.5, cross_contrast=0.0)
    assert batch.same_contrast.all()
    assert remap_same_contrast(batch, torch.Generator().manual_seed(0), 0.0) is batch
    out = remap_same_contrast(batch, torch.Generator().manual_seed(0), 0.5)
    picked = ~out.same_contrast
    assert 4 <= int(picked.sum()) <= 20 and torch.equal(out.fixed, batch.fixed) and torch.equal(out.truth, batch.truth)
    assert torch.equal(out.moving[~picked], batch.moving[~picked]) and not torch.allclose(out.moving[picked], batch.moving[picked])
    before = batch.moving.clone()
    random_contrast(batch.moving, torch.Generator().manual_seed(1))
    assert torch.equal(batch.moving, before)  # inputs are not modified
    remapped = out.moving[picked]
    background = batch.moving[picked] <= batch.moving[picked].amin(dim=(1, 2), keepdim=True)
    assert torch.all(remapped[background] == 0)
    _, f, m = prepare_inputs(out, None, 0.0)
    # every picked pair is scored by MI alone: better at the truth than unregistered
    at_truth, _ = similarity_loss(f[picked], m[picked], out.truth[picked], out.same_contrast[picked], "rigid", 2.5)
    at_zero, _ = similarity_loss(f[picked], m[picked], torch.zeros_like(out.truth[picked]), out.same_contrast[picked], "rigid", 2.5)
    assert at_truth < at_zero - 0.02
    with pytest.raises(Exception, match="--remap"):
        TrainConfig(data=["x"], out="o", holdout=["h"], remap=-0.1).validate()


def test_remap_loss_ncc_shows_the_remapped_slice_and_scores_the_original(tiny_data):
    """``--remap-loss ncc``: the network input carries the remapped moving slice, the loss the
    original one with the same-contrast flag (NCC); ``mi`` (the default) keeps the remapped slice
    and MI in both. Pairs that were not remapped are the same either way."""
    from rrr_training.train import training_inputs

    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(3), 16, (32, 32), 2.5, cross_contrast=0.0)
    remapped = remap_same_contrast(batch, torch.Generator().manual_seed(0), 0.5)
    picked = ~remapped.same_contrast
    assert picked.any() and (~picked).any()
    x_ncc, f_ncc, m_ncc, same_ncc = training_inputs(batch, remapped, None, 0.0, "ncc")
    x_mi, f_mi, m_mi, same_mi = training_inputs(batch, remapped, None, 0.0, "mi")
    assert torch.equal(x_ncc, x_mi) and torch.equal(f_ncc, f_mi)  # the same input either way
    assert torch.equal(x_ncc[:, 1], normalise_slices(remapped.moving))
    assert torch.equal(m_ncc, normalise_slices(batch.moving)) and torch.equal(same_ncc, batch.same_contrast)
    assert torch.equal(m_mi, normalise_slices(remapped.moving)) and torch.equal(same_mi, remapped.same_contrast)
    assert not torch.allclose(m_ncc[picked], m_mi[picked]) and torch.equal(m_ncc[~picked], m_mi[~picked])
    # scored by NCC on the original slice, the truth is as sharp an optimum as for any same-contrast pair
    at_truth, _ = similarity_loss(f_ncc[picked], m_ncc[picked], batch.truth[picked], same_ncc[picked], "rigid", 2.5)
    at_zero, _ = similarity_loss(f_ncc[picked], m_ncc[picked], torch.zeros_like(batch.truth[picked]), same_ncc[picked], "rigid", 2.5)
    assert at_truth < at_zero - 0.05
    assert training_inputs(batch, batch, None, 0.0, "ncc")[3] is batch.same_contrast  # nothing remapped: unchanged
    with pytest.raises(Exception, match="--remap-loss"):
        TrainConfig(data=["x"], out="o", holdout=["h"], remap_loss="nmi").validate()


def test_cross_loss_ncc_scores_real_cross_contrast_pairs_against_their_counterpart(tiny_data, monkeypatch):
    """``--cross-loss ncc``: a real cross-contrast pair (T1 fixed, T2 moved) keeps its T2 slice in the
    network input, and the loss compares the moving slice's anatomy in the *fixed* contrast (the
    subject's T1 sampled where the T2 slice was) by NCC, whose optimum is the truth; a subject
    named in NOT_CO_REGISTERED keeps MI on its own moving slice. Drawing the counterparts does not
    change the pairs drawn."""
    import rrr_training.data as data_module
    from rrr_training.train import training_inputs

    monkeypatch.setattr(data_module, "NOT_CO_REGISTERED", {"case1": "test: its T2 is not on its T1"})
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    plain = sample_pairs(subj, np.random.default_rng(5), 24, (32, 32), 2.5, cross_contrast=0.7)
    batch = sample_pairs(subj, np.random.default_rng(5), 24, (32, 32), 2.5, cross_contrast=0.7, counterparts=True)
    assert plain.counterpart is None and plain.counterpart_exact is None
    for a, b in ((plain.fixed, batch.fixed), (plain.moving, batch.moving), (plain.truth, batch.truth)):
        assert torch.equal(a, b)
    cross = ~batch.same_contrast
    names = np.array([src[0].name for src in batch.sources])
    expected_exact = torch.as_tensor((names != "case1") | batch.same_contrast.numpy())
    assert torch.equal(batch.counterpart_exact, expected_exact)
    real = cross & batch.counterpart_exact
    kept = cross & ~batch.counterpart_exact
    assert real.any() and kept.any() and batch.same_contrast.any()
    assert torch.equal(batch.counterpart[~real], batch.moving[~real])  # same contrast, or not co-registered
    assert not torch.allclose(batch.counterpart[real], batch.moving[real])  # T1 anatomy, not the T2 slice

    x, f, m, same = training_inputs(batch, batch, None, 0.0, "mi", "ncc")
    x_mi, f_mi, m_mi, same_mi = training_inputs(batch, batch, None, 0.0, "mi", "mi")
    assert torch.equal(x, x_mi) and torch.equal(f, f_mi)  # the network sees the T2 slice either way
    assert torch.equal(m[real], normalise_slices(batch.counterpart)[real]) and same[real].all()
    assert torch.equal(m[~real], m_mi[~real]) and torch.equal(same[~real], same_mi[~real])
    assert torch.equal(same_mi, batch.same_contrast)
    # the counterpart by NCC has its optimum at the truth, as sharp as a same-contrast pair's
    at_truth, _ = similarity_loss(f[real], m[real], batch.truth[real], same[real], "rigid", 2.5)
    at_zero, _ = similarity_loss(f[real], m[real], torch.zeros_like(batch.truth[real]), same[real], "rigid", 2.5)
    assert at_truth < at_zero - 0.05
    assert training_inputs(plain, plain, None, 0.0, "mi", "ncc")[3] is plain.same_contrast  # no counterparts drawn
    with pytest.raises(Exception, match="--cross-loss"):
        TrainConfig(data=["x"], out="o", holdout=["h"], cross_loss="nmi").validate()


def test_resampled_moving_slices_follow_each_pairs_own_estimate(tiny_data):
    """Iterative evaluation re-samples every moving slice from its volume through its own
    estimate (grouped by volume for speed): at the truth each same-contrast moving slice is its
    fixed slice again, and each pair's slice is the one sampled for that pair alone."""
    from RigidResNetRegistrationLib import geometry as geo
    from RigidResNetRegistrationLib.resample import sample_volume_at_ras

    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(4), 12, (32, 32), 2.5, cross_contrast=0.0)
    assert len({id(src[0]) for src in batch.sources}) > 1  # several volumes in one batch
    truth = batch.truth.double().numpy()
    at_truth = batch.resample_moving(truth, "rigid", (32, 32), 2.5)
    at_identity = batch.resample_moving(np.zeros_like(truth), "rigid", (32, 32), 2.5)
    assert at_truth.shape == batch.fixed.shape
    err_truth = (at_truth - batch.fixed).abs().mean(dim=(1, 2))
    err_identity = (at_identity - batch.fixed).abs().mean(dim=(1, 2))
    assert torch.all(err_truth < 0.35 * err_identity + 1e-3), (err_truth, err_identity)
    est = np.random.default_rng(5).uniform(-3, 3, truth.shape)
    grouped = batch.resample_moving(est, "rigid", (32, 32), 2.5)
    for i, (sub, s, contrast, motion) in enumerate(batch.sources):
        pts = geo.network_grid_points(sub.frame, (32, 32), 2.5, np.array([s]))[0]
        both = geo.params_to_ras(motion, sub.frame, "rigid", s) @ geo.params_to_ras(est[i], sub.frame, "rigid", s)
        alone = sample_volume_at_ras(sub.volumes[contrast], sub.ijk_to_ras[contrast], geo.apply_to_points(both, pts))
        assert torch.allclose(grouped[i], alone.float(), atol=1e-4)


def test_a_few_unsupervised_steps_reduce_the_loss(tiny_data):
    torch.manual_seed(0)
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(1), 16, (32, 32), 2.5, max_rotation_deg=8, max_translation_mm=8)
    x, f, m = prepare_inputs(batch, None, 0.0)
    net = ResNetRegressor(3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, _ = similarity_loss(f, m, net(x), batch.same_contrast, "rigid", 2.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < losses[0] - 0.01


def _cfg(tiny_data, out, steps=6):
    return TrainConfig(data=[str(tiny_data)], out=str(out), holdout=["case2"], size=32, spacing_mm=2.5, batch_size=4,
                       steps=steps, val_every=2, val_pairs=8, seed=3, threads=1, device="cpu")


def test_checkpoint_resumes_to_the_same_state_and_export_round_trips(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(tiny_data, straight))
    interrupted = tmp_path / "interrupted"
    train(_cfg(tiny_data, interrupted), stop_after=3)  # a session's end between validations is a checkpoint too
    assert torch.load(interrupted / "last.pt", weights_only=True)["step"] == 3
    train(_cfg(tiny_data, interrupted), resume=True)
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(interrupted / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert len(list(open(interrupted / "log.csv"))) == 1 + 4  # header + validations at 2, 3 (the session's end), 4, 6
    # OUT/compute.csv: a row per session (steps, hours, device, threads, precision)
    import csv

    from rrr_training.train import training_precision

    with open(interrupted / "compute.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["step_start"]), int(r["step_end"]), int(r["saved_step"])) for r in rows] == [(0, 3, 3), (3, 6, 6)]
    precision = training_precision("auto", torch.device("cpu"))
    assert all(r["device"] == "cpu" and r["precision"] == precision and r["threads"] == "1" and r["batch_size"] == "4" for r in rows)
    assert all(float(r["wall_hours"]) > 0 and r["session_end"] >= r["session_start"] for r in rows)
    assert (straight / "curves.png").stat().st_size > 0

    card_path = export(straight / "best.pt", tmp_path / "models", name="tiny")
    card = json.loads(card_path.read_text())
    assert card["trained"] and card["input"] == {**card["input"], "size": [32, 32], "spacing_mm": 2.5}
    model = load_model(card_path, "cpu")
    ref = ResNetRegressor(3)
    ref.load_state_dict(torch.load(straight / "best.pt", weights_only=True)["model"])
    x = torch.rand(3, 2, 32, 32)
    assert torch.allclose(model(x), ref.eval()(x), atol=2e-2 + 2e-2 * ref(x).abs().max().item())  # fp16 weights

    # a second checkpoint as the card's fine stage: its own fp16 file beside, named with its sha256
    staged_path = export(straight / "best.pt", tmp_path / "models", name="staged", fine=interrupted / "last.pt", fine_below=2.0)
    staged = json.loads(staged_path.read_text())
    assert staged["fine"]["file"] == "staged_fine.pt" and staged["fine"]["below"] == 2.0
    assert staged["fine"]["sha256"] == sha256_of(tmp_path / "models" / "staged_fine.pt")
    assert staged["fine"]["training"]["steps"] == torch.load(interrupted / "last.pt", weights_only=True)["step"]
    assert load_model(staged_path, "cpu").fine is not None and "mirror" not in staged
    mirrored = main(["export", str(straight / "best.pt"), "--models-dir", str(tmp_path / "models"), "--name", "mirrored", "--mirror"])
    assert mirrored == 0 and read_model_card(tmp_path / "models" / "mirrored.json").mirror
    assert not read_model_card(card_path).mirror
    other = torch.load(interrupted / "last.pt", weights_only=True)
    other["config"]["size"] = 64
    torch.save(other, tmp_path / "other_grid.pt")
    with pytest.raises(TrainError, match="fine checkpoint's"):
        export(straight / "best.pt", tmp_path / "models", name="bad", fine=tmp_path / "other_grid.pt")


def test_freeze_bn_keeps_the_batch_norm_statistics_of_the_initial_weights(tiny_data, tmp_path):
    """``--freeze-bn``: a fine-tune from ``--init`` leaves every batch norm's running statistics
    as they were (the weights still train); without it they move. Recorded in the exported card."""
    init = tmp_path / "init.pt"
    torch.manual_seed(0)
    torch.save(ResNetRegressor(3).state_dict(), init)
    start = torch.load(init, weights_only=True)
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats
    ends = {}
    for freeze in (True, False):
        out = tmp_path / f"freeze-{freeze}"
        train(replace(_cfg(tiny_data, out, steps=3), init=str(init), freeze_bn=freeze))
        ends[freeze] = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(ends[True][k], start[k]) for k in stats)
    assert not all(torch.equal(ends[False][k], start[k]) for k in stats)
    assert not torch.equal(ends[True]["features.conv1.weight"], start["features.conv1.weight"])
    card = json.loads(export(tmp_path / "freeze-True" / "last.pt", tmp_path / "models", name="frozen").read_text())
    assert card["training"]["batch_norm_frozen"] is True
    with pytest.raises(Exception, match="freeze_bn"):
        TrainConfig(data=["x"], out="o", holdout=["h"], freeze_bn="yes").validate()


_DDP_WORKER = '''
"""One torchrun process: the trainer's CLI, recording the network it trains and its first pairs."""
import json, os, sys
import torch
torch.set_num_threads(1)
from rrr_training import train as T

nets, first = [], []

class Recording(T.ResNetRegressor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nets.append(self)

sample = T.sample_pairs

def recording_sample(subjects, rng, batch_size, *args, **kwargs):
    batch = sample(subjects, rng, batch_size, *args, **kwargs)
    if batch_size == 2 and not first:  # the first training batch (validation draws 8)
        first.append(batch.truth.tolist())
    return batch

T.ResNetRegressor, T.sample_pairs = Recording, recording_sample
code = T.main(sys.argv[2:])
params = {k: v.detach().double().sum().item() for k, v in nets[-1].named_parameters()}
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as fh:
    json.dump({"code": code, "params": params, "first_batch": first[0]}, fh)
'''


def test_two_processes_under_torchrun_train_one_model_and_only_rank0_writes(tiny_data, tmp_path):
    import os
    import subprocess
    import sys

    script, out, report = tmp_path / "worker.py", tmp_path / "run", tmp_path / "ranks"
    script.write_text(_DDP_WORKER)
    report.mkdir()
    args = ["--data", str(tiny_data), "--holdout", "case2", "--out", str(out), "--size", "32", "--spacing-mm", "2.5",
            "--batch-size", "2", "--steps", "4", "--val-every", "2", "--val-pairs", "8", "--seed", "3",
            "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RIGID_RESNET_DEBUG": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(report), *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # each rank draws its own pairs
    assert ranks[0]["params"] == ranks[1]["params"]  # ... and DDP keeps one model
    assert run.stdout.count("val val_loss=") == 2  # only rank 0 validates and prints
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "compute.csv", "config.json", "curves.png", "last.pt", "log.csv"]
    assert len(list(open(out / "log.csv"))) == 1 + 2  # header + validations at 2, 4
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 4 and last["world_size"] == 2 and len(last["rng_ranks"]) == 2
    assert last["rng_ranks"][0] != last["rng_ranks"][1]
    for name in ("best.pt", "last.pt"):
        state = torch.load(out / name, weights_only=True)["model"]
        assert not any(k.startswith("module.") for k in state)
        ResNetRegressor(3).load_state_dict(state)  # strict: the plain model's keys
    saved = {k: v.double().sum().item() for k, v in last["model"].items()}
    assert all(saved[k] == pytest.approx(v, rel=1e-9, abs=1e-9) for k, v in ranks[0]["params"].items())


def test_torchrun_with_more_processes_than_gpus_is_one_clear_error(tiny_data, tmp_path, monkeypatch):
    import torch.distributed as dist

    from rrr_training.train import TrainError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("process group started"))
    cfg = _cfg(tiny_data, tmp_path / "run")
    cfg.device = "cuda"
    with pytest.raises(TrainError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and "local rank 1 needs cuda:1" in message and "only 1 CUDA GPU(s)" in message


def test_mirrored_pair_is_registered_by_the_mirrored_transform():
    """``--flip`` mirrors both slices of a pair left-right (along ex, image columns): its
    registering transform must be the original's with theta and tx negated (ty kept), in the
    warp the loss uses."""
    from RigidResNetRegistrationLib.resample import torch_params_to_matrix_2d, warp_images_2d
    from rrr_training.train import mirror_pairs

    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 40), torch.linspace(-1, 1, 48), indexing="ij")
    fixed = (torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.05) + 0.5 * torch.exp(-((xx + 0.4) ** 2 + (yy - 0.3) ** 2) / 0.02))[None, None]
    params = torch.tensor([[7.0, 3.0, -2.0]])
    inverse = torch.linalg.inv(torch_params_to_matrix_2d(params))
    moving = warp_images_2d(fixed, inverse, 2.0)  # moving(p) = fixed(A^-1 p): registered by A
    pair = torch.cat([fixed, moving], 1)
    mirrored = mirror_pairs(pair, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(mirrored, pair.flip(-1)) and not torch.equal(mirrored, pair)  # all mirrored, input kept

    def residual(images, p):
        warped = warp_images_2d(images[:, 1:], torch_params_to_matrix_2d(p), 2.0)
        return float((warped - images[:, :1])[..., 8:-8, 8:-8].abs().mean())

    assert residual(pair, params) < 0.1 * residual(pair, torch.zeros(1, 3))
    mirrored_params = params * torch.tensor([-1.0, -1.0, 1.0])
    assert residual(mirrored, mirrored_params) < 1.01 * residual(pair, params) + 1e-6
    assert residual(mirrored, params) > 5 * residual(mirrored, mirrored_params)
    assert mirror_pairs(pair, torch.Generator(), 0.0) is pair


def test_init_starts_from_given_weights_and_bad_ones_are_one_line_errors(tiny_data, tmp_path):
    from rrr_training.train import TrainError, initial_weights

    source = tmp_path / "source"
    train(_cfg(tiny_data, source, steps=2))
    start = torch.load(source / "last.pt", weights_only=True)["model"]
    cfg = _cfg(tiny_data, tmp_path / "fine", steps=2)
    cfg.init, cfg.lr, cfg.seed = str(source / "last.pt"), 1e-9, 11  # (almost) no learning, another seed's initialisation
    train(cfg)
    tuned = torch.load(tmp_path / "fine" / "last.pt", weights_only=True)["model"]
    key = "regressor.0.weight" if "regressor.0.weight" in start else next(k for k in start if start[k].is_floating_point())
    assert torch.allclose(tuned[key], start[key], atol=1e-5)
    # an exported fp16 weights file is accepted too, as floats
    card_path = export(source / "last.pt", tmp_path / "models", name="tiny")
    state = initial_weights(card_path.with_suffix(".pt"))
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert torch.allclose(state[key], start[key], atol=1e-2)
    with pytest.raises(TrainError, match="not found"):
        initial_weights(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainError, match="not a readable weights file"):
        initial_weights(tmp_path / "junk.pt")
    wrong = _cfg(tiny_data, tmp_path / "wrong", steps=1)
    wrong.init, wrong.hidden = str(source / "last.pt"), 64
    with pytest.raises(TrainError, match="do not fit"):
        train(wrong)


def test_evaluation_predicts_at_the_engines_precision(tiny_data, monkeypatch):
    """``evaluate`` (and the benchmark's 2D rows) measure the network as the engine runs it:
    ``auto`` resolves as in the engine (bf16 where the CPU computes it natively), pairs are
    predicted in both orders by default, and explicit choices are passed through."""
    import rrr_training.evaluate as ev

    from RigidResNetRegistrationLib.engine import resolve_precision

    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(0), 4, (32, 32), 2.5)
    seen = []

    def fake_predict(model, fixed, moving, batch_size, precision="fp32", symmetric=False):
        seen.append((precision, symmetric))
        return np.zeros((len(fixed), 3))

    monkeypatch.setattr(ev, "predict_parameters", fake_predict)
    model = type("M", (), {"card": type("C", (), {"transform": "rigid", "n_params": 3, "input_size": (32, 32), "spacing_mm": 2.5})(),
                           "device": "cpu"})()
    ev.evaluate_batch(model, batch, 2)
    ev.evaluate_batch(model, batch, 1, precision="fp32", symmetric=False)
    # symmetric (both orders) by default, as the engine
    assert seen == [(resolve_precision("auto", torch.device("cpu")), True)] * 2 + [("fp32", False)]


def test_pair_refinement_brings_estimates_back_to_the_truth(tiny_data):
    """``evaluate --refine-slices``: each pair's estimate refined on its own volumes comes back to the
    pair's truth (the composition with the pair's motion is the right way round), and an estimate
    at the truth stays there."""
    import rrr_training.evaluate as ev

    from RigidResNetRegistrationLib import geometry as geo

    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(1), 12, (32, 32), 2.5, max_rotation_deg=8.0, max_translation_mm=8.0,
                         fixed_contrast="t1", moving_contrasts=["t1"])
    truth = batch.truth.double().numpy()
    start = truth + np.random.default_rng(2).uniform(-1.5, 1.5, truth.shape)
    refined = ev.refine_pair_estimates(batch, start, "t1", (32, 32), 2.5, "ncc")
    rot0, trans0 = geo.params_error_2d(start, truth)
    rot, trans = geo.params_error_2d(refined, truth)
    assert np.median(trans) < 0.2 * np.median(trans0) and np.median(rot) < 0.3 * np.median(rot0), (rot, trans)
    stay = ev.refine_pair_estimates(batch, truth, "t1", (32, 32), 2.5, "ncc")
    rot, trans = geo.params_error_2d(stay, truth)
    assert rot.max() < 0.05 and trans.max() < 0.05


# --------------------------------------------------------------------------- issue 20: data at scale, synthetic
# contrasts, motion curriculum, compute log, precision, held-out evaluation rows


def test_find_subjects_splits_a_folder_of_several_peoples_scans(tmp_path):
    """A folder of one person's contrasts is one subject named after the folder (BraTS, z-scored
    BRATS 2015 names with the contrast first); a folder of several people's single scans (IXI,
    clinical whole heads, NRRD too) gives one subject per person, named without the contrast."""
    from RigidResNetRegistrationLib.io import write_volume

    from rrr_training.data import subject_key

    vol = phantom_volume(shape=(20, 22, 16))
    files = {"ixi/IXI012-HH-1211_T1.nii.gz", "ixi/IXI013-HH-1212_T1.nii.gz", "pat1/Flair_subtrMeanDivStd.nii.gz",
             "pat1/T1c_subtrMeanDivStd.nii.gz", "pat1/brainmask.nii.gz", "heads/studyforrest_t1w_2mm.nii.gz",
             "heads/pyradiomics_brain1_t1gd.nrrd", "heads/torchio_fernando_t2.nii.gz", "spm/avg152T1.nii", "spm/avg152PD.nii"}
    for rel in files:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        write_volume(vol, tmp_path / rel)
    found = {s.name: {c: p.name for c, p in s.images.items()} for s in find_subjects(tmp_path)}
    assert found == {
        "IXI012-HH-1211": {"t1": "IXI012-HH-1211_T1.nii.gz"}, "IXI013-HH-1212": {"t1": "IXI013-HH-1212_T1.nii.gz"},
        "pat1": {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1ce": "T1c_subtrMeanDivStd.nii.gz"},  # no mask
        "studyforrest_2mm": {"t1": "studyforrest_t1w_2mm.nii.gz"}, "pyradiomics_brain1": {"t1ce": "pyradiomics_brain1_t1gd.nrrd"},
        "torchio_fernando": {"t2": "torchio_fernando_t2.nii.gz"}, "spm": {"t1": "avg152T1.nii", "pd": "avg152PD.nii"}}
    assert subject_key(Path("BraTS2021_00001_t1ce.nii.gz")) == "BraTS2021_00001"
    assert contrast_of(Path("Flair_subtrMeanDivStd.nii.gz")) == "flair" and contrast_of(Path("brainmask.nii.gz")) is None
    nrrd = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tmp_path / "heads") if s.name == "pyradiomics_brain1"]
    assert nrrd[0] is not None and len(nrrd[0].slices) > 0  # NRRD read by the product's reader


def test_views_in_three_orientations_share_one_copy_of_the_voxels(tiny_data):
    from rrr_training.data import load_subject_views

    subject = find_subjects(tiny_data)[0]
    views = load_subject_views(subject, (32, 32), 2.5, ("axial", "coronal", "sagittal"), min_foreground=0.05)
    assert [v.orientation for v in views] == ["axial", "coronal", "sagittal"]
    normals = np.array([v.frame.n for v in views])
    assert np.allclose(np.abs(normals), np.eye(3)[[2, 1, 0]], atol=1e-6)  # S, A, R
    assert all(v.volumes is views[0].volumes for v in views)
    axial = load_subject(subject, (32, 32), 2.5, min_foreground=0.05)
    assert np.array_equal(axial.slices, views[0].slices) and axial.orientation == "axial"
    # pairs drawn from all views carry their own frame: at the truth the moving slice is the fixed one
    batch = sample_pairs(views, np.random.default_rng(0), 12, (32, 32), 2.5, cross_contrast=0.0)
    assert len({src[0].orientation for src in batch.sources}) > 1
    at_truth = batch.resample_moving(batch.truth.double().numpy(), "rigid", (32, 32), 2.5)
    assert torch.all((at_truth - batch.fixed).abs().mean(dim=(1, 2)) < 0.35 * (batch.moving - batch.fixed).abs().mean(dim=(1, 2)) + 1e-3)


def test_training_draws_every_slice_the_engine_registers(tmp_path):
    """By default the trainer and the evaluator draw the slices the engine registers (its survey's
    rule, :data:`options.MIN_FOREGROUND`), the thin ones at the top of a head included; a stricter
    ``min_foreground`` (``--min-foreground``, 0.15 before it was an option) leaves those out."""
    from rrr_training.data import load_subject_views
    from rrr_training.train import TrainError

    from RigidResNetRegistrationLib import geometry as geo
    from RigidResNetRegistrationLib.options import MIN_FOREGROUND
    from RigidResNetRegistrationLib.preprocess import survey_slices

    shape, spacing = (40, 40, 30), 2.0
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    centre = (np.array(shape) - 1) / 2
    # an ellipsoid "brain" whose axial sections shrink towards both ends of the stack
    r = np.sqrt((((ijk - centre) / np.array([16.0, 18.0, 14.0])) ** 2).sum(-1))
    array = np.where(r <= 1.0, 100.0 + 20.0 * np.sin(ijk[..., 0] / 3.0), 0.0).astype(np.float32)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    d = tmp_path / "egg"
    d.mkdir()
    nib.save(nib.Nifti1Image(array, aff), str(d / "egg_t1.nii.gz"))
    subject = find_subjects(tmp_path)[0]
    size, grid_mm = (32, 32), 2.5
    drawn = load_subject_views(subject, size, grid_mm)[0]
    frame = geo.slice_frame(aff, shape)
    vol = torch.from_numpy(array)
    survey = survey_slices(vol, aff, vol, aff, frame, size, grid_mm, coarsening=1)
    assert np.array_equal(drawn.slices, np.flatnonzero(survey.informative))
    thin = np.flatnonzero((survey.fixed_fg >= MIN_FOREGROUND) & (survey.fixed_fg < 0.15))
    assert len(thin) >= 2  # the case the default exists for
    strict = load_subject_views(subject, size, grid_mm, min_foreground=0.15)[0]
    assert set(drawn.slices) - set(strict.slices) == set(thin.tolist())
    cfg = TrainConfig(data=[str(tmp_path)], out=str(tmp_path / "run"), holdout=[])
    assert cfg.min_foreground == MIN_FOREGROUND
    with pytest.raises(TrainError, match="--min-foreground"):
        replace(cfg, min_foreground=1.5).validate()


def test_multi_contrast_share_sets_the_share_of_pairs_from_multi_contrast_subjects(tiny_data, tmp_path):
    from rrr_training.data import slice_weights

    single = tmp_path / "single"
    single.mkdir()
    for i in range(3):
        _save(phantom_volume(shape=(36, 40, 14), seed=10 + i, spacing=(2.0, 2.0, 4.0)), single / f"head{i}_T1.nii.gz")
    subj = [load_subject(s, (32, 32), 2.5) for s in [*find_subjects(tiny_data), *find_subjects(single)]]
    multi = np.array([len(s.volumes) > 1 for s in subj])
    assert multi.sum() == 3 and (~multi).sum() == 3
    plain = slice_weights(subj)
    assert np.allclose(plain, [len(s.slices) for s in subj] / np.sum([len(s.slices) for s in subj]))
    w = slice_weights(subj, 0.8)
    assert w.sum() == pytest.approx(1.0) and w[multi].sum() == pytest.approx(0.8)
    assert np.allclose(w[multi] / w[multi].sum(), plain[multi] / plain[multi].sum())  # slices equally likely within
    batch = sample_pairs(subj, np.random.default_rng(0), 200, (32, 32), 2.5, multi_contrast_share=0.8)
    share = np.mean([len(src[0].volumes) > 1 for src in batch.sources])
    assert 0.7 < share < 0.9


def test_holdout_file_names_the_projects_held_out_subjects():
    """``training/holdout.txt``: BraTS2021_90004, 15 IXI subjects chosen by a rule (every 10th
    sorted name from the 6th) and one whole-head scan, each with its evaluation group; checked
    against the shared data when it is there."""
    from conftest import ROOT, SHARED_DATA

    from rrr_training.data import read_holdout_file
    from rrr_training.train import DEFAULT_HOLDOUT_FILE

    assert DEFAULT_HOLDOUT_FILE == ROOT / "training" / "holdout.txt"
    held = read_holdout_file(DEFAULT_HOLDOUT_FILE)
    ixi = [n for n in held if n.startswith("IXI")]
    assert held["BraTS2021_90004"] == "skull-stripped" and len(ixi) == 15
    others = [n for n in held if n != "BraTS2021_90004" and n not in ixi]
    assert len(others) == 1 and all(held[n] == "whole-head" for n in [*ixi, *others])
    if not (SHARED_DATA / "ixi-t1-2mm").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}: the names were not checked against it")
    names = sorted(p.name.replace("_T1.nii.gz", "") for p in (SHARED_DATA / "ixi-t1-2mm").glob("*_T1.nii.gz"))
    assert ixi == names[5::10]
    found = {s.name for s in find_subjects(SHARED_DATA)}
    assert set(held) <= found


def _images(seed=0, n=6, size=48):
    """Brain-like network-grid slices (a phantom on a 2D grid), background near 0."""
    vol = phantom_volume(shape=(size, size, n), seed=seed, spacing=(2.0, 2.0, 36.0 / n))  # slices within +-18 mm of the centre
    return torch.from_numpy(np.moveaxis(vol.array, 2, 0).copy()).float()


def test_synthetic_contrast_is_non_monotonic_keeps_geometry_and_is_seeded():
    from rrr_training.synth import DEFAULT_SYNTH, BACKGROUND_LEVEL, gradient_magnitude, intensity_curve, synthetic_contrast

    images = _images()
    before = images.clone()
    out = synthetic_contrast(images, torch.Generator().manual_seed(1))
    assert torch.equal(images, before) and out.shape == images.shape
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # seeded: the same seed gives the same contrasts, another seed others
    assert torch.equal(out, synthetic_contrast(images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(out, synthetic_contrast(images, torch.Generator().manual_seed(2)), atol=0.05)
    # the draws do not depend on the pixels (a pair's contrast can be re-applied to a re-sampled slice)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    synthetic_contrast(images, g1)
    synthetic_contrast(images.flip(-1) * 3 + 7, g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    # non-monotonic: the smooth curves rise and fall; binned against the input, the output does too
    x = torch.linspace(0, 1, 201)[None, None].expand(40, 1, 201)
    curves = intensity_curve(x, torch.rand(40, DEFAULT_SYNTH.knots, generator=torch.Generator().manual_seed(0)), "smooth")[:, 0]
    slope = torch.diff(curves, dim=1)
    assert ((slope > 1e-4).any(1) & (slope < -1e-4).any(1)).float().mean() > 0.95
    plain = {"max_blur_px": 0.0, "thick_slice": 0.0, "bias": 0.0, "max_noise": 0.0, "tissue_share": 0.0, "random_background": 0.0}
    from rrr_training.synth import SynthOptions

    many = _images(seed=3, n=24)
    mapped = synthetic_contrast(many, torch.Generator().manual_seed(4), SynthOptions(**plain))
    v = normalise_slices(many)
    rises = falls = tested = 0
    for i in range(len(many)):
        fg = v[i] > 0.15
        bins = torch.bucketize(v[i][fg], torch.linspace(0.15, 1, 7))
        means = [mapped[i][fg][bins == b].mean() for b in bins.unique() if (bins == b).sum() > 20]
        if len(means) < 4:
            continue  # a slice with too little brain
        d = torch.diff(torch.stack(means))
        tested += 1
        rises += int((d > 0.02).any())
        falls += int((d < -0.02).any())
    assert tested >= 16 and rises >= 0.7 * tested and falls >= 0.7 * tested, (tested, rises, falls)
    # background: dark by default (the share given a random one aside), random with random_background=1
    bg = normalise_slices(images) < 0.05  # outside the head
    dark = synthetic_contrast(images.repeat(4, 1, 1), torch.Generator().manual_seed(6), SynthOptions(random_background=0.0))
    bg4 = bg.repeat(4, 1, 1)
    bg_means = torch.stack([dark[i][bg4[i]].mean() for i in range(len(dark))])
    fg_means = torch.stack([dark[i][~bg4[i]].mean() for i in range(len(dark))])
    assert float(bg_means.median()) < BACKGROUND_LEVEL + 0.05 and float((bg_means < fg_means).float().mean()) > 0.8
    bright = synthetic_contrast(images.repeat(4, 1, 1), torch.Generator().manual_seed(6), SynthOptions(random_background=1.0))
    bright_means = torch.stack([bright[i][bg4[i]].mean() for i in range(len(bright))])
    assert float(bright_means.std()) > 0.1 and float(bright_means.max()) > 0.3
    # geometry kept: the tissue boundaries (gradient magnitude) stay where they were, whatever the contrast
    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    ref = gradient_magnitude(images / images.amax())
    for seed in range(4):
        syn = synthetic_contrast(images, torch.Generator().manual_seed(seed), SynthOptions(max_noise=0.0))
        g = gradient_magnitude(syn)
        same = np.mean([corr(ref[i], g[i]) for i in range(len(images))])
        shifted = np.mean([corr(ref[i], torch.roll(g[i], 4, dims=1)) for i in range(len(images))])
        assert same > 0.4 and same > shifted + 0.2, (seed, same, shifted)


def test_synthetic_pieces_blur_thick_slices_and_tissue_classes():
    from rrr_training.synth import gaussian_blur, quantile_tissue_labels, thick_slice

    img = torch.zeros(2, 21, 21)
    img[:, 10, 10] = 1.0
    blurred = gaussian_blur(img, torch.tensor([0.0, 2.0]))
    assert torch.allclose(blurred[0], img[0], atol=1e-6) and blurred[1].sum() == pytest.approx(1.0, abs=1e-4)
    xs = torch.arange(21.0)[None].expand(21, 21)
    assert float((blurred[1] * xs).sum()) == pytest.approx(10.0, abs=1e-3)  # centred: nothing moves
    stripes = (torch.arange(24.0) % 2)[None].expand(24, 24)[None].repeat(2, 1, 1)  # columns alternate
    thick = thick_slice(stripes, torch.tensor([1, 4]), torch.tensor([1, 1]))
    assert torch.equal(thick[0], stripes[0]) and float(thick[1].std()) < 0.2 * float(stripes[1].std())
    along = thick_slice(stripes, torch.tensor([4, 4]), torch.tensor([0, 0]))  # along rows: columns untouched
    assert torch.allclose(along, stripes)
    # centred: a ramp across the blocks comes back unchanged between the first and the last full
    # block's centre of each factor (the anatomy does not move), along either axis
    ramp = torch.arange(29.0)[None].expand(29, 29)[None].repeat(4, 1, 1)
    factors = torch.tensor([2, 3, 4, 5])
    across = thick_slice(ramp, factors, torch.ones(4, dtype=torch.long))
    down = thick_slice(ramp.transpose(1, 2), factors, torch.zeros(4, dtype=torch.long))
    for b, k in enumerate(factors.tolist()):
        inner = slice(k // 2, (29 // k - 1) * k + (k - 1) // 2 + 1)
        assert torch.allclose(across[b][:, inner], ramp[b][:, inner], atol=1e-4), k
        assert torch.allclose(down[b].T, across[b], atol=1e-5)
    v = torch.linspace(0, 1, 400).reshape(1, 20, 20)
    labels = quantile_tissue_labels(v, torch.tensor([4]))
    assert torch.equal(labels[v <= 0.1], torch.zeros_like(labels[v <= 0.1]))
    counts = torch.bincount(labels.flatten())[1:]
    assert len(counts) == 4 and int(counts.max() - counts.min()) <= 2
    assert torch.all(torch.diff(labels.flatten()) >= 0)  # iso-intensity classes in intensity order


def test_synth_pairs_are_two_contrasts_of_one_scan_with_exact_truth(tiny_data):
    """``--synth P``: a share of the same-contrast pairs gets a synthetic contrast on each slice
    (cross contrast, MI); ``--remap`` and ``--synth`` split one draw; with ``--remap-loss ncc`` the
    loss compares the original slices."""
    from rrr_training.train import training_inputs

    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(5), 40, (32, 32), 2.5, cross_contrast=0.0)
    out = remap_same_contrast(batch, torch.Generator().manual_seed(0), 0.3, synth=0.4)
    changed_fixed = ~torch.isclose(out.fixed, batch.fixed).flatten(1).all(1)
    changed_moving = ~torch.isclose(out.moving, batch.moving).flatten(1).all(1)
    synth, remap = changed_fixed, changed_moving & ~changed_fixed
    assert torch.equal(~out.same_contrast, synth | remap)
    assert 6 <= int(synth.sum()) <= 26 and 4 <= int(remap.sum()) <= 22 and int((~(synth | remap)).sum()) >= 4
    assert torch.equal(out.truth, batch.truth)
    # legacy draws: no --synth, the same pairs as before
    a = remap_same_contrast(batch, torch.Generator().manual_seed(0), 0.3)
    b = remap_same_contrast(batch, torch.Generator().manual_seed(0), 0.3, synth=0.0)
    assert torch.equal(a.moving, b.moving) and torch.equal(a.fixed, batch.fixed)
    assert remap_same_contrast(batch, torch.Generator(), 0.0, synth=0.0) is batch
    _, f, m = prepare_inputs(out, None, 0.0)
    at_truth, _ = similarity_loss(f[synth], m[synth], out.truth[synth], out.same_contrast[synth], "rigid", 2.5)
    at_zero, _ = similarity_loss(f[synth], m[synth], torch.zeros_like(out.truth[synth]), out.same_contrast[synth], "rigid", 2.5)
    assert at_truth < at_zero - 0.02  # MI between two synthetic contrasts still finds the truth
    _, f_ncc, m_ncc, same_ncc = training_inputs(batch, out, None, 0.0, "ncc")
    assert torch.equal(f_ncc, normalise_slices(batch.fixed)) and torch.equal(m_ncc, normalise_slices(batch.moving))
    assert same_ncc.all()
    with pytest.raises(Exception, match="--remap and --synth"):
        TrainConfig(data=["x"], out="o", holdout=["h"], remap=0.6, synth=0.5).validate()


def test_motion_curriculum_widens_the_ranges_linearly(tiny_data, monkeypatch):
    from RigidResNetRegistrationLib import geometry as geo
    from rrr_training import train as T
    from rrr_training.train import draw_training_batch, motion_ranges

    cfg = TrainConfig(data=["x"], out="o", holdout=["h"], max_rotation_deg=30, max_translation_mm=30, curriculum_steps=100,
                      size=32, spacing_mm=2.5, batch_size=64, flip=0.0, augment=0.0)
    assert motion_ranges(cfg, 0) == (5.0, 5.0)
    assert motion_ranges(cfg, 50) == pytest.approx((17.5, 17.5))
    assert motion_ranges(cfg, 100) == (30.0, 30.0) and motion_ranges(cfg, 1000) == (30.0, 30.0)
    assert motion_ranges(replace(cfg, curriculum_steps=0), 0) == (30.0, 30.0)  # none: the maximum from the start
    assert motion_ranges(replace(cfg, curriculum_start_rotation_deg=2, curriculum_start_translation_mm=10), 50) == pytest.approx((16.0, 20.0))
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    seen = []
    original = T.sample_pairs

    def recording(*args, **kwargs):
        b = original(*args, **kwargs)
        seen.append(geo.invert_params_2d(b.truth.double().numpy(), "rigid"))  # the motions drawn
        return b

    monkeypatch.setattr(T, "sample_pairs", recording)
    for step, limit in ((0, 5.0), (100, 30.0)):
        draw_training_batch(subj, np.random.default_rng(0), torch.Generator().manual_seed(0), cfg, step)
        motion = seen[-1]
        assert np.abs(motion[:, 0]).max() <= limit + 1e-9 and np.abs(motion[:, 1:]).max() <= limit + 1e-9
        assert np.abs(motion[:, 0]).max() > 0.8 * limit  # and spans it
    with pytest.raises(Exception, match="--curriculum-steps"):
        TrainConfig(data=["x"], out="o", holdout=["h"], curriculum_steps=-1).validate()


def test_compute_log_appends_on_resume_and_precision_is_chosen(tiny_data, tmp_path):
    """``OUT/compute.csv`` (the trainer's rows are checked in the resume test above): a fresh run
    starts the file, a resumed one appends its row; ``--precision`` bf16 trains under CPU
    autocast, fp32 without."""
    import csv

    from RigidResNetRegistrationLib.engine import resolve_precision
    from rrr_training import train as T

    cfg = _cfg(tiny_data, tmp_path)
    path = tmp_path / "compute.csv"
    T.ComputeLog(path, False, 0, torch.device("cpu"), "fp32", cfg, 1).update(5, 4)
    T.ComputeLog(path, True, 4, torch.device("cpu"), "bf16", cfg, 1).update(9, 8)
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step_start"], r["step_end"], r["saved_step"], r["precision"]) for r in rows] == [("0", "5", "4", "fp32"), ("4", "9", "8", "bf16")]
    T.ComputeLog(path, False, 0, torch.device("cpu"), "fp32", cfg, 1)  # a fresh run in the same folder starts again
    with open(path) as fh:
        assert len(list(csv.DictReader(fh))) == 1
    # the arithmetic: bf16 autocast around the network on the CPU, none for fp32
    used = []
    real = torch.autocast

    class Spy(real):
        def __init__(self, device_type, dtype=None, enabled=True, **kw):
            used.append((device_type, dtype, enabled))
            super().__init__(device_type, dtype=dtype, enabled=enabled, **kw)

    cfg = replace(cfg, precision="bf16")
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    net = ResNetRegressor(3)
    opt = torch.optim.AdamW(net.parameters())
    x, f, m, same = T.draw_training_batch(subj, np.random.default_rng(0), torch.Generator(), cfg, 0)
    T.torch.autocast = Spy
    try:
        T.optimisation_step(net, opt, torch.amp.GradScaler("cuda", enabled=False), x, f, m, same, cfg, torch.device("cpu"), "bf16")
        T.optimisation_step(net, opt, torch.amp.GradScaler("cuda", enabled=False), x, f, m, same, cfg, torch.device("cpu"), "fp32")
    finally:
        T.torch.autocast = real
    assert used == [("cpu", torch.bfloat16, True), ("cpu", torch.bfloat16, False)]
    assert T.training_precision("fp32", torch.device("cpu")) == "fp32"
    assert T.training_precision("auto", torch.device("cpu")) == (resolve_precision("auto", torch.device("cpu")) if T.CPU_AUTO_BF16 else "fp32")
    with pytest.raises(Exception, match="--precision"):
        TrainConfig(data=["x"], out="o", holdout=["h"], precision="fp16").validate()
    with pytest.raises(Exception, match="--orientations"):
        TrainConfig(data=["x"], out="o", holdout=["h"], orientations=["axial", "oblique"]).validate()


def test_trainer_command_line_takes_a_holdout_file_and_the_new_options(tiny_data, tmp_path):
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("# held out\ncase2 skull-stripped\n")
    out = tmp_path / "run"
    args = ["--data", str(tiny_data), "--holdout-file", str(holdout), "--out", str(out), "--size", "32", "--spacing-mm", "2.5",
            "--batch-size", "2", "--steps", "2", "--val-every", "2", "--val-pairs", "4", "--threads", "1", "--device", "cpu",
            "--orientations", "axial", "coronal", "--synth", "0.5", "--multi-contrast-share", "0.5", "--curriculum-steps", "10",
            "--max-rotation-deg", "30", "--max-translation-mm", "30", "--precision", "fp32"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["holdout"] == ["case2"] and config["orientations"] == ["axial", "coronal"] and config["synth"] == 0.5
    assert config["curriculum_steps"] == 10 and config["precision"] == "fp32"
    card = json.loads(export(out / "last.pt", tmp_path / "models", name="cli").read_text())
    assert card["training"]["orientations"] == ["axial", "coronal"] and card["training"]["curriculum"]["steps"] == 10
    assert main([a for a in args if a not in ("--holdout-file", str(holdout))]) == 2  # no hold-out named: one error line


def test_throughput_measures_each_precision_and_batch_size(tiny_data):
    from rrr_training.throughput import markdown_table, measure

    cfg = TrainConfig(data=[str(tiny_data)], out="", holdout=[], size=32, spacing_mm=2.5, synth=0.5, threads=1)
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    rows = [measure(cfg, subj, p, b, 1, 0, torch.device("cpu")) for p in ("fp32", "bf16") for b in (2, 4)]
    assert [(r.precision, r.batch_size) for r in rows] == [("fp32", 2), ("fp32", 4), ("bf16", 2), ("bf16", 4)]
    assert all(r.data_s > 0 and r.network_s > 0 and r.pairs_per_s == pytest.approx(r.batch_size / r.step_s) for r in rows)
    assert markdown_table(rows).count("\n") == 5


def test_evaluate_rows_pick_subjects_pairing_motion_and_synthetic_contrast(tiny_data, tmp_path, card_factory, capsys):
    """``rigid-resnet-evaluate --subjects-file --rows GROUP:PAIRING --motions``: one table, a row
    per (motion, row, passes), the subject group and motion named; ``synth`` pairs are two
    synthetic contrasts of one scan whose moving contrast is re-applied after each pass."""
    import rrr_training.evaluate as ev

    groups = tmp_path / "groups.txt"
    groups.write_text("case0 skull-stripped\ncase1 whole-head  # a comment\n")
    card = card_factory(size=32, spacing=2.5, bias=[0.0, 0.0, 0.0])
    args = ["--data", str(tiny_data), "--weights", str(card), "--subjects-file", str(groups), "--pairs", "6",
            "--rows", "skull-stripped:t1-t2", "whole-head:same", "whole-head:synth", "all:t1-t1", "--motions", "5/5", "30/30",
            "--iterations", "1", "2", "--device", "cpu", "--threads", "1"]
    capsys.readouterr()
    assert ev.main(args) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| subjects | motion (deg / mm) | pairs | passes |")
    rows = table[2:]
    assert len(rows) == 2 * 4 * 2
    assert sum("| +-30 / +-30 |" in r for r in rows) == 8 and sum("| whole-head |" in r for r in rows) == 8
    assert any("| whole-head | +-30 / +-30 | synthetic -> synthetic contrast | 2 | 6 |" in r for r in rows)
    assert "case2" not in printed.split("subjects")[1].splitlines()[0]  # only the listed subjects
    # the zero-output model leaves the motion as the error: +-30 errors exceed +-5 ones
    def median_rot(motion, pairing):
        row = next(r for r in rows if motion in r and pairing in r and "| 1 |" in r)
        return float(row.split("|")[6])

    assert median_rot("+-30 / +-30", "T1 -> T1") > 3 * median_rot("+-5 / +-5", "T1 -> T1")
    # synthetic pairs: both slices new contrasts; the moving contrast is the same whenever applied
    subj = [load_subject(s, (32, 32), 2.5) for s in find_subjects(tiny_data)]
    batch = sample_pairs(subj, np.random.default_rng(0), 4, (32, 32), 2.5, cross_contrast=0.0)
    synth, contrast = ev.synthetic_pairs(batch, 7)
    assert not synth.same_contrast.any() and not torch.allclose(synth.fixed, normalise_slices(batch.fixed), atol=0.05)
    assert torch.equal(contrast(batch.moving), contrast(batch.moving))
    assert not torch.allclose(contrast(batch.fixed), synth.fixed, atol=0.05)  # fixed and moving: two contrasts
    with pytest.raises(ValueError, match="pairing must be one of"):
        ev.parse_rows(["all:t1-pd"], set())
    with pytest.raises(ValueError, match="no subject group 'whole-head'"):
        ev.parse_rows(["whole-head:same"], {"skull-stripped"})
    with pytest.raises(ValueError, match="DEG/MM"):
        ev.parse_motion("30")


def test_known_transform_moves_the_anatomy_as_an_analytic_phantom_moves():
    """``sample.apply_known_transform`` (the evaluator's 6-DOF volumes): ``moving(truth(x)) =
    fixed(x)``, checked against the phantom sampled analytically at ``truth^-1 y`` (conftest), and
    not met by the inverse transform."""
    from RigidResNetRegistrationLib import geometry as geo
    from RigidResNetRegistrationLib.sample import apply_known_transform

    fixed = phantom_volume(shape=(40, 44, 36), seed=3, spacing=(2.0, 2.0, 2.0))
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    truth = geo.rigid_matrix_3d((6.0, -8.0, 10.0), (3.0, -2.0, 4.0), centre)
    made = apply_known_transform(fixed, truth)
    analytic = moved_copy(fixed, truth)
    wrong = moved_copy(fixed, geo.invert(truth))
    assert made.shape == fixed.shape and np.allclose(made.ijk_to_ras, fixed.ijk_to_ras)
    inner = (slice(4, -4),) * 3
    err = np.abs(made.array[inner] - analytic.array[inner]).mean()
    assert err < 0.25 * np.abs(made.array[inner] - wrong.array[inner]).mean()
    assert err < 0.05 * float(np.abs(fixed.array).max())


def test_evaluate_volumes_six_dof_without_refinement_by_group(tiny_data, tmp_path, card_factory, capsys, monkeypatch):
    """``rigid-resnet-evaluate --volumes N --volume-motion 6dof --volume-no-refine``: volume rows per
    subject group, named as 6-DOF and --no-refine, every registration made without the refinement;
    with a network that predicts nothing, what is left is the start's coarse search (which
    polishes its candidates at 6 mm): larger errors than the same command with the refinement."""
    import RigidResNetRegistrationLib.engine as engine
    import rrr_training.evaluate as ev

    refined: list[bool] = []
    real = engine.register_volumes
    monkeypatch.setattr(engine, "register_volumes",
                        lambda fixed, moving, model, opts, *a, **k: refined.append(opts.refine) or real(fixed, moving, model, opts, *a, **k))
    groups = tmp_path / "groups.txt"
    groups.write_text("case0 skull-stripped\ncase1 whole-head\n")
    card = card_factory(size=32, spacing=2.5, bias=[0.0, 0.0, 0.0])
    args = ["--data", str(tiny_data), "--weights", str(card), "--subjects-file", str(groups), "--pairs", "2",
            "--volumes", "2", "--volume-motion", "6dof", "--volume-no-refine", "--max-rotation-deg", "15",
            "--max-translation-mm", "15", "--iterations", "1", "--device", "cpu", "--threads", "1"]

    def volume_rows(argv: list[str]) -> list[str]:
        capsys.readouterr()
        assert ev.main(argv) == 0
        tables = capsys.readouterr().out.split("engine ms / volume")
        return [line for line in tables[1].splitlines() if line.startswith("| ") and "---" not in line]

    rows = volume_rows(args)
    assert len(rows) == 4  # 2 groups x (T1 -> T1, T1 -> T2 / FLAIR)
    assert all("+-15 / +-15 6-DOF" in r and ", --no-refine" in r and "| 2 |" in r for r in rows)
    assert {r.split("|")[1].strip() for r in rows} == {"skull-stripped", "whole-head"}
    assert len(refined) == 8 and not any(refined)
    refined.clear()
    with_refinement = volume_rows([a for a in args if a != "--volume-no-refine"])
    assert len(refined) == 8 and all(refined)
    assert not any("--no-refine" in r for r in with_refinement)
    rotation_medians = [sum(float(r.split("|")[6]) for r in table) for table in (rows, with_refinement)]  # summed over the rows
    assert rotation_medians[0] > 2 * rotation_medians[1], rotation_medians


def test_evaluate_slices_mode_rows_per_group_and_pairing(tiny_data, tmp_path, card_factory, capsys):
    """``rigid-resnet-evaluate --slices-mode N``: the engine's slices mode on scans with motion
    between slices, one row per (group, pairing) over every registered slice; a network that
    predicts nothing leaves each slice's own motion as its error."""
    import rrr_training.evaluate as ev

    groups = tmp_path / "groups.txt"
    groups.write_text("case0 skull-stripped\ncase1 whole-head\n")
    card = card_factory(size=32, spacing=2.5, bias=[0.0, 0.0, 0.0])
    args = ["--data", str(tiny_data), "--weights", str(card), "--subjects-file", str(groups), "--pairs", "2",
            "--slices-mode", "1", "--max-rotation-deg", "8", "--max-translation-mm", "8", "--device", "cpu", "--threads", "1"]
    capsys.readouterr()
    assert ev.main(args) == 0
    table = capsys.readouterr().out.split("engine ms / slice")[1]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r]
    # both groups have T1 and T2 on one grid: T1 -> T1, T1 -> T2 / FLAIR, T1 -> T2-like each
    assert len(rows) == 6 and {r.split("|")[1].strip() for r in rows} == {"skull-stripped", "whole-head"}
    assert sum("T2-like" in r for r in rows) == 2 and all("slices mode, motion between slices" in r for r in rows)
    slices = [int(r.split("|")[5]) for r in rows]
    assert all(s >= 3 for s in slices)
    assert all(float(r.split("|")[6]) > 0.5 for r in rows)  # median rotation error: the motions stay
