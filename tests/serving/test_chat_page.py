"""serve's chat page in a real headless Chromium: streamed replies, model switching, side by side, save and
open, text never taken as markup, the API key asked for and kept in the tab's session, nothing from elsewhere.

The server is the real one (uvicorn on 127.0.0.1), over test_server's 4-bit base with two persona adapters
(`small_base`: the real tokenizer and chat template on a small random Llama). Screenshots of each step land in
the test's own tmp folder (printed).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from qlora_pipeline.serving.server import Settings, create_app

from test_human_eval_browser import _downloaded, _require_browser, _start_chromium, _wait_for
from test_server import DEFAULTS, KEY, client, serving
from test_server import engine, persona, roots, url  # noqa: F401 - the server module's fixtures, alice and bob

pytestmark = pytest.mark.slow

SCRIPT = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"


@pytest.fixture()
def browser(tmp_path):
    _require_browser()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _start_chromium(tmp_path, downloads)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots: {shots}")
    try:
        yield driver, downloads, shots
    finally:
        driver.quit()


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def items(driver, pane: str) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(li => ({role: li.className, "
        "text: li.querySelector('.text').textContent, meta: (li.querySelector('.meta') || {}).textContent || '', "
        "html: li.innerHTML, done: li.dataset.done === 'true'}))", f"#pane-{pane} .log li")


def open_page(driver, url):
    driver.get(url + "/")
    _wait_for(lambda: by_id(driver, "model-a").get_attribute("value"), 30, "the model list")


def send(driver, text: str) -> None:
    box = by_id(driver, "message")
    box.clear()
    box.send_keys(text)
    by_id(driver, "send").click()


def wait_replies(driver, panes=("a",), count: int = 1):
    def done():
        return all(sum(i["role"] == "assistant" and i["done"] for i in items(driver, p)) >= count for p in panes) \
            and driver.execute_script("return document.body.dataset.busy") == "false"
    _wait_for(done, 120, "the replies to finish")


def paced(app, seconds: float = 0.05):
    """``app`` with a pause after each part of a streamed body. The small model streams a reply in milliseconds: a
    browser slowed by a loaded machine could read it in one piece and never show it growing."""
    async def wrapped(scope, receive, send):
        async def send_paced(message):
            await send(message)
            if message["type"] == "http.response.body" and message.get("more_body"):
                await asyncio.sleep(seconds)
        await app(scope, receive, send_paced)
    return wrapped


@pytest.fixture()
def paced_url(persona, engine):
    with serving(paced(create_app(persona, engine, Settings(DEFAULTS, max_tokens_limit=64)))) as url:
        yield url


def test_a_message_streams_a_reply_that_is_the_apis_own(paced_url, browser):
    url = paced_url
    driver, _, shots = browser
    open_page(driver, url)
    assert by_id(driver, "model-a").get_attribute("value") == "alice"  # the first adapter, not the base
    assert "You are alice." in by_id(driver, "trained-system").text
    by_id(driver, "max_tokens").send_keys("16")
    # Every change of the reply's text while it streams, recorded in the page.
    driver.execute_script("""
        window.__snapshots = [];
        new MutationObserver(() => {
          const live = document.querySelector('#pane-a li[data-streaming] .text');
          if (live) window.__snapshots.push(live.textContent);
        }).observe(document.getElementById('pane-a'), {subtree: true, childList: true, characterData: true});""")
    send(driver, "hey, how was your weekend?")
    wait_replies(driver)
    driver.save_screenshot(str(shots / "1-streamed.png"))
    user, reply = items(driver, "a")
    assert user == {**user, "role": "user", "text": "hey, how was your weekend?"}
    api = client(url).chat.completions.create(model="alice", max_tokens=16,
                                              messages=[{"role": "user", "content": "hey, how was your weekend?"}])
    assert reply["text"] == api.choices[0].message.content and reply["text"]
    assert reply["meta"].startswith("alice")
    snapshots = [s for s in driver.execute_script("return window.__snapshots") if s]
    assert len(set(snapshots)) >= 2, f"the reply did not arrive in pieces: {snapshots}"
    assert all(reply["text"].startswith(s) for s in snapshots)


def test_switching_models_keeps_the_conversation_and_side_by_side_answers_both(url, browser, persona):
    from selenium.webdriver.support.ui import Select

    driver, downloads, shots = browser
    open_page(driver, url)
    send(driver, "do you like dogs or cats more?")
    wait_replies(driver)
    Select(by_id(driver, "model-a")).select_by_value("bob")
    send(driver, "why?")
    wait_replies(driver, count=2)
    log = items(driver, "a")
    assert [i["role"] for i in log] == ["user", "assistant", "user", "assistant"]
    assert log[1]["meta"].startswith("alice") and log[3]["meta"].startswith("bob")
    driver.save_screenshot(str(shots / "2-switched.png"))

    by_id(driver, "new").click()
    by_id(driver, "compare").click()
    Select(by_id(driver, "model-a")).select_by_value("alice")
    Select(by_id(driver, "model-b")).select_by_value("bob")
    send(driver, "what are you cooking tonight?")
    wait_replies(driver, panes=("a", "b"))
    driver.save_screenshot(str(shots / "3-side-by-side.png"))
    defaults = by_id(driver, "defaults").text  # each model decodes by its own (only the left one's were shown)
    assert defaults.startswith("Empty fields take each model's defaults: alice: temperature") and "; bob: " in defaults
    left, right = items(driver, "a")[1], items(driver, "b")[1]
    assert left["meta"].startswith("alice") and right["meta"].startswith("bob")
    for name, shown in (("alice", left), ("bob", right)):
        api = client(url).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "what are you cooking tonight?"}])
        assert shown["text"] == api.choices[0].message.content
    assert left["text"] != right["text"]  # two personas, one message

    by_id(driver, "save").click()
    data = json.loads(_downloaded(downloads, "conversation-*.json").read_text())
    assert data["format"] == "qlora-pipeline-chat/1"
    assert [c["model"] for c in data["conversations"]] == ["alice", "bob"]
    assert [m["content"] for m in data["conversations"][0]["messages"]] == ["what are you cooking tonight?",
                                                                             left["text"]]
    assert data["conversations"][1]["messages"][1]["model"] == "bob"


def test_text_from_a_model_a_user_or_a_file_is_shown_as_text(url, browser, tmp_path):
    driver, _, shots = browser
    open_page(driver, url)
    by_id(driver, "max_tokens").send_keys("4")
    send(driver, SCRIPT)
    wait_replies(driver)
    assert items(driver, "a")[0]["text"] == SCRIPT
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"format": "qlora-pipeline-chat/1", "system_prompt": None, "settings": {},
                                 "conversations": [{"model": "alice", "messages": [
                                     {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": SCRIPT, "model": "alice"}]}]}))
    by_id(driver, "open").send_keys(str(saved))
    _wait_for(lambda: len(items(driver, "a")) == 2 and items(driver, "a")[1]["text"] == SCRIPT, 10, "the opened file")
    driver.save_screenshot(str(shots / "4-markup-as-text.png"))
    assert driver.execute_script("return window.__pwned") is None
    assert driver.execute_script("return document.querySelectorAll('#panes script, #panes img').length") == 0
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    by_id(driver, "open").send_keys(str(tmp_path / "bad.json"))
    _wait_for(lambda: "not a conversation saved by this page" in by_id(driver, "status").text, 10, "the refusal")


def test_the_page_loads_nothing_from_elsewhere(url, browser):
    driver, _, _ = browser
    with urllib.request.urlopen(url + "/") as response:
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    open_page(driver, url)
    send(driver, "hi")
    wait_replies(driver)
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(url + "/") for name in resources), resources
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url + "/static/..%2Fserver.py")
    assert missing.value.code == 404


def test_the_api_key_is_asked_for_and_kept_in_the_tab_session_only(persona, engine, browser):
    driver, _, shots = browser
    with serving(create_app(persona, engine, Settings(DEFAULTS, api_key=KEY))) as keyed:
        driver.get(keyed + "/")
        _wait_for(lambda: by_id(driver, "key-form").is_displayed(), 30, "the key prompt")
        assert "API key" in by_id(driver, "status").text
        by_id(driver, "api-key").send_keys("wrong")
        by_id(driver, "key-form").submit()
        _wait_for(lambda: "refused" in by_id(driver, "status").text, 30, "the wrong key refused")
        by_id(driver, "api-key").send_keys(KEY)
        by_id(driver, "key-form").submit()
        _wait_for(lambda: by_id(driver, "model-a").get_attribute("value") == "alice", 30, "the models with the key")
        driver.save_screenshot(str(shots / "5-key.png"))
        send(driver, "hi")
        wait_replies(driver)
        assert items(driver, "a")[1]["role"] == "assistant"
        stored = driver.execute_script("return [sessionStorage.getItem('qlora-pipeline-api-key'), "
                                       "localStorage.length, document.cookie]")
        assert stored == [KEY, 0, ""]
