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
