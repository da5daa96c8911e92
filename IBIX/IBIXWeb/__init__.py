"""IBIX in the browser: ``ibix web``, a trame-slicer page with Slicer's own slice views and segment editor.

The page (:mod:`IBIXWeb.app`) binds Vuetify widgets and two linked slice views (input, output) to the same
:class:`IBIXLib.controller.Controller` the Slicer module panel drives; runs go to the engine process through
:mod:`IBIXLib.jobs`, results become overlays through :mod:`IBIXLib.scene`. :mod:`IBIXWeb.files` keeps every read
under the data folder and every write under the output folder; :mod:`IBIXWeb.server` starts it (loopback by
default, an access token in the URL).
"""
