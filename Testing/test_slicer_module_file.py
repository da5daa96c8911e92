"""The Slicer module files: IBIX.py vs IBIX.ui, import hygiene, packaging metadata."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest_slicer import slicer_app  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "IBIX" / "IBIX.py"
UI = ROOT / "IBIX" / "Resources" / "UI" / "IBIX.ui"
HOMEPAGE = "https://github.com/ibix-project/SlicerIBIX"


def ui_widgets():
    tree = ET.parse(UI)
    return {w.get("name"): w for w in tree.iter("widget")}


def module_tree():
    return ast.parse(MODULE.read_text(), filename=str(MODULE))


def test_module_compiles():
    compile(MODULE.read_text(), str(MODULE), "exec")


def test_every_ui_widget_the_module_uses_exists():
    widgets = ui_widgets()
    used = set()
    for node in ast.walk(module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    source = MODULE.read_text()
    controller = (ROOT / "IBIX" / "IBIXLib" / "controller.py").read_text()
    max_channels = int(re.search(r"^MAX_CHANNELS = (\d+)", controller, re.M).group(1))
    for pattern in re.findall(r'getattr\(self\.ui, f"(\w+)\{i\}"\)', source):
        used.update(f"{pattern}{i}" for i in range(max_channels))
    assert used, "found no self.ui.X uses"
    missing = sorted(used - set(widgets))
    assert not missing, f"IBIX.py uses widgets missing from IBIX.ui: {missing}"
    assert max_channels == 4


def test_ui_parameter_names_are_parameter_node_fields(slicer_app):
    """The parameter node's fields (declared once in IBIXLib.controller, for the module and the web page)."""
    sys.path.insert(0, str(ROOT / "IBIX"))
    from IBIXLib import controller

    fields = set(controller.settingsClass().__annotations__)
    assert {"modelPath", "forwardJitters", "backwardJitters", "maxJitter", "blocks", "compactness", "progressive",
            "coarseToFine",
            "coarseBlocks", "refineThreshold", "normalization", "signedDisplay", "colormap", "opacity", "threshold",
            "showLegend"} <= fields
    names = set()
    for w in ET.parse(UI).iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                names.add(p.find("string").text)
    assert names and not (names - fields), f"unknown parameter names in IBIX.ui: {names - fields}"


def test_ui_mrml_widgets_get_the_scene():
    tree = ET.parse(UI)
    receivers = {c.find("receiver").text for c in tree.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in tree.iter("widget") if w.get("class", "").startswith("qMRML")
            and w.get("class") != "qMRMLWidget"}
    assert mrml and mrml <= receivers


def test_no_onnxruntime_at_import_time():
    """Importing the engine, the Slicer helpers or IBIX.py never imports ONNX Runtime (it runs in the engine
    process only)."""
    for node in module_tree().body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n and n.startswith("onnxruntime") for n in names), names
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'IBIX')!r})\n"
        "import IBIXLogic\n"
        "assert 'onnxruntime' not in sys.modules, 'import IBIXLogic imported onnxruntime'\n"
        "import slicer\n"
        "if hasattr(slicer, 'vtkMRMLScene'):\n"
        "    import IBIXLib.scene, IBIXLib.jobs, IBIXLib.dependencies\n"
        "assert 'onnxruntime' not in sys.modules, 'import IBIXLib imported onnxruntime'\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------------
# Packaging metadata
# ------------------------------------------------------------------------------------------------------------------

def test_extension_cmake_metadata():
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert f'set(EXTENSION_HOMEPAGE "{HOMEPAGE}")' in text
    assert 'set(EXTENSION_CATEGORY "Image Synthesis")' in text
    assert 'set(EXTENSION_DEPENDS "NA")' in text
    for line in ("find_package(Slicer 5.10 REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(IBIX)",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    icon = re.search(r'EXTENSION_ICONURL "([^"]+)"', text).group(1)
    shot = re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', text).group(1)
    assert icon.endswith("Resources/Icons/IBIX.png") and (ROOT / "Resources/Icons/IBIX.png").exists()
    rel = shot.split("/main/", 1)[1]
    assert (ROOT / rel).exists(), f"screenshot {rel} named in CMakeLists.txt is missing"
    assert (ROOT / rel).stat().st_size < 500 * 1024


def test_module_cmake_lists_every_file():
    text = (ROOT / "IBIX" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for rel in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui", "Resources/requirements.txt"):
        assert rel in text
        assert (ROOT / "IBIX" / rel.replace("${MODULE_NAME}", "IBIX")).exists()
    assert "IBIXLogic/*.py" in text and "IBIXLogic/*.json" in text
    for path in sorted((ROOT / "IBIX" / "IBIXLib").glob("*.py")):  # the Slicer helpers, installed with the module
        assert f"IBIXLib/{path.name}" in text, path.name


def test_extensions_index_entry():
    entry = json.loads((ROOT / "IBIX.json").read_text())
    assert entry["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json")
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["category"] == "Image Synthesis"
    assert entry["scm_url"].startswith(HOMEPAGE)
    assert entry["scm_revision"] == "main" and entry["build_dependencies"] == [] and entry["tier"] == 1


def test_license_and_icons():
    text = (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause" in text and "2026" in text and "IBIX contributors" in text
    from PIL import Image

    for path in (ROOT / "Resources/Icons/IBIX.png", ROOT / "IBIX/Resources/Icons/IBIX.png"):
        with Image.open(path) as image:
            assert image.size == (128, 128)


def test_requirements_file_is_the_one_dependency_list():
    """pyproject.toml reads its dependencies from the module's requirements.txt; ONNX Runtime is the user's
    choice (extras cpu/gpu, the module's Runtime setting), never in the list."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" in project["project"]["dynamic"] and "dependencies" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["IBIX/Resources/requirements.txt"]}
    lines = [l.strip() for l in (ROOT / "IBIX/Resources/requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    names = [re.split(r"[<>=!~ ;\[]", l)[0].lower() for l in lines]
    assert not any(n.startswith("onnxruntime") for n in names)
    assert {"numpy", "scipy", "simpleitk", "scikit-image", "jsonschema"} <= set(names)
    extras = project["project"]["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.24.1"] and extras["gpu"] == ["onnxruntime-gpu[cuda,cudnn]>=1.24.1"]
