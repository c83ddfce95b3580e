"""The web app's HTTP server: the page and its static files, the runs API the page polls, and the
JSON serving API (OpenAI-style embeddings, zero-shot classification, folder search, captions).

Standard library only (http.server.ThreadingHTTPServer): one process serves the HTML and the
JSON, offline by construction. What it guards:
- it binds 127.0.0.1 unless told otherwise, and on a loopback address it answers only requests
  whose Host header is local (a web page elsewhere cannot reach it through DNS rebinding);
- it serves only its own static files, runs below the runs root (runs.RunsFolder.resolve) and
  thumbnails of images below an index root: any other path is a 404;
- a request body over `max_upload` bytes is refused from its Content-Length (413) before it is
  read; an upload that is not an image, or over training's pixel and aspect limits, is a 400
  naming the reason; at most `max_concurrent` requests are handled at once (others wait up to
  QUEUE_WAIT_S, then get a 429), and the inference queue is bounded (model_service.Busy: 429).
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import api
from .model_service import Busy, ModelService
from .runs import RunsFolder

STATIC = {  # URL path -> (file in mlx_clip/ui/static, content type): nothing else is served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
QUEUE_WAIT_S = 30.0
THUMB_SIZE = 160


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class App:
    """What the handlers share: the runs folder, the model service and the limits."""

    def __init__(
        self,
        runs: RunsFolder,
        service: ModelService,
        max_upload: int = 16 << 20,
        max_concurrent: int = 16,
        local_only: bool = True,
    ):
        self.runs, self.service, self.max_upload = runs, service, max_upload
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.local_only = local_only


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    server_version = "mlx_clip-ui"
    app: App  # set on the subclass make_server builds

    def log_message(self, format, *args):  # quiet: one line per error only
        pass

    # -- plumbing --------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def _handle(self, route) -> None:
        app = self.app
        if app.local_only:
            if urlsplit("//" + (self.headers.get("Host") or "")).hostname not in LOCAL_HOSTS:
                self.close_connection = True
                return self._error(403, f"Host {self.headers.get('Host')!r} is not local")
        if not app.slots.acquire(timeout=QUEUE_WAIT_S):
            self.close_connection = True
            return self._error(429, "the server is busy: too many requests at once; try again shortly")
        try:
            route()
        except HTTPError as e:
            self._error(e.status, str(e))
        except Busy as e:
            self._error(429, str(e))
        except KeyError as e:  # an unknown run, model or folder
            self._error(404, e.args[0] if e.args else "not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # never let one request take the server down
            self.close_connection = True
            self._error(500, f"{type(e).__name__}: {e}")
        finally:
            app.slots.release()

    def _body(self) -> tuple[str, bytes]:
        """(content type, body), refusing a body over max_upload before reading it."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise HTTPError(411, "a Content-Length header is required")
        if int(length) > self.app.max_upload:
            self.close_connection = True  # the body is left unread: this connection cannot go on
            raise HTTPError(
                413, f"request body of {int(length)} bytes is over the limit of {self.app.max_upload} bytes"
            )
        return self.headers.get("Content-Type", ""), self.rfile.read(int(length))

    # -- routes ----------------------------------------------------------------------------

    def do_GET(self):
        self._handle(self._get)

    def do_HEAD(self):
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        one = lambda k: (query.get(k) or [None])[0]  # noqa: E731
        app = self.app
        if url.path in STATIC:
            name, ctype = STATIC[url.path]
            body = resources.files(__package__).joinpath("static", name).read_bytes()
            return self._send(200, body, ctype)
        if url.path == "/api/runs":
            rows = [app.runs.summary(r) for r in app.runs.run_dirs()]
            return self._json(200, {"root": str(app.runs.root), "runs": rows, "sweeps": app.runs.sweeps()})
        if url.path == "/api/run":
            return self._json(200, app.runs.detail(one("name") or ""))
        if url.path == "/api/diff":
            return self._json(200, {"rows": app.runs.diff(query.get("name", []))})
        if url.path == "/api/models":
            folders = sorted(app.service.folders)
            return self._json(200, {"checkpoints": app.service.checkpoints(), "folders": folders})
        if url.path == "/api/thumb":
            return self._send(200, thumbnail(app.service.folders, one("folder"), one("path")), "image/png")
        raise HTTPError(404, f"not found: {url.path}")

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path not in api.ROUTES:
            raise HTTPError(404, f"not found: {path}")
        ctype, body = self._body()
        try:
            request = api.parse_request(ctype, body)
            self._json(200, api.ROUTES[path](self.app.service, request))
        except api.BadRequest as e:
            raise HTTPError(e.status, str(e)) from None


def thumbnail(folders: dict[str, Path], folder: str | None, rel: str | None) -> bytes:
    """A PNG thumbnail of an image below one of the index roots; a 404 for any other path."""
    from ..data.decode import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS, open_lazy
    from ..data.samples import DataError
    from ..inference import IMAGE_EXTENSIONS

    if folder not in folders or not rel:
        raise HTTPError(404, "no such image")
    root = folders[folder].resolve()
    path = (root / rel).resolve()
    hidden = any(part.startswith(".") for part in Path(rel).parts)
    if hidden or not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise HTTPError(404, "no such image")
    if not path.is_file():
        raise HTTPError(404, "no such image")
    try:
        with open_lazy(str(path), DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_ASPECT_RATIO) as im:
            im.draft("RGB", (THUMB_SIZE, THUMB_SIZE))  # JPEG: decode at a reduced scale
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
    except DataError as e:
        raise HTTPError(422, str(e)) from None
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_server(host: str, port: int, app: App) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; port 0 picks a free one (server.server_address)."""
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
