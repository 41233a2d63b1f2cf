"""Installing PyTorch into Slicer's Python, after asking the user (the module's Logic calls this).

Nothing is installed at import time or when the module opens: only when a registration is asked
for and ``torch`` cannot be imported. Runs inside Slicer; importing it needs ``slicer`` only.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Callable, Optional

import slicer
import slicer.util

from . import slicer_nodes
from .slicer_nodes import tr as _

if TYPE_CHECKING:  # imports torch
    from .engine import Predictor

#: Requirements installed (after asking) when the PyTorch extension is absent: the network is
#: built without torchvision (:mod:`.resnet`).
TORCH_REQUIREMENTS = ["torch>=2.1"]
REQUESTER = "Rigid ResNet Registration"


def torch_importable() -> bool:
    """torch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def ensure_torch(ask_confirmation: bool = True) -> None:
    """Make torch importable, installing it after asking the user.

    Uses the PyTorch extension (``PyTorchUtils``, which picks the right CUDA build) when it is
    installed, else ``slicer.packaging.pip_ensure`` (Slicer 5.11+, which asks itself), else
    ``slicer.util.pip_install`` after ``slicer.util.confirmOkCancelDisplay``.

    Raises:
        RuntimeError: PyTorch is still not importable (declined, or the installation failed).
    """
    if torch_importable():
        return
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask_confirmation) is None:
            raise RuntimeError(_("PyTorch is needed to register; it was not installed."))
    else:
        try:
            from slicer import packaging

            pip_ensure = packaging.pip_ensure
        except (ImportError, AttributeError):
            pip_ensure = None
        if pip_ensure is not None:
            pip_ensure(TORCH_REQUIREMENTS, requester=REQUESTER)
        else:
            question = _(
                "{requester} needs PyTorch ({packages}), which is not installed. "
                "Download and install it now (about 1-3 GB, some minutes)? "
                "Installing the PyTorch extension instead selects the right GPU build."
            ).format(requester=REQUESTER, packages=", ".join(TORCH_REQUIREMENTS))
            if ask_confirmation and not slicer.util.confirmOkCancelDisplay(question):
                raise RuntimeError(_("PyTorch is needed to register; installation was declined."))
            slicer.util.pip_install(" ".join(TORCH_REQUIREMENTS))
    importlib.invalidate_caches()
    if not torch_importable():
        raise RuntimeError(_("PyTorch is needed to register but could not be installed."))


def load_predictor(model: Optional[str], device: str, progress: Optional[Callable[[float, str], None]] = None) -> "Predictor":
    """The model ``model`` (a bundled key, a model card path or None: the default) loaded on
    ``device``, PyTorch installed first when it is missing (after asking).

    Raises:
        ValueError: an unknown model key or missing card, before anything is installed.
        RuntimeError: PyTorch missing, a model or device problem.
    """
    card_path = slicer_nodes.model_card_path(model)
    ensure_torch()
    from .model import load_model

    if progress:
        progress(0.0, _("loading the model"))
    return load_model(card_path, device)
