"""The chat page in a real headless Chromium (tests/web/conftest.py) that reaches only loopback.

A student enters a key, asks in Chinese, watches the answer stream and stops it; the server frees
its place. The screenshots in docs/ come from here: TUTORIAL_API_SCREENSHOTS=docs refreshes them.
"""

import logging
import os
import time
from pathlib import Path

import pytest
import requests

from tutorial_api import create_app, start_server

pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as shown
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow
KEY = "page-key-7f3a"
TEACHER_KEY = "teacher-key-91c2"
QUESTION = "你好！请用三句话介绍一下你自己。"


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Return where screenshots go: $TUTORIAL_API_SCREENSHOTS, else a temporary folder."""
    folder = os.environ.get("TUTORIAL_API_SCREENSHOTS")
    return Path(folder) if folder else tmp_path


@pytest.fixture(scope="module")
def server(slow_tiny):
    """The tiny model at 20 ms a step, answering up to 1000 tokens: a stop comes first."""
    server = start_server(
        create_app(
            slow_tiny,
            api_keys=[f"student:{KEY}", f"Ms Wang (teacher):{TEACHER_KEY}"],
            max_new_tokens=1000,
        ),
        port=0,
        log_level="warning",
    )
    yield server
    server.stop()


def wait_for(browser, condition, seconds=30):
    return WebDriverWait(browser, seconds).until(condition)


def speak(browser, locale: str):
    """Set the tab's navigator.language to `locale`, as a browser in that language does."""
    user_agent = browser.execute_script("return navigator.userAgent")
    browser.execute_cdp_cmd(
        "Emulation.setUserAgentOverride", {"userAgent": user_agent, "acceptLanguage": locale}
    )
    browser.set_window_size(1000, 640)  # a laptop's screen, for the screenshots


def open_page(browser, server, locale: str):
    """Open the chat page as a browser set to `locale` would, with nothing stored yet."""
    speak(browser, locale)
    browser.get(server.url)
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    return wait_for(browser, shown.visibility_of_element_located((By.ID, "key")))


def ask(browser, key: str, question: str):
    """Enter `key` once, then ask `question`; return the answer's element."""
    key_field = browser.find_element(By.ID, "key")
    key_field.send_keys(key)
    key_field.send_keys(Keys.ENTER)
    wait_for(browser, shown.invisibility_of_element_located((By.ID, "key-form")))
    browser.find_element(By.ID, "prompt").send_keys(question)
    browser.find_element(By.ID, "send").click()


def active_requests(server) -> int:
    return requests.get(f"{server.url}/health").json()["active_requests"]


@pytest.mark.parametrize(
    ("locale", "language", "stopped"), [("en-US", "en", "(stopped)"), ("zh-CN", "zh", "（已停止）")]
)
def test_a_student_asks_sees_the_answer_stream_and_stops_it(
    server, browser, reached_outside, caplog, locale, language, stopped
):
    caplog.set_level(logging.INFO)
    open_page(browser, server, locale)
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang").startswith(language)
    ask(browser, KEY, QUESTION)
    question = wait_for(
        browser, shown.visibility_of_element_located((By.CSS_SELECTOR, ".message.user"))
    )
    assert question.text == QUESTION
    answer = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    wait_for(browser, lambda _: answer.text)
    seen = answer.text
    wait_for(browser, lambda _: len(answer.text) > len(seen))  # it streams: the text grows
    assert active_requests(server) == 1

    browser.find_element(By.ID, "stop").click()
    wait_for(browser, lambda _: answer.text.endswith(stopped))
    deadline = time.monotonic() + 30
    while active_requests(server):
        assert time.monotonic() < deadline, "the stopped answer still generates on the server"
        time.sleep(0.05)
    stats = browser.find_element(By.CSS_SELECTOR, ".stats").text
    assert ("tokens/s" if language == "en" else "每秒") in stats
    assert browser.find_element(By.ID, "send").is_displayed()
    assert KEY not in browser.current_url and KEY not in browser.page_source
    assert not any(KEY in record.getMessage() for record in caplog.records)
    assert not reached_outside(server)


def test_a_wrong_key_is_explained_in_the_pages_language(server, browser, reached_outside):
    open_page(browser, server, "zh-CN")
    ask(browser, "not-the-key", "你好")
    notice = wait_for(browser, shown.visibility_of_element_located((By.ID, "notice")))
    assert "401" in notice.text and "密钥" in notice.text
    # The key form is back, for the right key; the question is back in the box, to send again.
    assert browser.find_element(By.ID, "key-form").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "你好"
    assert not reached_outside(server)


@pytest.mark.parametrize(("locale", "language"), [("en-US", "en"), ("zh-CN", "zh")])
def test_the_dashboard_shows_a_students_request_live(
    server, browser, reached_outside, screenshots, locale, language
):
    """A student asks in one tab; the teacher's dashboard in another shows it, then its end."""
    student = browser.current_window_handle
    open_page(browser, server, locale)
    ask(browser, KEY, QUESTION)
    answer = wait_for(
        browser, shown.visibility_of_element_located((By.CSS_SELECTOR, ".message.assistant"))
    )
    wait_for(browser, lambda _: answer.text)

    browser.switch_to.new_window("tab")
    speak(browser, locale)
    browser.get(f"{server.url}/dashboard")
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang").startswith(language)
    key_field = wait_for(browser, shown.visibility_of_element_located((By.ID, "key")))
    key_field.send_keys(TEACHER_KEY, Keys.ENTER)
    asking = wait_for(
        browser, shown.visibility_of_element_located((By.CSS_SELECTOR, "#keys tr.asking"))
    )
    assert asking.find_element(By.TAG_NAME, "td").text == "student"
    wait_for(browser, lambda _: browser.find_element(By.ID, "running").text == "1")
    assert QUESTION not in browser.page_source and TEACHER_KEY not in browser.page_source
    # A few polls, so that the screenshot has a tokens/s chart.
    wait_for(browser, lambda _: browser.execute_script("return rates.length") >= 3)
    browser.save_screenshot(str(screenshots / f"dashboard.{language}.png"))
    dashboard = browser.current_window_handle

    browser.switch_to.window(student)
    browser.find_element(By.ID, "stop").click()
    browser.switch_to.window(dashboard)
    wait_for(browser, shown.invisibility_of_element_located((By.CSS_SELECTOR, "#keys tr.asking")))
    assert browser.find_element(By.ID, "running").text == "0"
    assert not reached_outside(server)
    browser.close()
    browser.switch_to.window(student)


@pytest.mark.real_model
@pytest.mark.parametrize(("locale", "language"), [("en-US", "en"), ("zh-CN", "zh")])
def test_screenshots_of_a_real_answer(browser, screenshots, locale, language):
    """The real model answers on the page, in the screenshot chat_page.LANGUAGE.png.

    The question is in English in both: SmolLM2 was trained on English only.
    """
    server = start_server(
        create_app("smollm2-135m", api_keys=[f"student:{KEY}"], max_new_tokens=80),
        port=0,
        log_level="warning",
    )
    try:
        open_page(browser, server, locale)
        ask(browser, KEY, "What is the capital of France?")
        wait_for(browser, shown.visibility_of_element_located((By.CSS_SELECTOR, ".stats")), 120)
        browser.save_screenshot(str(screenshots / f"chat_page.{language}.png"))
    finally:
        server.stop()
    assert browser.find_element(By.CSS_SELECTOR, ".message.assistant").text
