import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from tutorial_api.hello import app, async_app


@pytest.fixture(params=[app, async_app], ids=["sync", "async"])
def client(request):
    return TestClient(request.param)


def test_root(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.json() == {"Hello": "World"}


def test_item_with_query(client):
    response = client.get("/items/5", params={"q": "somequery"})
    assert response.status_code == 200
    assert response.json() == {"item_id": 5, "q": "somequery"}


def test_item_without_query(client):
    assert client.get("/items/7").json() == {"item_id": 7, "q": None}


def test_item_id_must_be_an_integer(client):
    response = client.get("/items/abc")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "item_id"]


def test_openapi_documents_both_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/", "/items/{item_id}"}
    parameters = {p["name"]: p for p in paths["/items/{item_id}"]["get"]["parameters"]}
    assert parameters["item_id"]["schema"]["type"] == "integer"
    assert parameters["q"]["required"] is False


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_work_offline(client, page):
    html = client.get(page).text
    urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert urls and all(url.startswith("/") for url in urls), urls
    assert all(client.get(url).status_code == 200 for url in urls)


def test_importing_the_hello_app_and_the_client_loads_no_torch():
    """notebook 1 needs neither torch nor transformers: importing them took seconds."""
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tutorial_api.hello, tutorial_api.client; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "[]", imported.stdout


@pytest.mark.slow
def test_the_package_names_load_on_first_use():
    """Each public name is what it was before imports became lazy, whatever came first."""
    checked = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tutorial_api.conversation, tutorial_api.models\n"
            "from tutorial_api import chat, start_server, __all__\n"
            "import tutorial_api\n"
            "assert chat is tutorial_api.chat is tutorial_api.conversation.chat, chat\n"
            "assert start_server.__module__ == 'tutorial_api.server'\n"
            "assert set(__all__) <= set(dir(tutorial_api))\n"
            "try:\n    tutorial_api.no_such_name\nexcept AttributeError:\n    print('ok')",
        ],
        capture_output=True,
        text=True,
    )
    assert checked.stdout.strip() == "ok", checked.stderr
