"""The chat page at ``/`` in a real headless browser (Debian's chromium and chromium-driver, driven by
selenium) against a real server on the embedded model: a streamed reply equals the server's own
non-streamed greedy reply, the conversation carries its history, the tokens/s line reports the
server's usage count, and the stop button aborts the request on the server.

Without a browser the tests are skipped with the reason; under ``FLASHDECODE_REQUIRE_BROWSER=1``
(``.ci/run`` exports it) they fail instead. ``FLASHDECODE_CHAT_SCREENSHOT=PATH`` saves the page after
the first test there (docs/chat_page.png is made so).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from server_process import Server, metric, running_server

API_KEY = "page-key-456"
MODEL = "smollm2"
SYSTEM = "You answer briefly."
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,860",
]
REPLY_TIMEOUT_S = 90


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            return f"{name} is not on PATH (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory):
    reason = _browser_missing()
    if reason is not None:
        if os.environ.get("FLASHDECODE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FLASHDECODE_REQUIRE_BROWSER=1 but no headless browser: {reason}")
        pytest.skip(f"no headless browser: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    browser = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, driver):
    args = ["--max-model-len", "1024", "--served-model-name", MODEL, "--api-key", API_KEY]
    with running_server(args, tmp_path_factory.mktemp("server") / "server.log") as server:
        yield server


def _field(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, REPLY_TIMEOUT_S, poll_frequency=0.05).until(condition, what)


def _replies(driver) -> list[dict]:
    """Every assistant message as the page shows it: text (exactly, not whitespace-normalised), stats
    line (None while streaming) and error."""
    return driver.execute_script(
        """return [...document.querySelectorAll('.message.assistant')].map(m => ({
            text: m.querySelector('.content').textContent,
            stats: m.querySelector('.stats') ? m.querySelector('.stats').textContent : null,
            error: m.querySelector('.error') ? m.querySelector('.error').textContent : null,
        }));"""
    )


def _send(driver, text: str) -> dict:
    """Types ``text``, presses Enter and waits for the reply's stats line."""
    from selenium.webdriver.common.keys import Keys

    count = len(_replies(driver))
    driver.find_element("id", "message").send_keys(text, Keys.ENTER)
    _wait(driver, lambda d: len(_replies(d)) > count and _replies(d)[count]["stats"], "the reply's stats")
    return _replies(driver)[count]


def _reference(server: Server, messages: list[dict], max_tokens: int) -> dict:
    """The server's non-streamed greedy reply to the same conversation."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(
        f"{server.base}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _check_stats(stats: str, completion_tokens: int) -> None:
    assert stats.startswith("done"), stats
    assert f"{completion_tokens} tokens (usage)" in stats, stats
    rate = re.search(r"([\d.]+) tokens/s", stats)
    assert rate and float(rate.group(1)) > 0, stats
    assert re.search(r"first token [\d.]+ s", stats), stats


def test_page_streams_replies_with_history_and_tokens_per_second(driver, server: Server) -> None:
    page = httpx.get(f"{server.base}/")  # no key needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    driver.get(f"{server.base}/")
    status = driver.find_element("id", "model-status")
    _wait(driver, lambda d: "API key" in status.text, "the page to ask for the key")
    _field(driver, "api-key", API_KEY)
    driver.find_element("id", "system-prompt").click()  # the key field's change event
    _wait(driver, lambda d: status.text == f"model: {MODEL}", "the model name")
    _field(driver, "system-prompt", SYSTEM)
    _field(driver, "temperature", "0")
    _field(driver, "max-tokens", "12")

    conversation = [{"role": "system", "content": SYSTEM}]
    for question in ("Name a colour.", "And another one?"):
        conversation.append({"role": "user", "content": question})
        reply = _send(driver, question)
        expected = _reference(server, conversation, 12)
        text = expected["choices"][0]["message"]["content"]
        assert reply["error"] is None and reply["text"] == text
        _check_stats(reply["stats"], expected["usage"]["completion_tokens"])
        conversation.append({"role": "assistant", "content": text})
    shot = os.environ.get("FLASHDECODE_CHAT_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(shot)


def test_stop_button_aborts_the_request_on_the_server(driver, server: Server) -> None:
    driver.get(f"{server.base}/")
    _field(driver, "api-key", API_KEY)
    _field(driver, "temperature", "0")
    _field(driver, "max-tokens", "600")
    stop = driver.find_element("id", "stop")
    assert not stop.is_enabled()
    driver.find_element("id", "message").send_keys("Write a very long essay about the sea.\n")
    _wait(driver, lambda d: _replies(d) and len(_replies(d)[0]["text"]) > 20, "streamed text")
    assert metric(server, "num_requests_running") == 1
    stop.click()
    _wait(driver, lambda d: _replies(d)[0]["stats"], "the stopped reply's stats")
    reply = _replies(driver)[0]
    assert reply["stats"].startswith("stopped") and "(counted chunks)" in reply["stats"], reply
    assert reply["error"] is None and reply["text"]
    assert driver.find_element("id", "send").is_enabled() and not stop.is_enabled()
    deadline = time.monotonic() + 5
    while metric(server, "kv_cache_usage_perc") > 0 or metric(server, "num_requests_running") > 0:
        assert time.monotonic() < deadline, "the stopped request kept running on the server"
        time.sleep(0.1)
    time.sleep(0.2)  # the access log line is written when the response ends
    line = [ln for ln in server.log.read_text().splitlines() if "POST /v1/chat/completions" in ln][-1]
    tokens = int(re.search(r"completion_tokens=(\d+)", line).group(1))
    assert "finish=aborted" in line and 0 < tokens < 600, line
