"""The network: ResNet-34 features (:mod:`resnet`, torchvision's layout) + a 2-layer fully connected regressor.

Input: ``(B, 2, H, W)``, channel 0 the fixed slice and channel 1 the moving slice, each
normalised to ``[0, 1]`` (:func:`preprocess.normalise_slices`), on the network grid named in
the model card (``input.size`` pixels at ``input.spacing_mm``). Output: ``(B, P)`` slice-frame
parameters in the units of :mod:`geometry` (rigid: degrees, mm, mm; resampling direction,
about the grid centre). The last layer starts at zero, so an untrained model predicts identity.

Weights are plain ``state_dict`` files read with ``torch.load(weights_only=True)``; a JSON
*model card* beside them names the file, its sha256, the input grid and the training facts.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .geometry import mirror_params_2d
from .resnet import resnet34_features
from .model_card import DEFAULT_CARD, MODELS_DIR, ModelCard, ModelError, read_model_card, sha256_of, weights_path

__all__ = ["DEFAULT_CARD", "MODELS_DIR", "ModelCard", "ModelError", "read_model_card", "sha256_of", "weights_path",
           "ResNetRegressor", "LoadedModel", "build_model", "fold_batch_norms", "load_state", "load_model", "resolve_device", "save_weights"]

class ResNetRegressor(nn.Module):
    """ResNet-34 feature extractor (2-channel input) + FC(512, hidden) - ReLU - FC(hidden, P)."""

    def __init__(self, n_params: int = 3, hidden: int = 256, in_channels: int = 2, initialise: bool = True) -> None:
        """``initialise``: random features, a zero last layer (the identity transform); False: left
        as allocated, for weights loaded next (:func:`load_model`)."""
        super().__init__()
        self.features = resnet34_features(in_channels, initialise)  # torchvision's module names: its state dicts load
        self.regressor = nn.Sequential(nn.Linear(512, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_params))
        if initialise:
            nn.init.zeros_(self.regressor[2].weight)
            nn.init.zeros_(self.regressor[2].bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """``(B, 2, H, W)`` fixed/moving pairs -> ``(B, P)`` parameters."""
        return self.regressor(self.features(pair))


def build_model(card: ModelCard, initialise: bool = True) -> ResNetRegressor:
    """An (untrained) network with the card's architecture (``initialise``: as :class:`ResNetRegressor`)."""
    return ResNetRegressor(n_params=card.n_params, hidden=card.hidden, initialise=initialise)


def load_state(card: ModelCard, fine: bool = False) -> dict[str, torch.Tensor] | None:
    """The card's weights (``fine``: its fine stage's) as a state dict, sha256-checked, loaded
    with ``weights_only=True``. The hash is computed in a thread while torch reads the file
    (hashlib releases the GIL: 40 ms instead of 70 for the bundled 43 MB file); a file that does
    not match its card is refused whether or not torch could read it, and what torch read of it
    (with ``weights_only``, which runs no code from the file) is dropped."""
    p = weights_path(card, fine)
    if p is None:
        return None
    if not p.is_file():
        raise ModelError(f"weights file missing: {p}")
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(sha256_of, p)
        try:
            state, failure = torch.load(p, map_location="cpu", weights_only=True), None
        except Exception as exc:  # corrupt file: torch raises many types
            state, failure = None, exc
        digest = hashing.result()
    if digest != card.weights_entry(fine)[1]:
        raise ModelError(f"weights file {p.name} does not match its model card (sha256 {digest[:12]}...)")
    if failure is not None:
        raise ModelError(f"weights file {p.name} cannot be loaded ({failure.__class__.__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {p.name} holds no state dict")
    return state


@dataclass
class LoadedModel:
    """A network ready for inference, with its card and the device it lives on."""

    network: ResNetRegressor
    card: ModelCard
    device: torch.device
    fine: ResNetRegressor | None = None  # the card's fine stage (:class:`model_card.FineStage`)

    @property
    def sha256(self) -> str | None:
        return self.card.sha256

    @property
    def coarse(self) -> "LoadedModel":
        """The first network alone, without the card's fine stage and mirror averaging (the same
        weights, nothing copied; ``self`` when the card has neither): for network passes that
        only have to bring a motion within a refinement's reach (:func:`engine._predict`)."""
        if self.fine is None and not self.card.mirror:
            return self
        return LoadedModel(self.network, replace(self.card, fine=None, mirror=False), self.device)

    def __call__(self, pairs: torch.Tensor) -> torch.Tensor:
        """``(B, 2, H, W)`` normalised pairs -> ``(B, P)`` float32 parameters on the CPU. With a
        fine stage: the pairs whose estimate is within its ``below`` on every parameter (degrees,
        mm) are predicted again by the fine network, whose estimates replace those. With
        ``card.mirror``: every pair is also predicted mirrored (both slices' columns reversed, in
        the same batch) and the mean of the estimate and the mirrored one mapped back
        (:func:`geometry.mirror_params_2d`) is returned."""
        with torch.inference_mode():
            x = pairs.to(self.device, non_blocking=True)
            n = x.shape[0]
            if self.card.mirror:
                x = torch.cat([x, x.flip(-1)])
            x = x.contiguous(memory_format=torch.channels_last)
            out = self.network(x)
            if self.fine is not None:
                small = (out.abs() < self.card.fine.below).all(dim=1)
                if bool(small.any()):
                    out[small] = self.fine(x[small]).to(out.dtype)
            out = out.float().cpu()
        if self.card.mirror:
            mapped_back = torch.from_numpy(mirror_params_2d(out[n:].numpy(), self.card.transform)).float()
            out = 0.5 * (out[:n] + mapped_back)
        return out


def fold_batch_norms(network: ResNetRegressor) -> ResNetRegressor:
    """For inference: each batch norm of the (evaluation-mode) ResNet folded into the convolution
    before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced by an identity, in place
    (the network is returned). The same function up to float rounding, one pass over the
    activations fewer per layer (about 6% of the network's time on a CPU). The network must not be
    trained afterwards. Each convolution takes its folded weights (``fuse_conv_bn_weights``, the
    arithmetic of ``fuse_conv_bn_eval`` without its copy of every module), in the memory format
    its weights had."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    if network.training:
        raise ValueError("batch norms can only be folded into an evaluation-mode network")

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        return conv

    resnet = network.features
    fold(resnet.conv1, resnet.bn1)
    resnet.bn1 = nn.Identity()
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            fold(block.conv1, block.bn1)
            fold(block.conv2, block.bn2)
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
            if block.downsample is not None:
                block.downsample = nn.Sequential(fold(block.downsample[0], block.downsample[1]))
    return network


_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` when CUDA is absent is an error."""
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError("CUDA was requested but is not available (no CUDA GPU or a CPU-only PyTorch)")
        return torch.device(name)
    raise ModelError(f"device must be auto, cpu or cuda, not {device!r}")


def _as_float32(value: torch.Tensor) -> torch.Tensor:
    """A stored tensor as the network computes with it: floats in float32, convolution weights
    (4D) in channels-last order (what the network runs in), in one copy; other tensors as they are."""
    if not value.is_floating_point():
        return value
    if value.dim() == 4:
        return value.to(torch.float32, memory_format=torch.channels_last)
    return value.float()


def load_model(card_path: str | Path | None = None, device: str = "auto") -> LoadedModel:
    """Load (once, then from a cache) the model described by a card on a device."""
    card = read_model_card(card_path or DEFAULT_CARD)
    dev = resolve_device(device)
    key = (str(card.path), str(card.sha256), str(card.fine), card.mirror, str(dev))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        fine = _inference_network(card, load_state(card, fine=True), dev, card.fine.weights) if card.fine else None
        loaded = LoadedModel(_inference_network(card, load_state(card), dev, card.weights), card, dev, fine)
        _CACHE[key] = loaded
        return loaded


def _inference_network(card: ModelCard, state: dict[str, torch.Tensor] | None, device: torch.device,
                       file_name: str | None) -> ResNetRegressor:
    """The card's network with ``state`` (from ``file_name``; None: as initialised, an untrained
    card), batch norms folded, on ``device`` in channels-last order."""
    if state is None:
        network = build_model(card)
    else:
        # built on the meta device (no random initialisation: 0.2-0.4 s of a command line run on
        # 2 CPU cores), the weights then taken as the parameters themselves
        with torch.device("meta"):
            network = build_model(card, initialise=False)
        try:
            network.load_state_dict({k: _as_float32(v) for k, v in state.items()}, assign=True)
        except (RuntimeError, AttributeError) as exc:
            raise ModelError(
                f"weights file {file_name} does not fit the model card's architecture ({str(exc).splitlines()[0]})"
            ) from None
    return fold_batch_norms(network.eval()).to(device).to(memory_format=torch.channels_last)


def save_weights(network: nn.Module, path: str | Path, half: bool = True) -> str:
    """Write a state dict (fp16 floats when ``half``) and return its sha256."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in network.state_dict().items()}
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(p)
    return sha256_of(p)
