"""The student sheet at /sheet: its data for a teacher's key, its examples, each student's link.

The browser test opens a student's link, `ADDRESS/#key=KEY`, in a real headless Chromium
(tests/web/conftest.py) and checks that the key logs the student in and reaches the server only in
the Authorization header: never in a URL, a Referer or the request log.
"""

import logging
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests

from tutorial_api import create_app, start_server
from tutorial_api.class_keys import sheet_examples, student_link
from tutorial_api.server import network_address
from tutorial_api.web.access import ApiKey

ALICE, BOB, TEACHER = "alice-sheet-5d1e", "bob-sheet-8a0c", "teacher-sheet-3b7f"
KEY_STORE = "tutorial_api.key"  # where the chat page keeps a student's key


class Received:
    """ASGI middleware noting what each request brought: path, query and headers but the key's."""

    def __init__(self, app, into: list):
        self.app = app
        self.into = into

    async def __call__(self, scope, receive, send):
        """Note the request, then pass it on."""
        if scope["type"] == "http":
            headers = {
                name.decode(): value.decode()
                for name, value in scope["headers"]
                if name != b"authorization"
            }
            self.into.append((scope["path"], scope["query_string"].decode(), headers))
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def received() -> list:
    """What the module's server received, request by request (Authorization left out)."""
    return []


@pytest.fixture(scope="module")
def server(received):
    app = create_app(
        "tiny-qwen2",
        api_keys=[f"alice:{ALICE}", f"bob:{BOB}", f"Ms Wang (teacher):{TEACHER}"],
        max_new_tokens=16,
    )
    app.add_middleware(Received, into=received)
    server = start_server(app, port=0, log_level="warning")
    yield server
    server.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def sheet(server, host: str | None = None) -> dict:
    """Return the sheet's data as the teacher's browser, reaching the server as `host`, gets it."""
    headers = bearer(TEACHER) | ({"Host": host} if host else {})
    answer = requests.get(f"{server.url}/sheet/data", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"  # it holds every student's key
    return answer.json()


def test_the_sheets_data_needs_a_teachers_key(server):
    data = f"{server.url}/sheet/data"
    assert requests.get(data, timeout=10).status_code == 401
    assert requests.get(data, headers=bearer("wrong"), timeout=10).status_code == 401
    student = requests.get(data, headers=bearer(ALICE), timeout=10)
    assert student.status_code == 403 and "teacher" in student.json()["message"]
    assert ALICE not in student.text and BOB not in student.text
    # The page itself holds no key: anyone may load it, and it asks for the teacher's.
    page = requests.get(f"{server.url}/sheet", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert ALICE not in page.text and TEACHER not in page.text


def test_the_sheet_lists_each_students_own_link_only(server):
    data = sheet(server, "192.168.1.23:6006")
    address = "http://192.168.1.23:6006"
    assert data["address"] == address and data["needs_key"]
    assert data["students"] == [
        {"name": "alice", "key": ALICE, "link": f"{address}/#key={ALICE}"},
        {"name": "bob", "key": BOB, "link": f"{address}/#key={BOB}"},
    ]
    assert TEACHER not in str(data)  # the teacher's key is on no slip
    assert address in data["examples"]["requests"] and "YOUR_KEY" in data["examples"]["curl"]


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("teacher-pc.local:8000", "http://teacher-pc.local:8000"),
        ("[fd00::5]:6006", "http://[fd00::5]:6006"),
        ("10.0.0.7", "http://10.0.0.7"),
    ],
)
def test_the_address_is_the_one_the_teachers_browser_used(server, host, address):
    assert sheet(server, host)["address"] == address


def test_a_loopback_address_becomes_the_network_address(server):
    """127.0.0.1 or localhost reach only the teacher's machine: students get its network address."""
    expected = f"http://{network_address()}:{server.port}"
    assert sheet(server)["address"] == expected
    assert sheet(server, f"localhost:{server.port}")["address"] == expected


def test_a_link_keeps_a_key_with_any_characters():
    secret = "a b#c%d/e+f&key=g"
    link = student_link("http://10.0.0.7:6006", ApiKey("carol", secret))
    base, fragment = link.split("#", 1)
    assert base == "http://10.0.0.7:6006/"
    assert fragment.startswith("key=") and unquote(fragment.removeprefix("key=")) == secret
    assert " " not in fragment and "&" not in fragment.removeprefix("key=")


@pytest.mark.slow
def test_the_sheets_python_examples_answer(server):
    """The requests and openai examples, with a student's key filled in, get an answer."""
    examples = sheet_examples(server.url, ALICE)
    # The sheet's code, run as a student runs it: a refusal raises.
    asked = {}
    exec(examples["requests"], asked)
    assert asked["history"][-1][0] == "你好"
    streamed = {}
    exec(examples["openai"], streamed)
    assert "chunk" in streamed  # the stream came, chunk by chunk


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_the_sheets_curl_example_answers(server):
    example = sheet_examples(server.url, BOB)["curl"]
    answer = subprocess.run(
        ["bash", "-c", example], capture_output=True, text=True, timeout=60, check=True
    )
    assert '"response"' in answer.stdout, answer.stdout


@pytest.mark.slow
def test_a_students_link_logs_them_in_and_is_never_sent(
    server, received, browser, reached_outside, caplog
):
    """The teacher's sheet shows Alice's link; opened, it logs her in and leaves no trace."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(condition):
        return WebDriverWait(browser, 30).until(condition)

    def stored_key():
        return browser.execute_script(f"return localStorage.getItem('{KEY_STORE}')")

    caplog.set_level(logging.INFO, logger="tutorial_api.requests")
    received.clear()
    browser.get(f"{server.url}/sheet")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    key_field = wait_for(shown.visibility_of_element_located((By.ID, "key")))
    key_field.send_keys(TEACHER, Keys.ENTER)
    address = wait_for(shown.visibility_of_element_located((By.ID, "address")))
    expected = f"http://{network_address()}:{server.port}"
    assert address.text == f"{expected}/"
    chat_code = browser.find_element(By.CSS_SELECTOR, "#chat-qr svg")
    assert chat_code.get_attribute("aria-label") == f"{expected}/"
    assert browser.find_element(By.CSS_SELECTOR, "#chat-qr svg path").get_attribute("d")
    assert not browser.find_element(By.ID, "slips").is_displayed()  # no key on the projector

    browser.find_element(By.ID, "switch").click()
    slip = wait_for(shown.visibility_of_element_located((By.CSS_SELECTOR, ".slip")))
    assert slip.find_element(By.CLASS_NAME, "name").text == "alice"
    link = slip.find_element(By.CLASS_NAME, "link").text
    assert link == f"{expected}/#key={ALICE}"
    assert slip.find_element(By.TAG_NAME, "svg").get_attribute("aria-label") == link
    assert len(browser.find_elements(By.CSS_SELECTOR, ".slip")) == 2
    assert TEACHER not in browser.page_source
    assert not reached_outside(server)

    # Alice opens her link: this browser reaches the server at its loopback address.
    browser.get("about:blank")
    browser.get(link.replace(expected, server.url))
    wait_for(lambda _: browser.current_url == f"{server.url}/")
    assert stored_key() == ALICE
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    browser.find_element(By.ID, "prompt").send_keys("你好")
    browser.find_element(By.ID, "send").click()
    answered = (By.CSS_SELECTOR, ".message.assistant")
    refused = (By.ID, "notice")
    ended = shown.any_of(
        shown.visibility_of_element_located(refused),
        shown.element_to_be_clickable((By.ID, "send")),
    )
    wait_for(ended)
    assert not browser.find_element(*refused).is_displayed()  # no 401: she is logged in
    assert browser.find_elements(*answered)

    # A link opened in a tab already showing the chat page changes the key there too.
    browser.execute_script(f"location.hash = '#key={BOB}'")
    wait_for(lambda _: stored_key() == BOB)
    assert browser.current_url == f"{server.url}/"

    paths = [path for path, _, _ in received]
    assert "/sheet/data" in paths and "/v1/chat/completions" in paths
    for secret in (ALICE, BOB):
        assert secret not in str(received), "a student's key reached the server outside its header"
        assert not any(secret in record.getMessage() for record in caplog.records)
    assert not reached_outside(server)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("locale", "language", "title"),
    [("en-US", "en", "Student sheet"), ("zh-CN", "zh", "学员操作单")],
)
def test_the_sheet_speaks_the_browsers_language(server, browser, locale, language, title):
    """The sheet follows the browser's language; TUTORIAL_API_SCREENSHOTS=docs keeps a picture."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    user_agent = browser.execute_script("return navigator.userAgent")
    browser.execute_cdp_cmd(
        "Emulation.setUserAgentOverride", {"userAgent": user_agent, "acceptLanguage": locale}
    )
    browser.get(f"{server.url}/sheet")
    browser.execute_script(f"localStorage.setItem('tutorial_api.teacher_key', '{TEACHER}')")
    browser.refresh()
    WebDriverWait(browser, 30).until(shown.visibility_of_element_located((By.ID, "address")))
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang").startswith(language)
    assert browser.find_element(By.TAG_NAME, "h1").text == title
    assert "YOUR_KEY" in browser.find_element(By.ID, "example-powershell").text
    if folder := os.environ.get("TUTORIAL_API_SCREENSHOTS"):
        browser.set_window_size(1000, 1400)
        browser.save_screenshot(str(Path(folder) / f"sheet.{language}.png"))
