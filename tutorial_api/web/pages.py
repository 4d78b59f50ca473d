"""The pages a class opens in a browser: the chat page at GET /, the teacher's dashboard and sheet.

They are plain HTML, CSS and JavaScript files in `pages/`, served as they are: no build step, and
nothing loaded from another host (a Content-Security-Policy holds the browser to that). The keys
stay in each browser; the pages hold none. The dashboard polls GET /dashboard/data, which a
teacher's key opens: the same counters as /metrics, each key's tallies, and who is asking now,
never what they ask. The student sheet fetches GET /sheet/data with the same key: the address
students type, the examples, and each student's own link, `ADDRESS/#key=KEY`, whose key stays in
the fragment, which a browser never sends.
"""

import ipaddress
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from tutorial_api.class_keys import sheet_examples, student_link
from tutorial_api.server import network_address
from tutorial_api.web.access import require_teacher
from tutorial_api.web.metrics import DASHBOARD_DATA, SHEET_DATA

PAGES = files("tutorial_api.web") / "pages"
# Scripts, styles, images and requests from this server only.
POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


class SharedPathRoute(APIRoute):
    """A route whose path other routes serve too, such as GET / beside POST /.

    A method none of them takes gets a 405 whose Allow header names every method the API's schema
    documents for the path, not only this route's.
    """

    async def handle(self, scope, receive, send):
        """Answer, or refuse a method no route of this path takes."""
        if scope["method"] not in self.methods:
            documented = scope["app"].openapi()["paths"].get(self.path, {})
            allowed = ", ".join(sorted(method.upper() for method in documented))
            raise HTTPException(405, headers={"Allow": allowed})
        await super().handle(scope, receive, send)


def add_pages(app: FastAPI) -> None:
    """Serve the chat page at GET /, the dashboard and the student sheet, their files under /pages.

    Call it before POST / is added: the first route of a path answers its wrong methods.
    """
    app.mount("/pages", StaticFiles(packages=[("tutorial_api.web", "pages")]), name="pages")
    shared = APIRouter(route_class=SharedPathRoute)

    # Documented, since POST / is: the same path answers a browser with the chat page.
    @shared.get("/", response_class=HTMLResponse, tags=["pages"])
    async def chat_page():
        """Return the chat page, for a browser: students chat here with their key."""
        return _page("chat.html")

    app.include_router(shared)

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page():
        """Return the teacher's dashboard; its figures come from /dashboard/data."""
        return _page("dashboard.html")

    @app.get(DASHBOARD_DATA, include_in_schema=False)
    async def dashboard_data(
        request: Request, teacher: Annotated[str, Depends(require_teacher)]
    ) -> dict:
        """Return the class's figures now, for a teacher's key."""
        return request.app.state.metrics.snapshot()

    @app.get("/sheet", include_in_schema=False)
    async def sheet_page():
        """Return the student sheet, to project or print; its contents come from /sheet/data."""
        return _page("sheet.html")

    @app.get(SHEET_DATA, include_in_schema=False)
    async def sheet_data(
        request: Request, response: Response, teacher: Annotated[str, Depends(require_teacher)]
    ) -> dict:
        """Return the student sheet for a teacher's key: address, examples, each student's link."""
        response.headers["Cache-Control"] = "no-store"  # it holds every student's key
        address = students_address(request)
        students = [key for key in request.app.state.keys if not key.teacher]
        return {
            "address": address,
            "model": request.app.state.model_name,
            "needs_key": bool(request.app.state.keys),
            "examples": sheet_examples(address),
            "students": [
                {"name": key.name, "key": key.secret, "link": student_link(address, key)}
                for key in students
            ],
        }


def students_address(request: Request) -> str:
    """Return the server's address as students type it: the one the teacher's browser used.

    A loopback name works on this machine only, so it becomes the machine's network address.
    """
    url = request.url
    host = url.hostname or ""
    if _is_loopback(host):
        host = network_address()
    elif ":" in host:  # an IPv6 address goes in brackets
        host = f"[{host}]"
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{host}{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def _page(name: str) -> HTMLResponse:
    page = (PAGES / name).read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": POLICY})
