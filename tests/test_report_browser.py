"""The HTML report in a real browser: Debian's Chromium, headless, opens the
``report.html`` that ``ksmbench report`` makes from reference runs (the
smallest of each command: run, bench, identify, validate, selftest, so
every kind of section is there), with no network.

Driven through the DevTools protocol (``--remote-debugging-port`` and
websocket-client): every image decodes (naturalWidth > 0), every figure, as
painted on screen, is a picture rather than a blank box, nothing logs an
error, and the page asks for nothing beyond its own file (it is
self-contained).  A full-page screenshot is kept beside the report.

Chromium comes from ``vm/install-host-deps --test`` (``make test`` runs it).
Without it this test fails; ``KSMBENCH_ALLOW_SKIPS=1`` turns that into a skip
for a developer's partial run.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import ALLOW_SKIPS_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"
#: every wait on the browser is bounded by this (seconds)
BROWSER_WAIT = 60.0
VIEWPORT = (1280, 900)


class DevToolsError(AssertionError):
    pass


class Chromium:
    """A headless Chromium with a fresh profile, no network, and one page,
    driven over the DevTools protocol; gone (with every child) on close."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--disable-default-apps", "--disable-extensions", "--mute-audio",
             # no network: names resolve nowhere and any connection goes to a dead proxy
             "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
             "--proxy-bypass-list=<-loopback>")

    def __init__(self, binary: str, profile: Path):
        self.profile = profile
        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)  # its own group: close() kills every helper process
        self.events: list[dict] = []
        self._ids = itertools.count(1)
        self.ws = None
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        import websocket

        # Chromium writes the port it chose (and the browser's path) here
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + BROWSER_WAIT
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None:
                raise DevToolsError(f"chromium exited ({self.proc.returncode}) before it "
                                    f"listened: {self.proc.stderr.read().decode()[-500:]}")
            if time.monotonic() > deadline:
                raise DevToolsError(f"timed out after {BROWSER_WAIT:.0f} s waiting for chromium "
                                    f"to write {active}")
            time.sleep(0.05)
        port = int(active.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                    timeout=BROWSER_WAIT) as answer:
            pages = [t for t in json.load(answer) if t.get("type") == "page"]
        if not pages:
            raise DevToolsError("chromium has no page target")
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"],
                                              timeout=BROWSER_WAIT, suppress_origin=True)

    def _recv(self, what: str, deadline: float) -> dict:
        import websocket

        self.ws.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            return json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            raise DevToolsError(f"timed out after {BROWSER_WAIT:.0f} s waiting for {what}") from None
        except websocket.WebSocketConnectionClosedException:
            raise DevToolsError(f"chromium closed the connection while we waited for {what} "
                                f"(exit status {self.proc.poll()})") from None

    def call(self, method: str, **params):
        """Send one command; events that arrive meanwhile are kept in ``events``."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + BROWSER_WAIT
        while time.monotonic() < deadline:
            message = self._recv(f"the answer to {method}", deadline)
            if message.get("id") == ident:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
        raise DevToolsError(f"timed out after {BROWSER_WAIT:.0f} s waiting for the answer to {method}")

    def wait_event(self, method: str) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + BROWSER_WAIT
        while time.monotonic() < deadline:
            message = self._recv(method, deadline)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return message
        raise DevToolsError(f"timed out after {BROWSER_WAIT:.0f} s waiting for {method}")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            if self.ws is not None:
                try:
                    self.call("Browser.close")
                except Exception:
                    pass
                self.ws.close()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # helpers it may have left
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            # helpers in other process groups of its session (zygotes, renderers)
            deadline = time.monotonic() + 15
            while (left := browser_processes(self.profile, self.proc.pid)) and \
                    time.monotonic() < deadline:
                for p in left:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                time.sleep(0.1)
            if self.proc.stderr:
                self.proc.stderr.close()


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        message = "chromium is not installed: run vm/install-host-deps --test (make test does)"
        if os.environ.get(ALLOW_SKIPS_ENV, "") not in ("", "0"):
            pytest.skip(message)
        pytest.fail(message)
    return binary


def browser_processes(profile: Path, session: int) -> list[psutil.Process]:
    """Live processes of that browser: in its session, or naming its profile."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue  # dead; an init that never reaps keeps these
            if os.getsid(p.pid) == session or \
                    any(str(profile) in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def one_run_per_command() -> list[Path]:
    """The smallest reference run of each ksmbench command: every kind of
    report section, in a fraction of the time all of them take (a report of
    every reference run took 170 s here)."""
    by_command: dict[str, list[tuple[int, Path]]] = {}
    for run in sorted(REFERENCE.iterdir()):
        if not (run / "metadata.json").exists():
            continue
        command = json.loads((run / "metadata.json").read_text()).get("command") or ["", "?"]
        size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
        by_command.setdefault(command[1], []).append((size, run))
    return sorted(min(runs)[1] for runs in by_command.values())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    runs = one_run_per_command()
    assert runs, f"no reference run directories in {REFERENCE}"
    commands = {json.loads((r / "metadata.json").read_text())["command"][1] for r in runs}
    assert {"run", "bench", "identify", "validate", "selftest"} <= commands, commands
    out = tmp_path_factory.mktemp("browser") / "report"
    proc = subprocess.run([sys.executable, "-m", "ksmbench.cli", "report", *map(str, runs),
                           "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return out / "report.html"


@pytest.fixture(scope="module")
def page(report, tmp_path_factory):
    """The report as Chromium painted it: images, events and a screenshot."""
    binary = chromium_binary()
    profile = tmp_path_factory.mktemp("chromium-profile")
    browser = Chromium(binary, profile)
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0],
                     height=VIEWPORT[1], deviceScaleFactor=1, mobile=False)
        browser.events.clear()  # only what the report's own load brings
        browser.call("Page.navigate", url=report.as_uri())
        browser.wait_event("Page.loadEventFired")
        # every image decoded (or the reason it could not be)
        decode_failures = browser.evaluate(
            "Promise.all(Array.from(document.images).map("
            "  img => img.decode().then(() => null, e => (img.alt || img.src.slice(0, 60)) + ': ' + e)))")
        images = browser.evaluate(
            "Array.from(document.images).map(img => { const r = img.getBoundingClientRect();"
            "  return {alt: img.alt, scheme: img.currentSrc.split(':')[0],"
            "          naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,"
            "          x: r.left + window.scrollX, y: r.top + window.scrollY,"
            "          width: r.width, height: r.height}; })")
        painted = {}
        for img in images:
            if img["width"] < 1 or img["height"] < 1:
                continue
            shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                clip={"x": img["x"], "y": img["y"], "width": img["width"],
                                      "height": img["height"], "scale": 1})
            painted[img["alt"]] = _pixels(shot["data"])
        size = browser.evaluate("[document.documentElement.scrollWidth,"
                                " document.documentElement.scrollHeight]")
        full = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": size[0], "height": min(size[1], 16000),
                                  "scale": 0.5})
        screenshot = report.parent / "report-in-chromium.png"
        screenshot.write_bytes(_b64(full["data"]))
        title = browser.evaluate("document.title")
        events = list(browser.events)
    finally:
        browser.close()
    leftover = browser_processes(profile, browser.proc.pid)
    return {"images": images, "decode_failures": decode_failures, "painted": painted,
            "events": events, "screenshot": screenshot, "title": title, "leftover": leftover}


def _b64(data: str) -> bytes:
    import base64

    return base64.b64decode(data)


def _pixels(data: str) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(_b64(data)), format="png")


def test_every_image_decodes(page):
    assert len(page["images"]) >= 10, f"only {len(page['images'])} images in the report"
    broken = [img["alt"] for img in page["images"] if img["naturalWidth"] <= 0
              or img["naturalHeight"] <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert not [f for f in page["decode_failures"] if f], page["decode_failures"]


def test_every_figure_is_painted_not_blank(page):
    """Each figure, cut from the screen where the browser laid it out, has
    ink on it: a sizeable share of non-white pixels and several colours."""
    assert len(page["painted"]) == len(page["images"]), "some figures take no space on the page"
    for alt, pixels in page["painted"].items():
        rgb = pixels[..., :3]
        ink = float(np.mean(np.any(rgb < 0.9, axis=-1)))
        colours = len(np.unique((rgb.reshape(-1, 3) * 15).round(), axis=0))
        assert ink > 0.01 and colours > 8, f"{alt}: looks blank (ink {ink:.3f}, {colours} colours)"


def test_no_console_error_and_no_exception(page):
    errors = []
    for event in page["events"]:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append([a.get("value") for a in params.get("args", [])])
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text"))
        elif method == "Network.loadingFailed":
            errors.append(f"load failed: {params.get('errorText')}")
    assert not errors, errors


def test_the_page_needs_nothing_but_its_own_file(page):
    """Self-contained: no request leaves the file (data: URIs only), so it
    renders the same offline, mailed, or archived."""
    urls = [e["params"]["request"]["url"] for e in page["events"]
            if e["method"] == "Network.requestWillBeSent"]
    assert urls, "the browser reported no request at all (Network domain not working?)"
    outside = [u[:80] for u in urls if u.split(":", 1)[0] not in ("file", "data")]
    assert not outside, outside
    assert {img["scheme"] for img in page["images"]} == {"data"}


def test_screenshot_and_title(page):
    assert page["title"], "the report has no title"
    shot = page["screenshot"]
    assert shot.stat().st_size > 10_000
    assert _pixels_file(shot).shape[0] > VIEWPORT[1] // 2


def _pixels_file(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_no_browser_process_outlives_the_test(page):
    assert not page["leftover"], [p.pid for p in page["leftover"]]
