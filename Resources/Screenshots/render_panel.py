"""Render the module panel (Resources/Screenshots/panel.png) offscreen, without Slicer.

    pip install PySide6-Essentials slicer-core
    QT_QPA_PLATFORM=offscreen python3 Resources/Screenshots/render_panel.py

How the picture is made: the module's real ``.ui`` file is loaded with PySide6's ``QUiLoader``
after the Slicer/CTK widgets plain Qt does not have are replaced in a copy of the XML:
``qMRMLWidget`` -> ``QWidget``, ``ctkCollapsibleButton`` -> ``QGroupBox`` (a collapsed section is
drawn as a title only), ``qMRMLNodeComboBox`` -> ``QComboBox`` showing a node name or its "Create
new ..." entry. So it looks a little different inside Slicer. Combo boxes get the items the
parameter node puts there (devices, modes, model cards from ``Resources/Models``); the device line
and the result line come from the code the module runs: ``slicer_nodes.describe_devices()`` and,
unless ``--no-run``, a real registration of the bundled sample moved by the known demo motion
through ``slicer_nodes.register_nodes`` on MRML nodes (``slicer-core``), i.e. the Logic's path.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "RigidResNetRegistration"
UI_FILE = MODULE / "Resources" / "UI" / "RigidResNetRegistration.ui"
OUT = Path(__file__).resolve().parent / "panel.png"
sys.path.insert(0, str(MODULE))

MRML_ONLY = {"nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "renameEnabled",
             "noneDisplay", "collapsed", "SlicerParameterName"}


def plain_qt_ui(path: Path, node_names: dict[str, str]) -> tuple[bytes, set[str]]:
    """The .ui XML with Slicer/CTK widgets replaced by standard ones; also the collapsed sections."""
    tree = ET.parse(path)
    root = tree.getroot()
    collapsed = set()
    for widget in root.iter("widget"):
        cls, name = widget.get("class"), widget.get("name")
        props = {p.get("name"): p for p in widget.findall("property")}
        if cls == "qMRMLWidget":
            widget.set("class", "QWidget")
        elif cls == "ctkCollapsibleButton":
            widget.set("class", "QGroupBox")
            if "text" in props:
                props["text"].set("name", "title")
            if "collapsed" in props and props["collapsed"].findtext("bool") == "true":
                collapsed.add(name)
        elif cls == "qMRMLNodeComboBox":
            widget.set("class", "QComboBox")
            text = node_names.get(name) or (props["noneDisplay"].findtext("string") if "noneDisplay" in props else "None")
            item = ET.SubElement(widget, "item")
            prop = ET.SubElement(item, "property", name="text")
            ET.SubElement(prop, "string").text = text
        for p in list(widget.findall("property")):
            if p.get("name") in MRML_ONLY:
                widget.remove(p)
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root, encoding="utf-8"), collapsed


def registration_result_line() -> str:
    """Register the bundled sample against a copy moved by the known demo motion, on MRML nodes
    (slicer-core), exactly as the module's Logic does; return the panel's result line."""
    import slicer

    from RigidResNetRegistrationLib import sample, slicer_nodes
    from RigidResNetRegistrationLib.engine import RegistrationOptions
    from RigidResNetRegistrationLib.model import load_model

    scene = slicer.vtkMRMLScene()
    fixed = sample.load_sample()
    moving, _ = sample.apply_known_motion(fixed)
    fixed_node = slicer_nodes.add_volume_node(scene, fixed.array, fixed.ijk_to_ras, "MNI152_T1")
    moving_node = slicer_nodes.add_volume_node(scene, moving.array, moving.ijk_to_ras, "MNI152_T1 moved")
    out = slicer_nodes.register_nodes(fixed_node, moving_node, load_model(device="auto"), RegistrationOptions(device="auto"))
    made = [n.GetName() for n in (out.transform_node, out.registered_volume_node, out.difference_volume_node, out.table_node)]
    return out.summary() + "\nOutputs: " + ", ".join(made)  # as the widget's _showResult


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    parser.add_argument("--no-run", action="store_true", help="do not run a registration for the result line")
    parser.add_argument("--width", type=int, default=400)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from RigidResNetRegistrationLib import slicer_nodes

    result = "" if args.no_run else registration_result_line()
    node_names = {
        "fixedVolumeSelector": "MNI152_T1",
        "movingVolumeSelector": "MNI152_T1 moved",
    }
    xml, collapsed = plain_qt_ui(UI_FILE, node_names)

    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QLabel, QProgressBar, QPushButton, QWidget

    app = QApplication.instance() or QApplication([])
    buffer = QBuffer()
    buffer.setData(QByteArray(xml))
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    if panel is None:
        raise SystemExit("QUiLoader could not load the converted .ui")

    def child(cls, name):
        return panel.findChild(cls, name)

    cards = slicer_nodes.list_model_cards()
    choices = {
        "deviceComboBox": list(slicer_nodes.DEVICES),
        "modeComboBox": list(slicer_nodes.MODES),
        "modelComboBox": [c.key for c in cards],
        "axisComboBox": list(slicer_nodes.AXES),
    }
    for name, items in choices.items():
        combo = child(QComboBox, name)
        combo.clear()
        combo.addItems(items)
    child(QLabel, "deviceInfoLabel").setText(f"Available: {slicer_nodes.describe_devices()}")
    child(QLabel, "modelInfoLabel").setText(cards[0].label if cards else "")
    child(QLabel, "resultLabel").setText(result or "(result line: device, seconds, similarity before -> after)")
    child(QProgressBar, "progressBar").setVisible(False)
    child(QPushButton, "applyButton").setEnabled(True)
    for name in collapsed:
        box = child(QGroupBox, name)
        box.setTitle("\u25b8 " + box.title() + " (collapsed)")
        for w in box.findChildren(QWidget):
            w.setVisible(False)
        box.setMaximumHeight(24)

    panel.resize(args.width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(args.output)):
        raise SystemExit(f"could not write {args.output}")
    print(f"wrote {args.output} ({panel.width()}x{panel.height()})")
    if result:
        print(f"result line: {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
