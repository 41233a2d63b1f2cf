"""Model cards: what a weights file is (input grid, transform, sha256), read without torch.

A model card is a JSON file beside its weights in ``Resources/Models``. Reading one never executes
anything from it; the weights file it names must stay inside the card's folder. This module does
not import torch, so the Slicer panel can list models before PyTorch is installed or imported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .geometry import N_PARAMS

#: Folder of the bundled model cards and weights.
MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
DEFAULT_CARD = MODELS_DIR / "rigid_resnet34.json"


class ModelError(RuntimeError):
    """A model card or weights file that cannot be used: the message is one clear line."""


@dataclass(frozen=True)
class FineStage:
    """A second network (same architecture and grid, its own weights file) for the small motions:
    every pair whose first estimate is within ``below`` on every rigid parameter (degrees and mm)
    is predicted again by it (:class:`model.LoadedModel`). Card entry ``"fine": {"file",
    "sha256", "below"}``."""

    weights: str  # file name inside the card's folder
    sha256: str
    below: float


@dataclass
class ModelCard:
    """What a weights file is: parsed from the JSON model card (see ``Resources/Models``)."""

    name: str
    transform: str  # "rigid" | "affine"
    input_size: tuple[int, int]
    spacing_mm: float
    hidden: int
    weights: str | None  # file name inside the card's folder; None = untrained (identity) model
    sha256: str | None
    trained: bool
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    fine: FineStage | None = None
    #: Card entry ``"mirror": true``: every pair is also predicted with both slices mirrored
    #: (columns reversed) and the two estimates averaged (:class:`model.LoadedModel`), which cancels
    #: an error that turns with the image (a rotation bias across contrasts); twice the network work.
    mirror: bool = False

    @property
    def n_params(self) -> int:
        return N_PARAMS[self.transform]

    @property
    def identity(self) -> str:
        """One line naming the model and its weights: ``name (sha256 0123456789ab[, fine stage
        sha256 ... below B][, mirror-averaged])``, for tables and logs."""
        fine = f", fine stage sha256 {self.fine.sha256[:12]} below {self.fine.below:g}" if self.fine else ""
        mirror = ", mirror-averaged" if self.mirror else ""
        return f"{self.name} (sha256 {str(self.sha256)[:12]}{fine}{mirror})"

    def weights_entry(self, fine: bool = False) -> tuple[str | None, str | None]:
        """``(file name, sha256)`` of the card's weights (``fine``: its fine stage's; ``(None,
        None)`` when it has none)."""
        if fine:
            return (self.fine.weights, self.fine.sha256) if self.fine else (None, None)
        return self.weights, self.sha256

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> "ModelCard":
        try:
            transform = str(data["transform"])
            if transform not in N_PARAMS:
                raise ValueError(f"transform {transform!r}")
            size = tuple(int(s) for s in data["input"]["size"])
            spacing = float(data["input"]["spacing_mm"])
            weights = data.get("weights", {}) or {}
            file_name = weights.get("file")
            sha = weights.get("sha256")
            if len(size) != 2 or min(size) < 32 or not (0.1 <= spacing <= 10):
                raise ValueError("input grid")
            fine_entry = data.get("fine")
            fine = None
            if fine_entry is not None:
                if file_name is None or transform != "rigid":
                    raise ValueError("a fine stage needs a trained rigid model")
                fine = FineStage(str(fine_entry["file"]), fine_entry.get("sha256"), float(fine_entry["below"]))
                if not fine.below > 0:
                    raise ValueError("fine.below must be positive")
            mirror = data.get("mirror", False)
            if not isinstance(mirror, bool):
                raise ValueError(f"mirror must be true or false, not {mirror!r}")
        except (KeyError, TypeError, ValueError) as exc:
            where = f" {path}" if path else ""
            raise ModelError(f"model card{where} is invalid ({exc})") from None
        if file_name is not None:
            _check_weights_entry(str(file_name), sha, "weights file")
        if fine is not None:
            _check_weights_entry(fine.weights, fine.sha256, "fine stage weights file")
        return cls(
            name=str(data.get("name", "unnamed")),
            transform=transform,
            input_size=(size[0], size[1]),
            spacing_mm=spacing,
            hidden=int(data.get("hidden", 256)),
            weights=file_name,
            sha256=sha,
            trained=bool(data.get("trained", file_name is not None)),
            path=path,
            raw=dict(data),
            fine=fine,
            mirror=mirror,
        )


def _check_weights_entry(name: str, sha: object, what: str) -> None:
    """A weights file named by a card: a plain name inside the card's folder, with a sha256."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ModelError(f"model card names {what} {name!r} outside its folder")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ModelError(f"model card has a {what} but no valid sha256")


def read_model_card(path: str | Path) -> ModelCard:
    """Read and validate a model card JSON file (never executes anything from it)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model card not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {p} cannot be read ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ModelError(f"model card {p} is not a JSON object")
    return ModelCard.from_dict(data, p.resolve())


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_path(card: ModelCard, fine: bool = False) -> Path | None:
    """Absolute path of the card's weights file (``fine``: its fine stage's; always inside the
    card's folder), or None when the card has none."""
    name = card.weights_entry(fine)[0]
    if name is None:
        return None
    folder = (card.path.parent if card.path else MODELS_DIR).resolve()
    p = (folder / name).resolve()
    if p.parent != folder:
        raise ModelError(f"weights file {name!r} is outside the model folder")
    return p
