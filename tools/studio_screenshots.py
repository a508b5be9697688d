"""Screenshots of the studio for the docs (docs/img/studio-*.png).

    python tools/studio_screenshots.py ROOT [--out docs/img]

ROOT must hold one Story-Iter run and one candidate set (see docs/studio.md for the two
commands that made the pictures in docs/).  Needs Debian's chromium + chromium-driver
and selenium.  The label page is shown after a few marks made with the keyboard; the
marks are written to that set's journal like any others.
"""
import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


def shrink(path: Path, width: int) -> None:
    im = Image.open(path).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.quantize(colors=128).save(path, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--width", type=int, default=900)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    srv = subprocess.Popen([sys.executable, "-m", "pipelines.studio", args.root, "--port", str(port)])
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1300,900", f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    wait = WebDriverWait(drv, 30)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/api/runs", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        drv.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "a.run-link"))[0].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sheet img"))
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.images).every(i => i.complete)"))
        drv.save_screenshot(str(out / "studio-sheet.png"))
        drv.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "a.set-link"))[0].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".cand img"))
        keys = ActionChains(drv)
        keys.send_keys("2").key_down(Keys.SHIFT).send_keys("5").send_keys("1").key_up(Keys.SHIFT).perform()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "saved")
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.images).every(i => i.complete)"))
        drv.save_screenshot(str(out / "studio-label.png"))
    finally:
        drv.quit()
        srv.terminate()
        srv.wait(10)
    for name in ("studio-sheet.png", "studio-label.png"):
        shrink(out / name, args.width)
        print(out / name, (out / name).stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
