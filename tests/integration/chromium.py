"""Headless Chromium (Debian's package), driven over the DevTools protocol on a pipe.

`--remote-debugging-pipe` gives the browser two descriptors, 3 (commands in) and 4
(answers and events out), each message JSON ended by a NUL byte: no websocket, no port,
no client library. Reads and writes go through gevent so the servers under test, in the
same process, keep serving while the test waits for the page.
"""
from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import subprocess
import time

import gevent
from gevent.os import make_nonblocking, nb_read, nb_write


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, ("chromium is not installed (apt-get install chromium; "
                   ".ci/install-system-deps test installs it)")
    return found


class Chromium:
    """One headless browser with one page (a tab) attached."""

    def __init__(self, profile: str, width: int = 1280, height: int = 1800):
        commands_in, self._commands = os.pipe()
        self._answers, answers_out = os.pipe()
        args = [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--mute-audio",
                "--remote-debugging-pipe", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "about:blank"]
        # The browser expects its pipe as descriptors 3 and 4 (bash: dash redirects only
        # descriptors 0-9).
        shell = f'exec "$@" 3<&{commands_in} 4>&{answers_out} {commands_in}<&- {answers_out}>&-'
        self._log = open(os.path.join(profile, "chromium.log"), "wb")
        self.process = subprocess.Popen(["bash", "-c", shell, "bash", *args],
                                        pass_fds=(commands_in, answers_out),
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log)
        os.close(commands_in)
        os.close(answers_out)
        make_nonblocking(self._commands)
        make_nonblocking(self._answers)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"}, timeout=30)
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target["targetId"], "flatten": True})["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  session=True)

    def send(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float = 15.0) -> dict:
        """A command and its answer's result; raises on the browser's error."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[nb_write(self._commands, data):]
        with gevent.Timeout(timeout, AssertionError(f"chromium: no answer to {method} "
                                                    f"in {timeout}s")):
            while True:
                answer = self._receive()
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise AssertionError(f"chromium: {method}: {answer['error']}")
                    return answer["result"]
                if "method" in answer:
                    self.events.append(answer)

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            try:
                chunk = nb_read(self._answers, 1 << 20)
            except OSError as error:
                if error.errno != errno.EAGAIN:
                    raise
                continue
            if not chunk:
                raise AssertionError("chromium exited (see chromium.log in the profile)")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"chromium: {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = ""):
        """Until the expression is truthy in the page; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            gevent.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what or expression}")

    def screenshot(self, path: str) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png",
                                                    "captureBeyondViewport": True},
                         session=True, timeout=30)["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self._commands)
        os.close(self._answers)
        self._log.close()
