"""Model cards and weights loading; similarity measures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from RigidResNetRegistrationLib.model import (
    DEFAULT_CARD,
    ModelError,
    ResNetRegressor,
    load_model,
    read_model_card,
    sha256_of,
)
from RigidResNetRegistrationLib.resample import torch_params_to_matrix_2d, warp_images_2d
from RigidResNetRegistrationLib.similarity import mutual_information, ncc


def test_untrained_network_predicts_identity_and_has_resnet34_shape():
    net = ResNetRegressor(3).eval()
    out = net(torch.rand(4, 2, 64, 64))
    assert out.shape == (4, 3) and torch.count_nonzero(out) == 0
    n_backbone = sum(p.numel() for p in net.features.parameters())
    assert 21_000_000 < n_backbone < 21_500_000  # ResNet-34 without its fc, 2-channel conv1
    assert ResNetRegressor(6)(torch.rand(1, 2, 64, 64)).shape == (1, 6)


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
