"""/docs and /redoc in a real headless Chromium that can reach nothing but this machine's loopback
address: the pages render from the server's own files, Swagger UI's Authorize takes an API key, and
"Try it out" gets an answer.
"""

import shutil
import socket

import pytest

from tutorial_api import create_app, start_server

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (the dev extra has it)"
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as shown  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PACKAGES = {
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
}  # Debian's package for each command
MISSING = {command: package for command, package in PACKAGES.items() if not shutil.which(command)}
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"{' and '.join(MISSING)} not found: apt-get install {' '.join(MISSING.values())}",
    ),
]
KEY = "browser-key"


def dead_port() -> int:
    """a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    server = start_server(
        create_app("tiny-qwen2", api_keys=[f"student:{KEY}"], max_new_tokens=16),
        port=0,
        log_level="warning",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        # Every host but loopback is unreachable: names resolve to nothing, and anything else goes
        # to a proxy that is not there.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--proxy-server=http://127.0.0.1:{dead_port()}",
        "--proxy-bypass-list=127.0.0.1",
        "--window-size=1280,2000",
    ):
        options.add_argument(argument)
    options.set_capability(
        "goog:loggingPrefs", {"browser": "ALL"}
    )  # the console, where failed loads show
    browser = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    yield browser
    browser.quit()


def wait_for(browser, condition, seconds=30):
    return WebDriverWait(browser, seconds).until(condition)


def reached_outside(browser, server) -> list[str]:
    """What the page loaded from anywhere but the server, and the loads that failed (none should be
    tried).
    """
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.responseStatus).map(e => e.name)"
    )
    failed = [
        entry["message"] for entry in browser.get_log("browser") if "net::ERR_" in entry["message"]
    ]
    return [url for url in loaded if not url.startswith(server.url)] + failed


def test_swagger_ui_renders_authorizes_and_tries_post_root(server, browser):
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
    assert not reached_outside(browser, server)


def test_redoc_renders_offline(server, browser):
    browser.get(f"{server.url}/redoc")
    wait_for(
        browser, lambda page: "/v1/chat/completions" in page.find_element(By.TAG_NAME, "body").text
    )
    assert not reached_outside(browser, server)
