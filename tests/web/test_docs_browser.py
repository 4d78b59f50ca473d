"""/docs and /redoc in a real headless Chromium (tests/web/conftest.py) that can reach nothing but
this machine's loopback address: the pages render from the server's own files, Swagger UI's
Authorize takes an API key, and "Try it out" gets an answer.
"""

import pytest

from tutorial_api import create_app, start_server

pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as shown
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow
KEY = "browser-key"


@pytest.fixture(scope="module")
def server():
    server = start_server(
        create_app("tiny-qwen2", api_keys=[f"student:{KEY}"], max_new_tokens=16),
        port=0,
        log_level="warning",
    )
    yield server
    server.stop()


def wait_for(browser, condition, seconds=30):
    return WebDriverWait(browser, seconds).until(condition)


def test_swagger_ui_renders_authorizes_and_tries_post_root(server, browser, reached_outside):
    """Swagger UI renders, authorizes and tries the tutorial endpoint."""
    browser.get(f"{server.url}/docs")
    wait_for(browser, shown.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
    summaries = browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    paths = {summary.get_attribute("data-path") for summary in summaries}
    assert paths == {"/", "/v1/models", "/v1/chat/completions", "/tokenize", "/health"}

    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    wait_for(
        browser, shown.visibility_of_element_located((By.CSS_SELECTOR, ".auth-container input"))
    ).send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn-done").click()

    operation = browser.find_element(By.ID, "operations-default-create_chat__post")
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait_for(browser, shown.element_to_be_clickable((By.CSS_SELECTOR, ".try-out__btn"))).click()
    wait_for(browser, shown.element_to_be_clickable((By.CSS_SELECTOR, ".execute"))).click()
    status = wait_for(
        browser,
        shown.visibility_of_element_located(
            (By.CSS_SELECTOR, ".live-responses-table .response .response-col_status")
        ),
        seconds=60,
    )
    body = operation.find_element(
        By.CSS_SELECTOR, ".live-responses-table .response-col_description pre"
    ).text
    assert status.text.strip() == "200", body
    assert '"history"' in body and '"你好"' in body
    assert not reached_outside(server)


def test_redoc_renders_offline(server, browser, reached_outside):
    browser.get(f"{server.url}/redoc")
    wait_for(
        browser, lambda page: "/v1/chat/completions" in page.find_element(By.TAG_NAME, "body").text
    )
    assert not reached_outside(server)
