"""Import the Slicer module file IBIX.py outside Slicer, as Slicer does at start-up, with light stand-ins for the
application-only pieces (Qt, ``slicer.i18n``, the scripted-module base classes, ``parameterNodeWrapper``); MRML comes
from ``slicer-core``.

    python -X importtime Testing/import_module.py     # what importing the module costs, and which modules it pulls in

As a script it prints the import time of IBIX.py (Slicer's own modules and numpy already imported, as in Slicer)
and the heavy packages it imported (none). :func:`import_ibix` does the same inside a test (``monkeypatch``).
"""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1] / "IBIX"

#: Packages that a module import must not pull in (they load when a feature is used).
HEAVY = ("SimpleITK", "scipy", "skimage", "dask", "distributed", "matplotlib", "onnxruntime")


def standins() -> dict[str, types.ModuleType]:
    """Modules the Slicer application provides and ``slicer-core`` does not: module name -> stand-in."""
    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: (low, high)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    def init(self, parent=None):
        self.parent = parent

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": init}))
    return {"qt": qt, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted}


def import_ibix(monkeypatch):
    """IBIX.py freshly imported with the stand-ins (undone by ``monkeypatch`` after the test)."""
    import importlib

    import slicer
    import slicer.util  # noqa: F401

    monkeypatch.syspath_prepend(str(MODULE_DIR))
    for name, module in standins().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "IBIX", raising=False)
    return importlib.import_module("IBIX")


def main() -> None:
    sys.path.insert(0, str(MODULE_DIR))
    import numpy  # noqa: F401  (Slicer has imported these before any module)
    import slicer
    import slicer.util  # noqa: F401
    import vtk  # noqa: F401

    sys.modules.update(standins())
    started = time.perf_counter()
    import IBIX  # noqa: F401

    seconds = time.perf_counter() - started
    heavy = sorted(name for name in HEAVY if name in sys.modules)
    print(f"import IBIX: {seconds:.3f} s; heavy packages imported: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
