"""What the module panel computes, without Qt: whether Register can run, the Logic's keywords from
the parameter node, the result line and the model's description.

The widget (``RigidResNetRegistration.py``) only moves these values to and from its Qt widgets, so
everything here is tested on real MRML nodes with ``slicer-core``. ``parameters`` is the module's
parameter node (``RigidResNetRegistrationParameterNode``) or any object with its fields.
"""

from __future__ import annotations

from typing import Any, Optional

from . import slicer_nodes
from .slicer_nodes import VERDICT_STYLE, RegistrationNodes
from .slicer_nodes import tr as _

#: Parameter node fields passed unchanged to ``RigidResNetRegistrationLogic.register``.
ENGINE_FIELDS = ("device", "mode", "model", "axis", "iterations", "refine", "symmetric", "refineSlices", "batchSize",
                 "init", "applyTransform")


def output_choices(parameters: Any) -> tuple[Any, Any, Any]:
    """Registered volume, difference volume and slice table as Logic arguments: the selected node,
    True (create one) or False (not made)."""
    p = parameters
    return (
        (p.registeredVolume or True) if p.createRegisteredVolume else False,
        (p.differenceVolume or True) if p.createDifferenceVolume else False,
        (p.sliceTable or True) if p.createSliceTable else False,
    )


def register_keywords(parameters: Any) -> dict[str, Any]:
    """Keyword arguments of ``RigidResNetRegistrationLogic.register`` (after the two volumes) for
    the parameter node's settings; progress and cancel are the widget's own."""
    p = parameters
    registered, difference, table = output_choices(p)
    keywords = {name: getattr(p, name) for name in ENGINE_FIELDS}
    keywords.update(initialTransformNode=p.initialTransform, transformNode=p.outputTransform,
                    registeredVolume=registered, differenceVolume=difference, sliceTable=table)
    return keywords


def register_problem(parameters: Optional[Any]) -> Optional[str]:
    """Why Register cannot run with these settings (one line for the button's tooltip), or None."""
    p = parameters
    if not p or not p.fixedVolume:
        return _("Select the fixed volume")
    if not p.movingVolume:
        return _("Select the moving volume")
    if p.fixedVolume == p.movingVolume:
        return _("Fixed and moving volumes must be different")
    try:
        slicer_nodes.check_inputs(p.fixedVolume, p.movingVolume, p.outputTransform, *output_choices(p))
    except ValueError as exc:
        return str(exc)
    return None


def result_text(out: RegistrationNodes) -> tuple[str, str]:
    """The panel's result line with the names of the nodes made, and its style sheet (by verdict)."""
    made = [node.GetName() for node in (out.transform_node, out.registered_volume_node, out.difference_volume_node,
                                        out.table_node) if node is not None]
    text = out.summary() + "\n" + _("Outputs: {names}").format(names=", ".join(made))
    return text, VERDICT_STYLE[out.verdict]


def model_description(key: Optional[str]) -> tuple[str, str]:
    """Label and notes (tooltip) of the bundled model card ``key``; empty when there is none."""
    card = {card.key: card for card in slicer_nodes.list_model_cards()}.get(key) if key else None
    return (card.label, card.notes) if card else ("", "")


def default_inputs(scene: Any, fixed: Any, moving: Any) -> tuple[Any, Any]:
    """The fixed and moving volumes to preselect: those given, else the scene's first scalar volume
    as the fixed one and the next as the moving one (label maps and other subclasses skipped)."""
    volumes = [node for node in (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                                 for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
               if node.GetClassName() == "vtkMRMLScalarVolumeNode"]
    fixed = fixed or next(iter(volumes), None)
    moving = moving or next((node for node in volumes if node != fixed), None)
    return fixed, moving


def enabled_widgets(parameters: Optional[Any]) -> dict[str, bool]:
    """Which of the panel's widgets (``.ui`` names) are enabled for these settings: an output node
    selector only when that output is made; each refinement only in its own mode (the 6-DOF one in
    ``volume`` mode, the per-slice one in ``slices`` mode)."""
    p = parameters
    if not p:
        return {}
    return {
        "registeredVolumeSelector": bool(p.createRegisteredVolume),
        "differenceVolumeSelector": bool(p.createDifferenceVolume),
        "sliceTableSelector": bool(p.createSliceTable),
        "refineCheckBox": p.mode == "volume",
        "refineSlicesCheckBox": p.mode == "slices",
    }


def model_choices() -> tuple[list[str], str]:
    """The bundled model keys the panel lists and the one selected by default."""
    keys = [card.key for card in slicer_nodes.list_model_cards()] or [slicer_nodes.DEFAULT_MODEL]
    return keys, slicer_nodes.DEFAULT_MODEL if slicer_nodes.DEFAULT_MODEL in keys else keys[0]
