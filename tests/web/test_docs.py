import re

import pytest
from fastapi.testclient import TestClient

from tutorial_api import create_app


@pytest.fixture(scope="module")
def client():
    return TestClient(
        create_app("tiny-qwen2")
    )  # the docs need no model: no lifespan, nothing loaded


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_everything_from_this_server(client, page):
    html = client.get(page).text
    urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert urls and all(url.startswith("/") for url in urls), urls
    assert "http://" not in html and "https://" not in html
    for url in urls:
        if url != "/openapi.json":
            assert client.get(url).status_code == 200, url


def test_the_assets_are_the_real_scripts(client):
    swagger = client.get("/docs-assets/swagger-ui-bundle.js")
    assert swagger.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert "SwaggerUIBundle" in swagger.text[:2000] and len(swagger.content) > 500_000
    assert "Redoc" in client.get("/docs-assets/redoc.standalone.js").text[:2000]


def test_the_docs_pages_stay_out_of_the_schema(client):
    assert set(client.get("/openapi.json").json()["paths"]) == {
        "/",
        "/v1/models",
        "/v1/chat/completions",
        "/tokenize",
        "/health",
    }
