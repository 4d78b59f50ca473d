"""Call the chat API with requests, as the original tutorial's `get_completion` does."""

import requests

from tutorial_api.settings import Settings


class ChatAPIError(RuntimeError):
    """The server refused the request; the message is the server's own."""


def get_completion(prompt, history=None, url=None, *, api_key=None, timeout=600, **settings):
    """Ask the server at `url` (default http://127.0.0.1:6006); return `(response, history)`.

    `api_key` is needed when the server has keys. `settings` are the optional request fields:
    max_length, top_p, temperature.
    """
    answer = requests.post(
        url or Settings().url,
        json={"prompt": prompt, "history": history or [], **settings},
        headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        timeout=timeout,
    )
    try:
        body = answer.json()
    except ValueError:
        raise ChatAPIError(f"{answer.status_code}: {answer.text[:200]}") from None
    if not answer.ok:
        raise ChatAPIError(f"{answer.status_code}: {body.get('message', body)}")
    return body["response"], body["history"]
