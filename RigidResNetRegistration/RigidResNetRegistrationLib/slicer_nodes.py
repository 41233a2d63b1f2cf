"""Slicer adapter: MRML nodes <-> Lib volumes, and the MRML nodes a registration produces.

With ``slicer_panel`` (what the panel computes), ``slicer_install`` (PyTorch into Slicer's Python)
and ``slicer_selftest`` (the module's self-test cases), the only files of the Lib package that
import ``slicer``. It runs inside the Slicer application
and with the ``slicer-core`` wheel (MRML without the application), which is how the pytest suite
tests it. Every function takes its scene from the nodes it is given, never from the global
``slicer.mrmlScene`` (which ``slicer-core`` does not have).

Nothing here imports torch at import time: the module panel imports this file to list models and
describe devices; the torch-based Lib modules are imported inside :func:`register_nodes`.

Conventions (see ``geometry.py``):

* arrays: ``slicer.util.arrayFromVolume`` is ``[k, j, i]``, Lib volumes are ``array[i, j, k]``;
  the transposition happens here and only here (:func:`volume_from_node`, :func:`update_volume_node`);
* geometry: volumes are read in **world** RAS, i.e. ``IJKToRAS`` composed with the node's
  (linear) parent transforms; a non-linear parent transform is an error (harden it first);
* the output transform node holds the **modeling** transform "to parent" of the moving volume:
  observed by the moving volume it moves it onto the fixed volume; it maps the moving volume
  *as stored* (without a parent transform) to the fixed volume's world position. A linear
  transform already on the moving volume is used as the starting position and included in the
  result; when the moving volume is already observed by the output transform (a second run),
  that transform is ignored as input and replaced;
* registered and difference volumes are on the fixed volume's grid: the fixed volume's
  ``IJKToRAS`` and parent transform.

Inputs are never modified (voxels and geometry are copied); output nodes are created or written
only after the engine returned, so a failed or cancelled run leaves no half-made nodes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import slicer
import slicer.util
import vtk

from .errors import RegistrationCancelled
from .model_card import MODELS_DIR, ModelError, read_model_card  # torch-free

try:
    from slicer.i18n import tr
except ImportError:  # slicer-core (MRML without the application) has no translations

    def tr(text: str) -> str:
        """Slicer's translation of a user-visible text (the text itself outside the application)."""
        return text

if TYPE_CHECKING:  # only for type hints: these modules import torch
    from .batch import PairResult
    from .engine import Predictor, RegistrationOptions, RegistrationResult
    from .preprocess import Volume

DEFAULT_MODEL = "rigid_resnet34"

#: Attribute names set on the output nodes.
ATTRIBUTE_PREFIX = "RigidResNetRegistration."

OutputSpec = Union[bool, None, Any]  # True: create a node; False/None: skip; a node: write into it


# --------------------------------------------------------------------------- models & devices


@dataclasses.dataclass(frozen=True)
class ModelCardInfo:
    """What the panel shows about a bundled model card (read as JSON, without torch)."""

    key: str  # file stem, e.g. "rigid_resnet34": what the panel and ``register(model=...)`` use
    path: Path
    name: str
    transform: str
    trained: bool
    notes: str

    @property
    def label(self) -> str:
        status = "trained" if self.trained else "UNTRAINED placeholder (predicts identity)"
        return f"{self.name}: {self.transform}, {status}"


def list_model_cards(folder: Union[str, Path] = MODELS_DIR) -> list[ModelCardInfo]:
    """The ``*.json`` model cards in ``folder`` (rigid first, then by name). Unreadable cards are
    skipped here; loading one through ``model.load_model`` reports what is wrong with it."""
    cards = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            card = read_model_card(path)
        except ModelError:
            continue
        cards.append(ModelCardInfo(path.stem, path.resolve(), card.name, card.transform, card.trained,
                                   str(card.raw.get("notes", ""))))
    return sorted(cards, key=lambda c: (c.transform != "rigid", c.key))


def model_card_path(model: Union[str, Path, None] = None, folder: Union[str, Path] = MODELS_DIR) -> Path:
    """Resolve ``model``: None (the default bundled card), a bundled card's key
    (``"rigid_resnet34"``), or the path of a ``.json`` card. Raises ``ValueError`` if not found."""
    if model is None or str(model) == "":
        model = DEFAULT_MODEL
    p = Path(model)
    if p.suffix.lower() == ".json" or len(p.parts) > 1:
        if not p.is_file():
            raise ValueError(f"model card not found: {p}")
        return p.resolve()
    candidate = Path(folder) / f"{model}.json"
    if candidate.is_file():
        return candidate.resolve()
    known = ", ".join(c.key for c in list_model_cards(folder)) or "none"
    raise ValueError(f"unknown model {model!r} (bundled models: {known})")


def torch_status() -> dict[str, Any]:
    """What is known about PyTorch without importing it: installed?, version, CUDA build.

    Reads ``torch/version.py`` as text when torch is not imported yet (importing torch takes
    seconds and must wait until the user registers); asks torch itself once it is imported.
    """
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        available = bool(torch.cuda.is_available())
        return {
            "installed": True,
            "imported": True,
            "version": str(torch.__version__),
            "cuda_build": getattr(torch.version, "cuda", None),
            "cuda_available": available,
            "gpu": torch.cuda.get_device_name(0) if available else None,
        }
    status: dict[str, Any] = {"installed": False, "imported": False, "version": None, "cuda_build": None,
                              "cuda_available": None, "gpu": None}
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return status
    status["installed"] = True
    version_file = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError:
        return status
    version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    cuda = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    status["version"] = version.group(1) if version else None
    status["cuda_build"] = cuda.group(1) if cuda else None
    return status


def nvidia_driver_found() -> bool:
    """An NVIDIA driver is visible (Linux ``/proc`` entry or ``nvidia-smi`` on the PATH)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def describe_devices(status: Optional[dict[str, Any]] = None) -> str:
    """One line for the panel: which devices can run the model, as far as is known."""
    s = status if status is not None else torch_status()
    if not s["installed"]:
        return "CPU; CUDA unknown: PyTorch is not installed yet (it is installed, after asking, on Register)"
    torch_text = f"PyTorch {s['version'] or '?'}"
    if s["imported"]:
        if s["cuda_available"]:
            return f"CPU, CUDA ({s['gpu']}); {torch_text}"
        cause = "CPU-only PyTorch build" if not s["cuda_build"] else "no usable CUDA GPU"
        return f"CPU only ({cause}); {torch_text}"
    if not s["cuda_build"]:
        return f"CPU only (CPU-only PyTorch build); {torch_text}"
    if nvidia_driver_found():
        return f"CPU, CUDA likely (CUDA {s['cuda_build']} build, NVIDIA driver found); {torch_text}"
    return f"CPU; CUDA {s['cuda_build']} build but no NVIDIA driver found; {torch_text}"


# --------------------------------------------------------------------------- nodes <-> arrays


def _node_label(node: Any, role: str) -> str:
    name = node.GetName() if node is not None and hasattr(node, "GetName") else None
    return f"{role} '{name}'" if name else role


def _matrix(vtk_matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return slicer.util.arrayFromVTKMatrix(vtk_matrix)


def ijk_to_ras_of(node: Any) -> np.ndarray:
    """The node's own ``IJKToRAS`` 4x4 matrix (without parent transforms)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _matrix(m)


def check_scalar_volume(node: Any, role: str) -> None:
    """Raise ``ValueError`` (naming the volume) unless ``node`` is a 3D single-component scalar
    volume with image data in a scene."""
    if node is None:
        raise ValueError(f"select a {role}")
    if not hasattr(node, "IsA") or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__
        raise ValueError(f"{role} must be a scalar volume node, not {kind}")
    label = _node_label(node, role)
    if node.IsA("vtkMRMLTensorVolumeNode"):  # vector, DWI and DTI volumes derive from it
        raise ValueError(f"{label} is a vector/multi-component volume ({node.GetClassName()}); a 3D scalar volume is needed")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"{label} is a label map; choose an intensity image")
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"{label} has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"{label} has {image.GetNumberOfScalarComponents()} components per voxel (4D or vector image); "
            "a 3D scalar volume is needed"
        )
    dims = image.GetDimensions()
    if min(dims) < 1 or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"{label} is empty (dimensions {tuple(dims)})")
    if node.GetScene() is None:
        raise ValueError(f"{label} is not in a scene")


def parent_to_world(node: Any, role: str, skip: Any = None) -> np.ndarray:
    """4x4 RAS matrix of the node's parent transforms (identity if none). When the direct parent
    is ``skip`` it is ignored as a whole (it is the output transform, about to be replaced).
    A non-linear parent transform raises ``ValueError``."""
    parent = node.GetParentTransformNode()
    if parent is None or (skip is not None and parent is skip):
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(
            f"{_node_label(node, role)} is under a non-linear transform ('{parent.GetName()}'): "
            "harden it first (Data module, right-click, Harden transform)"
        )
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _matrix(m)


def volume_from_node(node: Any, name: str = "volume", to_world: Optional[np.ndarray] = None) -> "Volume":
    """A Lib :class:`~.preprocess.Volume` (``array[i, j, k]``, a copy) from a scalar volume node.

    ``to_world``: a 4x4 RAS matrix applied after ``IJKToRAS`` (the node's parent transforms).
    """
    from .preprocess import Volume  # imports torch: only when a registration runs

    check_scalar_volume(node, name)
    kji = slicer.util.arrayFromVolume(node)  # a view of VTK's memory, [k, j, i]
    array = np.array(np.transpose(kji, (2, 1, 0)), copy=True)  # [i, j, k], detached from the node
    ijk_to_ras = ijk_to_ras_of(node)
    if to_world is not None:
        ijk_to_ras = np.asarray(to_world, dtype=np.float64) @ ijk_to_ras
    return Volume(array, ijk_to_ras, _node_label(node, name))


def update_volume_node(node: Any, array_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> Any:
    """Write ``array[i, j, k]`` voxels and an ``IJKToRAS`` matrix into a scalar volume node."""
    a = np.asarray(array_ijk)
    if a.ndim != 3:
        raise ValueError(f"a 3D array is needed, got shape {a.shape}")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=np.float64)))
    slicer.util.updateVolumeFromArray(node, np.transpose(a, (2, 1, 0)))
    return node


def add_volume_node(scene: Any, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, name: str,
                    class_name: str = "vtkMRMLScalarVolumeNode") -> Any:
    """A new volume node in ``scene`` holding ``array[i, j, k]`` with ``ijk_to_ras``."""
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    update_volume_node(node, array_ijk, ijk_to_ras)
    node.CreateDefaultDisplayNodes()
    return node


def set_table(table_node: Any, rows: list[dict[str, Any]]) -> Any:
    """Fill a table node from a list of dicts (columns from the first row). Booleans and integers
    become integer columns, everything else double columns (None -> NaN)."""
    table_node.RemoveAllColumns()
    if not rows:
        return table_node
    table = table_node.GetTable()
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (bool, int, np.integer, np.bool_)) for v in values):
            column = vtk.vtkIntArray()
            cast: Callable[[Any], Any] = int
        else:
            column = vtk.vtkDoubleArray()
            cast = lambda v: float("nan") if v is None else float(v)  # noqa: E731
        column.SetName(str(key))
        column.SetNumberOfTuples(len(values))
        for index, value in enumerate(values):
            column.SetValue(index, cast(value))
        table.AddColumn(column)
    table.Modified()
    table_node.Modified()
    return table_node


# --------------------------------------------------------------------------- the registration


#: Style of the panel's result line for each quality verdict (:mod:`.quality`).
VERDICT_STYLE = {"ok": "", "suspicious": "color: #b36b00;", "failed": "color: #c00000; font-weight: bold;"}


@dataclasses.dataclass
class RegistrationNodes:
    """What a registration made in the scene, with the Lib result it came from.

    ``transform_node``: linear transform, "to parent" of the moving volume (modeling direction);
    ``moving_to_fixed_world``: its transform to world (moving volume as stored -> fixed world);
    ``registered_volume_node``/``difference_volume_node``: on the fixed grid (or None);
    ``table_node``: per-slice parameters and similarity (or None); ``result``: the engine's
    :class:`~.engine.RegistrationResult` (matrices, per-slice arrays, timings).
    """

    transform_node: Any
    registered_volume_node: Any
    difference_volume_node: Any
    table_node: Any
    result: "RegistrationResult"
    moving_to_fixed_world: np.ndarray
    model_name: str
    model_trained: bool
    created: list[Any] = dataclasses.field(default_factory=list)

    @property
    def device(self) -> str:
        return self.result.device

    @property
    def seconds(self) -> float:
        return self.result.seconds

    @property
    def similarity(self) -> dict[str, float]:
        return self.result.similarity

    @property
    def verdict(self) -> str:
        """Quality verdict: ``ok``, ``suspicious`` or ``failed`` (:mod:`.quality`)."""
        return self.result.verdict

    def summary(self) -> str:
        """One result line: quality verdict, device, seconds, similarity before -> after, and the
        verdict's reasons."""
        s = self.similarity
        text = (
            f"quality {self.verdict.upper() if self.verdict != 'ok' else 'ok'}: "
            f"{self.device}, {self.seconds:.2f} s, NCC {s['ncc_before']:.3f} -> {s['ncc_after']:.3f}, "
            f"MI {s['mi_before']:.3f} -> {s['mi_after']:.3f}"
        )
        if self.result.refinement is not None:
            text += f", refined on {str(self.result.refinement['metric']).upper()}"
        start = self.result.initialisation
        if start is not None and start.used != "header":
            text += f", started from {start.used}" + (" after a coarse rotation search" if start.searched else "")
        if not self.model_trained:
            text += " (untrained model: identity transform)"
        for reason in self.result.warnings:
            text += f"; WARNING: {reason}"
        return text


def _is_node(value: Any) -> bool:
    return value is not None and not isinstance(value, bool) and hasattr(value, "IsA")


def _chain(node: Any) -> list[Any]:
    """Parent transform nodes of ``node``, nearest first."""
    out = []
    parent = node.GetParentTransformNode()
    while parent is not None and len(out) < 100:
        out.append(parent)
        parent = parent.GetParentTransformNode()
    return out


def check_inputs(
    fixed_node: Any,
    moving_node: Any,
    transform_node: Any = None,
    registered_volume: OutputSpec = True,
    difference_volume: OutputSpec = True,
    slice_table: OutputSpec = True,
) -> None:
    """Validate input and output nodes before anything runs; ``ValueError`` with a clear message."""
    check_scalar_volume(fixed_node, "fixed volume")
    check_scalar_volume(moving_node, "moving volume")
    if fixed_node is moving_node:
        raise ValueError("fixed and moving volumes are the same node; choose two different volumes")
    if fixed_node.GetScene() is not moving_node.GetScene():
        raise ValueError("fixed and moving volumes are in different scenes")
    scene = fixed_node.GetScene()
    parent_to_world(fixed_node, "fixed volume")
    parent_to_world(moving_node, "moving volume", skip=transform_node)
    outputs = {"registered volume": registered_volume, "difference volume": difference_volume}
    for role, value in outputs.items():
        if value is None or isinstance(value, bool):
            continue
        if not _is_node(value) or not value.IsA("vtkMRMLScalarVolumeNode") or value.IsA("vtkMRMLTensorVolumeNode") \
                or value.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"{role} output must be a scalar volume node, True (create one) or False (none)")
        if value is fixed_node or value is moving_node:
            raise ValueError(f"{_node_label(value, role)} output is an input volume: choose or create another node")
        if value.GetScene() is not scene:
            raise ValueError(f"{_node_label(value, role)} output is not in the inputs' scene")
    if _is_node(registered_volume) and registered_volume is difference_volume:
        raise ValueError("registered and difference volumes must be different nodes")
    if not (slice_table is None or isinstance(slice_table, bool)):
        if not _is_node(slice_table) or not slice_table.IsA("vtkMRMLTableNode"):
            raise ValueError("slice table output must be a table node, True (create one) or False (none)")
        if slice_table.GetScene() is not scene:
            raise ValueError("slice table output is not in the inputs' scene")
    if transform_node is not None:
        if not _is_node(transform_node) or not transform_node.IsA("vtkMRMLTransformNode"):
            raise ValueError("output transform must be a transform node (or None to create one)")
        if transform_node.GetScene() is not scene:
            raise ValueError(f"{_node_label(transform_node, 'output transform')} is not in the inputs' scene")
        if transform_node in _chain(fixed_node):
            raise ValueError(
                f"{_node_label(transform_node, 'output transform')} moves the fixed volume: choose or create another transform"
            )
        moving_chain = _chain(moving_node)
        if transform_node in moving_chain[1:]:
            raise ValueError(
                f"{_node_label(transform_node, 'output transform')} is a parent of the moving volume's transform: "
                "choose or create another transform"
            )
        parent = transform_node.GetParentTransformNode()
        if parent is not None and not parent.IsTransformToWorldLinear():
            raise ValueError(f"{_node_label(transform_node, 'output transform')} is under a non-linear transform")


def _set_output_volume(node: Any, volume: "Volume", fixed_node: Any) -> None:
    """Write an engine output (on the fixed grid, world RAS) into ``node`` with the fixed volume's
    own IJKToRAS and parent transform, so it lies exactly where the fixed volume lies."""
    update_volume_node(node, volume.array, ijk_to_ras_of(fixed_node))
    node.SetAndObserveTransformNodeID(fixed_node.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()


def register_nodes(
    fixed_node: Any,
    moving_node: Any,
    predictor: "Predictor",
    options: Optional["RegistrationOptions"] = None,
    transform_node: Any = None,
    registered_volume: OutputSpec = True,
    difference_volume: OutputSpec = True,
    slice_table: OutputSpec = True,
    apply_transform: bool = True,
    progress: Optional[Callable[[float, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    initial_transform_node: Any = None,
) -> RegistrationNodes:
    """Register the moving volume node to the fixed one with ``predictor`` (a loaded model).

    Output arguments: a node (written into), True (a new node is created) or False/None (not
    produced). ``transform_node`` None creates a new linear transform. ``apply_transform`` makes
    the moving volume observe the output transform (replacing its parent transform, whose effect
    is included in the result). ``initial_transform_node``: an optional linear transform node whose
    transform to world (modeling direction, as if the moving volume were placed under it, after its
    own parent transform) gives the start; ``options.init`` works from there and the result
    includes it. Raises ``ValueError`` for bad inputs, the engine's
    ``RegistrationCancelled`` when ``cancel()`` returned True (nothing is created), and removes
    every node it created if anything fails while writing outputs.
    """
    from .engine import register_volumes

    outputs = _Outputs(transform_node, registered_volume, difference_volume, slice_table, apply_transform)
    fixed, moving, opts, moving_initial = _node_inputs(fixed_node, moving_node, options, outputs, initial_transform_node)
    result = register_volumes(  # validates the options and checks the volumes before any heavy work
        fixed, moving, predictor, opts, progress=progress, cancel=cancel)
    return _result_nodes(fixed_node, moving_node, result, predictor.card, moving_initial, outputs)


def register_node_pairs(
    pairs: "list[tuple[Any, Any]]",
    predictor: "Predictor",
    options: Optional["RegistrationOptions"] = None,
    registered_volume: bool = True,
    difference_volume: bool = True,
    slice_table: bool = True,
    apply_transform: bool = True,
    progress: Optional[Callable[[float, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> "list[PairResult]":
    """Register each (fixed node, moving node) pair as :func:`register_nodes` does (new output
    nodes for each), in :func:`batch.register_many`'s loop: one :class:`~.batch.PairResult` per pair,
    its ``output`` the pair's :class:`RegistrationNodes`; a failed pair (bad nodes included) is
    recorded with its one-line error, not raised, and leaves no nodes. The nodes are read in the
    main thread (no prefetch: MRML is not thread-safe). Output arguments: True (create) or False."""
    from .batch import Pair, PairInputs, register_many

    for role, value in (("registered volume", registered_volume), ("difference volume", difference_volume),
                        ("slice table", slice_table)):
        if not isinstance(value, bool):
            raise ValueError(f"{role} output must be True (create one for each pair) or False for many pairs, not a node")
    outputs = _Outputs(None, registered_volume, difference_volume, slice_table, apply_transform)
    items = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pair {i + 1} must be a (fixed volume node, moving volume node) tuple")
        items.append(Pair(pair[0], pair[1], name=pair[1].GetName() if _is_node(pair[1]) else f"pair {i + 1}"))

    def read(pair: Pair) -> PairInputs:
        fixed, moving, opts, moving_initial = _node_inputs(pair.fixed, pair.moving, options, outputs, None)
        return PairInputs(fixed, moving, opts, context=moving_initial)

    def write(pair: Pair, inputs: PairInputs, result: "RegistrationResult", started: float) -> RegistrationNodes:
        return _result_nodes(pair.fixed, pair.moving, result, predictor.card, inputs.context, outputs)

    results = register_many(items, predictor, options, read=read, write=write, progress=progress, cancel=cancel, prefetch=False,
                            write_behind=False)  # MRML: the main thread only
    failed = [r.name for r in results if r.status != "ok"]
    (logging.warning if failed else logging.info)(
        f"Rigid ResNet Registration: {len(results) - len(failed)} of {len(results)} pairs registered"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return results


@dataclasses.dataclass
class _Outputs:
    """The outputs asked for: the transform node (None: create one), the optional outputs (node,
    True: create, False/None: none) and whether the moving volume observes the transform."""

    transform_node: Any
    registered_volume: OutputSpec
    difference_volume: OutputSpec
    slice_table: OutputSpec
    apply_transform: bool


def _node_inputs(fixed_node: Any, moving_node: Any, options: Optional["RegistrationOptions"], outputs: _Outputs,
                 initial_transform_node: Any) -> "tuple[Volume, Volume, RegistrationOptions, np.ndarray]":
    """Check the nodes; return the fixed and moving volumes in world RAS, the options for them and
    the moving volume's starting position (its parent transforms to world)."""
    from . import geometry as geo
    from .engine import RegistrationOptions

    check_inputs(fixed_node, moving_node, outputs.transform_node, outputs.registered_volume, outputs.difference_volume,
                 outputs.slice_table)
    scene = fixed_node.GetScene()
    opts = dataclasses.replace(
        options or RegistrationOptions(),
        compute_registered=bool(outputs.registered_volume),
        compute_difference=bool(outputs.difference_volume),
    )
    fixed_world = parent_to_world(fixed_node, "fixed volume")
    moving_initial = parent_to_world(moving_node, "moving volume", skip=outputs.transform_node)
    fixed = volume_from_node(fixed_node, "fixed volume", fixed_world)
    moving = volume_from_node(moving_node, "moving volume", moving_initial)
    if initial_transform_node is not None:
        if not _is_node(initial_transform_node) or not initial_transform_node.IsA("vtkMRMLTransformNode") \
                or initial_transform_node.GetScene() is not scene:
            raise ValueError("initial transform must be a transform node of the inputs' scene (or None)")
        if not initial_transform_node.IsTransformToWorldLinear():
            raise ValueError(f"{_node_label(initial_transform_node, 'initial transform')} is not linear: harden or choose another")
        if opts.initial_transform is not None:
            raise ValueError("give the initial transform either as a node or in the options, not both")
        m = vtk.vtkMatrix4x4()
        initial_transform_node.GetMatrixTransformToWorld(m)
        # modeling (moving world -> fixed world) to the engine's resampling direction
        opts = dataclasses.replace(opts, initial_transform=geo.invert(_matrix(m)))
    return fixed, moving, opts, moving_initial


def _result_nodes(fixed_node: Any, moving_node: Any, result: "RegistrationResult", card: Any, moving_initial: np.ndarray,
                  outputs: _Outputs) -> RegistrationNodes:
    """The output nodes of a registration (created or written into); every node added is removed
    again when anything fails."""
    from . import geometry as geo
    from .report import result_report

    transform_node, registered_volume, difference_volume, slice_table = (
        outputs.transform_node, outputs.registered_volume, outputs.difference_volume, outputs.slice_table)
    scene = fixed_node.GetScene()
    # the inputs may have been removed while events were processed during the run
    for node, role in ((fixed_node, "fixed volume"), (moving_node, "moving volume"), (transform_node, "output transform"),
                       (registered_volume, "registered volume"), (difference_volume, "difference volume"),
                       (slice_table, "slice table")):
        if _is_node(node) and not scene.IsNodePresent(node):
            raise ValueError(f"{role} was removed from the scene during the registration; nothing was created")

    # modeling transform: moving volume as stored -> moving world (initial) -> fixed world
    moving_to_fixed_world = geo.invert(result.fixed_to_moving_ras) @ moving_initial
    moving_name, fixed_name = moving_node.GetName(), fixed_node.GetName()
    created: list[Any] = []
    existing = _node_ids(scene)

    def new_node(class_name: str, name: str) -> Any:
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
        created.append(node)
        return node

    try:
        if transform_node is not None:
            tnode = transform_node
        else:
            tnode = new_node("vtkMRMLLinearTransformNode", f"{moving_name} to {fixed_name}")
        to_parent = moving_to_fixed_world
        parent = tnode.GetParentTransformNode()
        if parent is not None:
            m = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(m)
            to_parent = geo.invert(_matrix(m)) @ moving_to_fixed_world
        tnode.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
        tnode.SetNodeReferenceID(tnode.GetFixedNodeReferenceRole(), fixed_node.GetID())
        tnode.SetNodeReferenceID(tnode.GetMovingNodeReferenceRole(), moving_node.GetID())
        report = result_report(result, card)
        report["moving_to_fixed_world_RAS"] = {
            "meaning": "this node's transform to world: moves the moving volume as stored onto the fixed volume",
            "matrix": moving_to_fixed_world.tolist(),
        }
        tnode.SetAttribute(ATTRIBUTE_PREFIX + "Report", json.dumps(report))

        reg_node = dif_node = table_node = None
        if registered_volume and result.registered is not None:
            reg_node = registered_volume if _is_node(registered_volume) else new_node(
                "vtkMRMLScalarVolumeNode", f"{moving_name} registered")
            _set_output_volume(reg_node, result.registered, fixed_node)
        if difference_volume and result.difference is not None:
            dif_node = difference_volume if _is_node(difference_volume) else new_node(
                "vtkMRMLScalarVolumeNode", f"{moving_name} difference")
            _set_output_volume(dif_node, result.difference, fixed_node)
        if slice_table:
            table_node = slice_table if _is_node(slice_table) else new_node("vtkMRMLTableNode", f"{moving_name} slices")
            set_table(table_node, result.slice_table())
            table_node.SetAttribute(ATTRIBUTE_PREFIX + "Mode", result.mode)
            table_node.SetAttribute(ATTRIBUTE_PREFIX + "SliceOrientation", result.frame.orientation)

        out = RegistrationNodes(tnode, reg_node, dif_node, table_node, result, moving_to_fixed_world,
                                card.name, bool(card.trained), created)
        tnode.SetAttribute(ATTRIBUTE_PREFIX + "Summary", out.summary())
        if outputs.apply_transform:
            moving_node.SetAndObserveTransformNodeID(tnode.GetID())
        return out
    except BaseException:
        # remove every node added while writing outputs (output nodes and their display nodes)
        added = [scene.GetNodeByID(i) for i in _node_ids(scene) if i not in existing]
        for node in reversed(added):
            if node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise


def _node_ids(scene: Any) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def is_cancellation(exc: BaseException) -> bool:
    """True if ``exc`` is the engine's :class:`errors.RegistrationCancelled` (a torch-free module)."""
    return isinstance(exc, RegistrationCancelled)
