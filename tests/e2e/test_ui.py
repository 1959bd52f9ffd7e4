"""`mmdistill ui` in headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

Each test starts the real command on loopback, works the page as a user does (types, uploads an image,
clicks), takes screenshots, checks each is a real PNG of non-trivial content, and checks what the page shows
against the models called directly (the same backends) or against the files the run wrote.
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers
from helpers import free_port, wait_until_served
from mmdistill.models import reranker as rm
from mmdistill.models.tiny import build_tiny_vlm, train_qwen_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if not (CHROMIUM and CHROMEDRIVER):  # .ci/run installs them with apt-get; without them there is nothing to drive
    pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ENV = dict(helpers.ENV, GRADIO_ANALYTICS_ENABLED="False")
TEXTS = [f"a {s} {c} {k} at the {p}" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for p in ("top", "left")]
TEXTS += [rm.SYSTEM_PROMPT, "<Instruct>: <Query>: <Document>: yes no", "what shape is it? a circle"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-models")
    tok = train_qwen_tokenizer(TEXTS, vocab_size=400)
    rm.build_tiny_reranker(d / "rr-teacher", TEXTS, kind="yesno", preset="vlm-nano", tokenizer=tok, seed=1)
    rm.build_tiny_reranker(d / "rr-student", TEXTS, kind="yesno", preset="vlm-nano", tokenizer=tok, seed=2)
    build_tiny_vlm(d / "vlm-teacher", TEXTS, preset="vlm-nano", tokenizer=tok, seed=3)
    build_tiny_vlm(d / "vlm-student", TEXTS, preset="vlm-nano", tokenizer=tok, seed=4)
    for name, seed in (("vlm-teacher", 3), ("vlm-student", 4)):
        _untie_head(d / name, seed)
    img = Image.new("RGB", (64, 64), (250, 250, 250))
    img.paste((220, 30, 30), (16, 16, 48, 48))
    img.save(d / "red-square.png")
    return d


def _untie_head(folder: Path, seed: int) -> None:
    """A random output head of its own: with tied embeddings an untrained tiny VLM echoes its last input token
    (the newline after `assistant`), so every answer would be blank and the page could not be checked."""
    import torch
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(folder)
    m.config.tie_word_embeddings = False
    m.config.text_config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(torch.randn(m.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    m.save_pretrained(folder)


class UI:
    """`mmdistill ui ...` in a child process and a headless Chromium looking at it."""

    def __init__(self, tmp: Path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"ui-{self.port}.log"
        self.tmp = tmp
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmdistill.cli", "ui", *map(str, args), "--port", str(self.port), "--threads", "1"],
                                     env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
        wait_until_served(self.proc, self.url, self.log_path, within=240, request_timeout=2, message="the UI did not start: ", log_in_message=True)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1600"):
            opts.add_argument(a)
        self.driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
        self.driver.get(self.url)
        self.wait_for(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role='tab']"), 90)

    def wait_for(self, cond, timeout: float = 120):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.25).until(cond)

    def el(self, css: str, timeout: float = 60):
        """The first element matching `css`, waited for: Gradio renders a tab's components after its tab buttons, and
        on a loaded machine a lookup right after the page came up found no #query box yet (a CI failure)."""
        return self.wait_for(lambda d: d.find_elements(By.CSS_SELECTOR, css), timeout)[0]

    def type(self, elem_id: str, text: str) -> None:
        box = self.el(f"#{elem_id} textarea, #{elem_id} input")
        box.clear()
        box.send_keys(text)

    def tab(self, label: str) -> None:
        self.driver.find_element(By.XPATH, f"//button[@role='tab' and contains(normalize-space(.), '{label}')]").click()

    def screenshot(self, name: str) -> Path:
        path = self.tmp / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        check_png(path.read_bytes(), min_size=(1000, 800))
        return path

    def close(self) -> None:
        self.driver.quit()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def check_png(data: bytes, min_size=(100, 50)) -> Image.Image:
    """A real PNG (signature, decodes) of at least `min_size` with non-trivial content (many colours, not flat)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
    px = np.asarray(img.convert("RGB"))
    assert px.std() > 10, "a flat image"
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50, "too few colours to be a rendered page"
    return img


def _scores_table(ui: UI) -> list[list[str]]:
    """The data rows of the scores grid (Gradio's Dataframe: role=row / gridcell), header row left out."""
    rows = ui.driver.find_elements(By.CSS_SELECTOR, "#scores [role='row']")
    return [[c.text.strip() for c in r.find_elements(By.CSS_SELECTOR, "[role='gridcell']")] for r in rows if r.get_attribute("aria-rowindex") != "1"]


def test_rerankers_side_by_side(models, tmp_path):
    from mmdistill.ui.compare import Comparer

    docs = ["a small red square at the top", "a large blue circle at the left", "a small green circle at the top"]
    expected = Comparer(models / "rr-student", models / "rr-teacher", task="yesno", threads=1).rerank("a red square", docs, Image.open(models / "red-square.png"))
    ui = UI(tmp_path, models / "rr-student", "--teacher", models / "rr-teacher", "--task", "yesno", "--runs", tmp_path / "runs")
    try:
        d = ui.driver
        ui.type("query", "a red square")
        ui.el("#image input[type='file']").send_keys(str(models / "red-square.png"))
        ui.wait_for(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"), 60)
        ui.type("documents", "\n".join(docs))
        ui.el("#compare").click()
        ui.wait_for(lambda d: len(_scores_table(ui)) == 3 and "ms" in ui.el("#latency").text, 120)
        shot = ui.screenshot("rerank")

        head = [h.text.strip() for h in d.find_elements(By.CSS_SELECTOR, "#scores [role='columnheader']")]
        assert any("teacher (rr-teacher)" in h for h in head) and any("student (rr-student)" in h for h in head), head
        rows = _scores_table(ui)
        for i, row in enumerate(rows):
            assert row[0] == docs[i]
            for side, cell in zip(expected, row[1:]):  # teacher column, then student column
                m = re.fullmatch(r"([0-9.]+) \(#(\d)\)", cell)
                assert m, cell
                assert abs(float(m.group(1)) - side["scores"][i]) < 2e-4, (cell, side)
                assert int(m.group(2)) == side["ranks"][i]
        assert expected[0]["scores"] != expected[1]["scores"]  # two different models: the columns must differ
        lat = ui.el("#latency").text
        assert re.search(r"teacher \(rr-teacher\): [0-9.]+ ms", lat) and re.search(r"student \(rr-student\): [0-9.]+ ms", lat), lat
        # the table as rendered: a real image of the element, not a blank box
        check_png(ui.el("#scores").screenshot_as_png, min_size=(200, 60))
        assert shot.stat().st_size > 20_000

        # bad input: no documents -> an error message on the page, and the UI keeps working
        ui.type("documents", " ")
        ui.el("#compare").click()
        ui.wait_for(lambda d: "documents: give at least one document" in d.find_element(By.TAG_NAME, "body").text, 60)
        ui.screenshot("rerank-error")
    finally:
        ui.close()


def test_vlms_answer_side_by_side(models, tmp_path):
    from mmdistill.ui.compare import Comparer

    expected = Comparer(models / "vlm-student", models / "vlm-teacher", threads=1).chat("what shape is it?", Image.open(models / "red-square.png"), 12)
    assert all(r["answer"].strip() for r in expected) and expected[0]["answer"] != expected[1]["answer"], expected
    ui = UI(tmp_path, models / "vlm-student", "--teacher", models / "vlm-teacher")
    try:
        ui.el("#image input[type='file']").send_keys(str(models / "red-square.png"))
        ui.wait_for(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"), 60)
        ui.type("prompt", "what shape is it?")
        slider = ui.el("input[type='number'][aria-label*='Max tokens'], input[type='number']")
        slider.send_keys(Keys.CONTROL, "a")
        slider.send_keys("12", Keys.TAB)
        ui.el("#compare").click()
        ui.wait_for(lambda d: "tokens" in ui.el("#latency").text, 120)
        ui.screenshot("chat")
        got = [ui.el(f"#answer-{i} textarea").get_attribute("value") for i in range(2)]
        assert got == [r["answer"] for r in expected], (got, expected)
        labels = ui.driver.find_element(By.TAG_NAME, "body").text
        assert "teacher (vlm-teacher)" in labels and "student (vlm-student)" in labels
        lat = ui.el("#latency").text
        for r in expected:
            assert f"{r['model']}: " in lat and f"{r['tokens']} tokens" in lat, lat
    finally:
        ui.close()


@pytest.mark.slow
def test_start_a_demo_watch_it_then_browse_its_report(tmp_path):
    runs = tmp_path / "runs"
    ui = UI(tmp_path, "--runs", runs)
    try:
        d = ui.driver
        ui.tab("Train")
        ui.type("demo-out", str(runs / "demo"))
        ui.el("#start-demo").click()
        seen = []

        def watching(d):
            text = ui.el("#job-progress").text
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            return "finished" in ui.el("#job-status").text or "failed" in ui.el("#job-status").text

        shot = None
        deadline = time.time() + 300
        while not watching(d):
            assert time.time() < deadline, (seen, ui.el("#job-log textarea").get_attribute("value"))
            running = "running" in ui.el("#job-status").text  # read first: a quick job may finish while we look
            if shot is None and running and d.find_elements(By.CSS_SELECTOR, "#loss-curve img") and re.search(r"step [1-9]", ui.el("#job-progress").text):
                shot = ui.screenshot("train-live")  # while the run is going: a loss curve and a step count on screen
            time.sleep(0.3)
        assert "finished" in ui.el("#job-status").text, ui.el("#job-log textarea").get_attribute("value")
        assert shot is not None, f"no loss curve seen while the run was going; progress seen: {seen}"
        # live: the progress line changed while the job ran (a stage may run between two polls on a slow machine:
        # which stages a poll caught is timing, so the stage history is read from the page at the end)
        steps_seen = [s for s in seen if re.match(r"\S+: step", s)]
        assert len(steps_seen) >= 2, seen
        # the last progress line is the last line of the last stage's log; under it, every stage the demo trained
        final = ui.el("#job-progress").text.splitlines()
        last = {s: json.loads((runs / "demo" / s / "metrics.jsonl").read_text().splitlines()[-1])["step"]
                for s in ("teacher", "student-base", "student-kd")}
        kd = json.loads((runs / "demo" / "student-kd" / "metrics.jsonl").read_text().splitlines()[-1])
        assert final[0] == f"student-kd: step {kd['step']} of 6, loss {kd['loss']:.4f}", final
        assert final[-1] == "stages so far: " + " → ".join(f"{s} (step {n})" for s, n in last.items()), final
        assert "report written to" in ui.el("#job-log textarea").get_attribute("value")
        check_png(ui.el("#loss-curve").screenshot_as_png, min_size=(200, 100))
        ui.screenshot("train-finished")

        # the report it wrote, in the Runs tab, with its plots
        ui.tab("Runs")
        ui.el("#refresh-runs").click()
        time.sleep(1)  # the refreshed choices reach the page
        ui.el("#run-folder input").click()
        want = str(runs / "demo" / "report")
        option = ui.wait_for(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "#run-folder [role='option']") if o.get_attribute("aria-label") == want], 30)
        listed = [o.get_attribute("aria-label") for o in ui.driver.find_elements(By.CSS_SELECTOR, "#run-folder [role='option']")]
        assert listed == [want] + [str(runs / "demo" / s) for s in ("student-base", "student-kd", "teacher")], listed
        option[0].click()
        report_md = (runs / "demo" / "report" / "report.md").read_text()
        title = report_md.splitlines()[0].lstrip("# ").strip()
        ui.wait_for(lambda d: title in ui.el("#report").text, 60)
        ui.wait_for(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plots img")) >= 2, 60)
        ui.screenshot("runs-report")
        for img in d.find_elements(By.CSS_SELECTOR, "#plots img")[:2]:
            check_png(img.screenshot_as_png, min_size=(60, 40))
        assert "student-kd" in ui.el("#report").text
    finally:
        ui.close()
