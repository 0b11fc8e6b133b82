"""Headless Chromium driven over the DevTools protocol, for the browser tests.

`--remote-debugging-pipe` speaks the protocol over file descriptors 3 and 4 (NUL-separated JSON),
so no websocket client or webdriver is needed. A page records what the browser itself reports:
uncaught exceptions, console.error calls and error log entries (a failed network load, say), so a
test can assert a page loaded cleanly, then read the live DOM with `evaluate`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--remote-debugging-pipe"]
TIMEOUT_S = 120


def chromium_path() -> str:
    """Debian's chromium; the browser tests skip, with this reason, only when it is missing."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def _as_fds_3_and_4(commands: int, replies: int) -> None:
    """In the child: Chromium reads commands on fd 3 and writes replies on fd 4. Copies above 10
    first, so neither pipe end is overwritten when it already sits on 3 or 4."""
    commands, replies = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands, replies))
    os.dup2(commands, 3)
    os.dup2(replies, 4)


class Chromium:
    def __init__(self, profile: Path):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        self.process = subprocess.Popen(
            [chromium_path(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=lambda: _as_fds_3_and_4(commands_read, replies_write),
        )
        os.close(commands_read)
        os.close(replies_write)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self.events: "queue.Queue[dict]" = queue.Queue()
        self._lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._replies, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._answers[message["id"]] = message
                        self._lock.notify_all()
                else:
                    self.events.put(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        number = self._next_id
        message = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        with self._lock:
            if not self._lock.wait_for(lambda: number in self._answers, timeout=TIMEOUT_S):
                raise TimeoutError(f"chromium did not answer {method}")
            answer = self._answers.pop(number)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def open(self, url: str, width: int = 1400, height: int = 1000) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        return page

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._commands)


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session
        self._problems: list[str] = []

    def evaluate(self, expression: str) -> Any:
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = TIMEOUT_S) -> Any:
        """Polls a JS expression until it is truthy: a React app renders after its data arrives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"never true within {timeout} s: {expression}")

    def problems(self) -> list[str]:
        """Uncaught exceptions, console.error and error log entries reported so far."""
        while True:
            try:
                event = self.browser.events.get_nowait()
            except queue.Empty:
                return self._problems
            if event.get("sessionId") != self.session:
                continue
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self._problems.append(f"exception: {details.get('exception', {}).get('description') or details}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                self._problems.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                                   for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self._problems.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")

    def screenshot(self, path: Path, clip_height: int | None = None) -> Path:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip_height:
            width = self.evaluate("document.documentElement.scrollWidth")
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": clip_height, "scale": 1}
        data = self.browser.send("Page.captureScreenshot", params, session=self.session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
