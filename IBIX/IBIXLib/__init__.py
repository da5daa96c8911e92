"""Slicer-side helpers of the IBIX module: the MRML bridge (``scene``), the engine process runner (``jobs``) and
Python dependency handling (``dependencies``). The engine itself is the package ``IBIXLogic``."""
