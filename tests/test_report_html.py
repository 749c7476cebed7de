"""report.html: escaping and self-containment checked on the text, then the page driven in a real
headless chromium (plots drawn, blind test voted, saved, reloaded, cleared) with its console watched.

Without chromium the browser test is skipped on a laptop but fails under CI=true: CI installs it
(.ci/run), so a skip there would only hide a broken page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from finetune.binomial import judged
from finetune.report_html import SAVE_NAME, _script_json, render_report

ATTACK = "</script><script>alert(1)</script>"
FAMILY = "👨\u200d👩\u200d👧"  # one emoji built from three with zero-width joiners
LONG = "とても長い返信" * 300


def _style(real: dict, system: dict, distance: float) -> dict:
    return {"distance": distance, "system": system, "real": real}


def make_report(systems=("base", "tuned", "echo"), blind=True) -> dict:
    """A report.json as docs/evaluation.md describes it, with the awkward text a real chat has."""
    real_profile = {
        "length": {"1-5": 0.35, "6-10": 0.3, "11-20": 0.2, "21-40": 0.1, "41+": 0.05},
        "endings": {"！": 0.3, "。": 0.1, "w": 0.2, "〜": 0.15, "(none)": 0.25},
        "emoji": {FAMILY: 0.05, "😂": 0.2, "🥺": 0.1, "👍": 0.04, "🙏": 0.03, "✨": 0.02, "💦": 0.02, "😇": 0.01,
                  "🎉": 0.01, "🍣": 0.01, "🐱": 0.01, "🌸": 0.01, "🙇\u200d♀️": 0.01, "😴": 0.01},
        "script": {"hiragana": 0.55, "katakana": 0.1, "kanji": 0.2, "latin": 0.1, "emoji": 0.05},
        "laughter": {"w": 0.1, "笑": 0.05, "草": 0.02},
    }
    shifted = {f: {k: round(v * (0.5 if i % 2 else 1.4), 4) for i, (k, v) in enumerate(d.items())}
               for f, d in real_profile.items()}
    shifted["emoji"] = {"😂": 0.4, "🙏": 0.1}
    entries = {
        "base": {"style_distance": 0.31, "chrf": 12.5, "chrf_corpus": 13.0, "loss": 3.4, "perplexity": 29.96,
                 "stock_rate": 0.12, "stock_phrases": [{"reply": "そうだね", "count": 31}, {"reply": "はい", "count": 9}],
                 "verbatim": {"rate": 0.0, "count": 0, "examples": []}},
        "tuned": {"style_distance": 0.12, "chrf": 18.4, "chrf_corpus": 19.0, "loss": 2.91, "perplexity": 18.36,
                  "stock_rate": 0.03, "stock_phrases": [{"reply": "おけ", "count": 4}],
                  "verbatim": {"rate": 0.008, "count": 2, "examples": [
                      {"id": "line.txt#0:101", "reply": "明日は渋谷のハチ公前に10時集合でお願いします！",
                       "match": "渋谷のハチ公前に10時集合で", "speaker": "美咲"},
                      {"id": "line.txt#0:102", "reply": "ok <b>bold</b> 了解", "match": "not in the reply as such",
                       "speaker": "健太"}]}},
        "echo": {"style_distance": 0.55, "chrf": 25.0,  # a --system: no loss, no corpus chrF, no verbatim
                 "stock_rate": 0.0, "stock_phrases": []},
    }
    report = {
        "samples": 35, "seed": 0, "created": "2026-11-30T08:00:00+00:00", "bunshin_version": "0.1.0",
        "dataset": {"path": "data/misaki", "persona": "美咲", "fingerprint": "f00dfeed", "eval_samples": 40},
        "adapter": {"path": "adapters/misaki", "base_model": "rinna/japanese-gpt-neox-3.6b"},
        "generation": {"max_new_tokens": 128, "temperature": 0.7},
        "verbatim_chars": 20,
        "features": {
            "length": {"label": "Reply length (characters)", "measure": "jsd"},
            "endings": {"label": "Sentence endings", "measure": "jsd"},
            "emoji": {"label": "Emoji", "measure": "jsd"},
            "script": {"label": "Script mix", "measure": "l1"},
            "laughter": {"label": "Laughter", "measure": "l1"},
        },
        "real": {
            "profile": real_profile,
            "summary": {"mean_chars": 14.2, "median_chars": 11, "mean_messages": 1.3, "distinct_2": 0.61,
                        "empty_rate": 0.0},
            "stock_rate": 0.02, "stock_phrases": [{"reply": "おけ", "count": 3}],
            "verbatim": {"rate": 0.0, "count": 0, "examples": []},
        },
        "systems": {},
        "examples": [],
        "blind": [],
    }
    for n, name in enumerate(systems):
        entry = dict(entries.get(name, {"style_distance": 0.2 + n / 10, "chrf": 10.0 + n}))
        entry["style"] = {f: _style(real_profile[f], shifted[f], round(0.05 + 0.07 * n + 0.01 * i, 3))
                          for i, f in enumerate(real_profile)}
        entry["summary"] = {"mean_chars": 10.0 + n, "median_chars": 8, "mean_messages": 1.1, "distinct_2": 0.4,
                            "empty_rate": 0.01 * n}
        report["systems"][name] = entry
    replies = ["うん！", "了解！\nまたね", f"それな{FAMILY}", ATTACK, "ok <b>bold</b>", LONG, "", "see https://example.com/a.png"]
    for i in range(35):
        report["examples"].append({
            "id": f"line.txt#0:{i}",
            "context": [{"speaker": "健太", "text": f"明日どうする？ {i}"}, {"speaker": "美咲", "text": "んー\nまだ決めてない"}],
            "real": replies[i % len(replies)],
            "replies": {name: replies[(i + k + 1) % len(replies)] for k, name in enumerate(systems)},
        })
    if blind and systems:
        other = systems[-1]
        report["blind"] = [
            {"id": "line.txt#0:1", "system": "tuned" if "tuned" in systems else systems[0],
             "context": [{"speaker": "健太", "text": "明日ひま？"}], "first": "ひまだよー😂", "second": "暇です。",
             "real_is": "first"},
            {"id": "line.txt#0:2", "system": other, "context": [{"speaker": "健太", "text": ATTACK}],
             "first": "<b>はい</b>", "second": "えー\nむりw", "real_is": "second"},
            {"id": "line.txt#0:3", "system": systems[0], "context": [], "first": LONG, "second": "おけ",
             "real_is": "second"},
        ]
    return report


# ---- the page as text -----------------------------------------------------------------------------

RESOURCE = re.compile(r"""(?:\b(?:src|href|xlink:href|action|poster|srcset)\s*=\s*["']?\s*|url\(\s*["']?\s*|@import\s*["']?)"""
                      r"""(?:https?:)?//""", re.IGNORECASE)


def test_untrusted_text_is_escaped_and_the_page_loads_nothing():
    page = render_report(make_report())
    assert ATTACK not in page and "<b>" not in page and "alert(1)</script>" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script") == 2  # ours: the blind data and the code
    assert not RESOURCE.findall(page), RESOURCE.findall(page)
    assert "https://example.com/a.png" in page  # a link in a message stays text
    assert '<meta charset="utf-8">' in page and "Noto Sans CJK JP" in page
    for text in ("美咲", "明日どうする？", "渋谷のハチ公前に10時集合で", FAMILY, "Script mix"):
        assert text in page
    assert "<mark>渋谷のハチ公前に10時集合で</mark>" in page  # the copied text is highlighted
    assert "&lt;b&gt;bold&lt;/b&gt;" in page


def test_script_json_cannot_end_its_script_element():
    value = {"id": ATTACK + "<!-- & \u2028\u2029", "system": "tuned"}
    text = _script_json(value)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == value
    report = make_report()
    report["blind"][0]["id"] = ATTACK
    page = render_report(report)
    blob = re.search(r'<script type="application/json" id="blind-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(blob)["items"][0] == {"id": ATTACK, "system": "tuned", "real_is": "first"}


def test_summary_marks_the_best_system_and_drops_empty_columns():
    page = render_report(make_report())
    summary = page[page.index('id="summary"'):page.index("</table>")]  # the first table, not reply shape
    assert "perplexity" in summary and "verbatim-repeat rate" in summary
    # tuned has the lowest style distance; echo the highest chrF
    rows = {m.group(1): m.group(0) for m in re.finditer(r'<tr><th><span class="sw"[^>]*></span>(\w+)</th>.*?</tr>', summary)}
    assert re.search(r'class="num best">0\.120<span class="star"', rows["tuned"])
    assert re.search(r'class="num best">25\.00<span class="star"', rows["echo"])
    shape = page[page.index("Reply shape"):page.index('id="features"')]
    assert "median length" in shape and ">8<span" not in shape  # every system ties at 8: none is best
    no_loss = make_report(systems=("echo", "other"))
    summary = render_report(no_loss).split('id="features"')[0]
    assert "perplexity" not in summary and ">loss<" not in summary


def test_blind_test_comes_before_the_sections_that_quote_replies_and_says_how_it_was_chosen():
    report = make_report()
    page = render_report(report)
    assert page.index('id="blind"') < min(page.index('id="phrases"'), page.index('id="verbatim"'),
                                          page.index('id="examples"'))
    assert 'id="blind-selection"' not in page  # a report from before blind_selection: nothing made up
    report["blind_selection"] = {"samples": 256, "limit": 40, "pairs": 40, "conversations": 38,
                                 "left_out": {"same_reply": 1, "shown_elsewhere": 9, "not_needed": 206}}
    note = re.search(r'<p class="muted" id="blind-selection">(.*?)</p>', render_report(report)).group(1)
    assert note.startswith("40 pairs from 256 held-out samples, 38 conversations; 9 left out because a reply")
    assert note.endswith("1 because the generated reply was the real one.")


@pytest.mark.parametrize("systems", [(), ("tuned",), ("base", "tuned", "a", "b", "c", "d")])
def test_odd_shapes_render(systems):
    report = make_report(systems=systems, blind=False)
    page = render_report(report)
    assert "No blind pairs in this report." in page
    assert page.count("<svg") == len(report["features"])  # real is drawn even with no system
    if len(systems) == 6:
        assert len(set(re.findall(r'<rect class="bar"[^>]*fill="(#\w+)"', page))) == 7  # real + six systems


def test_missing_keys_render():
    report = make_report()
    del report["systems"]["tuned"]["style"]["emoji"], report["systems"]["base"]["summary"]
    del report["real"]["profile"]["laughter"], report["adapter"], report["generation"]
    report["systems"]["echo"]["chrf"] = float("nan")
    page = render_report(report)
    assert "no adapter" in page and "Laughter" in page
    assert render_report({})  # nothing at all still gives a page


# ---- the page in a real browser -------------------------------------------------------------------

def _browser_or_skip():
    """(chromium, chromedriver) paths; without them skip here, but fail under CI."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "selenium is not installed (pip install -e '.[dev]')"
    else:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        if chromium and driver:
            return chromium, driver
        missing = "chromium and chromedriver are not both on PATH (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}; CI must run the browser test")
    pytest.skip(missing)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="chromium|selenium"):
        _browser_or_skip()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)  # a given driver: no download
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _open(driver, tmp_path: Path, report: dict, name: str = "report.html") -> None:
    path = tmp_path / name
    path.write_text(render_report(report), encoding="utf-8")
    driver.get(path.as_uri())


def _score(driver) -> str:
    return driver.find_element("id", "blind-score").text


def _verdict(driver) -> str:
    return driver.find_element("id", "blind-verdict").text


def _per_system(driver) -> list[str]:
    return [li.text for li in driver.find_elements("css selector", "#blind-per-system li")]


def _pick(driver, i: int, which: str) -> None:
    button = driver.find_element("css selector", f'article.blind-item[data-i="{i}"] button[data-pick="{which}"]')
    # mid-screen, as a person clicks it: scrolled to the top, the sticky score box would be over it
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()


def _wait_for(path: Path, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                pass  # still being written
        time.sleep(0.05)
    raise AssertionError(f"{path.name} was not downloaded within {seconds}s")


def test_page_in_browser_draws_plots_and_runs_the_blind_test(browser, tmp_path):
    report = make_report()
    _open(browser, tmp_path, report)
    assert not _severe(browser)
    assert browser.title.startswith("bunshin eval · 美咲")

    drawn = browser.execute_script("""
        return [...document.querySelectorAll("svg.chart")].map((svg) =>
          [...svg.querySelectorAll("rect.bar")].filter((r) => { const b = r.getBBox(); return b.width > 0 && b.height > 0; }).length);
    """)
    assert len(drawn) == len(report["features"]) and all(n > 0 for n in drawn), drawn
    # the injected script is text on the page, not a script
    assert ATTACK in browser.find_element("css selector", 'article.blind-item[data-i="1"] .ctx').text

    # nothing gives the answer away before a vote
    assert _score(browser) == "No votes yet: 3 pairs to judge."
    assert _verdict(browser) == "Not enough votes yet to say whether your friends could tell which reply was real."
    assert not browser.find_elements("css selector", ".is-real, .verdict.right, .verdict.wrong")
    assert browser.find_element("id", "blind-save").get_attribute("disabled")

    _pick(browser, 0, "first")  # right: real_is first
    verdict = browser.find_element("css selector", 'article.blind-item[data-i="0"] .verdict')
    assert verdict.text.startswith("Right")
    _pick(browser, 1, "first")  # wrong: real_is second
    assert browser.find_element("css selector", 'article.blind-item[data-i="1"] .verdict').text.startswith("Wrong")
    # Clopper-Pearson, rounded outwards: 1 of 2 is 1.3-98.7%, 1 of 1 is 2.5-100%, 0 of 1 is 0-97.5%
    expected = "2 of 3 pairs judged; the real reply picked in 1: 50%, 95% interval 1–99% (a coin: 50%)"
    assert _score(browser) == expected
    assert _verdict(browser).startswith("Not enough votes yet to say whether your friends could tell")
    assert _per_system(browser) == ["tuned: 1 of 1 (100%, 95% interval 2–100%): not enough votes yet",
                                    "echo: 0 of 1 (0%, 95% interval 0–98%): not enough votes yet", "base: no votes yet"]
    _pick(browser, 0, "second")  # a vote cannot be changed
    assert _score(browser) == expected

    browser.find_element("id", "blind-save").click()
    saved = _wait_for(browser.downloads / SAVE_NAME)
    assert saved["persona"] == "美咲" and saved["created"] == report["created"]
    assert saved["votes"] == [
        {"id": "line.txt#0:1", "system": "tuned", "picked": "first", "correct": True},
        {"id": "line.txt#0:2", "system": "echo", "picked": "first", "correct": False},
    ]
    assert saved["score"].keys() == {"all", "tuned", "echo"}
    for name, (right, total) in {"all": (1, 2), "tuned": (1, 1), "echo": (0, 1)}.items():
        assert saved["score"][name] == {**judged(right, total), "low": pytest.approx(judged(right, total)["low"]),
                                        "high": pytest.approx(judged(right, total)["high"])}

    browser.refresh()
    assert _score(browser) == expected
    assert "voted" in browser.find_element("css selector", 'article.blind-item[data-i="1"]').get_attribute("class")

    browser.find_element("id", "blind-reset").click()
    browser.switch_to.alert.accept()
    assert _score(browser) == "No votes yet: 3 pairs to judge."
    browser.refresh()
    assert _score(browser) == "No votes yet: 3 pairs to judge."
    assert not browser.find_elements("css selector", "article.voted")
    assert not _severe(browser)


def test_page_in_browser_without_systems_or_blind_pairs(browser, tmp_path):
    _open(browser, tmp_path, make_report(systems=(), blind=False), "empty.html")
    assert "No blind pairs" in browser.find_element("id", "blind").text
    _open(browser, tmp_path, {}, "nothing.html")
    assert not _severe(browser)


# ---- what the votes mean, computed by the page -----------------------------------------------------

def _report_with_pairs(count: int) -> dict:
    """`count` blind pairs, tuned and base in turn, every text different."""
    report = make_report(systems=("base", "tuned"))
    report["blind"] = [{"id": f"pair-{i}", "system": ("tuned", "base")[i % 2],
                        "context": [{"speaker": "健太", "text": f"質問その{i}"}],
                        "first": f"返事その{i}A", "second": f"返事その{i}B", "real_is": ("first", "second")[i % 3 == 0]}
                       for i in range(count)]
    return report


def _vote(driver, report: dict, i: int, right: bool) -> None:
    real = report["blind"][i]["real_is"]
    _pick(driver, i, real if right else {"first": "second", "second": "first"}[real])


def _figures(right: int, total: int) -> str:
    """What the page prints for right of total, from scipy's interval: rate rounded as JS rounds, the
    interval rounded outwards."""
    import math

    from tests.support.exact_interval import scipy_intervals

    (low, high), = scipy_intervals([(right, total)])
    return (f"{math.floor(100 * right / total + 0.5)}%, 95% interval {math.floor(100 * low)}–"
            f"{math.ceil(100 * high)}%")


COULD = "Your friends could tell which reply was real: the whole interval is above a coin's 50%."
COULD_NOT = ("Your friends could not tell which reply was real (no better than a coin): the interval stays below "
             "75%, halfway from guessing to always right.")
NOT_YET = ("Not enough votes yet to say whether your friends could tell which reply was real: the interval holds "
           "50% and reaches 75%.")


def test_page_says_what_the_votes_mean_as_they_come_in(browser, tmp_path):
    report = _report_with_pairs(20)
    _open(browser, tmp_path, report, "verdict.html")
    assert _score(browser) == "No votes yet: 20 pairs to judge."

    for i in (0, 2, 4, 6, 8, 10):  # six right, all against tuned
        _vote(browser, report, i, right=True)
    assert _score(browser) == f"6 of 20 pairs judged; the real reply picked in 6: {_figures(6, 6)} (a coin: 50%)"
    assert _figures(6, 6) == "100%, 95% interval 54–100%"  # 0.025 ** (1/6) = 0.541
    assert _verdict(browser) == COULD
    assert _per_system(browser) == [f"tuned: 6 of 6 ({_figures(6, 6)}): could tell", "base: no votes yet"]

    for i in (12, 14, 16, 18):  # tuned: now 6 of 10
        _vote(browser, report, i, right=False)
    for n, i in enumerate((1, 3, 5, 7, 9, 11, 13, 15)):  # base: 3 of 8
        _vote(browser, report, i, right=n < 3)
    assert _score(browser) == f"18 of 20 pairs judged; the real reply picked in 9: {_figures(9, 18)} (a coin: 50%)"
    assert _figures(9, 18) == "50%, 95% interval 26–74%"
    assert _verdict(browser) == COULD_NOT
    assert _per_system(browser) == [f"tuned: 6 of 10 ({_figures(6, 10)}): not enough votes yet",
                                    f"base: 3 of 8 ({_figures(3, 8)}): not enough votes yet"]  # 8.5-75.5%

    for i in (17, 19):
        _vote(browser, report, i, right=True)
    assert _score(browser) == f"20 of 20 pairs judged; the real reply picked in 11: {_figures(11, 20)} (a coin: 50%)"
    assert _verdict(browser) == NOT_YET  # 31.5-76.9%
    assert "could_tell" not in browser.find_element("id", "blind-verdict").get_attribute("class")

    for old in browser.downloads.glob("bunshin-blind-votes*"):
        old.unlink()  # an earlier test's: the browser would name this one "... (1).json"
    browser.find_element("id", "blind-save").click()
    saved = _wait_for(browser.downloads / SAVE_NAME)
    assert saved["score"]["all"] == {**judged(11, 20), "low": pytest.approx(judged(11, 20)["low"]),
                                     "high": pytest.approx(judged(11, 20)["high"])}
    assert saved["score"]["base"]["verdict"] == "not_enough" and saved["score"]["base"]["right"] == 5
    assert not _severe(browser)


def test_page_math_matches_scipy_and_the_python_twin(browser, tmp_path):
    from finetune.binomial import verdict
    from tests.support.exact_interval import scipy_intervals

    _open(browser, tmp_path, make_report(), "math.html")
    grid = [[k, n] for n in range(0, 41) for k in range(n + 1)]
    got = browser.execute_script(
        "return arguments[0].map(([k, n]) => [...window.bunshinBlind.clopperPearson(k, n),"
        " window.bunshinBlind.judge(k, n).verdict]);", grid)
    expected = [(0.0, 1.0)] + scipy_intervals([(k, n) for k, n in grid[1:]])
    for (k, n), (low, high, said), (ref_low, ref_high) in zip(grid, got, expected, strict=True):
        assert (low, high) == pytest.approx((ref_low, ref_high), abs=1e-9), (k, n)
        assert said == verdict(k, n), (k, n)
