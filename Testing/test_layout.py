"""Static checks of the extension layout: CMake lists what ships, README and CI agree."""

from __future__ import annotations

import re
import shlex

from conftest import ROOT

MODULE = ROOT / "RigidResNetRegistration"


def cmake_listed() -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text()
    names = set()
    for block in re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)(.*?)\)", text, re.S):
        for token in block.split():
            names.add(token.replace("${MODULE_NAME}", "RigidResNetRegistration"))
    return names


def shipped_files() -> set[str]:
    files = {p.relative_to(MODULE).as_posix() for p in (MODULE / "RigidResNetRegistrationLib").glob("*.py")}
    for folder in ("Resources/Models", "Resources/SampleData", "Resources/UI", "Resources/Icons"):
        files |= {p.relative_to(MODULE).as_posix() for p in (MODULE / folder).glob("*") if p.is_file()}
    files |= {p.name for p in MODULE.glob("*.py")}
    return files


def test_every_shipped_file_is_listed_in_the_module_cmake():
    missing = shipped_files() - cmake_listed()
    assert not missing, f"add to RigidResNetRegistration/CMakeLists.txt: {sorted(missing)}"


def test_every_listed_file_exists():
    absent = [n for n in cmake_listed() if not (MODULE / n).is_file()]
    assert not absent, f"listed in CMake but missing: {absent}"


def test_extension_cmake_declares_category_and_pytorch_dependency():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Registration")' in text
    assert re.search(r'set\(EXTENSION_DEPENDS "[^"]*PyTorch', text)
    assert "add_subdirectory(RigidResNetRegistration)" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert block, "README must mark its test command with <!-- test-command -->"
    for line in block.group(1).strip().splitlines():
        assert line.strip() in ci, f"CI does not run README's line: {line}"
    assert shlex.split("python3 -m pytest")[-1] in ci
