"""Print a pip constraints file that pins every engine dependency to its declared minimum.

    python Testing/lower_bounds.py > constraints.txt
    pip install -e ".[cpu,test]" -c constraints.txt      # what `make test-lower-bounds` does, then the tests

The requirements are ``IBIX/Resources/requirements.txt`` and the ``cpu`` extra of ``pyproject.toml`` (ONNX
Runtime); each must have a ``>=`` lower bound, which becomes ``name==bound``. The test tools (the ``test`` extra)
are left free. A declared minimum that does not work with the others then fails the install or the tests.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[str]:
    """The engine's requirement strings: requirements.txt and the cpu extra."""
    lines = [line.strip() for line in (ROOT / "IBIX" / "Resources" / "requirements.txt").read_text().splitlines()]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [line for line in lines if line and not line.startswith(("#", "-"))] + \
        list(project["optional-dependencies"]["cpu"])


def lower_bounds() -> dict[str, str]:
    """Distribution name -> its declared minimum version."""
    bounds = {}
    for text in requirements():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", text)
        if match is None:
            raise ValueError(f"{text!r} has no single '>=' lower bound: declare the minimum it is tested with")
        bounds[match.group(1)] = match.group(3)
    return bounds


if __name__ == "__main__":
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in lower_bounds().items()))
