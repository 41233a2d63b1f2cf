"""Model cards and weights loading; similarity measures."""

from __future__ import annotations

import json

import warnings

import numpy as np
import pytest
import torch

from conftest import add_fine_stage
from RigidResNetRegistrationLib.model import (
    DEFAULT_CARD,
    ModelError,
    ResNetRegressor,
    load_model,
    read_model_card,
    sha256_of,
)
from RigidResNetRegistrationLib.resample import torch_params_to_matrix_2d, warp_images_2d
from RigidResNetRegistrationLib.similarity import (
    fixed_bins,
    mattes_mutual_information,
    mutual_information,
    ncc,
    parzen_window,
)


def test_untrained_network_predicts_identity_and_has_resnet34_shape():
    net = ResNetRegressor(3).eval()
    out = net(torch.rand(4, 2, 64, 64))
    assert out.shape == (4, 3) and torch.count_nonzero(out) == 0
    n_backbone = sum(p.numel() for p in net.features.parameters())
    assert 21_000_000 < n_backbone < 21_500_000  # ResNet-34 without its fc, 2-channel conv1
    assert ResNetRegressor(6)(torch.rand(1, 2, 64, 64)).shape == (1, 6)


def test_resnet_matches_torchvision_names_shapes_and_outputs():
    """Our ResNet-34 (no torchvision import at inference) is torchvision's: the same state-dict keys and
    shapes, and the same output for the same weights (a changed block, stride or pool would fail here)."""
    from torchvision.models import resnet34

    reference = resnet34(weights=None)
    reference.conv1 = torch.nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    reference.fc = torch.nn.Identity()
    ours = ResNetRegressor(3).features
    theirs_state = reference.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs_state.items()}
    with torch.no_grad():  # non-trivial batch-norm statistics, so evaluation mode matters too
        for k, v in theirs_state.items():
            if k.endswith("running_var"):
                v.uniform_(0.5, 2.0)
            elif k.endswith("running_mean") or k.endswith(".bias"):
                v.uniform_(-0.2, 0.2)
    ours.load_state_dict(theirs_state)
    x = torch.rand(3, 2, 96, 80)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-5)


def test_inference_does_not_import_torchvision():
    """Loading the bundled model and registering the sample in a fresh interpreter leaves torchvision
    unimported (it adds about a second to every command line start)."""
    import subprocess
    import sys as _sys
    from pathlib import Path as _Path

    root = _Path(__file__).resolve().parents[1]
    code = ("import sys; from RigidResNetRegistrationLib.model import load_model; "
            "m = load_model(None, 'cpu'); import torch; m(torch.zeros(1, 2, *m.card.input_size)); "
            "print('torchvision' in sys.modules)")
    env = {**__import__("os").environ, "PYTHONPATH": str(root / "RigidResNetRegistration")}
    run = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_bundled_card_is_valid_and_loads():
    card = read_model_card(DEFAULT_CARD)
    assert card.transform == "rigid" and card.input_size[0] >= 64
    model = load_model(DEFAULT_CARD, "cpu")
    assert model.card.name == card.name
    assert load_model(DEFAULT_CARD, "cpu") is model  # cached, not reloaded
    if card.weights:
        assert sha256_of(DEFAULT_CARD.parent / card.weights) == card.sha256


def test_weights_round_trip_through_card(card_factory):
    card = card_factory(seed=5, bias=[0.3, -0.2, 0.1])
    model = load_model(card, "cpu")
    x = torch.rand(2, 2, 48, 48)
    ref = ResNetRegressor(3)
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in torch.load(card.with_suffix(".pt"), weights_only=True).items()})
    assert torch.allclose(model(x), ref.eval()(x), atol=1e-5)


def test_fine_stage_re_predicts_only_the_small_estimates(card_factory):
    """A card's fine stage replaces an estimate within ``below`` on every parameter by the fine
    network's, and leaves a larger one as the first network gave it."""
    fine = card_factory(bias=[0.25, -0.5, 0.75], name="fine")
    x = torch.rand(3, 2, 48, 48)
    small = add_fine_stage(card_factory(bias=[1.0, -2.0, 2.5], name="coarse_small"), fine)
    assert read_model_card(small).fine.below == 3.0
    fine_sha = json.loads(fine.read_text())["weights"]["sha256"]
    assert read_model_card(small).identity.endswith(f", fine stage sha256 {fine_sha[:12]} below 3)")
    assert "fine stage" not in read_model_card(fine).identity
    assert torch.allclose(load_model(small, "cpu")(x), torch.tensor([[0.25, -0.5, 0.75]] * 3), atol=2e-3)
    # one parameter at the threshold: the first network's estimate stays
    large = add_fine_stage(card_factory(bias=[1.0, 3.0, 0.0], name="coarse_large"), fine)
    assert torch.allclose(load_model(large, "cpu")(x), torch.tensor([[1.0, 3.0, 0.0]] * 3), atol=2e-3)
    # per pair: a first network whose estimate depends on the input switches row by row
    mixed = card_factory(seed=3, name="coarse_mixed")
    first = load_model(mixed, "cpu")(x)
    below = float(first.abs().amax(dim=1).median())
    staged = load_model(add_fine_stage(mixed, fine, below), "cpu")(x)
    switched = (first.abs() < below).all(dim=1)
    assert 0 < int(switched.sum()) < len(x)
    assert torch.allclose(staged[switched], torch.tensor([0.25, -0.5, 0.75]), atol=2e-3)
    assert torch.allclose(staged[~switched], first[~switched])


def _with_mirror(card, value=True):
    spec = json.loads(card.read_text())
    card.write_text(json.dumps({**spec, "mirror": value}))
    return card


def test_mirror_card_averages_each_pair_with_its_mirror_image(card_factory):
    """``"mirror": true``: the mean of the estimate and the mirrored pair's estimate mapped back, so a
    constant rotation and column shift (an error that turns with the image) cancels and a row shift
    stays; an input-dependent network gives exactly that mean, pair by pair."""
    x = torch.rand(4, 2, 48, 48)
    biased = _with_mirror(card_factory(bias=[1.5, -2.0, 0.75], name="biased"))
    assert torch.allclose(load_model(biased, "cpu")(x), torch.tensor([[0.0, 0.0, 0.75]] * 4), atol=2e-3)
    plain = load_model(card_factory(seed=3, name="plain"), "cpu")
    mirrored = load_model(_with_mirror(card_factory(seed=3, name="mirrored")), "cpu")
    signs = torch.tensor([-1.0, -1.0, 1.0])
    assert torch.allclose(mirrored(x), 0.5 * (plain(x) + plain(x.flip(-1)) * signs), atol=1e-5)
    assert not torch.allclose(mirrored(x), plain(x), atol=1e-3)
    assert read_model_card(biased).identity.endswith(", mirror-averaged)")
    single = card_factory(seed=3, name="single")  # a card without the entry: no mirror averaging
    assert "mirror" not in read_model_card(single).identity and not read_model_card(single).mirror
    assert read_model_card(DEFAULT_CARD).mirror  # the bundled card (since 2026-12-03) asks for it
    affine = _with_mirror(card_factory(transform="affine", bias=[0.1, 0.2, -0.3, 0.05, 1.0, 2.0], name="affine"))
    assert torch.allclose(load_model(affine, "cpu")(x[:1]), torch.tensor([[0.1, 0.0, 0.0, 0.05, 0.0, 2.0]]), atol=2e-3)
    # with a fine stage: the mirrored pairs go through both networks as well
    fine = card_factory(bias=[0.5, 0.25, -0.5], name="fine")
    staged = _with_mirror(add_fine_stage(card_factory(bias=[1.0, 1.0, 1.0], name="coarse"), fine))
    assert torch.allclose(load_model(staged, "cpu")(x), torch.tensor([[0.0, 0.0, -0.5]] * 4), atol=2e-3)
    _with_mirror(biased, "yes")
    with pytest.raises(ModelError, match="mirror must be true or false"):
        read_model_card(biased)


def test_fine_stage_weights_are_checked_like_the_weights(card_factory):
    fine = card_factory(bias=[0.0, 0.0, 0.0], name="fine")
    card = add_fine_stage(card_factory(bias=[1.0, 0.0, 0.0], name="coarse"), fine)
    spec = json.loads(card.read_text())
    fine.with_suffix(".pt").write_bytes(fine.with_suffix(".pt").read_bytes()[:1000])
    with pytest.raises(ModelError, match="fine.pt does not match its model card"):
        load_model(card, "cpu")
    fine.with_suffix(".pt").unlink()
    with pytest.raises(ModelError, match="weights file missing"):
        load_model(card, "cpu")
    for change, message in (({"file": "../fine.pt"}, "fine stage weights file '../fine.pt' outside its folder"),
                            ({"sha256": "abc"}, "fine stage weights file but no valid sha256"),
                            ({"below": 0}, "fine.below must be positive"),
                            ({"below": None}, "invalid")):
        card.write_text(json.dumps({**spec, "fine": {**spec["fine"], **change}}))
        with pytest.raises(ModelError, match=message):
            read_model_card(card)
    card.write_text(json.dumps({**spec, "transform": "affine"}))
    with pytest.raises(ModelError, match="a fine stage needs a trained rigid model"):
        read_model_card(card)


def test_tampered_truncated_and_escaping_weights_are_refused(tmp_path, card_factory):
    card = card_factory(seed=1)
    weights = card.with_suffix(".pt")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="does not match its model card"):
        load_model(card, "cpu")
    spec = json.loads(card.read_text())
    spec["weights"]["sha256"] = sha256_of(weights)  # a truncated file with a matching hash: still refused cleanly
    card.write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_model(card, "cpu")
    spec["weights"]["file"] = "../../etc/passwd"
    card.write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="outside its folder"):
        read_model_card(card)
    card.write_text("{not json")
    with pytest.raises(ModelError, match="cannot be read"):
        read_model_card(card)
    card.write_text(json.dumps({"name": "x", "transform": "shear", "input": {"size": [64, 64], "spacing_mm": 1}}))
    with pytest.raises(ModelError, match="invalid"):
        read_model_card(card)


def test_ncc_properties():
    a = torch.rand(3, 32, 32)
    assert torch.allclose(ncc(a, a), torch.ones(3), atol=1e-5)
    assert torch.allclose(ncc(a, 2 * a + 5), torch.ones(3), atol=1e-5)
    assert torch.allclose(ncc(a, -a), -torch.ones(3), atol=1e-5)
    assert ncc(a, torch.ones_like(a)).abs().max() == 0  # constant image: defined as 0, not NaN


def _blob_images():
    y, x = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    img = torch.exp(-((x - 0.2) ** 2 + (y + 0.1) ** 2) / 0.1) + 0.5 * torch.exp(-((x + 0.4) ** 2 + (y - 0.3) ** 2) / 0.05)
    return (img / img.max())[None]


def test_mutual_information_prefers_alignment_across_contrasts():
    img = _blob_images()
    other_contrast = 1.0 - img ** 0.5  # inverted, non-linear: NCC is negative, MI stays high
    shifted = warp_images_2d(other_contrast[:, None], torch_params_to_matrix_2d(torch.tensor([[8.0, 6.0, -4.0]])), 1.0)[:, 0]
    assert mutual_information(img, other_contrast) > mutual_information(img, shifted) + 0.05
    assert ncc(img, other_contrast) < 0


def test_parzen_window_weights_sum_to_one_and_their_derivative_is_the_slope():
    bins = 12
    x = torch.tensor([-0.3, 0.0, 0.013, 0.2, 0.5, 0.77, 0.999, 1.0, 1.4], dtype=torch.float64)
    idx, w, dw = parzen_window(x, bins)
    assert idx.shape == w.shape == dw.shape == (9, 4)
    assert torch.allclose(w.sum(dim=1), torch.ones(9, dtype=torch.float64))
    assert idx.min() >= 0 and idx.max() <= bins - 1
    # the window's centre of mass (edge bins absorbing what falls beyond) is the value itself
    inner = (x > 0.1) & (x < 0.9)
    assert torch.allclose((w * idx / (bins - 1)).sum(dim=1)[inner], x[inner])
    # derivative: central differences of the weights, per bin; zero where the value was clamped
    h = 1e-6
    _, wp, _ = parzen_window(x + h, bins)
    _, wm, _ = parzen_window(x - h, bins)
    inside = (x > h) & (x < 1 - h)
    assert torch.allclose(dw[inside], ((wp - wm) / (2 * h))[inside], atol=1e-6)
    assert torch.all(dw[(x < 0) | (x > 1)] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parzen_window_is_the_piecewise_kernel_at_each_bin_bit_for_bit(dtype):
    """The closed form (each bin's piece chosen by its side of the knots) against the kernel
    evaluated branch by branch at ``|s - bin|``: equal bit for bit, weights and derivatives, also
    at bin centres, at the range's ends, beyond them and one float step either side of each."""
    bins = 48
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.rand(20_000, generator=g, dtype=dtype) * 1.3 - 0.15,
                   torch.arange(bins, dtype=dtype) / (bins - 1), torch.tensor([0.0, 1.0, -0.5, 2.0], dtype=dtype)])
    x = torch.cat([x, torch.nextafter(x, torch.full_like(x, 9.0)), torch.nextafter(x, torch.full_like(x, -9.0))])
    s = x.clamp(0, 1) * (bins - 1)
    bin_index = torch.floor(s)[:, None] - 1 + torch.arange(4, dtype=dtype)
    d = s[:, None] - bin_index
    a = d.abs()
    kernel = torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))
    slope = ((x >= 0) & (x <= 1)).to(dtype) * (bins - 1)
    derivative = torch.sign(d) * torch.where(a < 1, (9 * a**2 - 12 * a) / 6, torch.where(a < 2, -0.5 * (2 - a) ** 2, torch.zeros_like(a)))
    idx, w, dw = parzen_window(x, bins)
    assert torch.equal(idx, bin_index.long().clamp(0, bins - 1))
    assert torch.equal(w, kernel)
    assert torch.equal(dw, derivative * slope[:, None])


def _mattes_reference(fixed: np.ndarray, moving: np.ndarray, weights: np.ndarray, bins: int) -> float:
    """Mattes MI written out point by point and bin by bin (numpy, float64): the fixed value in
    its nearest bin, the moving value spread by the cubic B-spline over bins 0..bins-1."""
    def bspline(d: float) -> float:
        a = abs(d)
        return (4 - 6 * a**2 + 3 * a**3) / 6 if a < 1 else ((2 - a) ** 3 / 6 if a < 2 else 0.0)

    h = np.zeros((bins, bins))
    for f, m, w in zip(np.clip(fixed, 0, 1), np.clip(moving, 0, 1), weights):
        fb = int(np.floor(f * (bins - 1) + 0.5))
        s = m * (bins - 1)
        for c in range(int(np.floor(s)) - 1, int(np.floor(s)) + 3):
            h[fb, min(max(c, 0), bins - 1)] += w * bspline(s - c)
    p = h / h.sum()
    pf, pm = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pf * pm)[nz])).sum())


def test_mattes_mutual_information_matches_a_direct_sum_and_its_gradient_is_exact():
    rng = np.random.default_rng(3)
    n, bins = 400, 10
    fixed = rng.uniform(-0.1, 1.1, n)
    moving = np.clip(0.6 * fixed + 0.3 * rng.uniform(0, 1, n), -0.05, 1.05) + rng.normal(0, 0.02, n)
    weights = (rng.uniform(0, 1, n) > 0.1).astype(float)
    fb = fixed_bins(torch.tensor(fixed), bins)
    m = torch.tensor(moving, requires_grad=True)
    mi = mattes_mutual_information(fb, m, torch.tensor(weights), bins)
    assert mi.item() == pytest.approx(_mattes_reference(fixed, moving, weights, bins), abs=1e-12)
    # the analytic backward against central differences of the function itself
    assert torch.autograd.gradcheck(lambda v: mattes_mutual_information(fb, v, torch.tensor(weights), bins), (m,))
    # aligned beats misaligned, across a contrast change
    img = _blob_images()
    other = 1.0 - img ** 0.5
    shifted = warp_images_2d(other[:, None], torch_params_to_matrix_2d(torch.tensor([[8.0, 6.0, -4.0]])), 1.0)[:, 0]
    fb, ones = fixed_bins(img.flatten(), 32), torch.ones(img.numel())
    aligned = mattes_mutual_information(fb, other.flatten(), ones, 32)
    assert aligned > mattes_mutual_information(fb, shifted.flatten(), ones, 32) + 0.05


def test_losses_are_differentiable_wrt_transform_parameters():
    img = _blob_images()
    params = torch.tensor([[5.0, 3.0, -2.0]], requires_grad=True)
    moved = warp_images_2d(img[:, None], torch_params_to_matrix_2d(params), 1.0)[:, 0]
    (ncc(img, moved).sum() + mutual_information(img, moved).sum()).backward()
    assert params.grad is not None and torch.all(torch.isfinite(params.grad)) and params.grad.abs().sum() > 0
    # moving towards the identity increases similarity (gradient ascent direction points back)
    assert np.sign(params.grad[0, 0].item()) == -1


def test_batch_norms_fold_into_the_convolutions():
    from RigidResNetRegistrationLib.model import fold_batch_norms

    torch.manual_seed(0)
    net = ResNetRegressor(3)
    for m in net.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    torch.nn.init.normal_(net.regressor[2].weight, std=0.1)
    net.eval()
    x = torch.rand(3, 2, 64, 64)
    with torch.no_grad():
        ref = net(x)
        folded = fold_batch_norms(net)
        out = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()) + 1e-6)
    with pytest.raises(ValueError, match="evaluation-mode"):
        fold_batch_norms(ResNetRegressor(3).train())


def test_bundled_model_on_identical_slices_is_biased_in_one_order_and_not_when_symmetric():
    """Identical fixed and moving slices (embedded sample): the truth is the identity. The bundled
    network alone answers a content-dependent motion of up to a few tenths of a degree / mm;
    predicted in both orders and combined (the engine's default) the rotation is gone and the
    translation is below 0.005 mm."""
    from RigidResNetRegistrationLib import geometry as geo
    from RigidResNetRegistrationLib.engine import predict_parameters
    from RigidResNetRegistrationLib.preprocess import as_float_tensor
    from RigidResNetRegistrationLib.resample import sample_slice_stack
    from RigidResNetRegistrationLib.sample import load_sample

    model = load_model(DEFAULT_CARD, "cpu")
    card = model.card
    vol = load_sample()
    frame = geo.slice_frame(vol.ijk_to_ras, vol.shape)
    idx = np.linspace(0.3 * len(frame.offsets), 0.7 * len(frame.offsets), 6).astype(int)
    slices = sample_slice_stack(as_float_tensor(vol, torch.device("cpu")), vol.ijk_to_ras, frame, card.input_size,
                                card.spacing_mm, idx)
    plain = predict_parameters(model, slices, slices, 32, precision="fp32")
    both = predict_parameters(model, slices, slices, 32, precision="fp32", symmetric=True)
    if card.trained:
        assert np.abs(plain).max() > 0.1
    assert np.abs(both[:, 0]).max() < 1e-9
    assert np.hypot(both[:, 1], both[:, 2]).max() < 0.005


def test_point_metrics_score_as_the_functions_they_wrap_and_reject_what_they_cannot_score() -> None:
    """The refinements' metric objects (similarity.point_metric): NCC and Mattes MI of moving
    values against fixed values fixed once, for one pair (N,) and a batch (B, N), equal to the
    functions with the same scaling; MI without intensity ranges and unknown names are errors."""
    from RigidResNetRegistrationLib.similarity import fixed_bins, mattes_mutual_information, ncc, point_metric

    g = torch.Generator().manual_seed(3)
    fixed = torch.rand((3, 500), generator=g) * 80 + 10
    moving = 200 - 1.5 * fixed + torch.rand((3, 500), generator=g) * 20  # anti-correlated, another contrast
    weights = (torch.rand((3, 500), generator=g) > 0.2).float()
    f_range, m_range = (12.0, 88.0), (60.0, 190.0)
    n_batch = point_metric("ncc", fixed)(moving, weights)
    torch.testing.assert_close(n_batch, ncc(fixed, moving, weights))
    torch.testing.assert_close(point_metric("ncc", fixed[1])(moving[1], weights[1]), n_batch[1])
    assert float(n_batch.max()) < -0.8
    mi = point_metric("mi", fixed, f_range, m_range, bins=32)
    expected = mattes_mutual_information(fixed_bins((fixed - 12.0) / 76.0, 32), (moving - 60.0) / 130.0, weights, 32)
    torch.testing.assert_close(mi(moving, weights), expected)
    single = point_metric("mi", fixed[0], f_range, m_range, bins=32)(moving[0], weights[0])
    torch.testing.assert_close(single, expected[0])
    unrelated = point_metric("mi", fixed[0], f_range, m_range, bins=32)(moving[0][torch.randperm(500, generator=g)], weights[0])
    assert float(single) > float(unrelated) + 0.2
    with pytest.raises(ValueError, match="intensity ranges"):
        point_metric("mi", fixed)
    with pytest.raises(ValueError, match="must be one of ncc, mi"):
        point_metric("ssd", fixed)


@pytest.mark.parametrize("layout", ["fortran", "flipped", "big-endian int16", "uint16", "bool", "float64 C", "read-only"])
def test_as_float_tensor_is_a_dense_float32_copy_of_any_array_layout(layout):
    """NIfTI readers give Fortran-ordered arrays; flips give negative strides; some files are
    big-endian: every layout becomes the same float32 [i, j, k] copy, input untouched, laid out
    densely: Fortran-ordered when the input is (no reordering pass: the engine reads it along its
    memory), else C-contiguous."""
    from RigidResNetRegistrationLib.preprocess import Volume, as_float_tensor
    from RigidResNetRegistrationLib.resample import is_fortran_ordered

    rng = np.random.default_rng(3)
    arrays = {
        "fortran": np.asfortranarray(rng.random((5, 6, 7), dtype=np.float32)),
        "flipped": rng.random((5, 6, 7))[::-1, :, ::-1],
        "big-endian int16": rng.integers(-900, 900, (5, 6, 7)).astype(">i2"),
        "uint16": rng.integers(0, 60000, (5, 6, 7)).astype(np.uint16),
        "bool": rng.random((5, 6, 7)) > 0.5,
        "float64 C": rng.random((5, 6, 7)),
        "read-only": np.asfortranarray(rng.random((5, 6, 7), dtype=np.float32)),
    }
    array = arrays[layout]
    array.flags.writeable = layout != "read-only"  # a memory map or Slicer's array: no torch warning either
    before = array.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = as_float_tensor(Volume(array, np.eye(4), layout))
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == array.shape
    if layout in ("fortran", "read-only"):
        assert is_fortran_ordered(tensor) and not tensor.is_contiguous()
    else:
        assert tensor.is_contiguous() and not is_fortran_ordered(tensor)
    assert np.array_equal(tensor.numpy(), array.astype(np.float32))
    tensor.fill_(0)  # a copy: the input is never written through it
    assert np.array_equal(array, before)


def test_initialise_false_leaves_the_network_for_loaded_weights():
    """``initialise=True``: torchvision's He-normal convolutions and a zero last layer (the
    identity); ``initialise=False`` skips both (load_model builds so on the meta device)."""
    torch.manual_seed(0)
    net = ResNetRegressor(3)
    conv = net.features.layer1[0].conv1.weight.detach()
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert abs(float(conv.std()) - (2.0 / fan_out) ** 0.5) < 0.1 * (2.0 / fan_out) ** 0.5
    assert not net.regressor[2].weight.any() and not net.regressor[2].bias.any()
    plain = ResNetRegressor(3, initialise=False)
    assert plain.regressor[2].weight.any()  # PyTorch's own default, not zeroed
    conv = plain.features.layer1[0].conv1.weight.detach()
    assert float(conv.std()) < 0.5 * (2.0 / fan_out) ** 0.5  # PyTorch's kaiming-uniform(a=sqrt 5) default, not He-normal
    with torch.device("meta"):
        assert ResNetRegressor(3, initialise=False).features.conv1.weight.is_meta


def test_the_weights_are_hashed_in_a_thread_while_torch_reads_them(card_factory, monkeypatch):
    """load_state overlaps the sha256 with torch.load (hashlib releases the GIL): the hash runs off
    the calling thread, and the check still refuses a file that does not match (above)."""
    import threading

    from RigidResNetRegistrationLib import model as model_module

    card = card_factory(seed=2)
    threads = []
    real = model_module.sha256_of

    def spy(path):
        threads.append(threading.get_ident())
        return real(path)

    monkeypatch.setattr(model_module, "sha256_of", spy)
    state = model_module.load_state(model_module.read_model_card(card))
    assert state and threads and threading.get_ident() not in threads
