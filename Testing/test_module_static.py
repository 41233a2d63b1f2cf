"""Static checks of the Slicer module (no Slicer, no Qt): widget names, parameter names, imports,
sample checksum, self-test runner, CMake and README hook-up."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import struct
import subprocess
import xml.etree.ElementTree as ET

from conftest import ROOT

MODULE_DIR = ROOT / "RigidResNetRegistration"
MODULE_FILE = MODULE_DIR / "RigidResNetRegistration.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "RigidResNetRegistration.ui"
LIB = MODULE_DIR / "RigidResNetRegistrationLib"
TORCH = {"torch", "torchvision"}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def class_def(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def top_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported when the file is imported: statements outside functions (including those
    inside top-level if/try blocks and class bodies), absolute names; relative ones as '.name'."""
    names: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)  # may be submodules
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(tree.body)
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _lib_module(name: str) -> str:
    """'RigidResNetRegistrationLib.engine.X' or '.engine.X' -> 'engine'; the package -> '__init__'."""
    rest = name.lstrip(".") if name.startswith(".") else name.partition(".")[2]
    first = rest.split(".")[0]
    return first if first and (LIB / f"{first}.py").is_file() else "__init__"


def lib_modules_reached(start: set[str]) -> tuple[set[str], set[str]]:
    """Follow top-level imports through the Lib package: (Lib modules reached, outside modules)."""
    seen: set[str] = set()
    outside: set[str] = set()
    todo: list[str] = []

    def route(name: str, inside_lib: bool) -> None:
        if (inside_lib and name.startswith(".")) or name.split(".")[0] == "RigidResNetRegistrationLib":
            todo.append(_lib_module(name))
        else:
            outside.add(name.split(".")[0])

    for name in start:
        route(name, False)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for name in top_level_imports(ast.parse((LIB / f"{mod}.py").read_text(encoding="utf-8"))):
            route(name, True)
    return seen, outside


def returned_dict_keys(path, function: str) -> set[str]:
    """String keys of the dict literals returned by ``function`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return {k.value for n in ast.walk(fn) if isinstance(n, ast.Dict) for k in n.keys if isinstance(k, ast.Constant)}


# --------------------------------------------------------------------------- widgets & parameters


def test_every_widget_the_module_uses_exists_in_the_ui():
    used = {m.group(1) for m in re.finditer(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8"))}
    assert used, "the module uses no widget from the .ui?"
    enabled = returned_dict_keys(LIB / "slicer_panel.py", "enabled_widgets")  # widgets the panel enables by name
    assert "refineCheckBox" in enabled
    used |= enabled
    missing = used - set(ui_widgets())
    assert not missing, f"widgets used in RigidResNetRegistration.py but absent from the .ui: {sorted(missing)}"


def test_ui_parameter_names_match_the_parameter_node_fields():
    fields = {n.target.id for n in class_def(module_tree(), "RigidResNetRegistrationParameterNode").body
              if isinstance(n, ast.AnnAssign)}
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
                bound[prop.findtext("string")] = name
    assert set(bound) <= fields, f"bound to unknown parameters: {sorted(set(bound) - fields)}"
    assert fields <= set(bound), f"parameters without a widget: {sorted(fields - set(bound))}"


def test_ui_is_a_slicer_panel_with_scene_connections():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "RigidResNetRegistration"
    selectors = {n for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors and selectors <= connected, f"node selectors without a scene: {sorted(selectors - connected)}"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert used - custom <= {"QLabel", "QComboBox", "QCheckBox", "QSpinBox", "QPushButton", "QProgressBar"}
    for name in ("fixedVolumeSelector", "movingVolumeSelector", "deviceComboBox", "modeComboBox", "modelComboBox",
                 "outputTransformSelector", "applyTransformCheckBox", "registeredVolumeSelector", "differenceVolumeSelector",
                 "sliceTableSelector", "applyButton", "progressBar", "resultLabel", "deviceInfoLabel"):
        assert name in ui_widgets(), name


# --------------------------------------------------------------------------- imports & conventions


def test_module_file_imports_no_torch_at_top_level():
    names = top_level_imports(module_tree())
    assert not {n.split(".")[0] for n in names} & TORCH, "torch imported at module import time"
    reached, outside = lib_modules_reached(names)
    assert "slicer_nodes" in reached
    assert not outside & TORCH, f"a Lib module imported at module import time imports torch: {sorted(reached)}"
    assert not reached & {"engine", "model", "preprocess", "resample", "similarity", "sample", "report", "io", "cli"}


def test_slicer_is_imported_only_by_the_slicer_files_and_the_module():
    """Only the Lib's ``slicer_*.py`` files (adapter, panel, installer, self-test cases) may import
    ``slicer``; none imports Qt (the widget's Qt code stays in the module file)."""
    slicer_files = {path.name for path in LIB.glob("slicer_*.py")}
    assert slicer_files == {"slicer_nodes.py", "slicer_panel.py", "slicer_install.py", "slicer_selftest.py"}
    for path in LIB.glob("*.py"):
        names = {n.split(".")[0] for n in top_level_imports(ast.parse(path.read_text(encoding="utf-8")))}
        inner = set(re.findall(r"^\s*(?:import|from)\s+(slicer|qt|ctk)\b", path.read_text(encoding="utf-8"), re.M))
        if path.name in slicer_files:
            assert not (names | inner) & {"qt", "ctk"}, f"{path.name} imports Qt"
        else:
            assert not (names | inner) & {"slicer", "qt", "ctk"}, f"{path.name} imports Slicer/Qt"


def test_module_file_is_thin_with_the_four_classes_where_slicer_expects_them():
    """The module file keeps Slicer's scripted-module layout (Module, parameter node, Widget, Logic,
    Test) and stays under 400 lines: what computes lives in the Lib package."""
    lines = MODULE_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 400, f"RigidResNetRegistration.py has {len(lines)} lines"
    classes = [n.name for n in module_tree().body if isinstance(n, ast.ClassDef)]
    assert classes == ["RigidResNetRegistration", "RigidResNetRegistrationParameterNode", "RigidResNetRegistrationWidget",
                       "RigidResNetRegistrationLogic", "RigidResNetRegistrationTest"]
    test = class_def(module_tree(), "RigidResNetRegistrationTest")
    assert {ast.unparse(b) for b in test.bases} >= {"ScriptedLoadableModuleTest", "SelfTestCases"}


def test_no_bare_except_and_no_install_in_the_module_constructor():
    for path in (MODULE_FILE, *LIB.glob("slicer_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bare = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.type is None]
        assert not bare, f"bare except in {path.name} at lines {bare}"
    ctor = next(n for n in class_def(module_tree(), "RigidResNetRegistration").body
                if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    called = {ast.unparse(n.func) for n in ast.walk(ctor) if isinstance(n, ast.Call)}
    assert not {c for c in called if re.search(r"install|pip|ensure|register\(", c)}, called


def test_module_metadata_and_sample_data():
    text = MODULE_FILE.read_text(encoding="utf-8")
    ctor = ast.get_source_segment(text, next(n for n in class_def(module_tree(), "RigidResNetRegistration").body
                                             if isinstance(n, ast.FunctionDef) and n.name == "__init__"))
    for attribute in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attribute} =" in ctor, attribute
    assert 'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]' in ctor
    assert "README_URL" in ctor and "#3d-slicer" in text
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in ctor
    sha = re.search(r'SAMPLE_SHA256 = "([0-9a-f]{64})"', text).group(1)
    sample = MODULE_DIR / "Resources" / "SampleData" / "MNI152_2009a_T1.nii.gz"
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == sha, "SAMPLE_SHA256 does not match the bundled sample"
    assert "registerCustomSampleDataSource" in text and 'checksums=f"SHA256:{SAMPLE_SHA256}"' in text


def test_logic_register_is_typed_and_documented():
    logic = class_def(module_tree(), "RigidResNetRegistrationLogic")
    register = next(n for n in logic.body if isinstance(n, ast.FunctionDef) and n.name == "register")
    doc = ast.get_docstring(register)
    assert doc and ":raises ValueError:" in doc
    untyped = [a.arg for a in register.args.args[1:] if a.annotation is None and a.arg != "predictor"]
    assert not untyped, f"untyped parameters: {untyped}"
    assert register.returns is not None
    params = [a.arg for a in register.args.args[1:3]]
    assert params == ["fixedVolume", "movingVolume"]
    widget = class_def(module_tree(), "RigidResNetRegistrationWidget")
    apply_src = ast.unparse(next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "onApplyButton"))
    assert "tryWithErrorDisplay" in apply_src and "_cancelRequested" in apply_src
    cleanup = ast.unparse(next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "cleanup"))
    assert "removeObservers" in cleanup


def test_icon_is_a_png():
    for path in (MODULE_DIR / "Resources" / "Icons" / "RigidResNetRegistration.png", ROOT / "Resources" / "RigidResNetRegistration.png"):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width == height >= 64


# --------------------------------------------------------------------------- hook-up


def test_self_test_runner_skips_clearly_without_slicer():
    script = ROOT / "Testing" / "run_slicer_selftest.sh"
    assert os.access(script, os.X_OK)
    env = {k: v for k, v in os.environ.items() if k != "SLICER_EXECUTABLE"}
    run = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and "SKIPPED" in run.stdout
    text = script.read_text()
    for flag in ("--no-main-window", "--disable-cli-modules", "--additional-module-paths", "--python-code"):
        assert flag in text
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == "Testing/run_slicer_selftest.sh"


def test_module_cmake_lists_the_module_first_and_registers_the_self_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1).split()
    assert scripts[0] == "${MODULE_NAME}.py"
    assert "${MODULE_NAME}Lib/slicer_nodes.py" in scripts
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*endif\(\)", text, re.S)


def test_readme_has_the_slicer_section_with_the_panel_picture():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert "3D Slicer" in headings and headings.index("3D Slicer") + 1 == headings.index("Python")
    section = readme.split("## 3D Slicer", 1)[1].split("\n## ", 1)[0]
    assert "Resources/Screenshots/panel.png" in section and (ROOT / "Resources" / "Screenshots" / "panel.png").is_file()
    assert "render_panel.py" in section and "RigidResNetRegistrationLogic" in section
