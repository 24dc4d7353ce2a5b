"""The gate's HTML report: one self-contained file a reviewer opens in any browser.

`write_html_report` renders `templates/report.html.j2` (jinja2 with autoescape on: responses
are untrusted text and may hold markup or scripts) with the verdict, every finding (value vs
threshold, severity), plots as base64 PNGs from matplotlib, and side-by-side samples of the
baseline and the candidate on the same prompts. Nothing is fetched: no external URLs, so the
file can be mailed or attached to a ticket and still renders the same. Its one script
(`RENDER_CHECK_JS`) records, after load, how many plots the browser decoded
(`<body data-plots-decoded="k/n">`, each image's `data-natural-width`): the headless-browser
test reads that, and a reviewer sees a warning banner if an image is broken. The page's
Content-Security-Policy allows exactly that script by its sha256 and nothing else, so even
markup that slipped past escaping could not run.

Plots, each only when the data for it exists:
- response-length histograms of every responses set (base/SFT/PPO, or baseline/candidate);
- proxy and gold reward against d = sqrt(KL) along the PPO steps, with the Gao et al. fit
  of the gold gain (from the `reward_hacking` findings);
- pairwise win rates, raw and length-controlled, with their confidence intervals (from the
  `preference` finding, when battles ran).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import markupsafe
import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nemo_rlhf.atomic_file import write_text_atomic  # noqa: E402
from nemo_rlhf.gate.detectors.common import length  # noqa: E402
from nemo_rlhf.gate.findings import GateResult  # noqa: E402
from nemo_rlhf.gate.responses import ResponseSet  # noqa: E402

TEMPLATE = "report.html.j2"
REPORT = "report.html"
SAMPLES = 12  # side-by-side prompts shown
SEVERITY_ORDER = {"fail": 0, "warn": 1, "info": 2}

# Runs on load: marks each plot with its decoded width and the body with "decoded/total";
# shows the (hidden) broken-plot banner when one did not decode.
RENDER_CHECK_JS = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img.plot"), ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].setAttribute("data-natural-width", String(imgs[i].naturalWidth));
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
  }
  document.body.setAttribute("data-plots-decoded", ok + "/" + imgs.length);
  if (ok < imgs.length) { document.getElementById("broken-plots").hidden = false; }
});
"""


def script_hash(script: str = RENDER_CHECK_JS) -> str:
    """The CSP source allowing exactly `script` inline: 'sha256-<base64 digest>'."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("nemo_rlhf.gate", "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped; responses are hostile text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _png(fig) -> str:
    """A figure as a base64 PNG for `<img src="data:image/png;base64,...">`; closes it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def length_histogram(sets: dict[str, ResponseSet]) -> str | None:
    """Overlaid histograms of response length (words) per responses set; None without responses."""
    lengths = {name: [length(r) for r in s.final().rows] for name, s in sets.items() if len(s)}
    if not lengths:
        return None
    top = max(max(v) for v in lengths.values())
    bins = np.linspace(0, max(top, 1) + 1, 21)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, (name, values) in enumerate(lengths.items()):  # outlines: overlapping sets stay visible
        color = f"C{i}"
        ax.hist(values, bins=bins, alpha=0.2, color=color)
        ax.hist(values, bins=bins, histtype="step", linewidth=1.8, linestyle=("-", "--", ":")[i % 3], color=color,
                label=f"{name} (median {np.median(values):.0f})")
    ax.set_xlabel("response length (words)")
    ax.set_ylabel("responses")
    ax.set_title("response lengths")
    ax.legend(fontsize="small")
    return _png(fig)


def length_table(sets: dict[str, ResponseSet]) -> list[dict]:
    """The histogram's numbers per responses set: count, median/mean words, share not finished."""
    table = []
    for name, s in sets.items():
        rows = s.final().rows
        if not rows:
            continue
        words = [length(r) for r in rows]
        known = [r.finished for r in rows if r.finished is not None]
        table.append({"name": name, "n": len(rows), "median": _number(float(np.median(words))),
                      "mean": _number(float(np.mean(words))),
                      "unfinished": f"{known.count(False) / len(known):.1%}" if known else "n/a"})
    return table


def reward_vs_kl(result: GateResult) -> str | None:
    """Proxy and gold reward over sqrt(KL) with the Gao fit, from the reward_hacking findings.

    None unless two or more checkpoints carry both rewards and a KL.
    """
    hacking = {f.check: f for f in result.findings if f.detector == "reward_hacking"}
    check = hacking.get("proxy_up_gold_down")
    points = [p for p in (check.details.get("points", []) if check else []) if p.get("d") is not None]
    if len(points) < 2:
        return None
    points.sort(key=lambda p: p["d"])
    d = np.array([p["d"] for p in points])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(d, [p["proxy"] for p in points], "o-", label="proxy reward (optimised)")
    ax.plot(d, [p["gold"] for p in points], "s-", label="gold reward")
    turnover = hacking.get("gold_turnover")
    if turnover is not None and "alpha" in turnover.details:
        alpha, beta = turnover.details["alpha"], turnover.details["beta"]
        base = points[0]["gold"] if points[0]["d"] == 0 else min(points, key=lambda p: p["d"])["gold"]
        grid = np.linspace(max(d.max(), 1e-6) / 200, d.max() * 1.15, 100)
        ax.plot(grid, base + grid * (alpha - beta * np.log(grid)), "--", color="gray",
                label=f"Gao fit: gold gain = d({alpha:.2g} - {beta:.2g} log d)")
        d_star = turnover.details.get("d_star")
        if d_star is not None and math.isfinite(d_star) and d_star <= grid.max():
            ax.axvline(d_star, color="red", linewidth=0.8, linestyle=":", label=f"gold turns over at d*={d_star:.3g}")
    for p in points:
        ax.annotate(p["label"], (p["d"], p["gold"]), fontsize=7, textcoords="offset points", xytext=(3, -9))
    ax.set_xlabel("d = sqrt(KL to reference)")
    ax.set_ylabel("mean reward")
    ax.set_title("proxy vs gold reward along PPO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def win_rates(result: GateResult) -> str | None:
    """Raw and length-controlled win rates with their CIs, from the preference finding."""
    found = next((f for f in result.findings if f.detector == "preference" and "win_rate" in f.details), None)
    if found is None:
        return None
    rates = {"raw": found.details["win_rate"], "length-controlled": found.details["lc_win_rate"]}
    fig, ax = plt.subplots(figsize=(6.5, 2.4))
    for y, (name, iv) in enumerate(rates.items()):
        ax.errorbar(iv["estimate"], y, xerr=[[iv["estimate"] - iv["low"]], [iv["high"] - iv["estimate"]]],
                    fmt="o", capsize=5)
        ax.annotate(f"{iv['estimate']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]", (iv["estimate"], y),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    if found.threshold is not None:
        ax.axvline(found.threshold, color="red", linestyle=":", linewidth=1, label=f"threshold {found.threshold:g}")
        ax.legend(fontsize="small", loc="lower right")
    ax.set_yticks(range(len(rates)), list(rates))
    ax.set_ylim(-0.7, len(rates) - 0.3)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{found.details.get('candidate')} win rate vs {found.details.get('baseline')}")
    ax.set_title(f"pairwise battles ({found.details.get('n')} prompts, both orders)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def side_by_side(candidate: ResponseSet, baseline: ResponseSet, limit: int = SAMPLES) -> list[dict]:
    """The first `limit` prompts both answered: the baseline's and the candidate's first response."""
    base = {}
    for r in baseline.rows:
        base.setdefault(r.prompt, r)
    rows, seen = [], set()
    for r in candidate.final().rows:
        if r.prompt in base and r.prompt not in seen:
            seen.add(r.prompt)
            rows.append({"prompt": r.prompt, "baseline": _sample(base[r.prompt]), "candidate": _sample(r)})
        if len(rows) >= limit:
            break
    return rows


def _sample(r) -> dict:
    scores = [f"{name} {getattr(r, name):.3g}" for name in ("proxy_reward", "gold_reward", "kl")
              if getattr(r, name) is not None]
    return {"response": r.response, "meta": ", ".join([f"{length(r)} words", *scores])}


def _details(finding, limit: int = 4000) -> str:
    """A finding's other numbers (intervals, per-side rates, fit parameters) as indented JSON;
    the bulky `cases` and `points` are shown elsewhere (bad cases, the reward plot)."""
    details = {k: v for k, v in finding.to_json()["details"].items() if k not in ("check", "points")}
    text = json.dumps(details, indent=1, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "\n... (see findings.json)"


def _number(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_html(result: GateResult, candidate: ResponseSet, baseline: ResponseSet,
                sets: dict[str, ResponseSet] | None = None, cases: list[dict] | None = None,
                source: dict | None = None) -> str:
    """The report as an HTML string (see the module docstring).

    Args:
        result: the gate's verdict and findings.
        candidate: the judged responses.
        baseline: the reference responses on the same prompts.
        sets: every responses set for the length histogram (default: baseline and candidate),
            e.g. base, sft and ppo in checkpoints mode.
        cases: the exported bad cases (shown after the samples).
        source: where the responses came from (run dir, files, checkpoints).
    """
    sets = sets or {baseline.name: baseline, candidate.name: candidate}
    plots = [(title, data) for title, data in (
        ("Response lengths", length_histogram(sets)),
        ("Proxy vs gold reward over sqrt(KL)", reward_vs_kl(result)),
        ("Win rates", win_rates(result)),
    ) if data]
    findings = sorted(result.findings, key=lambda f: SEVERITY_ORDER[f.severity])
    return _environment().get_template(TEMPLATE).render(
        passed=result.passed,
        failed=result.failed_detectors,
        findings=[{"detector": f.detector, "check": f.check, "severity": f.severity, "value": _number(f.value),
                   "threshold": _number(f.threshold), "message": f.message, "details": _details(f)}
                  for f in findings],
        counts={s: sum(f.severity == s for f in result.findings) for s in SEVERITY_ORDER},
        candidate=candidate.name, baseline=baseline.name, n_candidate=len(candidate.final()), n_baseline=len(baseline),
        plots=plots, lengths=length_table(sets), samples=side_by_side(candidate, baseline), cases=(cases or [])[:50],
        source={k: str(v) for k, v in (source or {}).items() if v is not None},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        script=markupsafe.Markup(RENDER_CHECK_JS), script_hash=markupsafe.Markup(script_hash()),
    )


def write_html_report(out_dir: str | os.PathLike, result: GateResult, candidate: ResponseSet,
                      baseline: ResponseSet, **kwargs) -> Path:
    """Writes OUT_DIR/report.html atomically (temp file + rename); kwargs go to `render_html`."""
    path = Path(out_dir) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_html(result, candidate, baseline, **kwargs))
    return path
