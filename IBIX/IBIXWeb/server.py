"""``ibix web``: start the IBIX page on a trame server.

Safe to leave running on a shared machine: it binds 127.0.0.1 unless told otherwise, and every request (the page,
its files, the websocket, downloads) needs the access token printed at start (``?token=...`` in the URL once, then
a cookie of that browser), as Jupyter does. One server is one user's: browser tabs that hold the token share one
page (the same scene, masks and maps); a request without it gets 403 and a message saying to start an own server.
Reads stay under ``--data``, writes under ``--output``.
"""
import contextlib
import hmac
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import IBIXLogic as ibx

from .files import UPLOAD_LIMIT, DataFolder

#: Cookie that keeps a browser's token after its first request.
COOKIE = "ibix_token"

LOOPBACK = ("127.0.0.1", "localhost", "::1")

REFUSED = ("This IBIX page belongs to the user who started it and needs its access token (the URL printed by "
           "'ibix web'). To explain your own model, start your own page: ibix web --data YOUR_FOLDER")


def add_arguments(parser):
    """The options of ``ibix web`` (the command line's subparser)."""
    parser.add_argument("--demo", action="store_true", default=False,
                        help="open the shipped T1 demo ready to paint (model checked, output generated)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; beyond loopback reach it through an SSH tunnel if you can")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="the folder whose volumes and models the page may open (default with --demo: the "
                             "shipped Resources folder)")
    parser.add_argument("--output", type=Path, default=None, metavar="DIR",
                        help="where maps, summaries and uploads are written (default: DATA/ibix-web-output, or a "
                             "new temporary folder with --demo, removed when the server stops)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    parser.add_argument("--upload-limit", type=float, default=UPLOAD_LIMIT / 2**20, metavar="MiB",
                        help="largest file a browser may upload")
    parser.add_argument("--token", default=None,
                        help="the access token (default: a new random one, printed in the URL)")
    parser.add_argument("--quiet", "-q", action="store_true", default=False, help="print only the URL and errors")


def token_middleware(token):
    """aiohttp middleware: 403 unless the request carries the token (query or cookie); sets the cookie."""
    from aiohttp import web

    @web.middleware
    async def require_token(request, handler):
        given = request.query.get("token") or request.cookies.get(COOKIE) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.Response(status=403, text=REFUSED)
        response = await handler(request)
        if request.query.get("token") and not getattr(response, "prepared", False):
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    return require_token


def download_route(data):
    """``GET /ibix-download/NAME``: a file of the output folder's results (plain names only)."""
    from aiohttp import web

    async def download(request):
        name = request.match_info["name"]
        folder = (data.output / "results").resolve()
        path = (folder / name).resolve()
        if os.path.basename(name) != name or not path.is_relative_to(folder) or not path.is_file():
            return web.Response(status=404, text=f"no result named {name!r}")
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    return web.get("/ibix-download/{name}", download)


def _client_counter(on_count):
    from wslink.websocket import LinkProtocol

    class Clients(LinkProtocol):
        """Counts the connected tabs; ``on_count(n)`` after each change."""

        def __init__(self):
            super().__init__()
            self.ids = set()

        def onConnect(self, request, client_id):
            self.ids.add(client_id)
            on_count(len(self.ids))

        def onClose(self, client_id):
            self.ids.discard(client_id)
            on_count(len(self.ids))

    return Clients()


def vtk_messages_to(path):
    """Send VTK's and Slicer's own messages to the log file ``path`` instead of the terminal, where the page's URL
    and IBIX's messages are printed. Call it again after a ``SlicerApp`` is made: it sets the terminal back."""
    from vtkmodules.vtkCommonCore import vtkFileOutputWindow, vtkLogger, vtkOutputWindow

    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
    if getattr(vtk_messages_to, "logging_to", None) != str(path):
        vtkLogger.LogToFile(str(path), vtkLogger.APPEND, vtkLogger.VERBOSITY_INFO)
        vtk_messages_to.logging_to = str(path)
    window = vtkFileOutputWindow()
    window.SetFileName(str(path))
    window.AppendOn()
    window.FlushOn()
    vtkOutputWindow.SetInstance(window)


@contextlib.contextmanager
def vtk_warnings_off():
    """No VTK warning or error shown meanwhile: the start-up of trame-slicer's ``SlicerApp`` sets VTK's messages to
    the terminal and reports that Slicer's desktop colour tables have no home folder (the page makes its own)."""
    from vtkmodules.vtkCommonCore import vtkObject

    shown = vtkObject.GetGlobalWarningDisplay()
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtkObject.SetGlobalWarningDisplay(shown)


def main(args):
    """Run ``ibix web`` with parsed ``args``; returns the exit code once the server stops."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen, no X server
    if bool(args.demo) == (args.data is not None):
        raise ibx.InputError("choose the data folder (ibix web --data DIR) or the shipped demo (ibix web --demo)")
    from IBIXLogic import demo

    shipped = demo.resources()
    root = args.data if args.data is not None else shipped
    if not Path(root).is_dir():
        raise ibx.InputError(f"--data {root}: no such folder")
    temporary = args.output is None and args.data is None  # the demo's output lives as long as its server
    output = args.output or (Path(root) / "ibix-web-output" if args.data is not None
                             else Path(tempfile.mkdtemp(prefix="ibix-web-")))
    data = DataFolder(root, output, upload_limit=args.upload_limit * 2**20)
    token = args.token or secrets.token_urlsafe(24)

    log = data.writable("ibix-web-vtk.log")
    vtk_messages_to(log)

    from trame.app import get_server

    from .app import Page

    server = get_server("ibix", client_type="vue3")
    with vtk_warnings_off():
        page = Page(server, data, device=args.device)
    vtk_messages_to(log)
    page.build_ui()
    clients = _client_counter(page.cancel_if_nobody_left)
    server.add_protocol_to_configure(lambda protocol: protocol.registerLinkProtocol(clients))

    @server.controller.add("on_server_bind")
    def _bind(wslink_server):
        wslink_server.app.middlewares.append(token_middleware(token))
        wslink_server.app.router.add_routes([download_route(data)])

    @server.controller.add("on_server_ready")
    def _ready(**_):
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"IBIX page: http://{host}:{server.port}/index.html?token={token}", flush=True)
        print(f"  data folder {data.root} (read), output folder {data.output} (written); VTK's messages in {log}",
              flush=True)

    if args.demo:
        page.open_demo(os.path.relpath(shipped / "Models" / "t1_to_t2_cae.onnx", data.root),
                       os.path.relpath(shipped / "SampleData" / "IBIX-T1.nrrd", data.root))
    sys.argv = sys.argv[:1]  # the options were read above; trame reads sys.argv again
    try:  # Ctrl+C and SIGTERM stop the server (aiohttp's handlers), then the page ends its engine processes
        server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False,
                     disable_logging=args.quiet)
    finally:
        page.close()
        if temporary:
            shutil.rmtree(output, ignore_errors=True)
    return 0
