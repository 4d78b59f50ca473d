"""API keys for a class: one named key per student, in a key file for --api-key-file.

Also what a student is handed: their line of the `keys` command's sheet, their own link to the chat
page, and the sheet's examples of a first request.
"""

import os
import re
import secrets
from urllib.parse import quote

from tutorial_api.web.access import ApiKey

# A name goes before the colon of `NAME:KEY` and into the log, so it keeps to plain characters.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# The student sheet's first request with each tool; {address} and {key} are filled in.
_EXAMPLES = {
    "requests": """\
import requests

URL = "{address}"
KEY = "{key}"


def get_completion(prompt, history=None):
    headers = {"Authorization": f"Bearer {KEY}"}
    data = {"prompt": prompt, "history": history or []}
    answer = requests.post(URL, headers=headers, json=data, timeout=180)
    if not answer.ok:
        raise RuntimeError(f"{answer.status_code}: {answer.text}")
    return answer.json()["response"], answer.json()["history"]


response, history = get_completion("你好")
print(response)
""",
    "openai": """\
from openai import OpenAI

client = OpenAI(base_url="{address}/v1", api_key="{key}")
for chunk in client.chat.completions.create(
    model="any", stream=True, messages=[{"role": "user", "content": "你好"}]
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
""",
    # The `\` ending its first line joins the two: one line, to paste whole.
    "curl": """\
curl -X POST "{address}" -H "Authorization: Bearer {key}" -H 'Content-Type: application/json' \
-d '{"prompt": "你好", "history": []}'
""",
    "powershell": """\
$url = "{address}"
$key = "{key}"
$body = [Text.Encoding]::UTF8.GetBytes('{"prompt": "你好", "history": []}')
Invoke-RestMethod -Method Post -Uri $url -Headers @{Authorization = "Bearer $key"} `
  -ContentType 'application/json' -Body $body
""",
}


def class_keys(count: int, prefix: str = "student") -> list[ApiKey]:
    """Return `count` fresh random keys named prefix01, prefix02 ... (128 bits each, URL-safe)."""
    if count < 1:
        raise ValueError(f"count: ask for at least one key, not {count}.")
    if not _PLAIN_NAME.fullmatch(prefix):
        raise ValueError(
            f"prefix: {prefix!r} must be letters, digits, '_', '.' or '-' (it names each key)."
        )
    width = max(2, len(str(count)))
    return [
        ApiKey(f"{prefix}{number:0{width}d}", secrets.token_urlsafe(16))
        for number in range(1, count + 1)
    ]


def write_key_file(path, keys: list[ApiKey], *, overwrite: bool = False) -> None:
    """Write `keys` as `NAME:KEY` lines to a file only this user can read.

    An existing file is an error unless `overwrite`, since replacing it locks out every student
    holding one of its keys.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    with os.fdopen(os.open(path, flags, 0o600), "w", encoding="utf-8") as key_file:
        key_file.write(
            "# API keys for a class: python -m tutorial_api serve --api-key-file THIS_FILE\n"
        )
        key_file.writelines(f"{key.name}:{key.secret}\n" for key in keys)


def student_sheet(keys: list[ApiKey], url: str) -> list[str]:
    """Return one line per student to hand out: their name, the server's address and their key."""
    width = max(len(key.name) for key in keys)
    return [f"{key.name:<{width}}  {url}  {key.secret}" for key in keys]


def student_link(url: str, key: ApiKey) -> str:
    """Return the chat page's address that logs `key` in, as `URL/#key=KEY`.

    The key rides in the fragment, which a browser keeps to itself: no server or log sees it.
    """
    return f"{url}/#key={quote(key.secret, safe='')}"


def sheet_examples(url: str, key: str = "YOUR_KEY") -> dict[str, str]:
    """Return the student sheet's first request to `url` with `key`, by tool, ready to run."""
    return {
        tool: code.replace("{address}", url).replace("{key}", key)
        for tool, code in _EXAMPLES.items()
    }
