"""The per-slice refinement of ``slices`` mode (``refine.refine_slices``) and the batched Mattes MI
it optimises.

The moving volume is the embedded T1 sample moved by a known in-plane motion through the
resampler (itself checked against SimpleITK in ``test_itk_agreement``); the truth is that
motion, so a slice-frame convention error (sign of the angle, the order of rotation and
translation, which way the transform points) would show as an error of degrees or millimetres.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.engine import RegistrationCancelled, RegistrationOptions, register_volumes
from RigidResNetRegistrationLib.model import load_model
from RigidResNetRegistrationLib.preprocess import InputError, as_float_tensor
from RigidResNetRegistrationLib.refine import MIN_SLICE_POINTS, refine_slices
from RigidResNetRegistrationLib.sample import apply_known_motion, load_sample
from RigidResNetRegistrationLib.similarity import fixed_bins, mattes_mutual_information

MOTION = np.array([4.0, 3.0, -2.0])  # theta_deg, tx_mm, ty_mm (slice frame, resampling direction)
GRID = ((128, 128), 1.5)


@pytest.fixture(scope="module")
def scene():
    fixed = load_sample()
    moving, truth = apply_known_motion(fixed, MOTION)
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    return fixed, moving, truth, frame


@pytest.fixture(scope="module")
def start(scene):
    """12 slices through the brain, each started 0.3-1.5 deg / mm off the truth in its own way."""
    idx = np.linspace(40, 120, 12).astype(int)
    rng = np.random.default_rng(0)
    offsets = rng.uniform(0.3, 1.5, (len(idx), 3)) * rng.choice([-1.0, 1.0], (len(idx), 3))
    return idx, MOTION + offsets


def remap(volume: torch.Tensor) -> torch.Tensor:
    """A non-monotonic intensity map (another 'contrast'): rises to mid-range, then falls."""
    mid = float(volume.min() + 0.5 * (volume.max() - volume.min()))
    return torch.where(volume < mid, volume, 2 * mid - volume)


def test_the_truth_is_the_motion_in_the_slice_frame(scene):
    _, _, truth, frame = scene
    assert np.allclose(geo.ras_to_params(truth, frame), MOTION, atol=1e-9)
    assert np.allclose(frame.ex, [1, 0, 0]) and np.allclose(frame.ey, [0, 1, 0])  # axial, ex ~ R, ey ~ A


@pytest.mark.parametrize("metric", ["ncc", "mi"])
def test_each_slice_is_brought_to_its_truth(scene, start, metric):
    fixed, moving, _, frame = scene
    idx, params = start
    f, m = as_float_tensor(fixed), as_float_tensor(moving)
    m_in = remap(m) if metric == "mi" else m
    f_copy, m_copy = f.clone(), m_in.clone()
    res = refine_slices(f, fixed.ijk_to_ras, m_in, moving.ijk_to_ras, frame, idx, params, *GRID, metric=metric)
    truth = np.broadcast_to(MOTION, params.shape)
    rot0, trans0 = geo.params_error_2d(params, truth)
    rot, trans = geo.params_error_2d(res.params, truth)
    assert rot0.min() > 0.25 and trans0.min() > 0.4  # every slice starts visibly off
    assert rot.max() < 0.1 and trans.max() < 0.1, (rot, trans)
    assert np.median(rot) < 0.03 and np.median(trans) < 0.03
    assert res.improved.all() and res.metric == metric and res.steps == 20
    assert np.all(res.similarity_after > res.similarity_before)
    assert torch.equal(f, f_copy) and torch.equal(m_in, m_copy)  # inputs untouched
    assert np.array_equal(params, start[1])


def test_a_slice_at_its_truth_stays_there_and_the_slices_are_independent(scene, start):
    fixed, moving, _, frame = scene
    idx, params = start
    mixed = params.copy()
    mixed[::2] = MOTION  # every other slice starts at the truth
    f, m = as_float_tensor(fixed), as_float_tensor(moving)
    res = refine_slices(f, fixed.ijk_to_ras, m, moving.ijk_to_ras, frame, idx, mixed, *GRID)
    alone = refine_slices(f, fixed.ijk_to_ras, m, moving.ijk_to_ras, frame, idx[1::2], mixed[1::2], *GRID)
    rot, trans = geo.params_error_2d(res.params[::2], np.broadcast_to(MOTION, (len(idx[::2]), 3)))
    assert rot.max() < 0.05 and trans.max() < 0.05
    # a slice's result does not depend on which other slices are refined with it
    assert np.allclose(res.params[1::2], alone.params, atol=1e-5)


def test_slices_without_signal_keep_their_start_and_no_slice_gets_worse(scene, start):
    fixed, moving, _, frame = scene
    idx = np.array([0, 60, 90])  # slice 0: no brain (the sample's first axial slice is background)
    params = np.vstack([MOTION + 1.0, start[1][:2]])
    f, m = as_float_tensor(fixed), as_float_tensor(moving)
    res = refine_slices(f, fixed.ijk_to_ras, m, moving.ijk_to_ras, frame, idx, params, *GRID)
    assert not res.improved[0] and np.array_equal(res.params[0], params[0])
    assert np.isnan(res.similarity_before[0]) and np.isnan(res.similarity_after[0])
    assert res.improved[1:].all() and np.all(res.similarity_after[1:] >= res.similarity_before[1:])
    # too few points to refine also leaves a slice alone
    few = refine_slices(f, fixed.ijk_to_ras, m, moving.ijk_to_ras, frame, idx[1:2], params[1:2], (6, 6), 1.5)
    assert 6 * 6 < MIN_SLICE_POINTS and not few.improved.any() and np.array_equal(few.params, params[1:2])


def test_zero_steps_only_scores_the_start(scene, start):
    fixed, moving, _, frame = scene
    idx, params = start
    f, m = as_float_tensor(fixed), as_float_tensor(moving)
    res = refine_slices(f, fixed.ijk_to_ras, m, moving.ijk_to_ras, frame, idx, params, *GRID, steps=0)
    assert np.array_equal(res.params, params) and not res.improved.any() and res.steps == 0
    assert np.allclose(res.similarity_before, res.similarity_after)


@pytest.mark.parametrize("bad, message", [
    (dict(metric="ssd"), "metric must be"),
    (dict(params=np.zeros((3, 3))), "params must be (S, 3)"),
    (dict(params=np.full((12, 3), np.nan)), "params must be finite"),
    (dict(steps=-1), "steps must be"),
    (dict(max_points=10), "max_points"),
])
def test_bad_arguments_raise_value_errors(scene, start, bad, message):
    fixed, moving, _, frame = scene
    idx, params = start
    kw = dict(params=params, metric="ncc") | bad
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refine_slices(as_float_tensor(fixed), fixed.ijk_to_ras, as_float_tensor(moving), moving.ijk_to_ras, frame, idx,
                      kw.pop("params"), *GRID, **kw)


def test_cancel_raises_before_an_iteration(scene, start):
    fixed, moving, _, frame = scene
    idx, params = start
    polls = []
    with pytest.raises(RegistrationCancelled):
        refine_slices(as_float_tensor(fixed), fixed.ijk_to_ras, as_float_tensor(moving), moving.ijk_to_ras, frame, idx,
                      params, *GRID, cancel=lambda: polls.append(1) or len(polls) > 3)
    assert len(polls) == 4


def test_batched_mattes_mi_is_each_pair_alone_with_the_same_gradient():
    gen = torch.Generator().manual_seed(1)
    fixed = torch.rand((3, 500), generator=gen)
    moving = (0.6 * fixed + 0.4 * torch.rand((3, 500), generator=gen)).requires_grad_(True)
    weights = (torch.rand((3, 500), generator=gen) > 0.2).float()
    bins = fixed_bins(fixed, 16)
    batched = mattes_mutual_information(bins, moving, weights, 16)
    (grad_b,) = torch.autograd.grad(batched.sum(), moving)
    for b in range(3):
        single_in = moving.detach()[b].clone().requires_grad_(True)
        single = mattes_mutual_information(bins[b], single_in, weights[b], 16)
        (grad_s,) = torch.autograd.grad(single, single_in)
        assert single.dim() == 0 and torch.allclose(batched[b], single, atol=1e-6)
        assert torch.allclose(grad_b[b], grad_s, atol=1e-6)
    assert batched[0] > mattes_mutual_information(bins[0], torch.rand(500, generator=gen), weights[0], 16)


@pytest.fixture(scope="module")
def bundled():
    model = load_model(None, "cpu")
    if not model.card.trained:
        pytest.skip("the bundled model is an untrained placeholder")
    return model


class HalfStep:
    """The bundled model answering half of every motion: its passes stop short of the truth (by
    about half the last correction), so the per-slice refinement has something to close."""

    def __init__(self, model):
        self.model, self.card = model, model.card

    def __call__(self, pairs):
        return 0.5 * self.model(pairs)


def test_slices_mode_with_refine_slices_is_closer_per_slice(scene, bundled):
    fixed, moving, _, _ = scene
    base = RegistrationOptions(device="cpu", mode="slices", compute_registered=False, compute_difference=False)
    refine = RegistrationOptions(**{**base.__dict__, "refine_slices": True})
    plain = register_volumes(fixed, moving, bundled, base)
    refined = register_volumes(fixed, moving, bundled, refine)
    used = plain.used
    assert np.array_equal(used, refined.used) and used.sum() > 100
    truth = np.broadcast_to(MOTION, (int(used.sum()), 3))
    rot1, trans1 = geo.params_error_2d(refined.slice_params[used], truth)
    assert np.percentile(rot1, 90) < 0.05 and np.percentile(trans1, 90) < 0.05
    # a network that leaves each slice off: the refinement brings every slice closer
    short = HalfStep(bundled)
    short_plain = register_volumes(fixed, moving, short, base)
    short_refined = register_volumes(fixed, moving, short, refine)
    rot0, trans0 = geo.params_error_2d(short_plain.slice_params[used], truth)
    rot2, trans2 = geo.params_error_2d(short_refined.slice_params[used], truth)
    assert np.median(rot0) > 0.1 or np.median(trans0) > 0.1  # the plain passes really stop short
    assert np.median(rot2) < 0.5 * np.median(rot0) and np.median(trans2) < 0.5 * np.median(trans0)
    assert np.percentile(rot2, 90) < 0.05 and np.percentile(trans2, 90) < 0.05
    assert refined.refinement["scope"] == "slices" and refined.refinement["metric"] == "ncc"
    assert refined.refinement["slices_refined"] > 0.9 * used.sum() and "refine" in refined.timings
    assert refined.refinement["slices_moved_over_1"] == 0  # the network was already close on every slice
    assert plain.refinement is None  # off by default


def test_refine_slices_leaves_volume_mode_alone_and_must_be_a_bool(scene, bundled):
    fixed, moving, _, _ = scene
    out = register_volumes(fixed, moving, bundled, RegistrationOptions(device="cpu", refine_slices=True, refine=False,
                                                                       compute_registered=False, compute_difference=False))
    assert out.refinement is None and out.mode == "volume"
    with pytest.raises(InputError, match="refine_slices must be True or False"):
        RegistrationOptions(refine_slices="yes").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(scene, start):
    fixed, moving, _, frame = scene
    idx, params = start
    args = (frame, idx, params, *GRID)
    cpu = refine_slices(as_float_tensor(fixed), fixed.ijk_to_ras, as_float_tensor(moving), moving.ijk_to_ras, *args)
    gpu = refine_slices(as_float_tensor(fixed, "cuda"), fixed.ijk_to_ras, as_float_tensor(moving, "cuda"), moving.ijk_to_ras, *args)
    rot, trans = geo.params_error_2d(gpu.params, cpu.params)
    assert rot.max() < 0.01 and trans.max() < 0.01


def test_a_moving_volume_on_another_grid_gives_the_same_answer(scene, start):
    """The moving volume stored LPS-flipped, at 1.25 mm and turned 20 degrees about S: the refinement
    reads it through its own header, so the slice-frame answer is the same motion."""
    from RigidResNetRegistrationLib.resample import resample_volume

    fixed, moving, _, frame = scene
    idx, params = start
    c, s = np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0))
    other = np.diag([-1.25, -1.25, 1.25, 1.0])  # i -> L, j -> P
    other[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ other[:3, :3]
    shape = (170, 170, 130)
    centre = geo.volume_centre_ras(moving.ijk_to_ras, moving.shape)
    other[:3, 3] = centre - other[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    regridded = resample_volume(as_float_tensor(moving), moving.ijk_to_ras, shape, other)
    res = refine_slices(as_float_tensor(fixed), fixed.ijk_to_ras, regridded, other, frame, idx, params, *GRID)
    rot, trans = geo.params_error_2d(res.params, np.broadcast_to(MOTION, params.shape))
    assert rot.max() < 0.1 and trans.max() < 0.1, (rot, trans)


def test_slices_the_similarity_moves_far_from_the_network_are_counted(scene):
    """A network that answers 2 deg / 2 mm off on every slice: the refinement brings the slices to
    the motion and reports how many it moved more than 1 deg / 1 mm from the network's estimate."""
    from conftest import ConstantPredictor

    from RigidResNetRegistrationLib.model import ModelCard

    fixed, moving, _, _ = scene
    card = ModelCard.from_dict({"name": "oracle", "transform": "rigid", "input": {"size": [128, 128], "spacing_mm": 1.5}})
    off = geo.compose_params_2d(np.array([2.0, 2.0, -2.0]), MOTION)  # MOTION, then 2 deg / 2.8 mm more
    opts = dict(device="cpu", iterations=1, refine=False, compute_registered=False, compute_difference=False)
    first = register_volumes(fixed, moving, ConstantPredictor(card, off), RegistrationOptions(**opts))
    n_common, n_used = int(first.used.sum()), int(first.informative.sum())
    # slices mode: the common motion answered `off`, then every slice's own pass answered "no more motion"
    answers = np.vstack([np.tile(off, (n_common, 1)), np.zeros((n_used, 3))])
    opts["mode"] = "slices"
    plain = register_volumes(fixed, moving, ConstantPredictor(card, answers), RegistrationOptions(**opts))
    refined = register_volumes(fixed, moving, ConstantPredictor(card, answers), RegistrationOptions(**opts, refine_slices=True))
    used = refined.used
    rot0, _ = geo.params_error_2d(plain.slice_params[used], np.broadcast_to(MOTION, (int(used.sum()), 3)))
    rot, trans = geo.params_error_2d(refined.slice_params[used], np.broadcast_to(MOTION, (int(used.sum()), 3)))
    assert np.median(rot0) > 1.0 and np.median(rot) < 0.1 and np.median(trans) < 0.1
    far = refined.refinement["slices_moved_over_1"]
    assert 0.9 * used.sum() <= far <= used.sum()
