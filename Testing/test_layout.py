"""Static checks of the extension layout: CMake lists what ships, README and CI agree."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

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
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert block, "README must mark its test command with <!-- test-command -->"
    for line in block.group(1).strip().splitlines():
        assert line.strip() in ci, f"CI does not run README's line: {line}"
    assert shlex.split("python3 -m pytest")[-1] in ci


def project_table() -> dict:
    """``[project]`` of pyproject.toml (tomllib: Python 3.11+; tomli where installed)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python 3.11+ or tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def extension_setting(name: str) -> str:
    match = re.search(rf'set\({name} "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text())
    assert match, f"{name} is not set in the top-level CMakeLists.txt"
    return match.group(1)


def test_extension_urls_name_one_repository_and_files_that_exist_in_it():
    """Homepage, icon and screenshots: one GitHub repository; the raw URLs name files of this
    repository (tracked by git, PNG); the module's README link points into the same repository."""
    home = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)", extension_setting("EXTENSION_HOMEPAGE"))
    assert home, "EXTENSION_HOMEPAGE must be the repository's GitHub page"
    owner, repo = home.groups()
    assert "example" not in owner.lower() and "yourname" not in owner.lower()
    urls = [extension_setting("EXTENSION_ICONURL"), *extension_setting("EXTENSION_SCREENSHOTURLS").split()]
    assert len(urls) >= 2, "at least one screenshot"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    for url in urls:
        raw = re.fullmatch(rf"https://raw\.githubusercontent\.com/{owner}/{repo}/main/(.+)", url)
        assert raw, f"{url} is not a file of {owner}/{repo} (branch main)"
        path = ROOT / raw.group(1)
        assert path.is_file(), f"{url}: {raw.group(1)} does not exist in this repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{raw.group(1)} is not a PNG"
        if tracked.returncode == 0:  # a git checkout: the file must be committed, not only present
            assert raw.group(1) in tracked.stdout.splitlines(), f"{raw.group(1)} is not tracked by git"
    module = (MODULE / "RigidResNetRegistration.py").read_text()
    readme_url = re.search(r'README_URL = "([^"]+)"', module).group(1)
    assert readme_url.startswith(f"https://github.com/{owner}/{repo}#"), readme_url


def test_license_file_is_the_apache_2_licence_pyproject_declares():
    pyproject = project_table()
    assert pyproject["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in pyproject["classifiers"]
    text = (ROOT / "LICENSE").read_text()
    words = " ".join(text.split())
    assert words.startswith("Apache License Version 2.0, January 2004 http://www.apache.org/licenses/")
    for part in ("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION", "1. Definitions.",
                 "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS"):
        assert part in words, part
    assert len(text.splitlines()) > 170  # the full text, not a stub


def test_python_versions_agree_with_the_classifiers():
    """requires-python and the version classifiers name the same versions (those torch 2.14.1
    has wheels for: 3.10 to 3.14)."""
    pyproject = project_table()
    minimum = re.fullmatch(r">=3\.(\d+)", pyproject["requires-python"])
    assert minimum
    listed = sorted(int(c.rsplit(".", 1)[1]) for c in pyproject["classifiers"]
                    if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert listed == list(range(int(minimum.group(1)), listed[-1] + 1)) and listed[0] == 10 and listed[-1] >= 14
