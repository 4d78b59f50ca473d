"""The tutorial's first FastAPI app, `main.py`, twice: with plain functions and with coroutines.

`app` has plain functions, `async_app` coroutines. Both serve /docs and /redoc from this
package, so the docs pages work offline.
"""

from fastapi import FastAPI

from tutorial_api.web.docs import add_docs

app = FastAPI(title="Hello, FastAPI", docs_url=None, redoc_url=None)
add_docs(app)


@app.get("/")
def read_root():
    """Say hello."""
    return {"Hello": "World"}


@app.get("/items/{item_id}")
def read_item(item_id: int, q: str | None = None):
    """Return the item's id, read from the path, and the optional query `q`."""
    return {"item_id": item_id, "q": q}


# The same app with `async def`: FastAPI awaits these on the event loop instead of running
# them in its thread pool, so they must never block (no model.generate, no time.sleep).
async_app = FastAPI(title="Hello, async FastAPI", docs_url=None, redoc_url=None)
add_docs(async_app)


@async_app.get("/")
async def read_root_async():
    """Say hello, on the event loop."""
    return {"Hello": "World"}


@async_app.get("/items/{item_id}")
async def read_item_async(item_id: int, q: str | None = None):
    """Return the item's id and the optional query `q`, on the event loop."""
    return {"item_id": item_id, "q": q}
