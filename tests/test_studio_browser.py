"""The studio in a real browser: Debian's headless Chromium driven by selenium.

Labels a set with the keyboard, reloads and finds the marks, kills the server
(SIGKILL) mid-set and finds them after a restart, marks while the server is down and
sees them land when it is back, exports and reads pairs.jsonl with the DPO trainer's
loader; opens a run's contact sheet, pages it and steps through a frame's rounds; and
asks for paths that escape ROOT.  Skipped when /usr/bin/chromium or chromedriver is absent
(CI installs them: apt-get install -y chromium chromium-driver).
"""
import json
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip(f"browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, "
                f"{CHROMEDRIVER}); apt-get install -y chromium chromium-driver",
                allow_module_level=True)
pytest.importorskip("fastapi", reason="the studio needs fastapi and uvicorn")
pytest.importorskip("selenium", reason="browser tests need selenium (pip install selenium)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from _studio_data import Server, make_run, make_set  # noqa: E402
from pipelines.studio.journal import JOURNAL_NAME  # noqa: E402
from pipelines.train.data import load_preference_pairs  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(CHROMEDRIVER))
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser") / "root"
    make_run(root, frames=25, rounds=2)
    make_set(root, scenarios=3, k=4)
    srv = Server(root).start()
    yield srv
    srv.kill()


def wait(drv, cond, timeout=15):
    return WebDriverWait(drv, timeout, poll_frequency=0.05).until(lambda d: cond(d))


def keys(drv, *seq):
    ActionChains(drv).send_keys(*seq).perform()


def shift_digit(drv, d):
    ActionChains(drv).key_down(Keys.SHIFT).send_keys(d).key_up(Keys.SHIFT).perform()


def marks_shown(drv):
    return {int(e.get_attribute("data-k")): ("winner" if "winner" in e.get_attribute("class") else "loser")
            for e in drv.find_elements(By.CSS_SELECTOR, ".cand") if
            {"winner", "loser"} & set(e.get_attribute("class").split())}


def saved(drv):
    return drv.find_element(By.ID, "status").text == "saved"


def open_set(drv, srv, hash_=""):
    drv.get(srv.url + "/")
    link = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "a.set-link"))[0]
    href = link.get_attribute("href")
    drv.get(href + hash_)
    wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cand img")) == 4)
    return href


def journal(srv):
    p = srv.root / "sets/a" / JOURNAL_NAME
    return [json.loads(l) for l in p.read_text().splitlines()] if p.is_file() else []


def test_label_with_keyboard_reload_kill_and_export(browser, studio):
    drv, srv = browser, studio
    open_set(drv, srv)
    assert "scenario 1 of 3" in drv.find_element(By.ID, "scenario-index").text
    keys(drv, "1")                       # candidate 1 winner
    shift_digit(drv, "3")                # candidate 3 loser
    keys(drv, "2", "2")                  # candidate 2 winner, then cleared
    wait(drv, saved)
    assert marks_shown(drv) == {0: "winner", 2: "loser"}
    keys(drv, "n")
    wait(drv, lambda d: "scenario 2 of 3" in d.find_element(By.ID, "scenario-index").text)
    keys(drv, "4")
    shift_digit(drv, "1")
    keys(drv, "u")                       # undo the loser mark
    wait(drv, saved)
    assert marks_shown(drv) == {3: "winner"}
    assert "1 of 3 scenarios" in drv.find_element(By.ID, "progress").text

    drv.refresh()                        # reload: the server's journal shows the marks
    wait(drv, lambda d: marks_shown(d) == {3: "winner"})
    keys(drv, Keys.ARROW_LEFT)
    wait(drv, lambda d: marks_shown(d) == {0: "winner", 2: "loser"})

    # kill the server mid-set: every acknowledged mark is on disk
    keys(drv, "n", "n")
    wait(drv, lambda d: "scenario 3 of 3" in d.find_element(By.ID, "scenario-index").text)
    shift_digit(drv, "2")
    wait(drv, saved)
    srv.kill()
    keys(drv, "3")                       # marked while the server is down
    wait(drv, lambda d: "retrying" in d.find_element(By.ID, "status").text)
    srv.start()                          # same port: the page resends its queue
    wait(drv, saved)
    drv.refresh()
    wait(drv, lambda d: marks_shown(d) == {2: "winner", 1: "loser"})
    assert "2 of 3 scenarios" in drv.find_element(By.ID, "progress").text
    ev = journal(srv)
    assert len({e["id"] for e in ev}) == len(ev)             # the resend was not doubled

    drv.find_element(By.ID, "export").click()
    out = wait(drv, lambda d: d.find_element(By.ID, "export-result").get_attribute("data-pairs")
               and d.find_element(By.ID, "export-result"))
    assert "2 pairs from 2 scenarios" in out.text and "skipped (no winner and loser): s1" in out.text
    pairs = load_preference_pairs(srv.root / "sets/a/pairs.jsonl")
    s = (srv.root / "sets/a").resolve()
    assert list(zip(pairs.scenario, pairs.winners, pairs.losers)) == [
        ("s0", s / "s0/cand_00.png", s / "s0/cand_02.png"),
        ("s2", s / "s2/cand_02.png", s / "s2/cand_01.png")]


def test_two_tabs_do_not_lose_each_others_marks(browser, studio):
    drv, srv = browser, studio
    open_set(drv, srv, "#1")
    first = drv.current_window_handle
    drv.switch_to.new_window("tab")
    open_set(drv, srv, "#1")
    second = drv.current_window_handle
    keys(drv, "1")
    wait(drv, saved)
    drv.switch_to.window(first)
    shift_digit(drv, "4")                # this tab has not seen candidate 1's mark yet
    wait(drv, lambda d: marks_shown(d) == {0: "winner", 3: "loser"})   # the answer folds both
    drv.switch_to.window(second)
    wait(drv, lambda d: marks_shown(d) == {0: "winner", 3: "loser"})   # the poll shows it
    drv.close()
    drv.switch_to.window(first)


def test_contact_sheet_and_frame_viewer(browser, studio):
    drv, srv = browser, studio
    drv.get(srv.url + "/")
    wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "a.run-link"))[0].click()
    wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sheet img")) == 3 * 20)
    assert "25 frames x 3 rounds" in drv.find_element(By.ID, "summary").text
    assert "scale 0.400" in drv.find_elements(By.CSS_SELECTOR, "tr.round-row")[1].text
    drv.find_element(By.ID, "next").click()
    wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sheet img")) == 3 * 5)
    assert "frames 20\u201324 of 25" in drv.find_element(By.ID, "window").text
    drv.find_elements(By.CSS_SELECTOR, "tr.round-row")[0].find_elements(By.TAG_NAME, "a")[2].click()
    big = wait(drv, lambda d: d.find_elements(By.ID, "big-img"))[0]
    assert big.get_attribute("data-round") == "0" and big.get_attribute("src").endswith("round_00/frame_022.png")
    assert "prompt of frame 22" in drv.find_element(By.ID, "prompt").text
    for r in (1, 2, 2):                  # step down through the rounds (stops at the last)
        keys(drv, Keys.ARROW_DOWN)
        wait(drv, lambda d: d.find_element(By.ID, "big-img").get_attribute("data-round") == str(r))
    wait(drv, lambda d: d.execute_script(
        "const im = document.getElementById('big-img'); return im.complete && im.naturalWidth > 0"))
    px = drv.execute_script("""
        const im = document.getElementById('big-img'); const c = document.createElement('canvas');
        c.width = im.naturalWidth; c.height = im.naturalHeight; const g = c.getContext('2d');
        g.drawImage(im, 0, 0); return Array.from(g.getImageData(5, 5, 1, 1).data.slice(0, 3));""")
    assert px == [30 * 22 % 256, 120, 200]        # the picture of round 2, frame 22
    keys(drv, Keys.ARROW_RIGHT)                   # next frame, same round
    wait(drv, lambda d: "frame 23" in d.find_element(By.ID, "title").text)
    wait(drv, lambda d: d.find_element(By.ID, "big-img").get_attribute("data-round") == "2")


@pytest.mark.parametrize("path", ["/file/../../outside.png", "/file/%2e%2e/%2e%2e/etc/passwd",
                                  "/file/%2Fetc%2Fpasswd", "/thumb/..%2F..%2Fetc%2Fpasswd",
                                  "/runs/0123456789ab", "/static/..%2Ffiles.py"])
def test_browser_cannot_leave_root(browser, studio, path):
    browser.get(studio.url + path)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "not found" in body.lower() and "root:" not in body and "import" not in body
