"""Python packages of the IBIX module, installed the way Slicer does, after the user agreed.

``IBIX/Resources/requirements.txt`` is the one list of what the engine needs (``pyproject.toml`` reads the same
file). ONNX Runtime is not in it: the user chooses the runtime in the module,

* ``cpu``: ``onnxruntime``, or
* ``gpu``: ``onnxruntime-gpu[cuda,cudnn]`` (NVIDIA GPU; the extras bring the CUDA 12 and cuDNN 9 libraries,
  which Slicer does not ship; the engine process loads them with ``onnxruntime.preload_dlls()``).

The two builds cannot coexist, so switching uninstalls the other one (after asking). The installed build is told
from the package metadata (``importlib.metadata``), never from ``import onnxruntime``, which finds either build.
Nothing here probes the GPU or starts a process on its own.

Slicer >= 5.11 (``slicer.packaging``): ``load_requirements`` + ``pip_ensure`` (its own prompt; skipped in testing
mode). Older Slicer: a confirmation, then ``slicer.util.pip_install``; skipped in testing mode as well.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: The requirements file shipped with the module.
REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources",
                            "requirements.txt")

#: Runtime choice -> ONNX Runtime requirement (the GPU build with its CUDA/cuDNN wheels).
RUNTIMES = {"cpu": "onnxruntime>=1.17", "gpu": "onnxruntime-gpu[cuda,cudnn]>=1.21"}

#: ONNX Runtime distribution of each runtime choice.
DISTRIBUTIONS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}

#: Packages Slicer ships with its own builds: never installed or upgraded from PyPI by IBIX.
SLICER_BUNDLED = {"numpy", "scipy", "simpleitk", "vtk"}


def load_requirements(path: str = REQUIREMENTS) -> list[Requirement]:
    """The requirements of ``path`` (comments, blank lines and pip options skipped), as Slicer reads them."""
    try:
        import slicer.packaging as packaging  # Slicer >= 5.11

        return list(packaging.load_requirements(path))
    except (ImportError, AttributeError):
        pass
    with open(path, encoding="utf-8") as f:
        return [Requirement(line.strip()) for line in f
                if line.strip() and not line.strip().startswith(("#", "-"))]


def installed_version(name: str) -> str | None:
    """Version of an installed distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_runtime() -> str | None:
    """Which ONNX Runtime build is installed: "cpu", "gpu", "both" (broken: uninstall one) or None."""
    found = [runtime for runtime, dist in DISTRIBUTIONS.items() if installed_version(dist) is not None]
    return None if not found else found[0] if len(found) == 1 else "both"


def satisfied(requirement: Requirement) -> bool:
    """True when the installed distribution meets the requirement (its version; extras are not checked)."""
    version = installed_version(requirement.name)
    return version is not None and requirement.specifier.contains(version, prereleases=True)


@dataclass
class Plan:
    """What to change for a runtime choice: requirement strings to install, distributions to uninstall."""

    runtime: str
    install: list[str] = field(default_factory=list)
    uninstall: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.install and not self.uninstall

    def describe(self) -> str:
        """The question asked before changing anything."""
        lines = []
        if self.uninstall:
            lines.append("Uninstall (the two ONNX Runtime builds cannot coexist):\n  " + "\n  ".join(self.uninstall))
        if self.install:
            lines.append("Install:\n  " + "\n  ".join(self.install))
        return ("IBIX needs to change Slicer's Python packages for the "
                + ("NVIDIA GPU" if self.runtime == "gpu" else "CPU") + " runtime.\n\n" + "\n\n".join(lines)
                + "\n\nThis can take a few minutes. Continue?")


def plan(runtime: str, path: str = REQUIREMENTS, in_slicer: bool = True) -> Plan:
    """What must be installed/uninstalled so that ``runtime`` ("cpu" or "gpu") and the requirements are met."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    result = Plan(runtime)
    other = "gpu" if runtime == "cpu" else "cpu"
    if installed_version(DISTRIBUTIONS[other]) is not None:
        result.uninstall.append(DISTRIBUTIONS[other])
    wanted = Requirement(RUNTIMES[runtime])
    if result.uninstall or not satisfied(wanted):
        # also reinstalled after the other build is removed: the two share the "onnxruntime" import package
        result.install.append(str(wanted))
    for requirement in load_requirements(path):
        if in_slicer and canonicalize_name(requirement.name) in SLICER_BUNDLED:
            continue
        if not satisfied(requirement):
            result.install.append(str(requirement))
    return result


def _slicer():
    import slicer

    return slicer


def testing() -> bool:
    """True in Slicer's testing mode (``--testing``), where nothing may be installed."""
    app = getattr(_slicer(), "app", None)
    return bool(app is not None and app.testingEnabled())


def ensure(runtime: str, path: str = REQUIREMENTS, prompt: bool = True) -> str:
    """Install what ``runtime`` needs, after asking. Returns "ready", "installed" or "skipped" (testing mode).

    Raises RuntimeError with the fix when the user declines (nothing is changed then) or the install fails.
    """
    slicer = _slicer()
    todo = plan(runtime, path)
    if todo.empty:
        return "ready"
    if testing():
        return "skipped"
    packaging = getattr(slicer, "packaging", None)
    if packaging is None:
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
    pip_ensure = getattr(packaging, "pip_ensure", None)
    if prompt and not slicer.util.confirmOkCancelDisplay(todo.describe(), "IBIX: install Python packages"):
        raise RuntimeError("IBIX cannot run without " + ", ".join(todo.install) + ": accept the installation, or "
                           "install them from the Python console with slicer.util.pip_install(...)")
    if todo.uninstall:
        slicer.util.pip_uninstall(" ".join(todo.uninstall))
    if pip_ensure is not None:
        pip_ensure([Requirement(r) for r in todo.install], prompt_install=False, requester="IBIX")
    else:
        slicer.util.pip_install(todo.install)
    left = plan(runtime, path)
    if left.install or left.uninstall:
        raise RuntimeError("IBIX could not install " + ", ".join(left.install + left.uninstall) + ": install them "
                           "from the Python console with slicer.util.pip_install(...), then restart Slicer")
    return "installed"
