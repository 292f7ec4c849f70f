"""A headless Chromium (Debian's chromium + chromium-driver, never a downloaded browser) driven through Selenium, and
the live API + worker stack the console test runs against."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LATPRUNE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LATPRUNE_CHROMEDRIVER", "/usr/bin/chromedriver")


def need_browser() -> None:
    """Skip without Chromium, unless LATPRUNE_REQUIRE_BROWSER is set (CI installs it: there a missing browser fails)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("LATPRUNE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Browser:
    driver: object
    base: str
    downloads: Path

    def open(self, fragment: str = "") -> None:
        self.driver.get(f"{self.base}/{fragment}")

    def go(self, fragment: str) -> None:
        """Change the hash route without reloading the page (what clicking a link does)."""
        self.driver.execute_script("location.hash = arguments[0]", fragment)

    def find(self, css: str, timeout_s: float = 10):  # noqa: ANN201
        return self.wait(lambda: self.first(css), timeout_s, f"an element matching {css!r}")

    def first(self, css: str):  # noqa: ANN201
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def all(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str, timeout_s: float = 10) -> str:
        return self.find(css, timeout_s).text

    def wait(self, predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.1):  # noqa: ANN201
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except Exception:  # noqa: BLE001 - a stale element while the page repaints: try again
                value = None
            if value:
                return value
            time.sleep(poll_s)
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; page:\n{self.page_text()}"
                    f"\nbrowser log:\n{self.log()}")

    def page_text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text[-3000:]

    def log(self) -> str:
        try:
            return "\n".join(str(e) for e in self.driver.get_log("browser"))
        except Exception:  # noqa: BLE001 - only for failure messages
            return "(no log)"

    def sign_in(self, key: str) -> None:
        self.go("#/signin")
        if self.first("#signout") and self.first("#nav").is_displayed():
            self.find("#signout").click()
        field = self.find("#api-key")
        field.clear()
        field.send_keys(key)
        self.find("#sign-in").click()
        self.find("#nav:not([hidden])")

    def downloaded(self, name: str, timeout_s: float = 20) -> Path:
        """The file once Chromium has finished writing it."""
        path = self.downloads / name
        self.wait(lambda: path.exists() and not any(self.downloads.glob("*.crdownload")), timeout_s,
                  f"the download {name}")
        return path

    @staticmethod
    def screenshot_folder() -> str | None:
        return os.environ.get("LATPRUNE_SCREENSHOTS")

    def screenshot(self, name: str, css: str | None = None) -> None:
        """Save a PNG to $LATPRUNE_SCREENSHOTS (the README's pictures are made this way); nothing otherwise."""
        folder = self.screenshot_folder()
        if not folder:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = str(Path(folder) / name)
        if css:
            self.find(css).screenshot(path)
            return
        # The whole page (up to 1600 px), not the window's first screen.
        size = self.driver.get_window_size()
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(size["width"], min(int(height) + 140, 1600))
        self.driver.execute_script("window.scrollTo(0, 0)")
        self.driver.save_screenshot(path)
        self.driver.set_window_size(size["width"], size["height"])


def start_browser(base: str, downloads: Path) -> Browser:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Both paths are given, so Selenium Manager has nothing to find; offline, it could not download a browser anyway.
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1280,1000", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,
                                              "safebrowsing.enabled": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which(CHROMEDRIVER)))
    # Headless Chromium only saves downloads where it is told to over the DevTools protocol.
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return Browser(driver, base, downloads)


@dataclass
class LiveStack:
    url: str
    settings: object
    database_url: str
    keys: dict[str, str]


def serve(app, stop: threading.Event | None = None) -> tuple[str, Callable[[], None]]:  # noqa: ANN001
    """Run `app` with uvicorn in a thread on a free port: (base URL, stop function)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"

    def stop_server() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop_server


def live_stack(home: Path) -> Iterator[LiveStack]:
    """The one-machine set-up `latprune up` runs (SQLite, the embedded broker, a local artifact store): the API over
    real HTTP and one worker process; keys of two tenants."""
    from service.app import create_app
    from service.auth import create_key
    from service.db import dispose_engines, session_scope
    from service.migrate import upgrade
    from service.settings import Settings
    from tests.workers.conftest import start_worker, stop_worker

    database, broker = f"sqlite:///{home / 'latprune.db'}", f"sqla+sqlite:///{home / 'broker.db'}"
    upgrade(database)
    settings = Settings(home=home, database_url=database, broker_url=broker)
    keys = {}
    with session_scope(database) as session:
        for tenant in ("alice", "bob"):
            keys[tenant], _ = create_key(session, f"{tenant}-{secrets.token_hex(3)}")
    env = {**os.environ, "LATPRUNE_HOME": str(home), "LATPRUNE_DATABASE_URL": database, "LATPRUNE_BROKER_URL": broker,
           "OMP_NUM_THREADS": "1", "LATPRUNE_PROGRESS_INTERVAL_S": "0.2", "LATPRUNE_CANCEL_CHECK_INTERVAL_S": "0.2"}
    worker = start_worker(env, "prune", home / "worker.log")
    url, stop_server = serve(create_app(settings))
    try:
        yield LiveStack(url, settings, database, keys)
    finally:
        stop_server()
        stop_worker(worker)
        dispose_engines()
