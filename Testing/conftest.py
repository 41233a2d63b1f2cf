"""Shared fixtures: synthetic brain-like phantoms on arbitrary grids, constant-output models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for sub in ("RigidResNetRegistration", "training"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

from RigidResNetRegistrationLib import geometry as geo  # noqa: E402
from RigidResNetRegistrationLib.model import ResNetRegressor, save_weights  # noqa: E402
from RigidResNetRegistrationLib.preprocess import Volume  # noqa: E402
from RigidResNetRegistrationLib.resample import sample_volume_at_ras  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"


def phantom_ras(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric 'head' defined in RAS mm (so any grid can sample the same object):
    an ellipsoid brain with internal blobs and a textured cortex, zero outside."""
    rng = np.random.default_rng(seed)
    p = np.asarray(points, dtype=np.float64) * 2.2  # the object is ~55 x 68 x 50 mm: inside every test grid
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    r = (x / 60.0) ** 2 + (y / 75.0) ** 2 + (z / 55.0) ** 2
    brain = 1.0 / (1.0 + np.exp((r - 1.0) * 25.0))
    value = 100.0 * brain
    for _ in range(14):
        c = rng.uniform([-40, -55, -35], [40, 55, 35])
        s = rng.uniform(6, 16)
        a = rng.uniform(-60, 80)
        value += a * brain * np.exp(-np.sum((p - c) ** 2, axis=-1) / (2 * s * s))
    value += 15 * brain * np.sin(x / 7.0) * np.cos(y / 9.0) * np.sin(z / 8.0 + 0.3)
    return value


def make_affine(spacing=(2.0, 2.0, 2.0), codes: str = "RAS", rotation_deg=(0.0, 0.0, 0.0), shape=(48, 56, 40),
                centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """IJK -> RAS affine with the given spacing, axis codes (e.g. LPS, RPS for sagittal-first),
    an optional oblique rotation, centred on ``centre``."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    m = np.zeros((3, 3))
    for col, code in enumerate(codes):
        row, sign = axes[code]
        m[row, col] = sign * spacing[col]
    rot = geo.rigid_matrix_3d(rotation_deg)[:3, :3]
    m = rot @ m
    aff = np.eye(4)
    aff[:3, :3] = m
    half = (np.asarray(shape) - 1) / 2.0
    aff[:3, 3] = np.asarray(centre) - m @ half
    return aff


def phantom_volume(shape=(48, 56, 40), seed: int = 0, name: str = "phantom", **affine_kw) -> Volume:
    aff = make_affine(shape=shape, **affine_kw)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    pts = geo.apply_to_points(aff, ijk)
    return Volume(phantom_ras(pts, seed).astype(np.float32), aff, name)


def moved_copy(fixed: Volume, truth_fixed_to_moving: np.ndarray, shape=None, **affine_kw) -> Volume:
    """The phantom seen after the head moved: ``moving(y) = fixed_object(truth^-1 y)``, sampled
    analytically (no interpolation) on a grid of its own."""
    shape = shape or fixed.shape
    aff = make_affine(shape=shape, **affine_kw) if affine_kw else fixed.ijk_to_ras.copy()
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    pts = geo.apply_to_points(geo.invert(truth_fixed_to_moving), geo.apply_to_points(aff, ijk))
    return Volume(phantom_ras(pts).astype(np.float32), aff, "moving phantom")


class ConstantPredictor:
    """Stands in for the network: returns fixed parameters (or a queue of per-slice ones).

    Like an ideal network it is inverse-consistent: given the engine's symmetric layout (a batch
    of pairs followed by some or all of the same pairs swapped, ``(moving, fixed)``, in order), it
    answers the pairs with its parameters and the swapped pairs with their inverses. ``seen``
    counts slice pairs (a pair and its swapped copy count once)."""

    def __init__(self, card, params):
        self.card = card
        self.params = torch.as_tensor(np.asarray(params, dtype=np.float32))
        self.seen = 0
        self.calls = 0

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        n, swapped = _split_swapped(pairs)
        if self.params.dim() == 2:
            out = self.params[self.seen : self.seen + n]
        else:
            out = self.params.repeat(n, 1)
        self.seen += n
        if swapped:
            # float64: the engine's combination then returns the parameters to 1e-12
            inverse = torch.as_tensor(geo.invert_params_2d(out[swapped].double().numpy(), self.card.transform))
            out = torch.cat([out.double(), inverse])
        return out


def _split_swapped(pairs: torch.Tensor) -> tuple[int, list[int]]:
    """For a batch of network inputs in the engine's layout: how many leading (fixed, moving)
    pairs it holds, and which of them (in order) the trailing inputs are swapped copies of."""
    b = pairs.shape[0]
    for tail in range(b // 2, 0, -1):
        head = b - tail
        rows, j = [], 0
        for swapped in pairs[head:].flip(1):
            while j < head and not torch.equal(pairs[j], swapped):
                j += 1
            if j == head:
                break
            rows.append(j)
            j += 1
        else:
            return head, rows
    return b, []


def write_card(folder: Path, size=48, spacing=2.0, transform="rigid", bias=None, seed=None, name="test_model") -> Path:
    """A real model card + fp16 weights file: the regressor's last layer outputs ``bias`` for any
    input (weights zero), or is randomly initialised when ``seed`` is given."""
    torch.manual_seed(seed or 0)
    net = ResNetRegressor(geo.N_PARAMS[transform])
    if seed is not None:
        torch.nn.init.normal_(net.regressor[2].weight, std=0.05)
    if bias is not None:
        with torch.no_grad():
            net.regressor[2].bias.copy_(torch.tensor(bias, dtype=torch.float32))
    sha = save_weights(net, folder / f"{name}.pt")
    card = {
        "name": name, "transform": transform, "hidden": 256, "trained": True,
        "input": {"size": [size, size], "spacing_mm": spacing},
        "weights": {"file": f"{name}.pt", "sha256": sha},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card))
    return path


def add_fine_stage(card: Path, fine_card: Path, below: float = 3.0) -> Path:
    """``card`` given ``fine_card``'s weights file (same folder) as its fine stage."""
    spec = json.loads(card.read_text())
    fine = json.loads(fine_card.read_text())["weights"]
    spec["fine"] = {"file": fine["file"], "sha256": fine["sha256"], "below": below}
    card.write_text(json.dumps(spec))
    return card


@pytest.fixture
def phantom():
    return phantom_volume


@pytest.fixture
def card_factory(tmp_path):
    def make(**kw):
        return write_card(tmp_path, **kw)

    return make


def sample_at(volume: Volume, points_ras: np.ndarray) -> np.ndarray:
    return sample_volume_at_ras(torch.from_numpy(volume.array.astype(np.float32)), volume.ijk_to_ras, points_ras).numpy()


def write_phantom_pair(folder: Path, motion=(3.0, 2.0, -1.0)) -> Path:
    """``fixed.nii.gz`` (an LPS phantom) and ``moving.nii.gz`` (it moved by in-plane slice-frame
    ``motion``) written into ``folder``, which is returned."""
    from RigidResNetRegistrationLib.io import write_volume

    fixed = phantom_volume(shape=(44, 50, 30), codes="LPS")
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    write_volume(fixed, folder / "fixed.nii.gz")
    write_volume(moved_copy(fixed, geo.params_to_ras(np.asarray(motion, dtype=float), frame)), folder / "moving.nii.gz")
    return folder
