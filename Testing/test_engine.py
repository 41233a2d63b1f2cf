"""The registration engine: oracle recovery, batching, skipped slices, outliers, modes, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ConstantPredictor, moved_copy, phantom_volume

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.engine import (
    REFINE_PASS_TOLERANCE,
    SLICE_PASS_TOLERANCE,
    RegistrationCancelled,
    RegistrationOptions,
    register_volumes,
    robust_combine,
)
from RigidResNetRegistrationLib.model import ModelCard, ModelError, load_model, resolve_device
from RigidResNetRegistrationLib.preprocess import InputError, Volume

CARD = ModelCard.from_dict({"name": "oracle", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0}})
TRUTH = np.array([4.0, 3.0, -2.0])


def _case(**grid):
    fixed = phantom_volume(shape=(44, 50, 30), **grid)
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    truth = geo.params_to_ras(TRUTH, frame)
    return fixed, moved_copy(fixed, truth), truth, frame


@pytest.mark.parametrize("grid", [dict(codes="RAS"), dict(codes="LPS", spacing=(1.8, 2.2, 3.0)),
                                  dict(codes="SRA", rotation_deg=(0, 5, 0))])
def test_oracle_parameters_give_the_exact_transform_and_align_the_images(grid):
    fixed, moving, truth, frame = _case(**grid)
    fixed_before, moving_before = fixed.array.copy(), moving.array.copy()
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert np.allclose(result.fixed_to_moving_ras, truth, atol=1e-9)
    assert np.allclose(result.moving_to_fixed_ras @ truth, np.eye(4), atol=1e-9)
    err_before = np.abs(moving.array - fixed.array).mean()
    err_after = np.abs(result.registered.array - fixed.array).mean()
    assert err_after < 0.15 * err_before
    assert result.similarity["ncc_after"] > result.similarity["ncc_before"]
    assert result.similarity["mi_after"] > result.similarity["mi_before"]
    assert result.difference.array.mean() < np.abs(moving.array - fixed.array).mean() / fixed.array.max()
    # inputs untouched
    assert np.array_equal(fixed.array, fixed_before) and np.array_equal(moving.array, moving_before)


def test_iterations_compose_in_the_right_order():
    """Two passes whose estimates compose to the truth must give the truth: first pass returns
    A, the second (seeing moving re-warped by A) returns D with A o D = truth."""
    fixed, moving, truth, frame = _case()
    first = np.array([1.5, 1.0, 0.5])
    second = geo.compose_params_2d(TRUTH, geo.invert_params_2d(first))  # D = A^-1 o truth -> A o D = truth
    n_used = register_volumes(fixed, moving, ConstantPredictor(CARD, first), RegistrationOptions(device="cpu", iterations=1, refine=False)).used.sum()
    params = np.vstack([np.repeat(first[None], n_used, 0), np.repeat(second[None], n_used, 0)])
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, params), RegistrationOptions(device="cpu", iterations=2, refine=False))
    assert np.allclose(result.fixed_to_moving_ras, truth, atol=1e-9)


def test_batching_gives_the_same_result_as_one_slice_at_a_time(card_factory):
    model = load_model(card_factory(seed=3), "cpu")
    fixed, moving, _, _ = _case()
    one = register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", iterations=1, refine=False, batch_size=1, compute_registered=False))
    many = register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", iterations=1, refine=False, batch_size=13, compute_registered=False))
    assert np.abs(one.slice_params).max() > 0.01  # a real, input-dependent prediction
    assert np.allclose(one.slice_params, many.slice_params, atol=1e-4)
    assert np.allclose(one.fixed_to_moving_ras, many.fixed_to_moving_ras, atol=1e-5)


def test_empty_slices_are_skipped_and_never_predicted():
    fixed, moving, _, frame = _case()
    arr = fixed.array.copy()
    arr[..., :6] = 0.0  # no signal in the first 6 axial slices (axis 2 for RAS)
    arr[..., -4:] = 0.0
    fixed = Volume(arr, fixed.ijk_to_ras, "fixed")
    oracle = ConstantPredictor(CARD, TRUTH)
    result = register_volumes(fixed, moving, oracle, RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert frame.axis == 2
    assert not result.used[:6].any() and not result.used[-4:].any()
    assert oracle.seen == result.used.sum() < fixed.shape[2] - 10 + 1
    assert np.isnan(result.similarity_slices["ncc_after"][0])


def test_volume_mode_rejects_outlier_slices():
    fixed, moving, truth, _ = _case()
    n_used = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False, max_slices=16)).used.sum()
    params = np.repeat(TRUTH[None], n_used, 0) + np.random.default_rng(0).normal(0, 0.02, (n_used, 3))
    bad = [2, 7, 11]
    params[bad] = [[25.0, -30.0, 12.0], [-40.0, 9.0, 9.0], [4.0, 3.0, 30.0]]
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, params), RegistrationOptions(device="cpu", iterations=1, refine=False, max_slices=16))
    used_idx = np.flatnonzero(result.used)
    assert not result.inlier[used_idx[bad]].any()
    assert result.inlier.sum() == n_used - 3
    rot, trans = geo.rigid_error(result.fixed_to_moving_ras, truth, geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape))
    assert rot < 0.05 and trans < 0.05
    # a plain mean would have been pulled far off
    assert abs(params[:, 0].mean() - TRUTH[0]) > 0.2


def test_robust_combine_all_outliers_falls_back_to_all():
    p = np.array([[0.0, 0, 0], [10.0, 0, 0]])
    combined, inlier = robust_combine(p, floor=0.1)
    assert inlier.all() and np.allclose(combined, [5.0, 0, 0])


def _slices_mode_counts(fixed, moving):
    """(slices registered in slices mode, slices of its common-motion stage) for a case."""
    n_used = int(register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH),
                                  RegistrationOptions(device="cpu", iterations=1, refine=False)).informative.sum())
    n_bulk = int(register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH),
                                  RegistrationOptions(device="cpu", iterations=1, refine=False, max_slices=8)).used.sum())
    return n_used, n_bulk


def test_slices_mode_keeps_one_transform_per_slice():
    """Slices mode: first the common motion from a few slices, then each slice's own residual
    from there; the result for slice s is common o residual_s."""
    fixed, moving, truth, frame = _case()
    n_used, n_bulk = _slices_mode_counts(fixed, moving)
    params = np.repeat(TRUTH[None], n_used, 0)
    params[:, 0] += np.linspace(-2, 2, n_used)  # motion varying through the scan
    residual = geo.compose_params_2d(params, geo.invert_params_2d(TRUTH))  # TRUTH o residual_s = params_s
    queue = np.vstack([np.repeat(TRUTH[None], n_bulk, 0), residual])
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, queue), RegistrationOptions(device="cpu", iterations=1, refine=False, mode="slices"))
    assert np.allclose(result.slice_params[result.used], params)
    # skipped slices take the robust volume estimate
    assert np.allclose(result.slice_params[~result.used], result.params)
    # each registered slice was resampled with its own transform
    s = int(np.flatnonzero(result.used)[0])
    ref = register_volumes(fixed, moving, ConstantPredictor(CARD, params[0]), RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert np.allclose(result.registered.array[..., s], ref.registered.array[..., s], atol=1e-4)
    assert not np.allclose(result.registered.array[..., -s - 1], ref.registered.array[..., -s - 1], atol=1e-2)


def test_slices_mode_predicts_each_slice_once_when_the_common_motion_explains_it():
    """With the common motion right, every slice's first residual is ~0: no slice is predicted
    twice (2 passes of the common stage, then one over all slices)."""
    fixed, moving, truth, frame = _case()
    n_used, n_bulk = _slices_mode_counts(fixed, moving)
    queue = np.vstack([np.repeat(TRUTH[None], n_bulk, 0), np.zeros((n_bulk + n_used, 3))])
    oracle = ConstantPredictor(CARD, queue)
    result = register_volumes(fixed, moving, oracle, RegistrationOptions(device="cpu", iterations=6, refine=False, mode="slices"))
    assert oracle.seen == 2 * n_bulk + n_used
    assert result.passes == 3
    assert np.allclose(result.slice_params[result.used], TRUTH)


def test_slices_mode_common_stage_stops_at_the_slice_tolerance():
    """The common motion is only where every slice starts (each is then corrected on its own, and
    predicted again from SLICE_PASS_TOLERANCE up): its passes stop there too, not at the finer
    ``tolerance``."""
    fixed, moving, truth, frame = _case()
    n_used, n_bulk = _slices_mode_counts(fixed, moving)
    second = np.array([0.8 * SLICE_PASS_TOLERANCE, 0.5, -0.5])  # above tolerance=0.2, below the slice tolerance
    queue = np.vstack([np.repeat(TRUTH[None], n_bulk, 0), np.repeat(second[None], n_bulk, 0), np.zeros((2 * n_bulk + n_used, 3))])
    oracle = ConstantPredictor(CARD, queue)
    result = register_volumes(fixed, moving, oracle, RegistrationOptions(device="cpu", iterations=6, tolerance=0.2, refine=False, mode="slices"))
    assert oracle.seen == 2 * n_bulk + n_used and result.passes == 3
    assert np.allclose(result.slice_params[result.used], geo.compose_params_2d(second, TRUTH))


def test_slices_mode_repredicts_only_slices_still_moving():
    """A slice whose first residual is above the tolerance is predicted again; the others not."""
    fixed, moving, truth, frame = _case()
    n_used, n_bulk = _slices_mode_counts(fixed, moving)
    first = np.zeros((n_used, 3))
    first[3] = [3.0, 0.0, 1.0]  # slice 3 of the registered ones moved on its own (above the 2 deg tolerance)
    queue = np.vstack([np.repeat(TRUTH[None], n_bulk, 0), np.zeros((n_bulk, 3)), first, [[0.05, 0.0, 0.0]]])
    oracle = ConstantPredictor(CARD, queue)
    result = register_volumes(fixed, moving, oracle, RegistrationOptions(device="cpu", iterations=6, refine=False, mode="slices"))
    assert oracle.seen == 2 * n_bulk + n_used + 1
    rows = result.slice_params[result.used]
    expected = geo.compose_params_2d(np.array([0.05, 0.0, 0.0]), geo.compose_params_2d(first[3], TRUTH))
    assert np.allclose(rows[3], expected)
    assert np.allclose(np.delete(rows, 3, axis=0), TRUTH)


def test_cancel_raises_and_progress_reports():
    fixed, moving, _, _ = _case()
    seen = []
    register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False),
                     progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(RegistrationCancelled):
        register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False), cancel=lambda: True)


def test_bad_options_and_inputs_raise_clear_errors():
    fixed, moving, _, _ = _case()
    oracle = ConstantPredictor(CARD, TRUTH)
    with pytest.raises(InputError, match="mode must be"):
        register_volumes(fixed, moving, oracle, RegistrationOptions(mode="slab", iterations=1, refine=False))
    with pytest.raises(InputError, match="batch size"):
        register_volumes(fixed, moving, oracle, RegistrationOptions(batch_size=0))
    with pytest.raises(InputError, match="moving.*NaN"):
        bad = moving.array.copy()
        bad[3, 3, 3] = np.nan
        register_volumes(fixed, Volume(bad, moving.ijk_to_ras, "moving"), oracle)
    with pytest.raises(InputError, match="fixed.*constant"):
        register_volumes(Volume(np.ones(fixed.shape, np.float32), fixed.ijk_to_ras, "fixed"), moving, oracle)
    with pytest.raises(InputError, match="3D scalar"):
        register_volumes(Volume(np.zeros((4, 4, 4, 3), np.float32), fixed.ijk_to_ras, "fixed"), moving, oracle)
    tiny = phantom_volume(shape=(8, 8, 6), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="too small for the network grid"):
        register_volumes(Volume(tiny.array, tiny.ijk_to_ras, "fixed"), moving, oracle)
    far = moving.ijk_to_ras.copy()
    far[:3, 3] += 5000.0
    with pytest.raises(InputError, match="do not overlap"):  # with the headers as they are (other starts align them)
        register_volumes(fixed, Volume(moving.array, far, "moving"), oracle, RegistrationOptions(init="header"))


def test_device_selection(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ModelError, match="CUDA was requested but is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    with pytest.raises(ModelError, match="device must be"):
        resolve_device("tpu")


def test_cuda_requested_without_cuda_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fixed, moving, _, _ = _case()
    with pytest.raises(InputError, match="CUDA"):
        register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(card_factory):  # pragma: no cover - runs only where a GPU exists
    card = card_factory(seed=3)
    fixed, moving, _, _ = _case()
    cpu = register_volumes(fixed, moving, load_model(card, "cpu"), RegistrationOptions(device="cpu", iterations=1, refine=False))
    gpu = register_volumes(fixed, moving, load_model(card, "cuda"), RegistrationOptions(device="cuda"))
    assert gpu.device.startswith("cuda")
    assert np.allclose(cpu.fixed_to_moving_ras, gpu.fixed_to_moving_ras, atol=1e-3)


def test_two_runs_give_identical_transforms(card_factory):
    model = load_model(card_factory(seed=4), "cpu")
    fixed, moving, _, _ = _case()
    a = register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", iterations=1, refine=False, compute_registered=False))
    b = register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", iterations=1, refine=False, compute_registered=False))
    assert np.array_equal(a.fixed_to_moving_ras, b.fixed_to_moving_ras)


def test_integer_voxel_types_do_not_overflow():
    fixed, moving, truth, _ = _case()
    scale = 60000.0 / fixed.array.max()
    f16 = Volume((fixed.array * scale).astype(np.uint16), fixed.ijk_to_ras, "fixed")
    m64 = Volume((moving.array * scale).astype(np.int64) * 10**9, moving.ijk_to_ras, "moving")
    result = register_volumes(f16, m64, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert np.allclose(result.fixed_to_moving_ras, truth)
    assert result.similarity["ncc_after"] > result.similarity["ncc_before"] > 0


# --------------------------------------------------------------------------- speed paths


def test_volume_mode_registers_max_slices_spread_over_the_brain():
    fixed, moving, truth, frame = _case()
    counter = ConstantPredictor(CARD, TRUTH)
    result = register_volumes(fixed, moving, counter, RegistrationOptions(device="cpu", iterations=2, max_slices=5, refine=False))
    used = np.flatnonzero(result.used)
    informative = np.flatnonzero(result.informative)
    assert len(used) == 5 and counter.seen == 10  # 5 slices, 2 passes (refinement off: a first pass never converges)
    assert set(used) <= set(informative)
    # spread: the picks span most of the informative range, not one end of it
    assert used.max() - used.min() >= 0.5 * (informative.max() - informative.min())
    every = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False, max_slices=0))
    assert np.array_equal(every.used, every.informative) and every.used.sum() > 5
    # slices mode ignores max_slices: every informative slice gets its own transform
    per_slice = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False, mode="slices", max_slices=3))
    assert np.array_equal(per_slice.used, per_slice.informative)


def test_select_slices_prefers_the_bulk_of_the_brain():
    from RigidResNetRegistrationLib.preprocess import SliceSurvey, select_slices

    fg = np.r_[np.zeros(5), np.linspace(0.06, 0.6, 10), np.full(20, 0.6), np.linspace(0.6, 0.06, 10), np.zeros(5)]
    survey = SliceSurvey(None, fg, fg, fg >= 0.05)
    picks = select_slices(survey, 6)
    assert len(picks) == 6 and np.all(np.diff(picks) > 0)
    assert np.all(fg[picks] >= 0.3)  # bulk: at least half the largest overlap
    assert np.array_equal(select_slices(survey, 0), np.flatnonzero(fg >= 0.05))


def test_bf16_precision_stays_close_to_fp32(card_factory):
    fixed, moving, truth, frame = _case()
    model = load_model(card_factory(seed=3), "cpu")
    runs = {p: register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", iterations=1, refine=False, precision=p)) for p in ("fp32", "bf16")}
    assert runs["bf16"].precision == "bf16" and runs["fp32"].precision == "fp32"
    assert not np.array_equal(runs["bf16"].slice_params, runs["fp32"].slice_params)  # really computed in bf16
    assert np.allclose(runs["bf16"].params, runs["fp32"].params, atol=0.05)
    with pytest.raises(InputError, match="precision must be"):
        register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", precision="fp8"))


class _MemoryHungry(ConstantPredictor):
    """Raises out-of-memory for batches larger than ``limit`` (``limit`` 0: always)."""

    def __init__(self, card, params, limit):
        super().__init__(card, params)
        self.limit, self.sizes = limit, []

    def __call__(self, pairs):
        self.sizes.append(pairs.shape[0])
        if pairs.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().__call__(pairs)


def test_out_of_memory_retries_with_smaller_batches_then_says_so():
    fixed, moving, truth, frame = _case()
    messages = []
    hungry = _MemoryHungry(CARD, TRUTH, limit=3)
    opts = RegistrationOptions(device="cpu", iterations=1, refine=False, batch_size=16, max_slices=0)
    result = register_volumes(fixed, moving, hungry, opts, progress=lambda f, m: messages.append(m))
    assert np.allclose(result.fixed_to_moving_ras, truth, atol=1e-9)
    assert max(s for s in hungry.sizes if s <= 3) == 2 and hungry.sizes[:3] == [16, 8, 4]
    assert any("retrying with 8 slices per batch" in m for m in messages)
    with pytest.raises(RuntimeError, match="even with one slice pair per batch"):
        register_volumes(fixed, moving, _MemoryHungry(CARD, TRUTH, limit=0), opts)


def test_passes_stop_once_a_correction_is_below_the_tolerance():
    fixed, moving, truth, frame = _case()
    n = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False)).used.sum()
    corrections = [TRUTH, [0.5, 0.0, 0.3], [0.15, 0.1, -0.1], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    queue = np.vstack([np.repeat(np.asarray(c, dtype=float)[None], n, 0) for c in corrections])
    stopped = register_volumes(fixed, moving, ConstantPredictor(CARD, queue), RegistrationOptions(device="cpu", iterations=6, tolerance=0.2, refine=False))
    assert stopped.passes == 3  # the third correction (0.15 deg, 0.14 mm) is below 0.2
    expected = geo.compose_params_2d(np.array(corrections[2]), geo.compose_params_2d(np.array(corrections[1]), TRUTH))
    assert np.allclose(stopped.params, expected, atol=1e-9)
    every = register_volumes(fixed, moving, ConstantPredictor(CARD, queue), RegistrationOptions(device="cpu", iterations=6, tolerance=0.0, refine=False))
    assert every.passes == 6 and np.allclose(every.params, expected, atol=1e-9)  # later passes corrected nothing
    capped = register_volumes(fixed, moving, ConstantPredictor(CARD, queue), RegistrationOptions(device="cpu", iterations=2, tolerance=0.2, refine=False))
    assert capped.passes == 2


def test_with_the_refinement_on_passes_stop_at_its_looser_tolerance_the_first_included():
    fixed, moving, truth, frame = _case()
    n = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False)).used.sum()

    def passes(corrections, refine):
        queue = np.vstack([np.repeat(np.asarray(c, dtype=float)[None], n, 0) for c in corrections])
        opts = RegistrationOptions(device="cpu", iterations=6, tolerance=0.2, refine=refine)
        return register_volumes(fixed, moving, ConstantPredictor(CARD, queue), opts).passes

    small = [TRUTH, [0.5, 0.0, 0.3]] + [[0.0, 0.0, 0.0]] * 4  # first correction 4 deg / 3.6 mm
    assert max(abs(TRUTH[0]), np.hypot(*TRUTH[1:])) < REFINE_PASS_TOLERANCE
    assert passes(small, refine=True) == 1  # within the refinement's reach at once
    assert passes(small, refine=False) == 3  # a first pass never counts as converged without it
    big = [[REFINE_PASS_TOLERANCE + 2.0, 1.0, 0.0], [-(REFINE_PASS_TOLERANCE - 1.0), 2.0, -2.0],
           [0.5, 0.0, 0.0]] + [[0.0, 0.0, 0.0]] * 3
    assert passes(big, refine=True) == 2  # the second correction (9 deg) is below the tolerance


def test_passes_a_refinement_follows_use_the_coarse_network_alone(card_factory, monkeypatch):
    """A card with a fine stage and mirror averaging: volume mode with its refinement predicts with
    the first network alone (the refinement does the last fraction of a degree); without the
    refinement, and in slices mode, every pass uses the fine stage and the mirror as well."""
    import json

    from conftest import add_fine_stage
    from RigidResNetRegistrationLib.model import LoadedModel

    fine = card_factory(bias=[0.25, -0.5, 0.75], name="fine", size=48, spacing=2.0)
    card = add_fine_stage(card_factory(bias=[1.0, 1.0, 1.0], name="coarse", size=48, spacing=2.0), fine)
    card.write_text(json.dumps({**json.loads(card.read_text()), "mirror": True}))
    model = load_model(card, "cpu")
    assert model.coarse.fine is None and not model.coarse.card.mirror and model.coarse.network is model.network
    x = torch.rand(2, 2, 48, 48)
    assert torch.allclose(model.coarse(x), torch.tensor([[1.0, 1.0, 1.0]] * 2), atol=2e-3)
    plain = load_model(card_factory(seed=2, name="plain", size=48, spacing=2.0), "cpu")
    assert plain.coarse is plain
    calls = []
    original = LoadedModel.__call__

    def spy(self, pairs):
        calls.append((self.fine is not None, self.card.mirror))
        return original(self, pairs)

    monkeypatch.setattr(LoadedModel, "__call__", spy)
    fixed, moving, truth, frame = _case()
    for options, used in ((RegistrationOptions(device="cpu", iterations=2), {(False, False)}),
                          (RegistrationOptions(device="cpu", iterations=2, refine=False), {(True, True)}),
                          (RegistrationOptions(device="cpu", iterations=2, mode="slices"), {(True, True)})):
        calls.clear()
        register_volumes(fixed, moving, model, options)
        assert calls and set(calls) == used, options


# --------------------------------------------------------------------------- refinement and quality control


def test_refinement_polishes_an_imperfect_network_estimate_to_the_truth():
    fixed, moving, truth, frame = _case()
    off = TRUTH + np.array([0.6, -0.5, 0.4])  # a network that is 0.6 deg / 0.6 mm off
    raw = register_volumes(fixed, moving, ConstantPredictor(CARD, off), RegistrationOptions(device="cpu", iterations=1, refine=False))
    refined = register_volumes(fixed, moving, ConstantPredictor(CARD, off), RegistrationOptions(device="cpu", iterations=1))
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    raw_rot, raw_trans = geo.rigid_error(raw.fixed_to_moving_ras, truth, centre)
    rot, trans = geo.rigid_error(refined.fixed_to_moving_ras, truth, centre)
    assert raw_rot > 0.5 and raw.refinement is None
    assert rot < 0.1 and trans < 0.05, (rot, trans)  # the 2 mm phantom is aliased: real data in the benchmark
    assert refined.refinement["metric"] == "ncc"  # same contrast: the aligned slices correlate
    assert np.allclose(refined.network_fixed_to_moving_ras, raw.fixed_to_moving_ras)
    assert refined.similarity["ncc_after"] > raw.similarity["ncc_after"]
    assert not refined.likely_failed


def test_refinement_recovers_out_of_plane_motion_the_network_cannot_see():
    fixed = phantom_volume(shape=(44, 50, 30))
    centre = geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
    truth = geo.rigid_matrix_3d((2.5, -2.0, 3.0), (1.5, -1.0, 2.0), centre)  # rotations about R, A and S
    moving = moved_copy(fixed, truth)
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    in_plane = geo.ras_to_params(truth, frame)  # all a slice-wise network could report
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, in_plane), RegistrationOptions(device="cpu", iterations=1))
    rot, trans = geo.rigid_error(result.fixed_to_moving_ras, truth, centre)
    before = geo.rigid_error(result.network_fixed_to_moving_ras, truth, centre)
    assert before[0] > 2.0  # the network's in-plane estimate misses the tilt
    # a small 30-slice 2 mm phantom whose NCC optimum is flat at this scale: started from the truth itself,
    # the refinement ends 0.19-0.29 deg away (and 0.31-0.36 deg from the network's start, depending on the
    # CPU's float kernels: AVX2 vs AVX-512). Real volumes are measured in the benchmark (0.02 deg)
    assert rot < 0.5 and trans < 0.1, (rot, trans)


def test_refinement_uses_mutual_information_across_contrasts():
    fixed, moving, truth, frame = _case()
    inverted = Volume(moving.array.max() - moving.array + 0.2 * moving.array ** 2 / moving.array.max(), moving.ijk_to_ras, "other contrast")
    off = TRUTH + np.array([0.5, 0.4, -0.4])
    result = register_volumes(fixed, inverted, ConstantPredictor(CARD, off), RegistrationOptions(device="cpu", iterations=1))
    assert result.refinement["metric"] == "mi"
    rot, trans = geo.rigid_error(result.fixed_to_moving_ras, truth, geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape))
    assert rot < 0.15 and trans < 0.15, (rot, trans)


def test_quality_control_flags_a_confident_wrong_answer():
    fixed, moving, truth, frame = _case()
    wrong = register_volumes(fixed, moving, ConstantPredictor(CARD, -TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert wrong.verdict == "failed" and wrong.likely_failed
    assert any("not at a similarity optimum" in w for w in wrong.warnings)
    right = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert right.verdict == "ok" and not right.likely_failed and right.warnings == []
    # slices that disagree: half the slices report another motion; the combined transform is off
    n = int(right.used.sum())
    split = np.repeat(TRUTH[None], n, 0)
    split[::2] = [-8.0, 6.0, -6.0]
    torn = register_volumes(fixed, moving, ConstantPredictor(CARD, split), RegistrationOptions(device="cpu", iterations=1, refine=False))
    assert torn.quality.signals.run.slices_agree < 0.5  # recorded
    assert torn.verdict == "failed" and torn.warnings


def test_a_refinement_that_makes_the_slices_less_similar_is_rejected(monkeypatch):
    """Quality control of the refinement by an independent measure (slice MI): a refinement that
    claims success but moves away from the alignment is not returned."""
    from RigidResNetRegistrationLib import engine
    from RigidResNetRegistrationLib.refine import RefineResult

    fixed, moving, truth, frame = _case()

    def bad_refinement(fixed_t, fixed_ijk, moving_t, moving_ijk, initial, **kw):
        wrong = initial @ geo.rigid_matrix_3d((6.0, 0.0, 0.0), (0.0, 4.0, 0.0), geo.volume_centre_ras(fixed_ijk, fixed_t.shape))
        return RefineResult(wrong, kw.get("metric", "ncc"), 0.5, 0.9, 10, 0.01)

    monkeypatch.setattr(engine, "refine_rigid", bad_refinement)
    result = register_volumes(fixed, moving, ConstantPredictor(CARD, TRUTH), RegistrationOptions(device="cpu", iterations=1))
    assert np.allclose(result.fixed_to_moving_ras, truth, atol=1e-9)  # the network's transform is kept
    assert result.refinement["rejected"] and any("refinement was rejected" in w for w in result.warnings)
    assert result.verdict == "suspicious" and result.quality.signals.run.refine_rejected


class _BiasedByContent:
    """A fake network that reads the motion right but adds an error depending on the content,
    whatever the order of the pair: theta = (mean(moving) - mean(fixed)) * 10 + 0.3 + 2 * mean(fixed * moving)."""

    card = CARD

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor:
        f, m = pairs[:, 0].flatten(1), pairs[:, 1].flatten(1)
        theta = (m.mean(1) - f.mean(1)) * 10 + 0.3 + 2 * (f * m).mean(1)
        return torch.stack([theta, torch.zeros_like(theta), torch.zeros_like(theta)], 1)


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_symmetric_prediction_predicts_each_pair_swapped_and_cancels_order_independent_errors(batch_size):
    """Each pair is predicted as (fixed, moving) and as (moving, fixed) and the two are combined:
    the part of the answer that does not change sign with the order (here 0.3 + 2 mean(f m)) is
    gone, the motion part (odd in the order) is kept, whatever the batch size."""
    from RigidResNetRegistrationLib.engine import predict_parameters
    from RigidResNetRegistrationLib.preprocess import normalise_slices

    gen = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(7, 48, 48, generator=gen), torch.rand(7, 48, 48, generator=gen) ** 2
    f, m = normalise_slices(fixed), normalise_slices(moving)
    motion = ((m.flatten(1).mean(1) - f.flatten(1).mean(1)) * 10).double().numpy()
    error = (0.3 + 2 * (f * m).flatten(1).mean(1)).double().numpy()
    plain = predict_parameters(_BiasedByContent(), fixed, moving, batch_size)
    both = predict_parameters(_BiasedByContent(), fixed, moving, batch_size, symmetric=True)
    assert np.allclose(plain[:, 0], motion + error, atol=1e-5)
    assert np.allclose(both[:, 0], motion, atol=1e-5) and np.allclose(both[:, 1:], 0.0)


class _CountingInputs(_BiasedByContent):
    """:class:`_BiasedByContent` that records how many network inputs each batch held."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor:
        self.sizes.append(pairs.shape[0])
        return super().__call__(pairs)


@pytest.mark.parametrize("batch_size", [2, 5, 32])
def test_symmetric_prediction_with_a_stride_predicts_every_nth_pair_swapped(batch_size):
    """``stride`` 3 on 8 consecutive slices: rows 0, 3, 6 and the last (7) are predicted in both
    orders (12 network inputs, not 16), and give the symmetric estimate; the others are their
    one-order estimate minus the order-independent error interpolated between those rows
    (:func:`geometry.symmetric_params_2d_interpolated`), whatever the batch size."""
    from RigidResNetRegistrationLib.engine import predict_parameters

    gen = torch.Generator().manual_seed(1)
    fixed, moving = torch.rand(8, 48, 48, generator=gen), torch.rand(8, 48, 48, generator=gen) ** 2
    plain = predict_parameters(_BiasedByContent(), fixed, moving, batch_size)
    both = predict_parameters(_BiasedByContent(), fixed, moving, batch_size, symmetric=True)
    net = _CountingInputs()
    strided = predict_parameters(net, fixed, moving, batch_size, symmetric=True, stride=3)
    assert sum(net.sizes) == 12 and max(net.sizes) <= batch_size
    anchors = [0, 3, 6, 7]
    backward = np.full_like(plain, np.nan)
    backward[anchors] = predict_parameters(_BiasedByContent(), moving, fixed, batch_size)[anchors]
    assert np.allclose(strided[anchors], both[anchors], atol=1e-6)
    assert np.allclose(strided, geo.symmetric_params_2d_interpolated(plain, backward), atol=1e-6)
    assert not np.allclose(strided[[1, 2, 4, 5]], plain[[1, 2, 4, 5]], atol=1e-3)  # corrected, not one order


def test_slices_mode_predicts_every_third_slice_in_both_orders_by_default(card_factory):
    """A network that answers the same bias for every pair: in ``slices`` mode the default (both
    orders on every 3rd slice) cancels it on every slice, as both orders on every slice do, with
    fewer network inputs; ``volume`` mode (a few slices spread over the brain) is not strided."""
    model = load_model(card_factory(bias=[2.0, 1.0, 0.5]), "cpu")
    fixed, moving, _, _ = _case()
    assert RegistrationOptions().symmetric_stride == 3
    inputs: dict[str, int] = {}
    results = {}
    for name, stride in (("strided", 3), ("every", 1)):
        counted = _CountingModel(model)
        results[name] = register_volumes(fixed, moving, counted, RegistrationOptions(
            device="cpu", iterations=1, refine=False, mode="slices", symmetric_stride=stride))
        inputs[name] = counted.inputs
    used = results["every"].used
    assert used.sum() > 6
    # (the translation left is the symmetric estimate's own |t| sin(theta / 2), composed twice)
    assert np.all(np.abs(results["strided"].slice_params[used, 0]) < 1e-6)
    assert np.all(np.hypot(*results["strided"].slice_params[used, 1:].T) < 0.05)
    assert np.allclose(results["strided"].slice_params, results["every"].slice_params, atol=1e-6)
    assert inputs["strided"] < inputs["every"] - 0.5 * used.sum()
    volume = {}
    for stride in (1, 3):
        counted = _CountingModel(model)
        register_volumes(fixed, moving, counted, RegistrationOptions(device="cpu", iterations=1, refine=False, symmetric_stride=stride))
        volume[stride] = counted.inputs
    assert volume[1] == volume[3]
    with pytest.raises(InputError, match="symmetric stride must be"):
        RegistrationOptions(symmetric_stride=0).validate()


class _CountingModel:
    """A loaded model that counts the network inputs it is given."""

    def __init__(self, model) -> None:
        self.model, self.card, self.device, self.inputs = model, model.card, model.device, 0

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor:
        self.inputs += pairs.shape[0]
        return self.model(pairs)


def test_symmetric_prediction_is_the_default_and_can_be_turned_off(card_factory):
    """A network that answers the same bias for every pair (the order-independent error in its
    purest form): the default (symmetric) volume transform has no in-plane rotation left; one
    order only returns the bias."""
    model = load_model(card_factory(bias=[2.0, 1.0, 0.5]), "cpu")
    fixed, moving, _, _ = _case()
    assert RegistrationOptions().symmetric
    sym = register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", iterations=1, refine=False))
    one = register_volumes(fixed, moving, model, RegistrationOptions(device="cpu", iterations=1, refine=False, symmetric=False))
    assert sym.symmetric and not one.symmetric
    assert np.allclose(one.params, [2.0, 1.0, 0.5], atol=1e-3)
    assert abs(sym.params[0]) < 1e-6 and np.hypot(*sym.params[1:]) < 0.02
    with pytest.raises(InputError, match="symmetric must be"):
        RegistrationOptions(symmetric="yes").validate()


def test_intensity_range_is_remembered_per_tensor_and_recomputed_after_an_in_place_change() -> None:
    """preprocess.intensity_range remembers a tensor's range (several stages ask for it): the same
    figures as computed afresh, again after the tensor is modified in place, per argument set, and
    never served to another tensor with the same values' id reused."""
    from RigidResNetRegistrationLib import preprocess

    g = torch.Generator().manual_seed(5)
    t = torch.rand((60, 50, 40), generator=g) * 100
    first = preprocess.intensity_range(t)
    assert preprocess.intensity_range(t) == first
    assert preprocess._RANGE_CACHE[id(t)][3] == first  # remembered
    t.mul_(2.0)  # in place: the version counter moves on
    doubled = preprocess.intensity_range(t)
    assert doubled == pytest.approx((2 * first[0], 2 * first[1]), rel=1e-5)
    assert preprocess.intensity_range(t, 0.1, 0.9) != doubled
    other = t.clone().add_(50.0)
    assert preprocess.intensity_range(other)[0] == pytest.approx(doubled[0] + 50.0, rel=1e-5)
    del t
    fresh = torch.zeros(60, 50, 40)  # may reuse the dead tensor's id: its entry is never served
    fresh[30:] = 1.0
    assert preprocess.intensity_range(fresh) == pytest.approx((0.0, 1.0))


def test_intensity_range_of_a_fortran_ordered_volume_samples_in_row_major_order_without_importing_sympy() -> None:
    """A NIfTI volume's tensor is Fortran-ordered; its range samples the same values, in the same
    row-major order, as the C-ordered copy's (the indices as numpy unravels them), and a fresh
    interpreter computing it does not import sympy (``torch.unravel_index`` did on its first call:
    0.4 s of every command line run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from RigidResNetRegistrationLib import preprocess

    for shape in [(7,), (3, 4), (5, 6, 7), (2, 3, 4, 5)]:
        picks = torch.arange(1, int(np.prod(shape)), 3)
        got = preprocess.row_major_indices(picks, shape)
        assert [list(a) for a in got] == [list(b) for b in np.unravel_index(picks.numpy(), shape)], shape
    g = torch.Generator().manual_seed(3)
    c_ordered = torch.rand((90, 80, 70), generator=g) ** 3 * 100
    f_ordered = c_ordered.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not f_ordered.is_contiguous() and torch.equal(f_ordered, c_ordered)
    assert preprocess.intensity_range(f_ordered) == preprocess.intensity_range(c_ordered)
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, torch; from RigidResNetRegistrationLib.preprocess import intensity_range; "
            "v = torch.rand(90, 80, 70).permute(2, 1, 0); assert not v.is_contiguous(); intensity_range(v); "
            "print('sympy' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(root / "RigidResNetRegistration")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False", "intensity_range imported sympy"


def test_fortran_ordered_inputs_register_as_c_ordered_ones_and_give_fortran_ordered_outputs(card_factory):
    """NIfTI readers give Fortran-ordered arrays and the engine keeps their order (no reordering
    copy; axial planes stay in one block of memory). The same voxels in either order must give the
    same registration (a trained-like model and the refinement, volume and slices mode), and the
    outputs are laid out as the moving volume, so that writing them to NIfTI needs no copy."""
    from RigidResNetRegistrationLib.io import fortran_order
    from RigidResNetRegistrationLib.preprocess import as_float_tensor
    from RigidResNetRegistrationLib.resample import is_fortran_ordered

    model = load_model(card_factory(seed=4), "cpu")
    fixed, moving, _, _ = _case()
    as_c = [Volume(np.ascontiguousarray(v.array, dtype=np.float32), v.ijk_to_ras, v.name) for v in (fixed, moving)]
    as_f = [Volume(np.asfortranarray(v.array, dtype=np.float32), v.ijk_to_ras, v.name) for v in (fixed, moving)]
    assert is_fortran_ordered(as_float_tensor(as_f[1])) and as_float_tensor(as_c[1]).is_contiguous()
    for mode in ("volume", "slices"):
        options = RegistrationOptions(device="cpu", mode=mode, iterations=2)
        c = register_volumes(*as_c, model, options)
        f = register_volumes(*as_f, model, options)
        assert np.allclose(f.fixed_to_moving_ras, c.fixed_to_moving_ras, atol=1e-4), mode
        assert np.allclose(f.slice_params, c.slice_params, atol=1e-3), mode
        scale = float(np.abs(c.registered.array).max())
        assert scale > 0 and np.allclose(f.registered.array, c.registered.array, atol=1e-4 * scale), mode
        assert np.allclose(f.difference.array, c.difference.array, atol=1e-4), mode
        assert f.registered.array.flags.f_contiguous and f.difference.array.flags.f_contiguous, mode
        assert c.registered.array.flags.c_contiguous, mode
        assert fortran_order(f.registered.array) is f.registered.array  # written as it is
    assert np.array_equal(as_f[1].array, moving.array)  # inputs untouched
