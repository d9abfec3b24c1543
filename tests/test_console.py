"""The web console (llmosd --http serves it at /) in a real headless browser: Debian's chromium and
chromium-driver, driven by selenium. It loads, shows a spawned process within a second, streams its log,
kills it with the Kill button, draws the engine panel and lists the namespace's files; a reader token (given
in the URL's fragment) sees no Kill or priority controls and the server refuses its Kill anyway; each
process's detail shows who it monitors and who monitors it. Screenshots go to
test-artifacts/console/ (what they show is checked through the DOM, at the moment each is taken).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pytest

import llmos
from llmosd_process import LlmosdServer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")
ARTIFACTS = pathlib.Path(os.environ.get("LLMOS_TEST_ARTIFACTS", pathlib.Path(__file__).resolve().parent.parent
                                        / "test-artifacts")) / "console"
WAIT_S = 20.0  # a bound for waits on a loaded machine; the one timing claim (within a second) is measured


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    srv = LlmosdServer(tmp_path_factory.mktemp("console") / "data", "--http", "127.0.0.1:0", "--cpus", "2")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def crowded_server(tmp_path: pathlib.Path) -> Iterator[LlmosdServer]:
    """A server of the test's own with 10,000 ports open, stopped (SIGKILL) rather than emptied after."""
    srv = LlmosdServer(tmp_path / "data", "--http", "127.0.0.1:0", "--cpus", "2", "--model", "none")
    srv.start()
    yield srv
    srv.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def until(browser: Any, what: Callable[[Any], Any], timeout: float = WAIT_S) -> Any:
    return WebDriverWait(browser, timeout, poll_frequency=0.02).until(what)


def click(browser: Any, css: str) -> None:
    """Click the element `css` selects once there is one (rows are redrawn each refresh: try again if the
    one found was replaced before the click)."""
    def clicked(b: Any) -> bool:
        try:
            b.find_element(By.CSS_SELECTOR, css).click()
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False
    until(browser, clicked)


def text(browser: Any, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def screenshot(browser: Any, name: str) -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert browser.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def test_console_shows_a_process_streams_its_log_and_kills_it(server: LlmosdServer, browser: Any) -> None:
    browser.get(server.http + "/")
    until(browser, lambda b: text(b, "connection") == "live")
    assert browser.title == "llmos console"
    screenshot(browser, "1-loaded")

    with llmos.connect(server.target) as k:
        port = k.open_port(name="console-port")
        spawned_at = time.monotonic()
        pid = k.spawn(lua='print("hello from the console test") sys.recv{} print("after the message") '
                          'while true do end', name="console-demo")
        row = f'#tree .row[data-pid="{pid}"]'
        until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, row))
        shown_after = time.monotonic() - spawned_at
        assert shown_after < 1.0, f"the process appeared after {shown_after:.2f} s"
        cells = browser.execute_script("return [...document.querySelector(arguments[0]).children]"
                                       ".map(c => c.textContent)", row)
        assert cells[1:3] == ["console-demo", "LUA"]

        click(browser, row)
        until(browser, lambda b: text(b, "detail-pid") == str(pid))
        until(browser, lambda b: "hello from the console test" in text(b, "detail-log"))
        until(browser, lambda b: text(b, "detail-state").startswith("BLOCKED:recv"))
        screenshot(browser, "2-process-detail")
        assert "0 messages" in text(browser, "detail-mailbox")

        k.send(pid, "go", sender=port)  # the log streams on: the next line appears while it runs
        until(browser, lambda b: "after the message" in text(b, "detail-log"))
        until(browser, lambda b: text(b, "detail-state").split(":")[0] in ("RUNNING", "RUNNABLE"))

        browser.find_element(By.ID, "kill").click()
        until(browser, lambda b: text(b, "detail-state").startswith("KILLED"))
        assert "console" in text(browser, "detail-state")  # the reason the console gives
        ended = k.wait(pid, timeout=WAIT_S)
        assert ended is not None and (ended.state, ended.exit_reason) == ("KILLED", "console")
        until(browser, lambda b: not b.find_elements(By.CSS_SELECTOR, f'#tree .row[data-pid="{pid}"]'))
        assert browser.find_element(By.ID, "kill").get_attribute("disabled") is not None
        screenshot(browser, "3-killed")
        events = browser.find_elements(By.CSS_SELECTOR, f'#events li[data-pid="{pid}"]')  # newest first
        assert [e.get_attribute("data-kind") for e in events] == ["ended", "spawned"]
        assert "console-demo KILLED (console)" in events[0].get_attribute("textContent")
        k.kill(port)


def test_console_priority_button_and_top(server: LlmosdServer, browser: Any) -> None:
    with llmos.connect(server.target) as k:
        busy = k.spawn(lua="while true do end", name="console-busy")
        try:
            browser.get(server.http + "/")
            click(browser, f'#tree .row[data-pid="{busy}"]')
            until(browser, lambda b: text(b, "detail-pid") == str(busy))
            field = browser.find_element(By.ID, "priority")
            field.clear()
            field.send_keys("-7")
            browser.find_element(By.ID, "set-priority").click()
            until(browser, lambda b: text(b, "control-status") == "priority: done")
            assert k.get(busy).priority == -7
            field.clear()
            field.send_keys("99")
            browser.find_element(By.ID, "set-priority").click()
            until(browser, lambda b: text(b, "control-status").startswith("priority: INVALID_ARGUMENT"))

            browser.find_element(By.CSS_SELECTOR, '#tabs [data-tab="top"]').click()
            busiest = until(browser, lambda b: b.execute_script(  # pid and CPU % of the first row, once measured
                "const r = document.querySelector('#top tbody tr'); const cpu = r && Number(r.children[6].textContent);"
                " return cpu > 0 ? [r.dataset.pid, cpu] : null;"))
            assert busiest[0] == str(busy)  # the spinner is the busiest
            screenshot(browser, "4-top")
        finally:
            k.kill(busy)


def test_console_engine_panel_and_files(server: LlmosdServer, browser: Any) -> None:
    with llmos.connect(server.target) as k:
        k.write_file("console/readme.txt", "shown in the console\n")
        k.infer("Once upon a time", max_tokens=8, temperature=0, seed=1, timeout=120)
    browser.get(server.http + "/")
    browser.find_element(By.CSS_SELECTOR, '#tabs [data-tab="engine"]').click()
    until(browser, lambda b: int(b.find_element(By.CSS_SELECTOR, '[data-metric="tokens generated"]').text
                             .split(".")[0] or 0) >= 8)
    assert text(browser, "val-kv").endswith(tuple("0123456789")) and " of " in text(browser, "val-kv")
    # each chart has drawn its line (the series' colour, #2563eb; the frame is grey) once it has two samples
    line_drawn = ("const c = document.getElementById(arguments[0]); const d = c.getContext('2d')"
                  ".getImageData(0, 0, c.width, c.height).data;"
                  " for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i + 2] > 200 && d[i] < 100) return true;"
                  " return false;")
    for chart in ("chart-batch", "chart-tps", "chart-kv"):
        until(browser, lambda b: b.execute_script(line_drawn, chart))
    screenshot(browser, "5-engine")

    browser.find_element(By.CSS_SELECTOR, '#tabs [data-tab="files"]').click()
    click(browser, '#files tr[data-path="console"]')
    click(browser, '#files tr[data-path="console/readme.txt"]')
    until(browser, lambda b: text(b, "file-view") == "shown in the console")
    screenshot(browser, "6-files")


def test_console_stays_responsive_with_10000_processes(crowded_server: LlmosdServer, browser: Any) -> None:
    with llmos.connect(crowded_server.target) as k, ThreadPoolExecutor(8) as pool:
        ports = sorted(pool.map(lambda _: k.open_port(), range(10_000)))
    browser.get(crowded_server.http + "/")
    until(browser, lambda b: text(b, "summary").startswith("10000 processes"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#tree .rows .row")
    assert 0 < len(rows) < 100  # only the rows in view are in the DOM
    browser.execute_script("const t = document.getElementById('tree'); t.scrollTop = t.scrollHeight;")
    click(browser, f'#tree .row[data-pid="{ports[-1]}"]')
    until(browser, lambda b: text(b, "detail-pid") == str(ports[-1]))
    browser.find_element(By.ID, "filter").send_keys(str(ports[5000]))  # a filter finds one among them
    until(browser, lambda b: text(b, "tree-count") == "1 shown")
    screenshot(browser, "7-ten-thousand")


def test_console_gates_controls_by_the_tokens_role_and_shows_monitors(server: LlmosdServer, browser: Any) -> None:
    admin = (server.data_dir / "admin.token").read_text().strip()
    with llmos.Client(server.target, token=admin) as k:
        _, reader = k.create_token("default", "reader", "console test")
        target = k.spawn(lua="sys.recv{}", name="console-watched")
        watcher = k.spawn(lua="sys.recv{}", name="console-watcher")
        k.monitor(watcher, target)
        try:
            browser.get(f"{server.http}/#token={reader}")
            until(browser, lambda b: text(b, "who") == "reader of default")
            assert "#" not in browser.current_url  # the token left the address bar (kept in sessionStorage)
            assert browser.execute_script("return sessionStorage.getItem('llmos-token')") == reader
            click(browser, f'#tree .row[data-pid="{target}"]')
            until(browser, lambda b: text(b, "detail-monitors") == f"watches none; watched by {watcher}")
            assert not browser.find_element(By.ID, "kill").is_displayed()
            assert not browser.find_element(By.ID, "set-priority").is_displayed()
            path = screenshot(browser, "8-reader")
            assert path.exists() and text(browser, "detail-pid") == str(target)  # what the screenshot shows
            refused = browser.execute_script(  # the server refuses a reader's Kill whatever the page shows
                "const r = await fetch('/v1/kernel/Kill', {method: 'POST', headers: headers(),"
                " body: JSON.stringify({pid: arguments[0]})}); return [r.status, (await r.json()).error.status];",
                str(target))
            assert refused == [403, "PERMISSION_DENIED"]
            assert not k.get(target).ended

            field = browser.find_element(By.ID, "token")  # logging in as the admin offers the controls
            field.clear()
            field.send_keys(admin + "\n")
            browser.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")
            until(browser, lambda b: text(b, "who") == "admin of default")
            click(browser, f'#tree .row[data-pid="{watcher}"]')
            until(browser, lambda b: text(b, "detail-monitors") == f"watches {target}; watched by none")
            until(browser, lambda b: b.find_element(By.ID, "kill").is_displayed())
            screenshot(browser, "9-admin")
            browser.find_element(By.ID, "kill").click()
            until(browser, lambda b: text(b, "detail-state").startswith("KILLED"))
        finally:
            browser.execute_script("sessionStorage.clear()")
            k.kill(target)
            k.kill(watcher)
