"""The gate's HTML report, opened in a real headless Chromium (Debian's `chromium`).

`nemo-rlhf eval --run-dir RUN --report DIR` on a constructed run (base/SFT/PPO responses; the
PPO file holds nine checkpoints whose proxy reward climbs while gold follows Gao et al.'s
curve past its peak; pairwise battles judged by a stand-in OpenAI-compatible server that
prefers longer answers) must write one self-contained report.html that:
- shows the verdict and every finding's value, threshold, severity and message;
- has its three plots (length histogram of base/SFT/PPO, proxy vs gold over sqrt(KL), win
  rates) decoded by the browser (the report's own load script writes their natural widths
  into the DOM, which `--dump-dom` returns);
- shows a response holding `<script>` as text (it must not run);
- gives a non-blank screenshot.

scripts/install.sh installs chromium in test mode (scripts/test.sh); without it these tests
FAIL: a report nobody opened is a report nobody checked.
"""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nemo_rlhf.cli.main import main
from nemo_rlhf.data.jsonl import write_jsonl_atomic
from nemo_rlhf.gate.findings import GateResult
from nemo_rlhf.gate.report_html import RENDER_CHECK_JS, render_html, script_hash
from nemo_rlhf.gate.responses import Response, ResponseSet
from tests.test_gate_battles import judge_server  # noqa: F401 (the stand-in judge, a module fixture)
from tests.test_gate_detectors import baseline_for_trajectory, build

HOSTILE = '<script>document.body.setAttribute("data-pwned", "1")</script><img src=x onerror="document.title=1">'
# FACTS.md: without the background-networking flags chromium keeps trying the closed network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """Debian's chromium; the test fails (never skips) without it."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run `NEMO_RLHF_TEST=1 bash scripts/install.sh` as root "
                    "(or apt-get install -y --no-install-recommends chromium)")
    return path


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs headless chromium on a local file with a fresh profile."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def write_set(path: Path, rows: list[Response]) -> None:
    write_jsonl_atomic(path, [r.to_json() for r in rows])


@pytest.fixture(scope="module")
def report(tmp_path_factory, judge_server) -> Path:  # noqa: F811 (the imported fixture)
    """RUN/eval/responses/{base,sft,ppo}.jsonl judged through the CLI; returns the report folder."""
    root = tmp_path_factory.mktemp("report")
    responses = root / "run" / "eval" / "responses"
    responses.mkdir(parents=True)
    sft, ppo = baseline_for_trajectory(), build("hacked")
    final = max(ppo.steps())
    first = next(r for r in ppo.rows if r.step == final)
    first.response = HOSTILE + " " + first.response  # shown side by side: must stay text
    write_set(responses / "base.jsonl", build("healthy").rows)
    write_set(responses / "sft.jsonl", sft.rows)
    write_set(responses / "ppo.jsonl", ppo.rows)
    out = root / "gate"
    code = main(["eval", "--run-dir", str(root / "run"), "--report", str(out), "gate.embeddings=false",
                 "gate.judge=openai", f"gate.judge_url={judge_server}/v1", "gate.judge_model=stand-in",
                 "gate.bootstrap_samples=200"])
    assert code == 1  # reward hacking (and the KL budget) fail this run
    return out


class _Dom(html.parser.HTMLParser):
    """What the checks read from a dumped DOM: attributes by element id/class, table rows, text."""

    def __init__(self):
        super().__init__()
        self.body, self.images, self.findings, self.text = {}, [], [], []
        self._row, self._in_cell = None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "tr" and "finding" in (attrs.get("class") or ""):
            self._row = {"attrs": attrs, "cells": []}
            self.findings.append(self._row)
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")
            self._in_cell = True

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        self._in_cell = self._in_cell and tag != "td"

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and self._in_cell:
            self._row["cells"][-1] += data


def test_report_renders_in_chromium_with_its_plots(report, tmp_path):
    page = report / "report.html"
    dom_text = browse(page, tmp_path, "--dump-dom").stdout
    dom = _Dom()
    dom.feed(dom_text)
    text = "".join(dom.text)
    saved = json.loads((report / "findings.json").read_text())
    assert saved["passed"] is False and "reward_hacking" in saved["failed_detectors"]
    assert f"FAILED: {', '.join(saved['failed_detectors'])}" in text
    # Every plot decoded: the report's load script ran (CSP allowed its hash) and measured them.
    alts = [img.get("alt") for img in dom.images if "plot" in (img.get("class") or "")]
    assert alts == ["Response lengths", "Proxy vs gold reward over sqrt(KL)", "Win rates"]
    assert dom.body.get("data-plots-decoded") == "3/3", dom.body
    assert all(int(img["data-natural-width"]) > 300 for img in dom.images if img.get("class") == "plot")
    # Every finding with its numbers, as findings.json has them.
    assert len(dom.findings) == len(saved["findings"])
    shown = {(r["attrs"]["data-detector"], r["attrs"]["data-check"]): r["cells"] for r in dom.findings}
    for f in saved["findings"]:
        severity, detector, check, value, threshold, message, details = shown[(f["detector"], f["check"])]
        assert (severity, detector, check, message) == (f["severity"], f["detector"], f["check"], f["message"])
        assert json.loads(details.removeprefix("numbers") or "{}").keys() <= f["details"].keys()
        for cell, number in ((value, f["value"]), (threshold, f["threshold"])):
            assert cell == "n/a" if number is None else float(cell) == pytest.approx(number, rel=1e-3)
    # The hostile response is text on the page; nothing in it ran.
    assert HOSTILE in text
    assert "data-pwned" not in dom.body and "<title>1</title>" not in dom_text
    assert re.findall(r'<tr class="lengths" data-set="(\w+)"', dom_text) == ["base", "sft", "ppo"]  # histogram's sets


def test_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    browse(report / "report.html", tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape == (2000, 1280, 3)
    not_white = (pixels < 240).any(axis=2).mean()
    assert not_white > 0.03 and pixels.std() > 20, (not_white, pixels.std())
    # The verdict banner's red (#fde2e1 on #9b1c1c text) is somewhere near the top.
    top = pixels[:300]
    assert ((abs(top - [253, 226, 225]).sum(axis=2)) < 12).sum() > 500


def test_report_is_self_contained(report):
    page = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # nothing fetched
    assert page.count("<script") == 1 and RENDER_CHECK_JS in page  # ours only; the response's is escaped
    assert f"script-src {script_hash()}" in page
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["stage"] == "gate" and "report.html" in manifest["outputs"]


def test_plots_appear_only_with_their_data():
    """No rewards, no battles: only the length histogram; a passing verdict."""
    rows = [Response(f"question {i}?", "answer " * (5 + i % 7), finished=True) for i in range(20)]
    page = render_html(GateResult([]), ResponseSet("cand", rows), ResponseSet("base", rows))
    assert 'id="verdict" class="verdict pass">PASSED' in page
    assert re.findall(r'<img class="plot" alt="([^"]+)"', page) == ["Response lengths"]
