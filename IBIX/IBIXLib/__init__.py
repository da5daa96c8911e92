"""Slicer-side helpers of the IBIX module (scene bridge, engine processes, Python packages, live maps).

``tr`` marks user-visible strings for translation (``from . import tr as _``): Slicer's ``slicer.i18n.tr`` in the
application, which takes its translation context from the calling file; the text unchanged elsewhere (tests,
``slicer-core``, which has no ``slicer.i18n``).
"""
try:
    from slicer.i18n import tr
except ImportError:
    def tr(text: str) -> str:
        return text
