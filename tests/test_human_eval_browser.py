"""The rating sheet in a real headless Chromium: read the persona's replies, click choices and
"loops or breaks" ticks, reload, download ratings.csv, score it.

Needs Debian's Chromium + chromedriver (``scripts/install_browser.sh``) and selenium (a dev
dependency: ``pip install -e '.[dev]'``). When any of them is missing this test FAILS with that
instruction rather than skipping, so a machine that cannot run it is noticed.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from qlora_pipeline.human_eval.formats import RATINGS_COLUMNS
from qlora_pipeline.human_eval.score import score_ratings
from qlora_pipeline.human_eval.sheet import pick_persona_examples, write_sheet

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = (
    "run `scripts/install_browser.sh` (installs Debian's chromium + chromium-driver) and "
    "`pip install -e '.[dev]'` (selenium) and rerun the tests"
)

SAMPLES = [
    {
        "id": "trip-1",
        "context": [
            {"role": "user", "content": "back from the trip?"},
            {"role": "assistant", "content": "yep, landed an hour ago"},
            {"role": "user", "content": "how was it"},
        ],
        "reference": "amazing, ate way too much",
        "base": "It was a wonderful experience overall, thank you for asking!",
        "tuned": "honestly amazing. ate way too much lol",
    },
    {
        "id": "dinner-2",
        "context": [{"role": "user", "content": "dinner friday?"}],
        "reference": "down! where",
        "base": "I would be happy to join you for dinner on Friday.",
        "tuned": "down, where at",
    },
    {
        "id": "code-3",
        "context": [
            {"role": "system", "content": "Casual chat between two coworkers."},
            {"role": "user", "content": "did the deploy go ok? <script>alert('x')</script>"},
        ],
        "reference": "yeah all green",
        "base": "Yes, the deployment completed successfully.",
        "tuned": "yeah all green, no drama",
    },
    {
        "id": "movie-4",
        "context": [{"role": "user", "content": "seen the new one yet"}],
        "reference": "not yet, no spoilers",
        "base": "I have not seen it yet. Could you tell me more about it?",
        "tuned": "nope!! no spoilers pls",
    },
]
CLICKS = {"trip-1": "A", "dinner-2": "B", "code-3": "tie", "movie-4": "A"}
COMMENTS = {"dinner-2": 'too "formal", robotic'}
# "loops or breaks" ticks, by side: trip-1's B, both of code-3's.
BROKEN = {"trip-1": ("B",), "code-3": ("A", "B")}
TRAIN_ROWS = [
    {"id": "t1", "messages": [{"role": "system", "content": "Chat."}, {"role": "user", "content": "mail me?"}],
     "target": "sure, at <EMAIL> :)"},
    {"id": "t2", "messages": [{"role": "user", "content": "you up"}], "target": "barely lol"},
    {"id": "t3", "messages": [{"role": "user", "content": "ok?"}], "target": "k"},  # too short to show
]


def _require_browser():
    problems = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        problems.append("the Python package 'selenium' is not installed")
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing")
    if not CHROMEDRIVER.exists():
        problems.append(f"{CHROMEDRIVER} is missing")
    if problems:
        pytest.fail(f"browser test cannot run: {'; '.join(problems)}. Fix: {INSTALL_HINT}.", pytrace=False)


def _start_chromium(tmp_path: Path, download_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(download_dir),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
            "safebrowsing.enabled": False,
        },
    )
    # An explicit driver path keeps Selenium Manager (which would try the network) out of it.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
    )
    return driver


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _downloaded(folder: Path, pattern: str, timeout: float = 30) -> Path:
    """The one file Chromium downloaded into ``folder`` by ``pattern``, once whole: no ``.crdownload`` left, and
    its size above 0 and the same at two polls (the file can be seen before its bytes are)."""
    sizes: list[int] = []

    def whole() -> Path | None:
        found = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if len(found) != 1 or list(folder.glob("*.crdownload")):
            return None
        sizes.append(found[0].stat().st_size)
        return found[0] if len(sizes) > 1 and sizes[-1] == sizes[-2] > 0 else None

    return _wait_for(whole, timeout, f"{pattern} to be downloaded into {folder}")


def _wait_for_sheet(driver):
    """Until the sheet's script has restored saved ratings (it marks <html data-sheet-ready>)."""
    _wait_for(
        lambda: driver.execute_script(
            "return document.readyState === 'complete'"
            " && document.documentElement.getAttribute('data-sheet-ready') === 'true'"),
        timeout=20,
        what="the rating sheet's script to finish",
    )


def _storage_report(driver) -> str:
    """What the page's storage held, for a failure message (was it lost, or never read back?)."""
    state = driver.execute_script(
        "var out = {keys: [], warning_shown: !document.getElementById('storage-warning').hidden};"
        "try { for (var i = 0; i < localStorage.length; i++) {"
        "  var k = localStorage.key(i); out.keys.push([k, localStorage.getItem(k)]); } }"
        "catch (e) { out.error = String(e); }"
        "return out;")
    return f"localStorage and storage warning = {state}"


def _reload_until_restored(driver, expected: str, attempts: int = 5):
    """Reload the sheet until its counter reads ``expected``; the counter element, or fail.

    The counter's HTML says "Rated 0 of N" until the page's script has run, so each reload waits
    for the script's mark (cleared first, so only the reloaded page can set it). Headless Chromium
    on a starved CPU sometimes serves a reloaded file:// page an empty localStorage and the next
    reload the saved one (seen here 4 times in 25 with four busy processes on two cores, never
    when idle), so a few reloads are allowed; a page that never restores still fails.
    """
    from selenium.webdriver.common.by import By

    seen = []
    for _ in range(attempts):
        driver.execute_script("document.documentElement.removeAttribute('data-sheet-ready')")
        driver.refresh()
        _wait_for_sheet(driver)
        progress = driver.find_element(By.ID, "progress")
        if progress.text == expected:
            return progress
        seen.append(f"{progress.text!r} with {_storage_report(driver)}")
    raise AssertionError(f"after {attempts} reloads the sheet never showed {expected!r}: {seen}")


def test_sheet_in_headless_chromium_rates_reloads_and_downloads(tmp_path):
    _require_browser()
    from selenium.webdriver.common.by import By

    started = time.monotonic()
    html_path = tmp_path / "sheet" / "human_eval.html"
    key_path = tmp_path / "private" / "key.csv"
    examples = pick_persona_examples(TRAIN_ROWS, 8, seed=3)
    key = write_sheet(SAMPLES, seed=3, html_path=html_path, key_path=key_path, title="Browser test sheet",
                      persona_examples=examples)
    sides = {row["id"]: row for row in key}
    download_dir = tmp_path / "downloads"
    download_dir.mkdir()

    driver = _start_chromium(tmp_path, download_dir)
    try:
        driver.get(html_path.as_uri())
        _wait_for_sheet(driver)
        assert driver.title == "Browser test sheet"
        progress = driver.find_element(By.ID, "progress")
        assert progress.text == "Rated 0 of 4"
        # No script injected by sample text ran: the page has only its own two <script>s.
        assert driver.execute_script("return document.scripts.length") == 2

        # The persona's replies are on view above the items, placeholders shown as text.
        persona = driver.find_element(By.ID, "persona-examples")
        assert persona.is_displayed()
        assert "How this person talks: 2 real replies from the training chats" in persona.text
        answers = [e.text for e in persona.find_elements(By.CSS_SELECTOR, ".answer .text")]
        assert sorted(answers) == ["barely lol", "sure, at <EMAIL> :)"]
        assert persona.location["y"] < driver.find_element(By.ID, "item-0").location["y"]

        # Reference hidden by default, revealed by its toggle.
        first_ref = driver.find_element(By.CSS_SELECTOR, "#item-0 details.reference .text")
        assert not first_ref.is_displayed()
        driver.find_element(By.CSS_SELECTOR, "#item-0 details.reference summary").click()
        assert first_ref.is_displayed() and first_ref.text == SAMPLES[0]["reference"]

        for index, sample in enumerate(SAMPLES):
            choice = CLICKS[sample["id"]]
            label = driver.find_element(By.CSS_SELECTOR, f"label:has(> #choice-{index}-{choice})")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", label)
            label.click()
            if sample["id"] in COMMENTS:
                driver.find_element(By.ID, f"comment-{index}").send_keys(COMMENTS[sample["id"]])
            for side in BROKEN.get(sample["id"], ()):
                driver.find_element(By.CSS_SELECTOR, f"label:has(> #broken-{index}-{side})").click()
                reply = driver.find_element(By.CSS_SELECTOR, f"#item-{index} .reply[data-side={side}]")
                assert "broken" in reply.get_attribute("class").split()
            assert progress.text == f"Rated {index + 1} of 4"

        # Reload: choices, comments and the counter come back from localStorage.
        progress = _reload_until_restored(driver, "Rated 4 of 4")
        for index, sample in enumerate(SAMPLES):
            radio = driver.find_element(By.ID, f"choice-{index}-{CLICKS[sample['id']]}")
            assert radio.is_selected()
        assert driver.find_element(By.ID, "comment-1").get_attribute("value") == COMMENTS["dinner-2"]
        for index, sample in enumerate(SAMPLES):
            for side in ("A", "B"):
                ticked = driver.find_element(By.ID, f"broken-{index}-{side}").is_selected()
                assert ticked == (side in BROKEN.get(sample["id"], ())), (sample["id"], side)

        driver.find_element(By.ID, "download").click()
        target = _downloaded(download_dir, "ratings.csv")
        assert "all 4 items rated" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()

    with target.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(RATINGS_COLUMNS) == ["id", "choice", "a_broken", "b_broken", "comment"]
    assert rows[1:] == [
        [s["id"], CLICKS[s["id"]], *(str(int(side in BROKEN.get(s["id"], ()))) for side in "AB"),
         COMMENTS.get(s["id"], "")]
        for s in SAMPLES
    ]

    expected_tuned = sum(1 for sid, c in CLICKS.items() if c != "tie" and sides[sid][c] == "tuned")
    expected_base = sum(1 for sid, c in CLICKS.items() if c != "tie" and sides[sid][c] == "base")
    result = score_ratings(target, key_path)
    assert result["n_rated"] == 4 and result["n_skipped"] == 0
    assert result["ties"] == 1
    assert result["tuned_wins"] == expected_tuned
    assert result["base_wins"] == expected_base
    assert result["tuned_win_rate"] == pytest.approx((expected_tuned + 0.5) / 4)
    # code-3's two ticks are one per system; trip-1's B is whichever system B was there.
    trip_b = sides["trip-1"]["B"]
    assert result["broken"][trip_b]["count"] == 2
    assert result["broken"]["tuned" if trip_b == "base" else "base"]["count"] == 1
    assert result["broken"][trip_b]["rate"] == pytest.approx(2 / 4)

    print(f"browser test took {time.monotonic() - started:.1f}s")


def test_partial_ratings_download_keeps_unrated_rows_empty(tmp_path):
    _require_browser()
    from selenium.webdriver.common.by import By

    html_path = tmp_path / "sheet.html"
    key_path = tmp_path / "key.csv"
    write_sheet(SAMPLES, seed=9, html_path=html_path, key_path=key_path, title="Partial")
    download_dir = tmp_path / "downloads"
    download_dir.mkdir()
    driver = _start_chromium(tmp_path, download_dir)
    try:
        driver.get(html_path.as_uri())
        _wait_for_sheet(driver)
        driver.find_element(By.CSS_SELECTOR, "label:has(> #choice-2-B)").click()
        assert driver.find_element(By.ID, "progress").text == "Rated 1 of 4"
        driver.find_element(By.ID, "download").click()
        target = _downloaded(download_dir, "ratings.csv")
        assert "3 of 4 items are still unrated" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
    with target.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["id", "choice", "a_broken", "b_broken", "comment"],
        ["trip-1", "", "0", "0", ""],
        ["dinner-2", "", "0", "0", ""],
        ["code-3", "B", "0", "0", ""],
        ["movie-4", "", "0", "0", ""],
    ]
    result = score_ratings(target, key_path)
    assert result["n_rated"] == 1 and result["n_skipped"] == 3
