"""The case-study report in a real browser: served from localhost by `http.server`, loaded in headless Chromium
(Debian's `chromium` + `chromium-driver`, which `.ci/run` installs) through Selenium.  Every <audio> element must
load its file and know its duration, every <img> must decode, and the console must stay free of errors.  A
screenshot is saved under the test's tmp dir, and also to `$ITH_SAVE_SCREENSHOT` when that is set (the README's
picture).

A missing Chromium is a failure that says how to install it, never a skip: the page is only tested here.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from ith_jax.report import build_report
from tests.test_report import write_report_inputs

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = "chromedriver"
INSTALL = ("apt-get install chromium chromium-driver (Debian/Ubuntu; .ci/run does it), then pip install selenium "
           "(in ith-jax[dev])")


def _browser_paths() -> tuple[str, str]:
    browser = next((path for name in CHROMIUM if (path := shutil.which(name))), None)
    driver = shutil.which(DRIVER)
    if browser is None or driver is None:
        pytest.fail(f"headless Chromium is needed for this test, but {'chromium' if browser is None else DRIVER} is "
                    f"not on PATH: {INSTALL}", pytrace=False)
    return browser, driver


@contextlib.contextmanager
def _serve(directory: Path):
    """A static server on a free localhost port, in a thread, for the block's duration."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would flood pytest's output
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def _chromium(browser: str, driver_path: str):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is needed for this test: {INSTALL}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1700",
                     "--mute-audio", "--disable-gpu"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver path is given, so Selenium Manager never tries to download anything (no internet here).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


MEDIA_STATE = """
return {
  audio: Array.from(document.querySelectorAll('audio')).map(a => ({
    src: a.getAttribute('src'), readyState: a.readyState, duration: a.duration,
    error: a.error ? a.error.code : null})),
  images: Array.from(document.querySelectorAll('img')).map(i => ({
    src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})),
};
"""


def test_report_loads_in_headless_chromium(tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _browser_paths()
    inputs = write_report_inputs(tmp_path / "inputs")
    out = tmp_path / "report"
    build_report(out, [(str(inputs["files"][t]["text"]), str(inputs["files"][t]["ith"])) for t in ("pitch", "animal")],
                 sample=3, seed=1)
    with _serve(out) as url, _chromium(browser, driver_path) as driver:
        driver.get(f"{url}/index.html")
        assert driver.title == "Imagine to Hear: case study"

        def settled(d):
            state = d.execute_script(MEDIA_STATE)
            done = all(a["error"] is not None or (a["readyState"] >= 1 and (a["duration"] or 0) > 0)
                       for a in state["audio"]) and all(i["complete"] for i in state["images"])
            return state if done else False

        try:
            state = WebDriverWait(driver, 60, poll_frequency=0.25).until(settled)
        except Exception:
            state = driver.execute_script(MEDIA_STATE)
            pytest.fail(f"media still loading after 60 s: {state}")
        assert state["audio"], "the report has no audio players"
        for audio in state["audio"]:
            assert audio["error"] is None, f"{audio['src']}: MediaError code {audio['error']}"
            assert audio["readyState"] >= 1 and 0.3 < audio["duration"] < 0.5, audio  # the cached 0.4 s tones
        assert len(state["images"]) >= 4
        for image in state["images"]:
            assert image["width"] > 0, f"{image['src']} did not decode"
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        # the group filter works: hiding "fixed" hides exactly those cards
        driver.find_element("css selector", 'input[data-group="fixed"]').click()
        hidden = driver.execute_script("return Array.from(document.querySelectorAll('article')).filter("
                                       "a => a.style.display === 'none').map(a => a.dataset.group)")
        assert hidden and set(hidden) == {"fixed"}
        driver.find_element("css selector", 'input[data-group="fixed"]').click()

        driver.execute_script("window.scrollTo(0, 0)")
        screenshot = tmp_path / "report_screenshot.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if target := os.environ.get("ITH_SAVE_SCREENSHOT"):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(screenshot, target)
