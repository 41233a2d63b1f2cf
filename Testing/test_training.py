"""The trainer: dataset discovery, losses, a few steps learn, resume, export round trip."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import phantom_volume
from PIL import Image

from RigidResNetRegistrationLib.model import ResNetRegressor, load_model
from rrr_training.data import contrast_of, find_subjects, load_subject, sample_pairs
from rrr_training.losses import similarity_loss
from rrr_training.train import TrainConfig, export, prepare_inputs, train


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
    train(_cfg(tiny_data, interrupted), stop_after=4)
    assert torch.load(interrupted / "last.pt", weights_only=True)["step"] == 4
    train(_cfg(tiny_data, interrupted), resume=True)
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(interrupted / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert len(list(open(interrupted / "log.csv"))) == 1 + 3  # header + validations at 2, 4, 6
    assert (straight / "curves.png").stat().st_size > 0

    card_path = export(straight / "best.pt", tmp_path / "models", name="tiny")
    card = json.loads(card_path.read_text())
    assert card["trained"] and card["input"] == {**card["input"], "size": [32, 32], "spacing_mm": 2.5}
    model = load_model(card_path, "cpu")
    ref = ResNetRegressor(3)
    ref.load_state_dict(torch.load(straight / "best.pt", weights_only=True)["model"])
    x = torch.rand(3, 2, 32, 32)
    assert torch.allclose(model(x), ref.eval()(x), atol=2e-2 + 2e-2 * ref(x).abs().max().item())  # fp16 weights
