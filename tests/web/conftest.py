"""A real headless Chromium for the pages' tests, reaching nothing but this machine's loopback."""

import shutil
import socket

import pytest

# Debian's package for each command the browser tests need.
PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}


def dead_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Start headless Chromium through selenium; skip where either is not installed."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (the dev extra has it)"
    )
    missing = {
        command: package for command, package in PACKAGES.items() if not shutil.which(command)
    }
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: apt-get install {' '.join(missing.values())}"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
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
    # The console, where failed loads show.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    yield browser
    browser.quit()


@pytest.fixture
def reached_outside(browser):
    """Return a check: what the page loaded from anywhere but `server`, and the loads that failed.

    None should be tried: the list should be empty.
    """

    def check(server) -> list[str]:
        loaded = browser.execute_script(
            "return performance.getEntriesByType('resource')"
            ".filter(e => e.responseStatus).map(e => e.name)"
        )
        failed = [
            entry["message"]
            for entry in browser.get_log("browser")
            if "net::ERR_" in entry["message"]
        ]
        return [url for url in loaded if not url.startswith(server.url)] + failed

    return check
