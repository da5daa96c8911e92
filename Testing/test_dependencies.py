"""IBIXLib.dependencies: what to install for the runtime the user chose, asked first, the Slicer way; and the
engine process's CUDA preload (IBIXLib/child.py)."""
from __future__ import annotations

import sys
import types

import pytest
from packaging.requirements import Requirement

from conftest_slicer import MODULE_DIR  # noqa: F401  (puts IBIXLib on the path)

from IBIXLib import child, dependencies  # noqa: E402


@pytest.fixture
def installed(monkeypatch):
    """The distributions 'installed' (name -> version); everything the requirements list is present."""
    versions = {r.name.lower(): "99.0" for r in dependencies.load_requirements()}

    def version(name):
        return versions.get(name.lower())

    monkeypatch.setattr(dependencies, "installed_version", version)
    return versions


@pytest.fixture
def fake_slicer(monkeypatch):
    """slicer.util's install and dialog functions recorded in order; testing mode off; no slicer.packaging."""
    calls = []
    util = types.SimpleNamespace(
        confirmOkCancelDisplay=lambda text, title=None, **kw: calls.append(("ask", text)) or fake.answer,
        pip_install=lambda requirements, **kw: calls.append(("install", list(requirements))),
        pip_uninstall=lambda requirements, **kw: calls.append(("uninstall", requirements)))
    fake = types.SimpleNamespace(util=util, app=types.SimpleNamespace(testingEnabled=lambda: fake.testing),
                                 answer=True, testing=False, calls=calls, packaging=None)
    monkeypatch.setattr(dependencies, "_slicer", lambda: fake)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer < 5.11
    return fake


@pytest.mark.parametrize("chosen, present, install, uninstall", [
    ("cpu", None, ["onnxruntime>=1.17"], []),
    ("gpu", None, ["onnxruntime-gpu[cuda,cudnn]>=1.21"], []),
    ("gpu", "onnxruntime", ["onnxruntime-gpu[cuda,cudnn]>=1.21"], ["onnxruntime"]),
    ("cpu", "onnxruntime-gpu", ["onnxruntime>=1.17"], ["onnxruntime-gpu"]),
    ("cpu", "onnxruntime", [], []),
])
def test_the_chosen_runtime_is_told_from_package_metadata(installed, chosen, present, install, uninstall):
    """Issue 11 (4): with the CPU build installed and the GPU chosen, IBIX switches (``import onnxruntime``
    would find either build; the metadata tells which)."""
    if present:
        installed[present] = "1.22.0"
    plan = dependencies.plan(chosen)
    assert plan.install == install and plan.uninstall == uninstall
    assert dependencies.installed_runtime() == {None: None, "onnxruntime": "cpu",
                                                 "onnxruntime-gpu": "gpu"}[present]


def test_requirements_come_from_the_file_and_slicer_builds_are_never_reinstalled(installed):
    for name in list(installed):
        installed.pop(name)
    installed["onnxruntime"] = "1.22.0"
    plan = dependencies.plan("cpu")
    names = [Requirement(r).name.lower() for r in plan.install]
    assert "scikit-image" in names and "jsonschema" in names
    assert not {"numpy", "scipy", "simpleitk"} & set(names)  # Slicer ships its own builds
    assert {"numpy", "scipy", "simpleitk"} <= {Requirement(r).name.lower() for r in
                                               dependencies.plan("cpu", in_slicer=False).install}


def test_old_version_is_upgraded(installed):
    installed["onnxruntime"] = "1.16.0"
    assert dependencies.plan("cpu").install == ["onnxruntime>=1.17"]


def test_nothing_is_installed_in_testing_mode(installed, fake_slicer):
    """Issue 11 (2): on Slicer's test machines installs are skipped; ensure() says so instead of failing."""
    fake_slicer.testing = True
    assert dependencies.ensure("cpu") == "skipped"
    assert fake_slicer.calls == []


def test_asks_first_then_uninstalls_the_other_build_then_installs(installed, fake_slicer, monkeypatch):
    installed["onnxruntime"] = "1.22.0"

    def pip_install(requirements, **kw):
        fake_slicer.calls.append(("install", list(requirements)))
        installed.pop("onnxruntime", None)
        installed["onnxruntime-gpu"] = "1.22.0"

    fake_slicer.util.pip_install = pip_install
    assert dependencies.ensure("gpu") == "installed"
    kinds = [c[0] for c in fake_slicer.calls]
    assert kinds == ["ask", "uninstall", "install"]
    assert "onnxruntime" in fake_slicer.calls[0][1] and "cannot coexist" in fake_slicer.calls[0][1]
    assert fake_slicer.calls[1][1] == "onnxruntime"
    assert fake_slicer.calls[2][1] == ["onnxruntime-gpu[cuda,cudnn]>=1.21"]


def test_declining_changes_nothing(installed, fake_slicer):
    installed["onnxruntime-gpu"] = "1.22.0"
    fake_slicer.answer = False
    with pytest.raises(RuntimeError, match="cannot run without onnxruntime>=1.17"):
        dependencies.ensure("cpu")
    assert [c[0] for c in fake_slicer.calls] == ["ask"]


def test_slicer_packaging_pip_ensure_is_used_where_slicer_has_it(installed, fake_slicer, monkeypatch):
    ensured = []

    def pip_ensure(requirements, prompt_install=True, requester=None, **kw):
        ensured.append(([str(r) for r in requirements], prompt_install, requester))
        installed["onnxruntime"] = "1.22.0"

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = pip_ensure
    fake_slicer.packaging = packaging
    assert dependencies.ensure("cpu") == "installed"
    assert ensured == [(["onnxruntime>=1.17"], False, "IBIX")]  # IBIX asked already (one question)
    assert [c[0] for c in fake_slicer.calls] == ["ask"]


def test_a_failed_install_says_what_is_missing(installed, fake_slicer):
    with pytest.raises(RuntimeError, match="could not install onnxruntime>=1.17"):
        dependencies.ensure("cpu")


def test_child_preloads_the_cuda_libraries_only_for_the_gpu_build(monkeypatch):
    preloaded = []
    ort = types.ModuleType("onnxruntime")
    ort.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    ort.preload_dlls = lambda: preloaded.append(True)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    child.preload_cuda("cpu")
    assert preloaded == []
    child.preload_cuda("cuda")
    assert preloaded == [True]
    ort.get_available_providers = lambda: ["CPUExecutionProvider"]  # the CPU build: nothing to load
    child.preload_cuda("cuda")
    assert preloaded == [True]
