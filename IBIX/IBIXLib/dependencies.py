"""Python packages of the IBIX module, installed without breaking 3D Slicer, after the user agreed.

IBIX needs ``IBIX/Resources/requirements.txt`` (``pyproject.toml`` reads the same file) and the ONNX Runtime build
the user chose in the module:

* ``cpu``: ``onnxruntime``, or
* ``gpu``: ``onnxruntime-gpu[cuda,cudnn]`` (NVIDIA GPU; the extras bring the CUDA 12 and cuDNN 9 libraries, which
  Slicer does not ship; the engine process loads them with ``onnxruntime.preload_dlls()``). PyPI has this build for
  Linux and Windows on x86-64 only; elsewhere it is not offered, and :func:`runtime_unavailable` says why.

The installed build is told from the package metadata (``importlib.metadata``), never from ``import onnxruntime``,
which finds either build; ONNX Runtime is never imported into Slicer itself.

:func:`ensure` installs what is missing, in this order:

1. :func:`plan`: the requirements not met (versions and extras, from the package metadata) and the other ONNX
   Runtime build to remove (the two share the ``onnxruntime`` package folder, so they cannot coexist). The builds
   Slicer ships (numpy, scipy, SimpleITK, vtk) are never installed from PyPI; one too old is a clear error.
2. :func:`pinned_versions`: what must not change - numpy, scipy, SimpleITK, vtk and every distribution of which a
   module is already imported in Slicer - written to a constraints file at its installed version.
3. :func:`resolve`: pip's dry run under those constraints (``pip install --dry-run --report``, wheels only). Where
   the constraints cannot be met, the user is told which package conflicts and nothing is installed.
4. The question: what is installed (with the dependencies pip chose), removed and kept.
5. Switching the build: the new one is unpacked into a scratch folder and must import in an IBIX engine process
   (``child.py ... -- runtime``) before the old one is uninstalled; then the new one is installed (every package at
   the version of the dry run) and must import again. If that fails, the old build is put back.
6. When a package that Slicer had already imported changed, a restart is proposed (as Slicer 5.12 does).

Installs go through Slicer: ``slicer.packaging.pip_ensure(..., constraints=FILE)`` (Slicer 5.12 and later) or
``slicer.util.pip_install([..., "-c", FILE])``; pip's dry run and the engine check run in ``PythonSlicer``
processes started with ``slicer.util.launchConsoleProcess``. Outside Slicer (tests) pip and the engine check run
with this interpreter. In Slicer's testing mode nothing is installed.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata

from . import tr as _

#: The requirements file shipped with the module.
REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources",
                            "requirements.txt")

#: Runtime choice -> ONNX Runtime requirement (the GPU build with its CUDA/cuDNN wheels).
RUNTIMES = {"cpu": "onnxruntime>=1.24.1", "gpu": "onnxruntime-gpu[cuda,cudnn]>=1.24.1"}

#: ONNX Runtime distribution of each runtime choice.
DISTRIBUTIONS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}

#: Packages Slicer ships with its own builds: never installed or upgraded from PyPI by IBIX.
SLICER_BUNDLED = ("numpy", "scipy", "simpleitk", "vtk")

#: The oldest 3D Slicer IBIX runs in (also in CMakeLists.txt and the README).
MINIMUM_SLICER = (5, 10)

#: The engine process's entry point (a script PythonSlicer runs).
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")

#: (sys.platform, machine) where PyPI has onnxruntime-gpu wheels.
GPU_PLATFORMS = {("linux", "x86_64"), ("win32", "amd64")}


class InstallError(RuntimeError):
    """Python packages could not be installed; the message says what happened and what was left as it was."""


def _slicer():
    """The ``slicer`` module, or None outside Slicer."""
    try:
        import slicer
    except ImportError:
        return None
    return slicer


def _app():
    """The Slicer application object, or None (outside the application: tests, ``slicer-core``, PythonSlicer)."""
    return getattr(_slicer(), "app", None)


def _requirement(text: str):
    from packaging.requirements import Requirement

    return Requirement(text)


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


# ------------------------------------------------------------------------------------------------------------------
# What this Slicer and this computer can run
# ------------------------------------------------------------------------------------------------------------------

def slicer_version_problem() -> str | None:
    """A message when this 3D Slicer is older than :data:`MINIMUM_SLICER`, else None (also outside Slicer)."""
    app = _app()
    major, minor = getattr(app, "majorVersion", None), getattr(app, "minorVersion", None)
    if major is None or minor is None or (int(major), int(minor)) >= MINIMUM_SLICER:
        return None
    return _("IBIX needs 3D Slicer {minimum} or later; this is 3D Slicer {version}. Install a current 3D Slicer "
             "from https://download.slicer.org, then IBIX from its Extensions Manager.").format(
        minimum="{}.{}".format(*MINIMUM_SLICER), version=f"{major}.{minor}")


def runtime_unavailable(runtime: str, system: str | None = None, machine: str | None = None) -> str | None:
    """Why ``runtime`` cannot be installed on this computer (``system``: ``sys.platform``), or None."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    system = system or sys.platform
    machine = (machine or platform.machine()).lower()
    if runtime != "gpu" or (system, machine) in GPU_PLATFORMS:
        return None
    if system == "darwin":
        return _("The NVIDIA GPU runtime is not offered on macOS: ONNX Runtime publishes its CUDA build "
                 "(onnxruntime-gpu) for Linux and Windows only. Use the CPU runtime.")
    return _("The NVIDIA GPU runtime is not offered on this computer ({system}, {machine}): ONNX Runtime publishes "
             "its CUDA build (onnxruntime-gpu) for Linux and Windows on x86-64 only. Use the CPU runtime.").format(
        system=system, machine=machine)


# ------------------------------------------------------------------------------------------------------------------
# What is installed, what is missing
# ------------------------------------------------------------------------------------------------------------------

def load_requirements(path: str = REQUIREMENTS) -> list:
    """The requirements of ``path`` (comments, blank lines and pip options skipped), as Slicer reads them."""
    with open(path, encoding="utf-8") as f:
        return [_requirement(line.strip()) for line in f
                if line.strip() and not line.strip().startswith(("#", "-"))]


def installed_version(name: str) -> str | None:
    """Version of an installed distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str]:
    """Every installed distribution: canonical name -> version (re-read from disk: pip may have run meanwhile)."""
    import importlib

    importlib.invalidate_caches()
    return {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def installed_runtime() -> str | None:
    """Which ONNX Runtime build is installed: "cpu", "gpu", "both" (broken: uninstall one) or None."""
    found = [runtime for runtime, dist in DISTRIBUTIONS.items() if installed_version(dist) is not None]
    return None if not found else found[0] if len(found) == 1 else "both"


def _extra_requirements(name: str, extra: str) -> list:
    """The requirements that ``name[extra]`` adds to ``name`` (from its metadata), markers resolved."""
    found = []
    for text in metadata.requires(name) or []:
        dependency = _requirement(text)
        marker = dependency.marker
        if marker is not None and marker.evaluate({"extra": extra}) and not marker.evaluate({"extra": ""}):
            dependency.marker = None
            found.append(dependency)
    return found


def satisfied(requirement, _seen: set | None = None) -> bool:
    """True when the installed distribution meets the requirement: its version, and what its extras bring
    (``dask[distributed]`` needs ``distributed``; ``onnxruntime-gpu[cuda,cudnn]`` the NVIDIA wheels)."""
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        return True  # not for this platform
    version = installed_version(requirement.name)
    if version is None or not requirement.specifier.contains(version, prereleases=True):
        return False
    seen = set() if _seen is None else _seen
    for extra in sorted(requirement.extras):
        for dependency in _extra_requirements(requirement.name, extra):
            key = (_canonical(dependency.name), str(dependency.specifier), tuple(sorted(dependency.extras)))
            if key not in seen:
                seen.add(key)
                if not satisfied(dependency, seen):
                    return False
    return True


@dataclass
class Preview:
    """What pip's dry run would install: ``install`` (canonical name -> version) and ``changes`` (installed
    packages it would replace: name -> (installed version, new version))."""

    install: dict[str, str] = field(default_factory=dict)
    changes: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Plan:
    """What to change for a runtime choice: requirement strings to install, distributions to uninstall, and
    the packages Slicer ships that are too old for IBIX (never installed from PyPI)."""

    runtime: str
    install: list[str] = field(default_factory=list)
    uninstall: list[str] = field(default_factory=list)
    slicer_too_old: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.install and not self.uninstall

    def describe(self, preview: Preview | None = None, pinned: dict[str, str] | None = None) -> str:
        """The question asked before changing anything."""
        build = _("NVIDIA GPU") if self.runtime == "gpu" else _("CPU")
        parts = [_("IBIX needs to change Slicer's Python packages for the {build} runtime.").format(build=build)]
        if self.install:
            parts.append(_("Install:") + "\n  " + "\n  ".join(self.install))
        wanted = {_canonical(_requirement(r).name) for r in self.install}
        extra = sorted(f"{name} {version}" for name, version in (preview.install if preview else {}).items()
                       if name not in wanted)
        if extra:
            parts.append(_("With the packages they need:") + "\n  " + ", ".join(extra))
        if preview and preview.changes:
            parts.append(_("Upgraded or downgraded:") + "\n  " + ", ".join(
                f"{name} {old} -> {new}" for name, (old, new) in sorted(preview.changes.items())))
        if self.uninstall:
            parts.append(_("Then uninstall, once the new build works (the two ONNX Runtime builds cannot "
                           "coexist):") + "\n  " + "\n  ".join(self.uninstall))
        kept = sorted(f"{name} {pinned[name]}" for name in SLICER_BUNDLED if name in (pinned or {}))
        if kept:
            parts.append(_("Kept as they are (Slicer's own): {packages}.").format(packages=", ".join(kept)))
        parts.append(_("This can take a few minutes. Continue?"))
        return "\n\n".join(parts)


def plan(runtime: str, path: str = REQUIREMENTS, in_slicer: bool = True) -> Plan:
    """What must be installed/uninstalled so that ``runtime`` ("cpu" or "gpu") and the requirements are met.

    With ``in_slicer`` the packages Slicer ships (:data:`SLICER_BUNDLED`) are never in ``install``; one that does
    not meet its requirement is listed in ``slicer_too_old``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    result = Plan(runtime)
    wanted = _requirement(RUNTIMES[runtime])
    other = DISTRIBUTIONS["gpu" if runtime == "cpu" else "cpu"]
    if installed_version(other) is not None:
        result.uninstall.append(other)
        if installed_version(wanted.name) is not None:  # both: the other's removal breaks this one's files
            result.uninstall.append(DISTRIBUTIONS[runtime])
    if result.uninstall or not satisfied(wanted):
        result.install.append(str(wanted))
    for requirement in load_requirements(path):
        if in_slicer and _canonical(requirement.name) in SLICER_BUNDLED:
            version = installed_version(requirement.name)
            if version is not None and not requirement.specifier.contains(version, prereleases=True):
                result.slicer_too_old.append(f"{requirement.name} {version} ({requirement})")
        elif not satisfied(requirement):
            result.install.append(str(requirement))
    return result


def imported_distributions() -> set[str]:
    """Canonical names of the installed distributions of which a module is imported in this process (now)."""
    imported = {name.partition(".")[0] for name in list(sys.modules)}
    return {_canonical(dist) for top, dists in metadata.packages_distributions().items() if top in imported
            for dist in dists}


def pinned_versions(exclude=()) -> dict[str, str]:
    """What an install must not change: canonical name -> installed version of Slicer's own builds
    (:data:`SLICER_BUNDLED`) and of every distribution of which a module is imported in this process.

    The ONNX Runtime builds and ``exclude`` are left free (a runtime switch replaces them).
    """
    names = imported_distributions() | set(SLICER_BUNDLED)
    names -= {_canonical(n) for n in (*DISTRIBUTIONS.values(), *exclude)}
    pins = {}
    for name in sorted(names):
        version = installed_version(name)
        if version is not None:
            pins[name] = version
    return pins


def write_constraints(path: str, versions: dict[str, str]) -> str:
    """A pip constraints file pinning ``versions`` (name -> version); returns ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("# written by IBIX: the packages an install must leave as they are\n")
        f.writelines(f"{name}=={version}\n" for name, version in sorted(versions.items()))
    return path


# ------------------------------------------------------------------------------------------------------------------
# Processes: pip and the engine check, in Slicer's way inside Slicer
# ------------------------------------------------------------------------------------------------------------------

def python_executable() -> str:
    """``PythonSlicer`` in the Slicer application (Slicer's Python), else this interpreter."""
    if _app() is not None:
        return shutil.which("PythonSlicer") or sys.executable
    return sys.executable


def _decode(line) -> str:
    return line.decode("utf-8", "replace") if isinstance(line, bytes) else line


def run_process(args: list[str], startup_environment: bool = False) -> tuple[int, str]:
    """Run ``args`` to its end: (exit code, output). In Slicer through ``slicer.util.launchConsoleProcess``
    (Slicer's startup environment with ``startup_environment``, as engine runs; else Slicer's, as its pip calls),
    keeping the GUI responsive meanwhile."""
    app = _app()
    if app is None:
        proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    else:
        proc = _slicer().util.launchConsoleProcess(list(args), useStartupEnvironment=startup_environment)
    stream = getattr(proc.stdout, "buffer", proc.stdout)  # bytes: an odd byte must not end the reading
    lines = []
    while True:
        line = stream.readline()
        if not line:
            return proc.wait(), "".join(lines)
        lines.append(_decode(line))
        if app is not None:
            app.processEvents()


def pip(*args: str) -> tuple[int, str]:
    """``python -m pip ARGS`` with Slicer's Python: (exit code, output)."""
    return run_process([python_executable(), "-m", "pip", *args])


def _pip_says(output: str, lines: int = 12) -> str:
    """pip's explanation of a failure: its ERROR lines and the causes of a conflict."""
    keep, causes = [], False
    for line in output.splitlines():
        if line.startswith("ERROR:") and "ResolutionImpossible" not in line:
            keep.append(line[len("ERROR:"):].strip())
        elif line.startswith("The conflict is caused by"):
            causes = True
        elif causes and line.startswith("    "):
            keep.append("  " + line.strip())
        elif causes and line.strip():
            causes = False
    return "\n".join(keep[-lines:]) or "\n".join(output.strip().splitlines()[-lines:])


def resolve(requirements: list[str], constraints: str, folder: str) -> Preview:
    """pip's dry run of installing ``requirements`` under ``constraints`` (wheels only): what it would install.

    Raises :class:`InstallError` naming the conflicting package when the constraints cannot be met (nothing is
    installed then).
    """
    report = os.path.join(folder, "report.json")
    code, output = pip("install", "--dry-run", "--only-binary=:all:", "--report", report,
                       "-c", constraints, *requirements)
    if code != 0:
        pinned = re.findall(r"The user requested \(constraint\) (\S+?)==(\S+)", output)
        if pinned:
            raise InstallError(_("IBIX's Python packages cannot be installed without changing {packages}, which "
                                 "3D Slicer (or a module loaded in it) uses. Nothing was installed.\n\npip says:\n"
                                 "{details}").format(packages=", ".join(f"{n} {v}" for n, v in pinned),
                                                     details=_pip_says(output)))
        raise InstallError(_("pip cannot install {requirements} on this computer (Python {python}, {system}): it "
                             "found no build for it, or could not reach PyPI. Nothing was installed.\n\npip says:\n"
                             "{details}").format(
            requirements=", ".join(requirements), python=platform.python_version(), system=sys.platform,
            details=_pip_says(output)))
    with open(report, encoding="utf-8") as f:
        items = json.load(f).get("install", [])
    preview = Preview({_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items})
    for name, version in preview.install.items():
        old = installed_version(name)
        if old is not None and old != version:
            preview.changes[name] = (old, version)
    return preview


def check_runtime(runtime: str, path: str | None = None) -> dict:
    """Import ONNX Runtime in an IBIX engine process (from ``path`` first, when given); its version, file and
    providers. Raises :class:`InstallError` when it does not import or is not the ``runtime`` build."""
    folder = tempfile.mkdtemp(prefix="IBIX-check-")
    try:
        args = [python_executable(), CHILD_SCRIPT, "--job-folder", folder,
                "--device", "cuda" if runtime == "gpu" else "cpu", "--", "runtime"]
        code, output = run_process(args + (["--path", path] if path else []), startup_environment=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record = None
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                pass
    info = (record or {}).get("runtime") if code == 0 else None
    problem = None
    if not info:
        problem = (record or {}).get("error") or "\n".join(output.strip().splitlines()[-5:]) or f"exit code {code}"
    elif path and not os.path.abspath(info["file"]).startswith(os.path.abspath(path)):
        problem = f"it was imported from {info['file']}, not from {path}"
    elif runtime == "gpu" and "CUDAExecutionProvider" not in info["providers"]:
        problem = f"it is not the CUDA build (providers: {', '.join(info['providers'])})"
    if problem:
        raise InstallError(_("{package} does not work in the IBIX engine process: {problem}").format(
            package=DISTRIBUTIONS[runtime], problem=problem))
    return info


def _stage(runtime: str, version: str, folder: str) -> None:
    """Unpack the ``runtime`` build into ``folder/stage`` (not installed) and check it imports there."""
    stage = os.path.join(folder, "stage")
    code, output = pip("install", "--no-deps", "--only-binary=:all:", "--target", stage,
                       f"{DISTRIBUTIONS[runtime]}=={version}")
    if code != 0:
        raise InstallError(_("could not download {package} {version}; nothing was changed.\n\npip says:\n"
                             "{details}").format(package=DISTRIBUTIONS[runtime], version=version,
                                                 details=_pip_says(output)))
    try:
        check_runtime(runtime, stage)
    except InstallError as error:
        raise InstallError(_("{error}. Nothing was changed: the installed build stays.").format(error=error))


def _install(requirements: list[str], constraints: str) -> None:
    """Install through Slicer (``pip_ensure`` with ``constraints=`` on Slicer 5.12+, else ``pip_install`` with
    ``-c``), or this interpreter's pip outside Slicer."""
    slicer = _slicer()
    if _app() is None:
        code, output = pip("install", *requirements, "-c", constraints)
        if code != 0:
            raise InstallError(_pip_says(output))
        return
    try:
        from slicer.packaging import pip_ensure  # Slicer >= 5.12
    except ImportError:
        pip_ensure = None
    if pip_ensure is not None:
        pip_ensure([_requirement(r) for r in requirements], constraints=constraints, prompt_install=False,
                   prompt_restart=False, requester="IBIX")
    else:
        slicer.util.pip_install([*requirements, "-c", constraints])


def _uninstall(names: list[str]) -> None:
    if _app() is None:
        code, output = pip("uninstall", "--yes", *names)
        if code != 0:
            raise InstallError(_pip_says(output))
    else:
        _slicer().util.pip_uninstall(list(names))


def changed_imported(before: dict[str, str], after: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """Distributions whose version changed between ``before`` and ``after`` (name -> version) and of which a module
    is imported in this process: (name, old version or None, new version or None)."""
    imported = imported_distributions()
    return [(name, before.get(name), after.get(name)) for name in sorted(set(before) | set(after))
            if before.get(name) != after.get(name) and name in imported]


def _offer_restart(changed: list[tuple[str, str | None, str | None]]) -> None:
    """After an install that changed already-imported packages: propose to restart Slicer."""
    slicer, app = _slicer(), _app()
    if not changed or app is None or app.testingEnabled():
        return
    detail = "\n".join(f"{name}: {old or '-'} -> {new or '-'}" for name, old, new in changed)
    if slicer.util.confirmYesNoDisplay(
            _("Packages that Slicer had already loaded were updated; they work correctly only after a restart of "
              "3D Slicer. Restart now?"), _("IBIX: restart 3D Slicer"), detailedText=detail):
        slicer.util.restart()


def testing() -> bool:
    """True in Slicer's testing mode (``--testing``), where nothing may be installed."""
    app = _app()
    return bool(app is not None and app.testingEnabled())


def _confirm(text: str) -> bool:
    slicer = _slicer()
    if _app() is None:
        raise InstallError(_("installing needs the user's consent: call with prompt=False to install without asking"))
    return bool(slicer.util.confirmOkCancelDisplay(text, _("IBIX: install Python packages")))


# ------------------------------------------------------------------------------------------------------------------
# The install
# ------------------------------------------------------------------------------------------------------------------

def ensure(runtime: str = "cpu", path: str = REQUIREMENTS, prompt: bool = True) -> str:
    """Install what ``runtime`` needs, after asking. Returns "ready", "installed" or "skipped" (testing mode).

    Raises :class:`InstallError` (a RuntimeError) with the fix when this Slicer is too old, the runtime is not
    offered here, the constraints cannot be met, the user declines, or the install fails; in each case the
    installed ONNX Runtime build is left installed and working.
    """
    for problem in (slicer_version_problem(), runtime_unavailable(runtime)):
        if problem:
            raise InstallError(problem)
    todo = plan(runtime, path)
    if todo.slicer_too_old:
        raise InstallError(_("IBIX needs newer versions of packages that 3D Slicer ships: {packages}. Use 3D Slicer "
                             "{minimum} or later.").format(packages=", ".join(todo.slicer_too_old),
                                                          minimum="{}.{}".format(*MINIMUM_SLICER)))
    if todo.empty:
        return "ready"
    if testing():
        return "skipped"
    with tempfile.TemporaryDirectory(prefix="IBIX-install-") as folder:
        pins = pinned_versions(exclude=todo.uninstall)
        preview = resolve(todo.install, write_constraints(os.path.join(folder, "slicer.txt"), pins), folder)
        if prompt and not _confirm(todo.describe(preview, pins)):
            raise InstallError(_("IBIX cannot run without {packages}: accept the installation, or install them from "
                                 "the Python console with slicer.util.pip_install(...)").format(
                packages=", ".join(todo.install)))
        constraints = write_constraints(os.path.join(folder, "install.txt"), {**pins, **preview.install})
        before = installed_versions()
        if todo.uninstall:
            new = _canonical(DISTRIBUTIONS[runtime])
            _stage(runtime, preview.install.get(new) or before[new], folder)
            _uninstall(todo.uninstall)
        try:
            _install(todo.install, constraints)
            left = plan(runtime, path)
            if not left.empty:
                raise InstallError(_("pip finished, but these are still missing: {packages}").format(
                    packages=", ".join(left.install + left.uninstall)))
            check_runtime(runtime)
        except Exception as error:
            message = _("IBIX could not install {packages}: {error}").format(packages=", ".join(todo.install),
                                                                           error=error)
            if todo.uninstall:
                message += "\n\n" + _restore(runtime, todo, before, constraints)
            raise InstallError(message) from error
        _offer_restart(changed_imported(before, installed_versions()))
    return "installed"


def _restore(runtime: str, todo: Plan, before: dict[str, str], constraints: str) -> str:
    """After a failed switch: the build that was installed before, put back; says how that went."""
    old = [name for name in todo.uninstall if _canonical(name) in before and name != DISTRIBUTIONS[runtime]]
    try:
        if installed_version(DISTRIBUTIONS[runtime]) is not None:
            _uninstall([DISTRIBUTIONS[runtime]])
        _install([f"{name}=={before[_canonical(name)]}" for name in old], constraints)
        for name in old:
            check_runtime(next(r for r, d in DISTRIBUTIONS.items() if d == name))
    except Exception as error:  # say what to do by hand
        return _("The previous ONNX Runtime build could not be put back ({error}): install it from the Python "
                 "console with slicer.util.pip_install('{requirement}').").format(
            error=error, requirement=" ".join(f"{n}=={before[_canonical(n)]}" for n in old))
    return _("The previous ONNX Runtime build ({packages}) was put back and works.").format(
        packages=", ".join(f"{n} {before[_canonical(n)]}" for n in old))
