"""The Slicer module files: IBIX.py vs IBIX.ui, import hygiene, packaging metadata, and the console API
(IBIX.IBIXLogic) run on a slicer-core scene with Qt-only pieces stubbed."""
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
    max_channels = int(re.search(r"^MAX_CHANNELS = (\d+)", source, re.M).group(1))
    for pattern in re.findall(r'getattr\(self\.ui, f"(\w+)\{i\}"\)', source):
        used.update(f"{pattern}{i}" for i in range(max_channels))
    assert used, "found no self.ui.X uses"
    missing = sorted(used - set(widgets))
    assert not missing, f"IBIX.py uses widgets missing from IBIX.ui: {missing}"
    assert max_channels == 4


def test_ui_parameter_names_are_parameter_node_fields():
    fields = set()
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.ClassDef) and node.name == "IBIXParameterNode":
            fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
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
    """Importing the engine (and the bridge) must not import ONNX Runtime; IBIX.py imports neither at top level."""
    for node in module_tree().body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n and (n.startswith("onnxruntime") or n.startswith("IBIXLogic")) for n in names), names
    code = (
        "import sys, ast\n"
        "import IBIXLogic\n"
        "assert 'onnxruntime' not in sys.modules, 'import IBIXLogic imported onnxruntime'\n"
        "try:\n"
        "    import slicer\n"
        "    if hasattr(slicer, 'vtkMRMLScene'):\n"
        "        import IBIXLogic.mrml\n"
        "except ImportError:\n"
        "    pass\n"
        "assert 'onnxruntime' not in sys.modules, 'import IBIXLogic.mrml imported onnxruntime'\n"
        f"compile(open({str(MODULE)!r}).read(), 'IBIX.py', 'exec')\n"
        "assert 'onnxruntime' not in sys.modules\n"
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
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(IBIX)",
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


def test_requirements_file():
    lines = [l.strip() for l in (ROOT / "IBIX/Resources/requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    names = [re.split(r"[<>=!~ ;\[]", l)[0].lower() for l in lines]
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names


# ------------------------------------------------------------------------------------------------------------------
# IBIX.py imported with the Qt-only pieces stubbed (slicer-core has no Qt): dependencies and the console API
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def ibix_module(monkeypatch):
    from conftest_slicer import import_slicer_core

    slicer = import_slicer_core()
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda lo, hi: (lo, hi)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *args, **kwargs):
            pass

        def getParameterNode(self):
            return None

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (Base,), {}))
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "parameterNodeWrapper", wrapper, raising=False)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "IBIX"))
    monkeypatch.delitem(sys.modules, "IBIX", raising=False)
    import IBIX

    yield IBIX
    sys.modules.pop("IBIX", None)


@pytest.mark.parametrize("gpu, installed, expect_install, expect_uninstall", [
    (True, [], "onnxruntime-gpu", None),
    (False, [], "onnxruntime", None),
    (True, ["onnxruntime"], "onnxruntime-gpu", "onnxruntime"),
    (False, ["onnxruntime-gpu"], "onnxruntime", "onnxruntime-gpu"),
])
def test_dependency_choice_asks_first_and_never_installs_both(ibix_module, monkeypatch, gpu, installed,
                                                              expect_install, expect_uninstall):
    IBIX = ibix_module
    import importlib.util

    import slicer

    calls = []
    state = {"installed": False}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (None if name == "onnxruntime" and not state["installed"]
                                          else real_find_spec(name, *a)))
    monkeypatch.setattr(IBIX, "hasNvidiaGpu", lambda: gpu)
    monkeypatch.setattr(IBIX, "_installedDistributions", lambda *names: [n for n in names if n in installed])
    util = slicer.util
    monkeypatch.setattr(util, "pip_uninstall", lambda name: calls.append(("uninstall", name)), raising=False)
    monkeypatch.setattr(util, "confirmOkCancelDisplay", lambda text, title=None: calls.append(("ask", text)) or True,
                        raising=False)

    def pip_install(requirements):
        calls.append(("install", requirements))
        state["installed"] = True

    monkeypatch.setattr(util, "pip_install", pip_install, raising=False)
    assert IBIX.ensureDependencies() is True
    kinds = [c[0] for c in calls]
    assert "ask" in kinds and kinds.index("ask") < kinds.index("install")
    assert "uninstall" not in kinds or kinds.index("ask") < kinds.index("uninstall") < kinds.index("install")
    install = [c[1] for c in calls if c[0] == "install"][0]
    assert expect_install in install.split()[0] or install.startswith(expect_install + ">=")
    other = "onnxruntime" if expect_install == "onnxruntime-gpu" else "onnxruntime-gpu"
    assert not re.search(rf"(^| ){re.escape(other)}(>|=|$| )", install)
    assert [c[1] for c in calls if c[0] == "uninstall"] == ([expect_uninstall] if expect_uninstall else [])


def test_dependency_prompt_declined_raises(ibix_module, monkeypatch):
    IBIX = ibix_module
    import slicer

    monkeypatch.setattr(IBIX, "missingRequirements", lambda: ("onnxruntime", []))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: False, raising=False)
    installs = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda r: installs.append(r), raising=False)
    monkeypatch.setattr(IBIX, "_installedDistributions", lambda *names: ["onnxruntime-gpu"])
    uninstalls = []
    monkeypatch.setattr(slicer.util, "pip_uninstall", lambda r: uninstalls.append(r), raising=False)
    with pytest.raises(RuntimeError, match="cannot run without"):
        IBIX.ensureDependencies()
    assert not installs and not uninstalls  # declining changes nothing


def test_console_api_on_a_slicer_core_scene(ibix_module, slicer_app, tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest_slicer import conv_model

    import slicer

    IBIX = ibix_module
    logic = IBIX.IBIXLogic()
    with pytest.raises(ValueError, match="no model loaded"):
        logic.generateOutput([])
    with pytest.raises(ValueError, match="model file not found"):
        logic.loadModel(str(tmp_path / "missing.onnx"), installDependencies=False)
    model = logic.loadModel(str(conv_model(tmp_path)), device="cpu", installDependencies=False)
    assert "T1" in logic.cardSummary() and "2D" in logic.cardSummary()
    assert logic.deviceSummary().startswith("cpu")

    array = np.random.default_rng(1).random((4, 16, 12)).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, np.diag([0.9, 1.2, 3.0, 1.0]), name="T1")
    seg = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = seg.GetSegmentation().AddEmptySegment("", "Left ventricle")
    mask = np.zeros(array.shape, np.uint8)
    mask[1, 5:8, 4:7] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, volume)

    output = logic.generateOutput([volume])
    fmap = logic.runForward([volume], seg, sid, n_jitters=2)
    assert fmap.GetName() == "T1 forward map (Left ventricle)"
    bmap = logic.runBackward([volume], output, seg, sid, n_blocks=12, n_jitters=2, blocks="grid")
    assert bmap.GetAttribute("IBIX.kind") == "backward"
    assert model is logic.model

    # GUI parameters -> engine parameters
    p = types.SimpleNamespace(forwardJitters=8, backwardJitters=4, maxJitter=0.0, blocks=500, compactness=0.1,
                              coarseToFine=True, coarseBlocks=50, refineThreshold=0.5, normalization="fraction",
                              signedDisplay=False, progressive=True)
    assert logic.forwardParameters(p) == {"n_jitters": 8, "display": "normalized", "progressive": True}
    assert logic.backwardParameters(p) == {"n_blocks": 500, "compactness": 0.1, "n_jitters": 4,
                                           "normalization": "fraction", "coarse_blocks": 50, "refine_threshold": 0.5,
                                           "progressive": True}
    p.maxJitter = 2.5
    assert logic.forwardParameters(p)["max_jitter"] == 2.5

    # Errors: same text as the GUI shows, scene unchanged.
    empty = seg.GetSegmentation().AddEmptySegment("", "empty")
    count = slicer_app.node_count()
    with pytest.raises(ValueError, match="is empty: paint it in the Segment Editor"):
        logic.runForward([volume], seg, empty)
    with pytest.raises(ValueError, match="1 input channel"):
        logic.runForward([volume, output], seg, sid)
    assert slicer_app.node_count() == count
