"""Headless Chromium for tests, driven over the DevTools protocol on a pipe (stdlib only).

Why this way: the MLflow UI is a single-page React app whose content appears only after
its API calls return, and on a loaded 2-core machine that can take anywhere from one to
tens of seconds. A one-shot `chromium --dump-dom --virtual-time-budget=N` has to guess N
(too small: an empty page; too large: slow every time). Driving the browser lets a test
*wait for what it asserts* (poll the rendered text until it appears, with a deadline), so it
is fast when idle and patient when loaded, and it can screenshot exactly the state it
checked. `--remote-debugging-pipe` speaks the protocol over fds 3/4 (NUL-separated JSON,
what Playwright and Puppeteer use), so no websocket client, chromedriver, Selenium or
Playwright download is needed: just Debian's `chromium`.

    with Chromium.launch(user_data_dir) as b:
        b.goto("http://127.0.0.1:5000/#/experiments/1/runs/<id>")
        b.wait_for_text(["demo-train"], timeout=90)
        png = b.screenshot()
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time

# Flags measured on this machine: the background-networking ones keep Chromium from
# calling out (which the closed network refuses, and which slows start-up).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-quic", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe")


def find_chromium() -> str | None:
    """Debian's `chromium` (or another Chromium/Chrome on PATH), else None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(AssertionError):
    pass


class Chromium:
    """One headless Chromium process and one page (tab) attached to it."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int, log_path: str):
        self.proc, self._w, self._r, self.log_path = proc, to_browser, from_browser, log_path
        self._buf = b""
        self._next_id = 0
        self.session: str | None = None
        self.events: list[dict] = []  # console errors, exceptions, failed requests (for failure messages)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def launch(cls, user_data_dir: str, width: int = 1400, height: int = 1000, exe: str | None = None,
               start_timeout: float = 60.0) -> "Chromium":
        exe = exe or find_chromium()
        if not exe:
            raise BrowserError("chromium not found (Debian: apt-get install -y chromium)")
        os.makedirs(user_data_dir, exist_ok=True)
        # Two pipes, moved above fd 9 so that `3<&N 4>&M` below never collides with them.
        r_in, w_in = os.pipe()  # we write -> Chromium reads fd 3
        r_out, w_out = os.pipe()  # Chromium writes fd 4 -> we read
        fds = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (r_in, w_in, r_out, w_out)]
        for fd in (r_in, w_in, r_out, w_out):
            os.close(fd)
        r_in, w_in, r_out, w_out = fds
        args = [*FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}", "about:blank"]
        log_path = os.path.join(user_data_dir, "chromium.log")
        # bash (not dash, which takes one-digit fds only) puts the pipe ends on fds 3 and 4, then
        # execs Chromium in a new session: close() can then end its whole process group.
        shell = f'exec "$0" "$@" 3<&{r_in} 4>&{w_out} {r_in}<&- {w_out}>&-'
        try:
            with open(log_path, "w") as log:
                proc = subprocess.Popen(["/bin/bash", "-c", shell, exe, *args], pass_fds=(r_in, w_out),
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        except BaseException:
            for fd in (w_in, r_out):
                os.close(fd)
            raise
        finally:
            os.close(r_in)
            os.close(w_out)
        b = cls(proc, w_in, r_out, log_path)
        try:
            b.call("Browser.getVersion", timeout=start_timeout, session=False)
            target = b.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            b.session = b.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                               session=False)["sessionId"]
            for method in ("Page.enable", "Runtime.enable", "Log.enable"):
                b.call(method)
            b.call("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            b.close()
            raise
        return b

    def close(self) -> None:
        """Ask the browser to quit, then make sure its whole process group is gone."""
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", session=False, timeout=10)
            except Exception:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:  # renderer/GPU/utility children live in the same (new) session and process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, params: dict | None = None, timeout: float = 60.0, session: bool = True) -> dict:
        self._next_id += 1
        msg: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._w, data):]
        except BrokenPipeError:
            raise BrowserError(f"chromium is gone (exit {self.proc.poll()}) before {method}\n{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._note_event(reply)

    def _read(self, deadline: float, what: str) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium did not answer {what} in time\n{self.log_tail()}")
            ready, _, _ = select.select([self._r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium closed its pipe (exit {self.proc.poll()}) during {what}\n"
                                       f"{self.log_tail()}")
                self._buf += chunk
            elif self.proc.poll() is not None:
                raise BrowserError(f"chromium exited ({self.proc.returncode}) during {what}\n{self.log_tail()}")
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _note_event(self, ev: dict) -> None:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            self.events.append({"exception": p.get("exceptionDetails", {}).get("exception", {}).get("description")
                                or p.get("exceptionDetails", {}).get("text")})
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.events.append({"log": e.get("text"), "url": e.get("url")})
        elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
            self.events.append({"console": " ".join(str(a.get("value", a.get("description", "")))
                                                     for a in p.get("args", []))[:300]})

    # ------------------------------------------------------------------ page
    def goto(self, url: str, timeout: float = 60.0) -> None:
        res = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if res.get("errorText"):
            raise BrowserError(f"navigating to {url}: {res['errorText']}")

    def eval(self, expression: str, timeout: float = 30.0):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                        timeout=timeout)
        if "exceptionDetails" in res:
            raise BrowserError(f"evaluating {expression[:80]!r}: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    def text(self) -> str:
        """The page's rendered text (what a user reads)."""
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def html(self) -> str:
        return self.eval("document.documentElement ? document.documentElement.outerHTML : ''") or ""

    def wait_for(self, expression: str, timeout: float, what: str, poll: float = 0.5):
        """Poll a JS expression until it is truthy (returns its value); fail with the page text."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.eval(expression)
            except BrowserError:
                got = None  # mid-navigation: the context is being replaced
            if got:
                return got
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.describe()}")
            time.sleep(poll)

    @staticmethod
    def text_contains_js(needles: list[str]) -> str:
        """A JS expression: the page's rendered text once it holds every needle, else null."""
        return ("(() => { const t = document.body ? document.body.innerText : ''; "
                f"return {json.dumps(list(needles))}.every(n => t.includes(n)) ? t : null; }})()")

    def wait_for_text(self, needles: list[str], timeout: float, what: str | None = None) -> str:
        """Wait until every needle is in the rendered text; return that text."""
        return self.wait_for(self.text_contains_js(needles), timeout, what or f"text {needles}")

    def open(self, url: str, until: str, what: str, timeout: float = 120.0, attempts: int = 2):
        """Navigate to `url` and wait until the JS expression `until` is truthy (returns it).

        A single-page app can stall on a slow API answer when the machine is loaded: after
        half the time (per attempt) the page is reloaded once, then the rest is waited out.
        """
        deadline = time.monotonic() + timeout
        self.goto(url)
        for attempt in range(attempts):
            left = deadline - time.monotonic()
            budget = left if attempt == attempts - 1 else left / (attempts - attempt)
            try:
                return self.wait_for(until, max(budget, 1.0), what)
            except BrowserError:
                if attempt == attempts - 1:
                    raise
            self.call("Page.reload", {"ignoreCache": True})

    def set_local_storage_on_load(self, items: dict[str, str]) -> None:
        """Seed localStorage before any page script runs (every later navigation)."""
        js = "".join(f"try {{ localStorage.setItem({json.dumps(k)}, {json.dumps(v)}); }} catch (e) {{}}\n"
                     for k, v in items.items())
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": js})

    def screenshot(self, path: str | None = None) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "wb") as f:
                f.write(png)
        return png

    def describe(self, n_chars: int = 3000) -> str:
        """Where the page is and what it shows: for failure messages."""
        try:
            url = self.eval("location.href")
            text = self.text()
        except Exception as e:  # noqa: BLE001 - best effort inside an error path
            url, text = "?", f"(page text unavailable: {e})"
        errs = "\n".join(json.dumps(e)[:300] for e in self.events[-15:])
        return (f"--- page {url} ---\n{text[:n_chars]}\n--- browser errors ---\n{errs or '(none)'}\n"
                f"{self.log_tail(15)}")

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        return f"--- chromium log (last {min(n, len(lines))} lines) ---\n" + "\n".join(lines[-n:])
