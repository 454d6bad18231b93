"""Every page of the built book, opened in a real browser (headless Chromium, driven by Selenium).

A page can build without a Sphinx warning and still be broken for its reader: a formula left as raw TeX,
an image that does not load, a table wider than the text, a chapter missing from the sidebar. These tests
open each page of ``_toc.yml`` in ``_build/html`` the way a reader does, from the files and with the
network cut off (so MathJax and everything else must come from the book itself), and fail naming the
page and what is wrong on it. A full-page screenshot of each page lands in ``_build/screenshots/``.

Run after the book is built (``python3 scripts/course.py test`` does both)::

    pytest tests/browser -q

They use the system's Chromium and its chromedriver (Debian: ``apt-get install chromium chromium-driver``)
and never download a browser; without them, or without a built book, they skip and say why.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
from pathlib import Path

import pytest
import yaml

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests drive Chromium with Selenium: "
                                "pip install -r requirements.txt")
from selenium.common.exceptions import TimeoutException  # noqa: E402 - after the skip above
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
PAGE_FACTS = (Path(__file__).parent / "page_facts.js").read_text()
BROWSERS = ("chromium", "chromium-browser")  # Debian's and Ubuntu's names
WINDOW = (1280, 900)  # a laptop's browser window: the sidebar, the text column and the page's outline side by side
WAIT_S = 30  # for MathJax to typeset a page and its images to load
# Console errors of the book's own tools that break nothing, each with why it may stay.
HARMLESS_CONSOLE_ERRORS = {
    "Identifier 'THEBE_JS_URL' has already been declared":
        "sphinx-thebe 0.3.1 (jupyter-book's) writes its settings script twice under Sphinx 7; thebe is off here",
}


def toc_pages(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """The book's pages in reading order, as paths of ``_build/html`` (``book/intro.html``...)."""
    tree = yaml.safe_load(toc.read_text())
    files = [tree["root"]]
    for part in tree.get("parts", [tree]):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return [f"{file}.html" for file in files]


PAGES = toc_pages()


def system_browser() -> str | None:
    """The path of the system's Chromium, if it has one."""
    found = [shutil.which(name) for name in BROWSERS]
    return next((path for path in found if path), None)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with its console log kept and every host name unresolvable (no network)."""
    binary, driver = system_browser(), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    if not (HTML / "index.html").is_file():
        pytest.skip(f"no built book in {HTML}: run `python3 scripts/course.py book` first")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(argument)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    chrome.set_script_timeout(WAIT_S)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module", params=PAGES)
def page(request, browser) -> dict:
    """One page, loaded and typeset: its console errors, the facts of ``page_facts.js``, a screenshot."""
    name = request.param
    if not (HTML / name).is_file():
        pytest.fail(f"{name}: listed in _toc.yml but not built into {HTML}")
    browser.get((HTML / name).as_uri())
    typeset = wait_for_mathjax(browser)
    wait_for_images(browser)
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and not any(known in entry["message"] for known in HARMLESS_CONSOLE_ERRORS)]
    save_screenshot(browser, SCREENSHOTS / name.replace("/", "__").replace(".html", ".png"))
    return {"name": name, "typeset": typeset, "console_errors": errors, **browser.execute_script(PAGE_FACTS)}


def wait_for_mathjax(browser) -> str:
    """Wait until MathJax has typeset the page (its startup promise); say how that went."""
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        if (!window.MathJax) return done("no MathJax on this page");
        if (!MathJax.startup || !MathJax.startup.promise) return done("MathJax never started: did its script load?");
        MathJax.startup.promise.then(() => done("typeset"), (error) => done(`MathJax failed: ${error}`));
    """)


def wait_for_images(browser) -> None:
    """Wait until the browser has finished with every image, loaded or failed (slow ones fail the test later)."""
    with contextlib.suppress(TimeoutException):  # those still loading are reported by test_images_load, by name
        WebDriverWait(browser, WAIT_S).until(
            lambda chrome: chrome.execute_script("return [...document.images].every((image) => image.complete)"))


def save_screenshot(browser, path: Path) -> None:
    """The whole page, not just the window: Chromium's DevTools draw beyond the viewport."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "format": "png"})
    path.write_bytes(base64.b64decode(shot["data"]))


def listing(page: dict, problem: str, items: list[str]) -> str:
    return f"{page['name']}: {problem}:\n  " + "\n  ".join(items)


def test_no_console_errors(page):
    assert not page["console_errors"], listing(page, "errors in the browser console", page["console_errors"])


def test_images_load(page):
    assert not page["brokenImages"], listing(page, "images that did not load", page["brokenImages"])


def test_math_is_typeset(page):
    assert page["typeset"] in ("typeset", "no MathJax on this page"), f"{page['name']}: {page['typeset']}"
    assert not page["rawMath"], listing(page, "TeX left untypeset (the text around it)", page["rawMath"])


def test_nothing_wider_than_the_column(page):
    assert page["hasColumn"], f"{page['name']}: no content column (article.bd-article): has the theme changed?"
    assert not page["tooWide"], listing(page, "elements wider than the text column, or cut off", page["tooWide"])


def test_sidebar_lists_every_page(page):
    linked = set(page["navLinks"])
    missing = [name for name in PAGES if (HTML / name).as_uri() not in linked]
    assert not missing, listing(page, "pages of _toc.yml missing from the sidebar", missing)
