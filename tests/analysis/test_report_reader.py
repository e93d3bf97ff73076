"""The report as a reader sees it (issue 23, item 6), on a smoke-shaped sweep: depth 0/1 x routing
iterations 1/3 x 2 seeds, with the cnn controls at depth 0 and 1 that carry the base config's
iterations=3. The parent run is written by the runner's own `create_parent` from the shipped smoke spec
(so it records what a real sweep records: the versions, the sweep settings, no sampler for a grid), the
trials by MLflow in the runner's layout. Checked: the labels of the cnn controls, the integer axes of
the parallel coordinates and where their tick labels sit, the run links with --ui-url, the versions in
the reproducibility block, figure titles that fit their PNG, the status line of `capsweep report`, and
the page in headless Chromium at 800 and 1400 px (the configurations table and its reasons readable).
"""
from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from analysis import plots
from analysis.interactive import tick_values
from analysis.load import load_sweep
from capsmodels.progress import Status, duration, sweep_line
from analysis.report import write_report
from analysis.verdict import annotate, compute_verdict
from sweeps.runner import create_parent
from sweeps.spec import load_spec
from tests.helpers import browser as browser_helpers
from tests.helpers.sweep import ROOT, capsweep_cmd, env_for_subprocess
from tests.helpers.probe_metrics import BASE, capsnet_metrics, cnn_metrics
from tests.helpers.runs import log_trial

UI = "http://127.0.0.1:5000"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("capsweep", artifact_location=str(root / "artifacts"))
    spec = load_spec("smoke", [f"storage_path={root / 'ray'}"])
    parent = create_parent(c, exp, spec)
    n = iter(range(100))
    for depth in (0, 1):
        for it in (1, 3):
            for s in (0, 1):
                m = capsnet_metrics(depth, grad_ratio=1e-8 if depth else 1.0, dead_hidden=1.0 if depth else 0.0,
                                    test_acc=0.83 if depth == 0 else 0.11 + 0.01 * s, seed=s)
                log_trial(c, exp, parent, "smoke", f"t{next(n):02d}",
                          {**BASE, "model.depth": depth, "model.iterations": it, "train.seed": s,
                           "trial.role": "reference" if depth == 0 else "candidate"}, m)
    for depth in (0, 1):
        for s in (0, 1):
            log_trial(c, exp, parent, "smoke", f"t{next(n):02d}",
                      {**BASE, "model.arch": "cnn", "model.depth": depth, "model.iterations": 3, "train.seed": s,
                       "trial.role": "control"}, cnn_metrics(depth, 0.86 + 0.01 * s, s))
    c.set_terminated(parent, "FINISHED")
    data = load_sweep("capsweep", uri, "smoke", progress=False)
    verdict = compute_verdict(data)
    out = root / "report"
    paths = write_report(data, verdict, str(out), ui_url=UI)
    return {"root": root, "uri": uri, "data": data, "verdict": verdict, "paths": paths, "out": out,
            "parent": parent, "html": Path(paths["html"]).read_text()}


def test_cnn_controls_are_labelled_by_what_a_cnn_reads(smoke):
    labels = {c.id: (c.role, c.label) for c in smoke["verdict"].configurations}
    cnn = sorted(label for role, label in labels.values() if label.startswith("arch=cnn"))
    assert cnn == ["arch=cnn depth=0", "arch=cnn depth=1"], labels
    caps = sorted(label for role, label in labels.values() if label.startswith("arch=capsnet"))
    assert caps == [f"arch=capsnet depth={d} iterations={i}" for d in (0, 1) for i in (1, 3)]
    assert "arch=cnn depth=1 iterations" not in smoke["html"]


def test_parallel_coordinates_put_integer_levels_on_integer_axes_and_labels_above_the_lines(smoke):
    html = smoke["html"]
    svg = html[html.index("<figure class='chart pc'"):]
    svg = svg[:svg.index("</svg>")]
    ticks = re.findall(r"<text class='tick' x='([\d.]+)' y='[\d.]+'>([^<]*)</text>", svg)
    axes = re.findall(r"<line class='ax' x1='([\d.]+)'", svg)
    by_axis = {x: [t for tx, t in ticks if abs(float(tx) - 4 - float(x)) < 0.05] for x in axes}
    titles = re.findall(r"font-weight='600'>([^<]*)<title>", svg)
    named = dict(zip(titles, by_axis.values()))
    assert named["depth"] == ["0", "1"] and named["iterations"] == ["1", "3"], named
    # every tick label comes after every line (SVG paints in document order) and has a halo
    assert svg.rindex("class='pl'") < svg.index("<text class='tick'")
    assert "svg text.tick{paint-order:stroke;stroke:#fff" in html


@pytest.mark.parametrize("values, want", [
    ([0, 1, 0, 1], [0, 1]), ([1, 3], [1, 3]), ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]),
    (range(0, 11), [0, 2, 4, 6, 8, 10]), (range(3, 20), [5, 10, 15]),
    ([0.092, 0.87, 0.3, 0.5, 0.1, 0.2, 0.4, 0.6], [0.2, 0.4, 0.6, 0.8]),
    ([-9.431, -0.8752, -3, -4, -5, -6, -7], [-8, -6, -4, -2]),
])
def test_tick_values(values, want):
    got = tick_values(list(values))
    assert got == pytest.approx(want, abs=1e-12)
    lo, hi = min(values), max(values)
    assert all(lo <= t <= hi for t in got)
    if all(float(v).is_integer() for v in values):
        assert all(float(t).is_integer() for t in got)


def test_run_ids_link_to_the_ui_given_and_the_command_keeps_it(smoke):
    html, data = smoke["html"], smoke["data"]
    links = re.findall(r"href='(http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]+)'", html)
    runs = set(data.trials["run_id"])
    linked = {u.rsplit("/", 1)[1] for u in links}
    assert runs | {smoke["parent"]} == linked
    assert all(u.startswith(f"{UI}/#/experiments/{data.experiment_id}/runs/") for u in links)
    assert "capsweep report --ui-url ADDRESS" not in html           # the hint is for reports without links
    repro = html[html.index("id='reproducibility'"):]
    assert f"--ui-url {UI}" in repro.replace("&#58;", ":")


def test_the_sweep_records_its_versions_and_the_report_shows_them(smoke):
    tags = MlflowClient(smoke["uri"]).get_run(smoke["parent"]).data.tags
    want = {n: version(n) for n in ("capsweep", "torch", "ray", "mlflow", "optuna", "numpy", "pandas", "scipy")}
    assert {k[len("capsweep.version."):]: v for k, v in tags.items() if k.startswith("capsweep.version.")} == \
        {"python": sys.version.split()[0], **want}
    repro = smoke["html"][smoke["html"].index("id='reproducibility'"):]
    row = re.search(r"<th>versions the sweep ran with</th><td><code>(.*?)</code>", repro).group(1)
    assert row.startswith(f"python {sys.version.split()[0]}, capsweep {want['capsweep']}, torch {want['torch']}")
    assert "none recorded" not in repro and "(differ from the sweep's" not in repro
    # a grid sweep logs no sampler (it used to log the default, tpe)
    assert "sweep.sampler" not in MlflowClient(smoke["uri"]).get_run(smoke["parent"]).data.params
    assert "sweep.sampler" not in repro and "sweep.search=grid" in repro


def _edge_ink(png: Path, margin: int = 2) -> dict[str, int]:
    """Dark pixels (any channel < 0.5) in the outermost `margin` rows/columns: text cut at the edge."""
    im = imread(png)[..., :3]
    dark = (im < 0.5).any(axis=-1)
    return {"left": int(dark[:, :margin].sum()), "right": int(dark[:, -margin:].sum()),
            "top": int(dark[:margin].sum()), "bottom": int(dark[-margin:].sum())}


def test_figure_titles_and_axis_labels_fit_their_png(smoke, tmp_path):
    """A one-panel figure (one depth line per layer, nothing else swept) with the longest title; and every
    figure of the report: no text runs into the PNG's edges (it used to read "adient reaching ... by lay")."""
    trials, _, _ = annotate(smoke["data"])
    one = trials[(trials["model.arch"] == "capsnet") & (trials["model.iterations"] == "3")]
    fig = plots.plot_layer_profile(one, ["model.depth"], 0.05, str(tmp_path))
    assert fig["title"] == "Gradient reaching each capsule layer: log10 act_grad/l{l} by layer"
    assert "One panel per" not in fig["caption"]                       # it is one panel
    assert _edge_ink(tmp_path / fig["file"]) == {"left": 0, "right": 0, "top": 0, "bottom": 0}
    pngs = sorted(smoke["out"].glob("*.png"))
    assert len(pngs) >= 8
    for png in pngs:
        assert _edge_ink(png) == {"left": 0, "right": 0, "top": 0, "bottom": 0}, png.name


def test_fit_text_breaks_a_long_title_and_leaves_a_short_one():
    title = "Gradient reaching each capsule layer: log10 act_grad/l{l} by layer"
    assert plots.fit_text(title, 10, 11) == title
    lines = plots.fit_text(title, 4.4, 11).split("\n")
    assert len(lines) == 2 and " ".join(lines) == title


# ---- progress ---------------------------------------------------------------------------------------
def test_sweep_line_counts_and_estimates_what_is_left():
    assert sweep_line(3, 12, {"finished": 2, "failed": 1}, 2, 90.0, 3) == \
        "capsweep: 3/12 trials ended (2 finished, 1 failed), 2 running; 1 min 30 s elapsed, about 4 min 30 s left"
    # a resumed sweep: 10 ended before, 1 here in 60 s: 1 left at 60 s a trial
    assert sweep_line(11, 12, {"finished": 11}, 1, 60.0, 1).endswith("1 min 00 s elapsed, about 1 min 00 s left")
    assert sweep_line(12, 12, {"finished": 12}, 0, 7200.0, 12) == \
        "capsweep: 12/12 trials ended (12 finished), 0 running; 2 h 00 min elapsed"
    assert duration(59.4) == "59 s" and duration(3599) == "59 min 59 s"


def test_status_line_is_drawn_in_place_and_erased():
    import io
    buf = io.StringIO()
    st = Status("capsweep report", stream=buf, enabled=True, tick=3600)
    st("reading sweep 'smoke'")
    st("drawing the figures")
    st.done()
    text = buf.getvalue()
    parts = text.split("\r\x1b[K")
    assert parts[0] == "" and parts[-1] == ""
    assert re.fullmatch(r"capsweep report: reading sweep 'smoke' \.\.\. \d+\.\d s", parts[1])
    assert re.fullmatch(r"capsweep report: drawing the figures \.\.\. \d+\.\d s", parts[2])
    quiet = io.StringIO()
    Status("x", stream=quiet)("step")              # not a terminal: nothing
    assert quiet.getvalue() == ""


def test_report_shows_its_steps_on_a_terminal(smoke, tmp_path):
    """`capsweep report` in a real pseudo-terminal: it says what it does while it works (it used to be
    silent for 6-15 s), then erases that line before its answer."""
    env = env_for_subprocess()
    env.pop("CAPSWEEP_PROGRESS", None)
    out_dir = tmp_path / "r"
    master, slave = pty.openpty()
    proc = subprocess.Popen(capsweep_cmd("report", "smoke", "--tracking-uri", smoke["uri"], "--out", str(out_dir),
                                         "--no-log-artifacts"), cwd=ROOT, env=env, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(300) == 0
    text = b"".join(chunks).decode()
    steps = [s.split(" ... ")[0] for s in text.split("\r\x1b[K") if s.startswith("capsweep report: ")]
    order = list(dict.fromkeys(steps))
    assert order == ["capsweep report: opening the store", "capsweep report: reading sweep 'smoke'",
                     "capsweep report: deciding the verdict (12 trials)", "capsweep report: drawing the figures",
                     "capsweep report: writing the interactive views and the documents"], order
    answer = text.index("escaped: ")
    assert text.rindex("\r\x1b[K") < answer                      # the line is erased before the answer


def test_the_status_line_follows_the_environment_switch(monkeypatch):
    """CAPSWEEP_PROGRESS=1 turns the status line on where stderr is not a terminal, 0 off on one."""
    monkeypatch.setenv("CAPSWEEP_PROGRESS", "1")
    assert Status("capsweep eval").enabled
    monkeypatch.setenv("CAPSWEEP_PROGRESS", "0")
    assert not Status("capsweep eval").enabled


# ---- the page in a real browser ------------------------------------------------------------------
READER = r"""
const vw = document.documentElement.clientWidth;
const box = document.getElementById('config-table').parentElement;
const why = [...box.querySelectorAll('.why-in')];
const inView = () => why.filter(w => w.textContent.trim()).map(w => {const r = w.getBoundingClientRect();
  return [Math.round(r.left), Math.round(r.right)];});
const before = inView();
box.scrollLeft = box.scrollWidth;
const lastTh = [...box.querySelectorAll('tr')[0].children].pop().getBoundingClientRect();
const boxR = box.getBoundingClientRect();
const after = inView();
const tick = document.querySelector('figure.pc text.tick');
return {vw, sw: document.documentElement.scrollWidth, boxScrolls: box.scrollWidth > box.clientWidth + 1,
        boxRight: Math.round(boxR.right), lastThRight: Math.round(lastTh.right), before, after,
        paint: getComputedStyle(tick).paintOrder,
        imgs: [...document.images].map(i => [i.naturalWidth, Math.round(i.getBoundingClientRect().right)]),
        links: document.querySelectorAll("a[href^='http://127.0.0.1:5000/#/experiments/']").length};
"""


@pytest.mark.parametrize("width", [800, 1400])
def test_the_page_reads_at_800_and_1400_px(smoke, tmp_path, width):
    binary, reason = browser_helpers.chromium()
    if reason:
        pytest.skip(reason)
    page = Path(smoke["paths"]["html"])
    got = browser_helpers.measure(binary, page, READER, width)
    print(json.dumps({k: got[k] for k in ("vw", "sw", "boxScrolls", "boxRight", "lastThRight", "paint", "links")}))
    assert got["sw"] <= got["vw"], got                               # the page itself never scrolls sideways
    # every reason and run list under a row lies inside the window, before and after scrolling the table
    for left, right in got["before"] + got["after"]:
        assert 0 <= left and right <= got["vw"], (left, right, got["vw"])
    assert got["lastThRight"] <= got["boxRight"] + 1                 # the last column can be scrolled to
    if width == 800:
        assert got["boxScrolls"]                                     # ... and the table does scroll there
    assert "stroke" in got["paint"]
    assert all(nat > 0 and right <= got["vw"] for nat, right in got["imgs"]), got["imgs"]
    assert got["links"] == len(smoke["data"].trials) + 1             # every run and the parent
    shot = browser_helpers.screenshot(binary, page, tmp_path / f"report-{width}.png", width, 2400)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_link_bases_never_carry_a_user_or_password():
    from analysis.report import report_command, ui_base
    assert ui_base("sqlite:///mlflow.db") is None
    assert ui_base("sqlite:///mlflow.db", "http://alice:S3cret@head:5000/#/experiments/1") == "http://head:5000"
    assert ui_base("https://alice:S3cret@head/") == "https://head"
    from dataclasses import asdict

    from analysis.results import Verdict
    from analysis.verdict import Thresholds
    v = Verdict.from_json({"sweep": "s", "experiment": "capsweep", "tracking_uri": "sqlite:///m.db",
                           "thresholds": {**asdict(Thresholds()), "num_classes_source": "data"}})
    assert "S3cret" not in report_command(v, "out", "http://alice:S3cret@head:5000")
