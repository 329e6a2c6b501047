"""The playground page, end to end in headless Chromium (Debian's ``chromium`` and
``chromedriver``, driven by Selenium) against a real Daphne gateway and a real
Celery worker: it lists the tenant's workers and models, streams a prompt over
the WebSocket API, and shows the tokens, the time to first token and the cost."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import Fakes, TenantFixture, WorkerProcess, start_gateway, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def gateway(realtime_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_gateway(tmp_path_factory.mktemp("playground") / "gateway.log")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium as root on a machine without network: no sandbox, and none
    of Chromium's own background connections."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def until(driver: webdriver.Chrome, condition: object, timeout_s: float = 20) -> object:
    return WebDriverWait(driver, timeout_s).until(condition)


def connect(driver: webdriver.Chrome, url: str, key: str) -> None:
    driver.get(f"{url}/playground")
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "connect").click()


def test_the_page_is_served_by_the_gateway(gateway: str) -> None:
    resp = httpx.get(f"{gateway}/playground", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "/api/v1/stream" in resp.text and "/v1/models" in resp.text


def test_a_prompt_streams_into_the_page_with_ttft_tokens_and_cost(gateway: str, browser: webdriver.Chrome, owner: TenantFixture, fakes: Fakes) -> None:
    connect(browser, gateway, owner.key)
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
    workers = [o.text for o in Select(browser.find_element(By.ID, "worker")).options]
    assert {"echo", "openai", "anthropic"} <= set(workers)
    Select(browser.find_element(By.ID, "worker")).select_by_visible_text("openai")
    models = [o.text for o in Select(browser.find_element(By.ID, "model")).options]
    assert models == ["gpt-fake", "gpt-other"]  # the chosen worker's models
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("gpt-other")
    fakes.openai.tokens = ["Tokens ", "from ", "the ", "fake"]
    browser.find_element(By.ID, "prompt").send_keys("stream to the browser")
    browser.find_element(By.ID, "send").click()
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "done"))
    assert browser.find_element(By.ID, "output").text == "Tokens from the fake"
    assert browser.find_element(By.ID, "tokens").text == "4"  # the provider's completion tokens
    ttft = browser.find_element(By.ID, "ttft").text
    assert ttft.endswith(" ms") and float(ttft.removesuffix(" ms")) > 0
    assert browser.find_element(By.ID, "cost").text.startswith("$")
    assert fakes.openai.requests[-1]["body"]["model"] == "gpt-other"  # the page's choice reached the provider


def test_max_tokens_temperature_and_session_reach_the_provider(gateway: str, browser: webdriver.Chrome, owner: TenantFixture, fakes: Fakes) -> None:
    connect(browser, gateway, owner.key)
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
    Select(browser.find_element(By.ID, "worker")).select_by_visible_text("openai")
    browser.find_element(By.ID, "max-tokens").send_keys("3")
    browser.find_element(By.ID, "temperature").send_keys("0.4")
    browser.find_element(By.ID, "session").send_keys("play-1")
    browser.find_element(By.ID, "prompt").send_keys("with controls")
    browser.find_element(By.ID, "send").click()
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "done"))
    body = fakes.openai.requests[-1]["body"]
    assert (body["max_completion_tokens"], body["temperature"]) == (3, 0.4)
    assert browser.find_element(By.ID, "output").text == "Hello, world"  # three of the fake's four tokens
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("and again")
    browser.find_element(By.ID, "send").click()
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "done"))
    sent = [m["content"] for m in fakes.openai.requests[-1]["body"]["messages"]]
    assert "with controls" in sent and "Hello, world" in sent  # the session's earlier turn came along


def test_the_page_has_a_favicon_of_its_own(gateway: str) -> None:
    assert '<link rel="icon" href="data:image/svg+xml,' in httpx.get(f"{gateway}/playground", timeout=10).text


def test_the_tokens_appear_before_the_answer_is_complete(gateway: str, browser: webdriver.Chrome, owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.tokens, fakes.openai.token_delay_s = [f"w{i} " for i in range(30)], 0.1
    connect(browser, gateway, owner.key)
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
    Select(browser.find_element(By.ID, "worker")).select_by_visible_text("openai")
    browser.find_element(By.ID, "prompt").send_keys("slowly please")
    browser.find_element(By.ID, "send").click()
    until(browser, ec.text_to_be_present_in_element((By.ID, "output"), "w2"))
    partial = browser.find_element(By.ID, "output").text
    assert "streaming" in browser.find_element(By.ID, "status").text and "w29" not in partial
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "done"))
    assert browser.find_element(By.ID, "output").text.startswith(partial)


def test_a_wrong_key_is_shown_as_an_error(gateway: str, browser: webdriver.Chrome) -> None:
    connect(browser, gateway, "po_00000000_not-a-real-key")
    # Its models come from GET /v1/models: the OpenAI API's code for a wrong key.
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "invalid_api_key"))
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    assert browser.find_element(By.ID, "send").get_attribute("disabled") is not None


def test_a_worker_error_ends_the_prompt_with_its_code(gateway: str, browser: webdriver.Chrome, owner: TenantFixture, fakes: Fakes) -> None:
    connect(browser, gateway, owner.key)
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
    Select(browser.find_element(By.ID, "worker")).select_by_visible_text("openai")
    fakes.openai.mode = "401"
    browser.find_element(By.ID, "prompt").send_keys("this will fail")
    browser.find_element(By.ID, "send").click()
    until(browser, ec.text_to_be_present_in_element((By.ID, "status"), "worker_auth_error"))
    assert browser.find_element(By.ID, "send").get_attribute("disabled") is None  # ready for the next prompt


FETCH_STREAM = """
const [url, key, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
fetch(url + "/api/v1/infer", {
  method: "POST",
  headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json", "Accept": "text/event-stream"},
  body: JSON.stringify({prompt: "fetched by the browser", stream: true}),
}).then(async (resp) => {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (;;) {
    const {value, done: finished} = await reader.read();
    if (finished) break;
    text += decoder.decode(value, {stream: true});
  }
  done({status: resp.status, type: resp.headers.get("content-type"), text});
}).catch((error) => done({error: String(error)}));
"""


def test_the_browsers_fetch_reads_the_stream(gateway: str, browser: webdriver.Chrome, owner: TenantFixture, fakes: Fakes) -> None:
    """A page's own ``fetch`` with ``Accept: text/event-stream`` reads the events as they come."""
    browser.get(f"{gateway}/playground")  # same origin: no CORS in the way
    browser.set_script_timeout(30)
    got = browser.execute_async_script(FETCH_STREAM, gateway, owner.key)
    assert got.get("status") == 200, got
    assert got["type"].startswith("text/event-stream")
    kinds = [line.removeprefix("event: ") for line in got["text"].splitlines() if line.startswith("event: ")]
    assert kinds[0] == "start" and kinds[-1] == "done" and "token" in kinds and "fetched" in got["text"]
