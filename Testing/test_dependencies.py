"""IBIXLib.dependencies: what to install for the runtime the user chose, constrained so that nothing 3D Slicer has
changes, asked first, the runtime switched only once the new build works; IBIXLib/child.py's runtime check and
CUDA preload; the module's light import, sample checksums and minimum Slicer version.

Three kinds of test: the plan and the order of Slicer calls (Slicer's functions recorded), real processes on this
interpreter (the engine check, the output reader), and real pip in scratch virtual environments (marked ``pypi``):
one pinned like 3D Slicer 5.10 (numpy 2.0.2, scipy 1.13.1) whose install plan goes through pip's dry run against
PyPI, and one holding the real ``onnxruntime`` in which runtime switches go through a local wheel folder.
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import types
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest_slicer import MODULE_DIR  # noqa: F401  (puts IBIXLib on the path)

from IBIXLib import child, dependencies  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: What Slicer 5.10 ships (SuperBuild/External_python-*.cmake at v5.10.0).
SLICER_510 = {"pip": "25.1.1", "packaging": "25.0", "numpy": "2.0.2", "scipy": "1.13.1"}


# ------------------------------------------------------------------------------------------------------------------
# Distributions and wheels made here (real metadata for importlib.metadata and pip)
# ------------------------------------------------------------------------------------------------------------------

def _metadata_text(name: str, version: str, requires=(), extras=()) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Provides-Extra: {extra}" for extra in extras] + [f"Requires-Dist: {r}" for r in requires]
    return "\n".join(lines) + "\n"


def dist_info(folder: Path, name: str, version: str, requires=(), extras=()) -> Path:
    """An installed distribution's metadata folder, as pip writes it (put ``folder`` on sys.path)."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(_metadata_text(name, version, requires, extras))
    return info


def wheel(folder: Path, name: str, version: str, files: dict[str, str], requires=(), extras=(),
          corrupt: str | None = None) -> Path:
    """A pure-Python wheel holding ``files`` (path -> text); ``corrupt``: a file whose bytes are damaged in the
    archive (its metadata still reads, so pip resolves it, but installing it fails)."""
    stem = f"{name.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    members = dict(files)
    members[f"{info}/METADATA"] = _metadata_text(name, version, requires, extras)
    members[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: IBIX tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    members[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, text in members.items():
            archive.writestr(member, text)
    if corrupt is not None:  # flip bytes inside the compressed data of that member: its CRC no longer matches
        with zipfile.ZipFile(path) as archive:
            entry = archive.getinfo(corrupt)
        data = bytearray(path.read_bytes())
        start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)
        for i in range(start, start + entry.compress_size):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    return path


#: ``onnxruntime/__init__.py`` of stand-in GPU builds: one that imports (as the CUDA build: its providers), one
#: that does not (as a build missing a library).
GPU_BUILD = ('__version__ = "{version}"\n\ndef get_available_providers():\n'
             '    return ["CUDAExecutionProvider", "CPUExecutionProvider"]\n\ndef preload_dlls():\n    pass\n')
BROKEN_BUILD = 'raise ImportError("libcudnn.so.9: cannot open shared object file")\n'


# ------------------------------------------------------------------------------------------------------------------
# The plan: from the package metadata
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def installed(monkeypatch):
    """The distributions 'installed' (name -> version); everything the requirements list is present."""
    versions = {r.name.lower(): "9999.0" for r in dependencies.load_requirements()}  # above any pin, CalVer too
    versions["numpy"] = metadata.version("numpy")

    def version(name):
        return versions.get(name.lower())

    monkeypatch.setattr(dependencies, "installed_version", version)
    monkeypatch.setattr(dependencies, "installed_versions", lambda: {k.lower(): v for k, v in versions.items()})
    monkeypatch.setattr(dependencies, "satisfied",
                        lambda r, _seen=None: r.specifier.contains(versions.get(r.name.lower()) or "0", True)
                        and r.name.lower() in versions)
    return versions


@pytest.mark.parametrize("chosen, present, install, uninstall", [
    ("cpu", [], ["onnxruntime>=1.24.1"], []),
    ("gpu", [], ["onnxruntime-gpu[cuda,cudnn]>=1.24.1"], []),
    ("gpu", ["onnxruntime"], ["onnxruntime-gpu[cuda,cudnn]>=1.24.1"], ["onnxruntime"]),
    ("cpu", ["onnxruntime-gpu"], ["onnxruntime>=1.24.1"], ["onnxruntime-gpu"]),
    ("cpu", ["onnxruntime"], [], []),
    ("cpu", ["onnxruntime", "onnxruntime-gpu"], ["onnxruntime>=1.24.1"], ["onnxruntime-gpu", "onnxruntime"]),
])
def test_the_chosen_runtime_is_told_from_package_metadata(installed, chosen, present, install, uninstall):
    """``import onnxruntime`` would find either build; the metadata tells which. With both (broken: they share one
    package folder) both go and the chosen one is installed afresh."""
    for name in present:
        installed[name] = "1.25.0"
    plan = dependencies.plan(chosen)
    assert plan.install == install and plan.uninstall == uninstall
    assert dependencies.installed_runtime() == {(): None, ("onnxruntime",): "cpu", ("onnxruntime-gpu",): "gpu",
                                                 ("onnxruntime", "onnxruntime-gpu"): "both"}[tuple(present)]


def test_slicer_builds_are_never_installed_and_too_old_ones_are_named(installed):
    for name in list(installed):
        installed.pop(name)
    installed["onnxruntime"] = "1.25.0"
    installed["numpy"] = "1.21.0"  # older than requirements.txt asks; scipy, SimpleITK: no metadata
    plan = dependencies.plan("cpu")
    names = [Requirement(r).name.lower() for r in plan.install]
    assert "scikit-image" in names and "jsonschema" in names
    assert not {"numpy", "scipy", "simpleitk"} & set(names)  # Slicer ships its own builds
    assert plan.slicer_too_old == ["numpy 1.21.0 (numpy>=1.24)"]
    assert {"numpy", "scipy", "simpleitk"} <= {Requirement(r).name.lower() for r in
                                               dependencies.plan("cpu", in_slicer=False).install}


def test_extras_are_checked_not_just_the_package(tmp_path, monkeypatch):
    """dask without distributed, or onnxruntime-gpu without its CUDA/cuDNN wheels, is not ready (real metadata
    read by importlib.metadata from dist-info folders)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    dist_info(tmp_path, "ibixtest-dask", "2024.1.0", requires=['ibixtest-distributed==2024.1.0; extra == "distributed"',
                                                                 'ibixtest-toolz>=0.10'], extras=["distributed"])
    dist_info(tmp_path, "ibixtest-ort-gpu", "1.22.0", extras=["cuda", "cudnn"],
              requires=['ibixtest-cuda-runtime~=12.0; extra == "cuda"', 'ibixtest-cudnn~=9.0; extra == "cudnn"',
                        'ibixtest-only-windows; sys_platform == "win32" and extra == "cuda"'])
    dist_info(tmp_path, "ibixtest-cuda-runtime", "12.4.0")
    assert dependencies.satisfied(Requirement("ibixtest-dask>=2024.1"))  # no extra asked: the base package is enough
    assert not dependencies.satisfied(Requirement("ibixtest-dask[distributed]>=2024.1"))
    assert not dependencies.satisfied(Requirement("ibixtest-ort-gpu[cuda,cudnn]>=1.21"))  # cuDNN missing
    assert dependencies.satisfied(Requirement("ibixtest-ort-gpu[cuda]>=1.21"))  # the Windows-only one is not for here
    dist_info(tmp_path, "ibixtest-distributed", "2024.1.0")
    dist_info(tmp_path, "ibixtest-cudnn", "9.1.0")
    assert dependencies.satisfied(Requirement("ibixtest-dask[distributed]>=2024.1"))
    assert dependencies.satisfied(Requirement("ibixtest-ort-gpu[cuda,cudnn]>=1.21"))
    assert not dependencies.satisfied(Requirement("ibixtest-ort-gpu[cuda,cudnn]>=1.23"))


def test_what_slicer_has_imported_is_pinned(tmp_path, monkeypatch):
    """numpy, scipy, SimpleITK, vtk and every distribution with an imported module keep their version; ONNX Runtime
    (never imported in Slicer; a switch replaces it) stays free."""
    import numpy  # noqa: F401  (imported, as in Slicer)

    pins = dependencies.pinned_versions()
    assert pins["numpy"] == metadata.version("numpy") and pins["packaging"] == metadata.version("packaging")
    assert "onnxruntime" not in pins and "onnxruntime-gpu" not in pins
    path = dependencies.write_constraints(str(tmp_path / "c.txt"), pins)
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    assert f"numpy=={metadata.version('numpy')}" in lines and all("==" in line for line in lines)


def test_a_changed_imported_package_is_found_for_the_restart_question():
    version = metadata.version("numpy")
    before = {"numpy": "0.1", "ibixtest-never-imported": "1.0", "packaging": metadata.version("packaging")}
    after = {"numpy": version, "ibixtest-never-imported": "2.0", "packaging": metadata.version("packaging")}
    assert dependencies.changed_imported(before, after) == [("numpy", "0.1", version)]


@pytest.mark.parametrize("system, machine, offered", [
    ("linux", "x86_64", True), ("win32", "AMD64", True), ("darwin", "arm64", False), ("darwin", "x86_64", False),
    ("linux", "aarch64", False), ("win32", "ARM64", False)])
def test_the_gpu_runtime_is_offered_where_pypi_has_a_wheel(system, machine, offered):
    reason = dependencies.runtime_unavailable("gpu", system, machine)
    assert (reason is None) == offered
    if not offered:
        assert "onnxruntime-gpu" in reason and "CPU runtime" in reason
    assert dependencies.runtime_unavailable("cpu", system, machine) is None


# ------------------------------------------------------------------------------------------------------------------
# The order of Slicer calls (Slicer's functions recorded; pip's dry run and the engine check recorded too, they are
# tested for real below)
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_slicer(monkeypatch, installed):
    """slicer.util's install and dialog functions recorded in order; Slicer 5.10 (no slicer.packaging)."""
    calls = []

    def pip_install(requirements, **kw):
        requirements = list(requirements)
        calls.append(("install", requirements, Path(requirements[-1]).read_text() if "-c" in requirements else ""))
        if fake.fail_install and requirements[0].startswith(fake.fail_install):
            raise subprocess.CalledProcessError(1, "pip install")
        for text in requirements:
            if not text.startswith("-") and not text.endswith(".txt"):
                installed[Requirement(text).name] = "1.99.0"

    def pip_uninstall(requirements, **kw):
        calls.append(("uninstall", list(requirements)))
        for name in requirements:
            installed.pop(name, None)

    util = types.SimpleNamespace(
        confirmOkCancelDisplay=lambda text, title=None, **kw: calls.append(("ask", text)) or fake.answer,
        confirmYesNoDisplay=lambda text, title=None, **kw: calls.append(("restart?", text)) or True,
        restart=lambda: calls.append(("restart",)), pip_install=pip_install, pip_uninstall=pip_uninstall)
    app = types.SimpleNamespace(testingEnabled=lambda: fake.testing, majorVersion=5, minorVersion=10,
                                processEvents=lambda: None)
    fake = types.SimpleNamespace(util=util, app=app, answer=True, testing=False, fail_install="", calls=calls)
    monkeypatch.setattr(dependencies, "_slicer", lambda: fake)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer < 5.12
    monkeypatch.setattr(dependencies, "resolve", lambda requirements, constraints, folder: calls.append(
        ("dry run", list(requirements), Path(constraints).read_text())) or dependencies.Preview(
        {Requirement(r).name: "1.99.0" for r in requirements}))
    monkeypatch.setattr(dependencies, "_stage", lambda runtime, version, folder: calls.append(("stage", runtime)))
    monkeypatch.setattr(dependencies, "check_runtime", lambda runtime, path=None: calls.append(("check", runtime)))
    monkeypatch.setattr(dependencies, "changed_imported", lambda before, after: [])  # tested on its own
    return fake


def test_nothing_is_installed_in_testing_mode(fake_slicer):
    fake_slicer.testing = True
    assert dependencies.ensure("cpu") == "skipped"
    assert fake_slicer.calls == []


def test_a_switch_installs_and_checks_the_new_build_before_the_old_one_goes(installed, fake_slicer):
    """Constraints pin Slicer's packages in the dry run and in the install (pip_install ... -c FILE); the new build
    imports in the engine process (staged) before the old one is uninstalled, and again once installed."""
    installed["onnxruntime"] = "1.25.0"
    assert dependencies.ensure("gpu") == "installed"
    kinds = [c[0] for c in fake_slicer.calls]
    assert kinds == ["dry run", "ask", "stage", "uninstall", "install", "check"]
    numpy_pin = f"numpy=={metadata.version('numpy')}"
    assert numpy_pin in fake_slicer.calls[0][2].splitlines()
    question = fake_slicer.calls[1][1]
    assert "onnxruntime-gpu[cuda,cudnn]>=1.24.1" in question and "cannot coexist" in question
    assert f"numpy {metadata.version('numpy')}" in question  # kept as it is, and said so
    assert fake_slicer.calls[3][1] == ["onnxruntime"]
    install = fake_slicer.calls[4]
    assert install[1][:-2] == ["onnxruntime-gpu[cuda,cudnn]>=1.24.1"] and install[1][-2] == "-c"
    assert numpy_pin in install[2].splitlines() and "onnxruntime-gpu==1.99.0" in install[2].splitlines()
    assert fake_slicer.calls[5] == ("check", "gpu")


def test_slicer_512_gets_the_constraints_through_pip_ensure(installed, fake_slicer, monkeypatch):
    ensured = []

    def pip_ensure(requirements, constraints=None, prompt_install=True, prompt_restart=True, requester=None, **kw):
        ensured.append(([str(r) for r in requirements], Path(constraints).read_text(), prompt_install,
                        prompt_restart, requester))
        installed["onnxruntime"] = "1.25.0"

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    assert dependencies.ensure("cpu") == "installed"
    (requirements, constraints, prompt_install, prompt_restart, requester), = ensured
    assert requirements == ["onnxruntime>=1.24.1"] and f"numpy=={metadata.version('numpy')}" in constraints
    assert (prompt_install, prompt_restart, requester) == (False, False, "IBIX")  # IBIX asked already (one question)
    assert [c[0] for c in fake_slicer.calls] == ["dry run", "ask", "check"]


def test_declining_changes_nothing(installed, fake_slicer):
    installed["onnxruntime-gpu"] = "1.25.0"
    fake_slicer.answer = False
    with pytest.raises(RuntimeError, match="cannot run without onnxruntime>=1.24.1"):
        dependencies.ensure("cpu")
    assert [c[0] for c in fake_slicer.calls] == ["dry run", "ask"]


def test_a_failed_install_puts_the_old_build_back(installed, fake_slicer):
    installed["onnxruntime"] = "1.25.0"
    fake_slicer.fail_install = "onnxruntime-gpu"
    with pytest.raises(dependencies.InstallError, match=r"(?s)could not install.*onnxruntime 1\.25\.0\) was put back"):
        dependencies.ensure("gpu")
    kinds = [c[0] for c in fake_slicer.calls]
    assert kinds == ["dry run", "ask", "stage", "uninstall", "install", "install", "check"]
    assert fake_slicer.calls[5][1][0] == "onnxruntime==1.25.0" and fake_slicer.calls[6] == ("check", "cpu")


def test_an_old_slicer_or_an_unoffered_runtime_is_refused_before_anything(installed, fake_slicer, monkeypatch):
    fake_slicer.app.minorVersion = 8
    with pytest.raises(dependencies.InstallError, match=r"needs 3D Slicer 5\.10 or later; this is 3D Slicer 5\.8"):
        dependencies.ensure("cpu")
    fake_slicer.app.minorVersion = 10
    monkeypatch.setattr(dependencies.platform, "machine", lambda: "aarch64")
    with pytest.raises(dependencies.InstallError, match="not offered"):
        dependencies.ensure("gpu")
    installed["numpy"] = "1.21.0"
    with pytest.raises(dependencies.InstallError, match=r"numpy 1\.21\.0 .*Use 3D Slicer 5\.10"):
        dependencies.ensure("cpu")
    assert fake_slicer.calls == []


def test_a_changed_imported_package_offers_a_restart(fake_slicer):
    dependencies._offer_restart([("numpy", "2.0.2", "2.2.6")])
    assert [c[0] for c in fake_slicer.calls] == ["restart?", "restart"]
    fake_slicer.calls.clear()
    dependencies._offer_restart([])
    assert fake_slicer.calls == []


# ------------------------------------------------------------------------------------------------------------------
# Real processes on this interpreter
# ------------------------------------------------------------------------------------------------------------------

def test_processes_keep_slicer_responsive_and_survive_stray_bytes(monkeypatch):
    """In Slicer, pip and the engine check run through launchConsoleProcess (a strict text pipe); a stray byte
    costs one character, and the event loop turns while waiting."""
    events = []

    def launch(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None):  # as Slicer's
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)

    fake = types.SimpleNamespace(util=types.SimpleNamespace(launchConsoleProcess=launch),
                                 app=types.SimpleNamespace(processEvents=lambda: events.append(1)))
    monkeypatch.setattr(dependencies, "_slicer", lambda: fake)
    code = "import sys; sys.stdout.buffer.write(b'bad \\xff byte\\n' + b'x' * 100 + b'\\nlast line\\n'); sys.exit(3)"
    returncode, output = dependencies.run_process([sys.executable, "-c", code])
    assert returncode == 3 and output.splitlines() == ["bad \ufffd byte", "x" * 100, "last line"]
    assert len(events) == 3


def test_the_engine_check_imports_the_runtime_where_it_is_asked(tmp_path):
    """This environment's onnxruntime in a real engine process; then a build unpacked elsewhere, imported from
    there first; a build that does not import or is not the asked one is refused, with the reason."""
    ort = pytest.importorskip("onnxruntime")
    info = dependencies.check_runtime("cpu")
    assert info["version"] == ort.__version__ and "CPUExecutionProvider" in info["providers"]
    with pytest.raises(dependencies.InstallError, match="not the CUDA build"):
        dependencies.check_runtime("gpu")
    staged = tmp_path / "stage"
    (staged / "onnxruntime").mkdir(parents=True)
    (staged / "onnxruntime" / "__init__.py").write_text(GPU_BUILD.format(version="1.99.0"))
    info = dependencies.check_runtime("gpu", str(staged))
    assert info["version"] == "1.99.0" and info["file"].startswith(str(staged))
    (staged / "onnxruntime" / "__init__.py").write_text(BROKEN_BUILD)
    with pytest.raises(dependencies.InstallError, match="libcudnn.so.9"):
        dependencies.check_runtime("gpu", str(staged))


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


# ------------------------------------------------------------------------------------------------------------------
# Real pip in scratch virtual environments
# ------------------------------------------------------------------------------------------------------------------

def _venv(folder: Path, *packages: str) -> Path:
    """A virtual environment with ``packages`` installed (pip's cache makes a second build quick); its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--only-binary=:all:", *packages],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return python


def _in_venv(python: Path, code: str, environment: dict | None = None) -> dict:
    """Run ``code`` in that environment with IBIXLib importable; the JSON it prints last."""
    code = f"import json, sys\nsys.path.insert(0, {str(MODULE_DIR)!r})\n" + textwrap.dedent(code)
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                            env={**os.environ, **(environment or {})}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def slicer510(tmp_path_factory):
    """A scratch environment pinned like 3D Slicer 5.10 (its pip, packaging, numpy and scipy)."""
    return _venv(tmp_path_factory.mktemp("slicer510") / "venv",
                 *(f"{name}=={version}" for name, version in SLICER_510.items()))


def _plan_in(python: Path, requirements: Path, environment: dict | None = None) -> dict:
    """In that environment (numpy and scipy imported, as in Slicer): the module's plan for the CPU runtime, the
    pins, and pip's dry run of the plan with the pins and without them."""
    return _in_venv(python, f"""
        import os, tempfile, numpy, scipy
        from IBIXLib import dependencies as d
        todo, pins, folder = d.plan("cpu", {str(requirements)!r}), d.pinned_versions(), tempfile.mkdtemp()
        found = {{"install": todo.install, "pins": pins}}
        for name, versions in (("constrained", pins), ("free", {{}})):
            try:
                preview = d.resolve(todo.install, d.write_constraints(os.path.join(folder, name), versions), folder)
                found[name] = {{"install": preview.install, "changes": preview.changes}}
            except d.InstallError as error:
                found[name] = {{"error": str(error)}}
        print(json.dumps(found))
    """, environment)


@pytest.mark.pypi
def test_the_install_plan_changes_none_of_slicer_510s_packages(slicer510):
    """The module's install plan (requirements.txt and onnxruntime), through pip's dry run against PyPI in an
    environment pinned like 3D Slicer 5.10, changes none of the pinned packages."""
    found = _plan_in(slicer510, ROOT / "IBIX" / "Resources" / "requirements.txt")
    names = {Requirement(r).name.lower() for r in found["install"]}
    assert {"onnxruntime", "scikit-image", "matplotlib", "dask"} <= names and not names & {"numpy", "scipy"}
    assert {"numpy": "2.0.2", "scipy": "1.13.1", "packaging": "25.0"}.items() <= found["pins"].items()
    plan = found["constrained"]
    assert {"scikit-image", "tifffile", "onnxruntime", "matplotlib", "distributed"} <= set(plan["install"]), plan
    assert not set(plan["install"]) & set(found["pins"]) and plan["changes"] == {}


@pytest.mark.pypi
def test_a_dependency_that_needs_a_newer_numpy_cannot_replace_slicers(slicer510, tmp_path):
    """Finding 1 made deterministic: a package of the plan whose newest release needs numpy >= 2.1 (as tifffile's
    did). Unconstrained, pip upgrades Slicer's numpy; constrained, it takes the release that works with numpy
    2.0.2; with no such release, nothing is installed and the message names numpy 2.0.2."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "ibixtest-imaging", "2.0", {"ibixtest_imaging/__init__.py": ""}, requires=["numpy>=2.1"])
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("ibixtest-imaging\n")
    found = _plan_in(slicer510, requirements, {"PIP_FIND_LINKS": str(wheels)})
    assert found["free"]["changes"]["numpy"][0] == "2.0.2"  # what an unconstrained install does to Slicer
    assert found["constrained"]["error"].startswith("IBIX's Python packages cannot be installed without changing "
                                                    "numpy 2.0.2")
    assert "Nothing was installed" in found["constrained"]["error"]
    wheel(wheels, "ibixtest-imaging", "1.0", {"ibixtest_imaging/__init__.py": ""}, requires=["numpy>=1.20"])
    found = _plan_in(slicer510, requirements, {"PIP_FIND_LINKS": str(wheels)})
    assert found["constrained"]["install"]["ibixtest-imaging"] == "1.0" and found["constrained"]["changes"] == {}
    assert found["free"]["install"]["ibixtest-imaging"] == "2.0" and "numpy" in found["free"]["changes"]


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    """A scratch environment holding the real CPU build (this environment's version) and a wheel folder with it."""
    ort = pytest.importorskip("onnxruntime")
    onnx_models = pytest.importorskip("onnx_models")
    import onnx

    folder = tmp_path_factory.mktemp("runtime")
    python = _venv(folder / "venv", f"pip=={SLICER_510['pip']}", f"onnxruntime=={ort.__version__}",
                   f"packaging=={metadata.version('packaging')}")
    wheels = folder / "wheels"
    result = subprocess.run([str(python), "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                             "-d", str(wheels), f"onnxruntime=={ort.__version__}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    model = folder / "polynomial.onnx"
    onnx.save(onnx_models.polynomial(2.0, 1.0), str(model))
    requirements = folder / "requirements.txt"
    requirements.write_text("# nothing but the runtime\n")
    return types.SimpleNamespace(python=python, wheels=wheels, model=model, requirements=requirements,
                                 version=ort.__version__)


def _switch(env, runtime: str, wheels: Path) -> dict:
    """dependencies.ensure(runtime) in the scratch environment, pip offline on ``wheels`` only; then which build
    is installed and, with the CPU build, a real inference: f(x) = 2x^2 + x at x = 3 (21)."""
    return _in_venv(env.python, f"""
        from IBIXLib import dependencies as d
        try:
            outcome = d.ensure({runtime!r}, path={str(env.requirements)!r}, prompt=False)
        except d.InstallError as error:
            outcome = "error: " + str(error)
        state = {{"outcome": outcome, "runtime": d.installed_runtime()}}
        if state["runtime"] == "cpu":
            import numpy, onnxruntime
            session = onnxruntime.InferenceSession({str(env.model)!r}, providers=["CPUExecutionProvider"])
            x = numpy.full((1, 1, 4, 4), 3.0, numpy.float32)
            state["f(3)"] = float(session.run(None, {{session.get_inputs()[0].name: x}})[0].max())
        print(json.dumps(state))
    """, {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)})


def _wheels(env, tmp_path: Path, name: str, *gpu_wheels: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for path in env.wheels.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    for spec in gpu_wheels:
        wheel(folder, **spec)
    return folder


@pytest.mark.pypi
def test_a_runtime_switch_that_cannot_complete_leaves_the_old_build_working(runtime_venv, tmp_path):
    """Real pip, a local wheel folder: no GPU build at all; one that installs but does not import; one whose
    dependency breaks the install after the old build was removed (it is put back). Each time the CPU build stays
    installed and computes f(3) = 21. Then a GPU build that works: the switch completes, and back to the CPU."""
    env = runtime_venv
    none = _switch(env, "gpu", _wheels(env, tmp_path, "none"))
    assert none["outcome"].startswith("error: pip cannot install onnxruntime-gpu")
    assert "Nothing was installed" in none["outcome"] and none["runtime"] == "cpu" and none["f(3)"] == 21.0

    broken = {"name": "onnxruntime-gpu", "version": "1.99.0", "extras": ["cuda", "cudnn"],
              "files": {"onnxruntime/__init__.py": BROKEN_BUILD}}
    state = _switch(env, "gpu", _wheels(env, tmp_path, "broken", broken))
    assert "does not work in the IBIX engine process" in state["outcome"] and "libcudnn.so.9" in state["outcome"]
    assert "Nothing was changed" in state["outcome"] and state["runtime"] == "cpu" and state["f(3)"] == 21.0

    needs_libs = {"name": "onnxruntime-gpu", "version": "1.99.1", "extras": ["cuda", "cudnn"],
                  "requires": ['ibixtest-cuda-libs==12.0; extra == "cuda"'],
                  "files": {"onnxruntime/__init__.py": GPU_BUILD.format(version="1.99.1")}}
    damaged = {"name": "ibixtest-cuda-libs", "version": "12.0", "files": {"ibixtest_cuda_libs/lib.txt": "x" * 5000},
               "corrupt": "ibixtest_cuda_libs/lib.txt"}
    state = _switch(env, "gpu", _wheels(env, tmp_path, "damaged", needs_libs, damaged))
    assert state["outcome"].startswith("error: IBIX could not install onnxruntime-gpu")
    assert f"(onnxruntime {env.version}) was put back and works" in state["outcome"]
    assert state["runtime"] == "cpu" and state["f(3)"] == 21.0

    libs = dict(damaged, corrupt=None)
    state = _switch(env, "gpu", _wheels(env, tmp_path, "working", needs_libs, libs))
    assert state == {"outcome": "installed", "runtime": "gpu"}
    state = _switch(env, "cpu", _wheels(env, tmp_path, "back"))
    assert state == {"outcome": "installed", "runtime": "cpu", "f(3)": 21.0}


# ------------------------------------------------------------------------------------------------------------------
# The module: light import, sample checksums, minimum Slicer, declared versions
# ------------------------------------------------------------------------------------------------------------------

HEAVY = ("SimpleITK", "scipy", "skimage", "dask", "distributed", "matplotlib", "onnxruntime")


def test_importing_the_module_imports_nothing_heavy():
    """``python -X importtime`` of IBIX.py with Slicer stand-ins (Testing/import_module.py): none of the heavy
    packages, and ``import IBIXLogic`` alone neither; the engine's names still work, imported on first use."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "Testing" / "import_module.py")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "IBIX" in imported and "IBIXLib" in imported and not set(HEAVY) & imported, set(HEAVY) & imported
    code = ("import sys, IBIXLogic as ibx\n"
            "heavy = [m for m in %r if m in sys.modules]\n"
            "assert ibx.forward_mapping.__module__ == 'IBIXLogic.forward' and ibx.atlas.ResponseAtlas\n"
            "from IBIXLogic import read_volume, InputError\n"
            "print(heavy, 'scipy' in sys.modules, 'SimpleITK' in sys.modules)\n" % (HEAVY,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.stdout.split() == ["[]", "True", "True"], result.stderr[-2000:]


def test_unknown_engine_names_are_attribute_errors():
    import IBIXLogic

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        IBIXLogic.no_such_name  # noqa: B018
    assert {"forward_mapping", "load_model", "InputError"} <= set(dir(IBIXLogic))
    for name in IBIXLogic.__all__:  # every public name resolves to what its submodule defines
        value = getattr(IBIXLogic, name)
        assert getattr(sys.modules[value.__module__], name) is value


def _module_constant(name: str):
    tree = ast.parse((MODULE_DIR / "IBIX.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in IBIX.py")


def test_sample_data_is_registered_with_the_checksums_of_the_shipped_files(monkeypatch):
    """An updated sample replaces the one Sample Data cached, because its SHA-256 differs."""
    shipped = sorted(p.name for p in (ROOT / "Resources" / "SampleData").glob("*.nrrd"))
    sums = _module_constant("SAMPLE_SHA256")
    assert sorted(sums) == shipped
    for name in shipped:
        assert sums[name] == hashlib.sha256((ROOT / "Resources" / "SampleData" / name).read_bytes()).hexdigest(), name
    import import_module

    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: registered.append(kw))
    ibix = import_module.import_ibix(monkeypatch)
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    ibix.registerSampleData()
    assert len(registered) == 2
    for kw in registered:
        assert kw["checksums"] == [f"SHA256:{sums[name]}" for name in kw["fileNames"]]


def test_an_older_slicer_gets_a_clear_message_at_start_up(monkeypatch):
    import import_module

    ibix = import_module.import_ibix(monkeypatch)
    shown, connected = [], []
    app = types.SimpleNamespace(majorVersion=5, minorVersion=8, connect=lambda signal, slot: connected.append(slot))
    monkeypatch.setattr(ibix.slicer, "app", app, raising=False)
    monkeypatch.setattr(ibix.slicer.util, "errorDisplay", lambda text, **kw: shown.append(text))
    parent = types.SimpleNamespace()
    ibix.IBIX(parent)
    for slot in connected:
        if slot is not ibix.registerSampleData:
            slot()
    assert shown and "needs 3D Slicer 5.10 or later; this is 3D Slicer 5.8" in shown[0]
    assert "5.10 or later" in parent.helpText
    app.minorVersion, shown[:] = 10, []
    ibix.IBIX(types.SimpleNamespace())
    assert shown == []


def test_the_install_question_and_run_status_lines_are_translated(monkeypatch, installed):
    """Every user-visible string of the install, the run status lines and the module's testing-mode error go
    through Slicer's translation function (here one that marks what it translated)."""
    from IBIXLib import jobs

    def mark(text):
        return "\u00bb" + text

    monkeypatch.setattr(dependencies, "_", mark)
    monkeypatch.setattr(jobs, "_", mark)
    installed["onnxruntime"] = "1.25.0"
    question = dependencies.plan("gpu").describe(dependencies.Preview({"onnxruntime-gpu": "1.25.0", "x": "1"}),
                                                 {"numpy": "2.0.2"})
    paragraphs = question.split("\n\n")
    assert len(paragraphs) == 6 and all(p.startswith("\u00bb") for p in paragraphs), question
    assert dependencies.runtime_unavailable("gpu", "darwin", "arm64").startswith("\u00bb")
    cohort = object.__new__(jobs.CohortRun)
    cohort.state, cohort.cases, cohort.seconds = jobs.FINISHED, {"total": 2, "failed": 0}, 1.0
    assert cohort.status.startswith("\u00bbcohort done: 2 cases")
    from IBIXLib import logic

    monkeypatch.setattr(logic, "_", mark)
    monkeypatch.setattr(dependencies, "ensure", lambda runtime, prompt=True: "skipped")
    with pytest.raises(RuntimeError, match="^\u00bbONNX Runtime is not installed"):
        logic.Logic().loadModel("model.onnx")


def test_declared_versions_agree():
    """The minimum Slicer in the module, CMakeLists.txt and README; the runtime requirements in pyproject's extras;
    every engine requirement has a tested lower bound (make test-lower-bounds)."""
    import tomllib

    import lower_bounds

    minimum = "{}.{}".format(*dependencies.MINIMUM_SLICER)
    assert minimum == "5.10"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f"find_package(Slicer {minimum} REQUIRED)" in cmake  # a build against an older Slicer stops there
    assert "cmake_minimum_required(VERSION 3.20.6...3.28.0 FATAL_ERROR)" in cmake  # Slicer 5.10's CMake; 5.12's policies
    assert f"3D Slicer {minimum} or later" in (ROOT / "README.md").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cpu"] == [dependencies.RUNTIMES["cpu"]] and extras["gpu"] == [dependencies.RUNTIMES["gpu"]]
    bounds = lower_bounds.lower_bounds()
    assert {"numpy", "scipy", "scikit-image", "SimpleITK", "matplotlib", "dask", "onnxruntime"} <= set(bounds)
    assert bounds["matplotlib"] == "3.10" and bounds["onnxruntime"] == "1.24.1"
    assert "test-lower-bounds" in (ROOT / ".ci" / "run").read_text()
