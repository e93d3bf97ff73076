"""The report's search views and its page in a real browser.

First the pure functions of analysis/search_views.py against independent references: the Pareto set
against a brute-force O(n^2) double loop, importances on tables where one param alone determines the
objective. Then a real MLflow store (sqlite in tmp) holding an Optuna-shaped sweep in the runner's
layout (parent params sweep.search/metric/mode, candidates, references and cnn controls, one failed
trial, the optional probes tree_recovery/l{l} and test_acc_transformed), its report written by
write_report and rendered by headless Chromium at 1400 px: nothing wider than the window, every image
decoded, every chart drawn, table rows of sane height, the colour switch and the axis brush working.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Param

from analysis.interactive import colour, scale_of
from analysis.load import load_sweep
from analysis.report import run_url, write_report
from analysis.search_views import config_means, objectives_of, param_importances, pareto_mask
from analysis.verdict import compute_verdict
from tests.helpers import browser as browser_helpers
from tests.helpers.probe_metrics import BASE, capsnet_metrics, cnn_metrics
from tests.helpers.runs import log_trial, start_sweep

WIDTH = 1400


# ---------------------------------------------------------------------------------------------------
# Pure functions

def _brute_pareto(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Row i is on the front unless some row j is >= on every objective and > on one (after flipping the
    minimised ones); rows with a NaN are off the front and dominate nothing."""
    n, k = values.shape
    sign = [1.0 if m else -1.0 for m in maximize]
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        if any(v != v for v in values[i]):
            continue
        dominated = False
        for j in range(n):
            if j == i or any(v != v for v in values[j]):
                continue
            ge = all(sign[d] * values[j, d] >= sign[d] * values[i, d] for d in range(k))
            gt = any(sign[d] * values[j, d] > sign[d] * values[i, d] for d in range(k))
            dominated |= ge and gt
        out[i] = not dominated
    return out


@pytest.mark.parametrize("seed,n,k", [(0, 300, 2), (1, 300, 3), (2, 50, 4), (3, 600, 3)])
def test_pareto_set_matches_the_brute_force_double_loop(seed, n, k):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 12, size=(n, k)).astype(float)   # small integers: many ties and duplicates
    values[rng.random((n, k)) < 0.03] = np.nan
    maximize = [bool(b) for b in rng.integers(0, 2, size=k)]
    got, want = pareto_mask(values, maximize), _brute_pareto(values, maximize)
    print(f"seed {seed}: n={n} k={k} front {int(want.sum())} rows")
    assert want.any() and (got == want).all()


def test_pareto_by_hand():
    # maximise accuracy, minimise starved: (0.9, 0.5) and (0.8, 0.1) trade off; (0.8, 0.3) is dominated
    # by (0.8, 0.1); the duplicate (0.8, 0.1) stays (equal rows do not dominate); NaN is off
    v = np.array([[0.9, 0.5], [0.8, 0.1], [0.8, 0.3], [0.8, 0.1], [np.nan, 0.0], [0.7, 0.6]])
    assert pareto_mask(v, [True, False]).tolist() == [True, True, False, True, False, False]
    assert pareto_mask(v, [False, True]).tolist() == [False, False, False, False, False, True]


def _synthetic(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"train.lr": [f"{x:.6g}" for x in 10 ** rng.uniform(-4, -2, n)],
                         "model.routing": rng.choice(["dynamic", "em", "uniform"], n),
                         "model.bias": rng.choice(["True", "False"], n),
                         "model.caps_dim": rng.choice(["4", "8", "16"], n),
                         "model.preset": ["small"] * n})


def test_importances_go_to_the_one_param_that_determines_the_objective():
    t = _synthetic(48, 0)
    t["cat"] = t["model.routing"].map({"dynamic": 0.9, "em": 0.2, "uniform": 0.5})     # routing alone
    t["num"] = np.log10(t["train.lr"].astype(float)) ** 2                             # lr alone
    params = ["train.lr", "model.routing", "model.bias", "model.caps_dim", "model.preset"]
    for objective, owner in (("cat", "model.routing"), ("num", "train.lr")):
        for mode in ("max", "min"):
            imp = param_importances(t, params, objective, mode)
            print(objective, mode, {k: round(v, 4) for k, v in imp.items()})
            assert "model.preset" not in imp             # a single value: nothing to attribute
            assert next(iter(imp)) == owner and imp[owner] > 0.9
            assert sum(imp.values()) == pytest.approx(1.0)
    assert param_importances(t.head(2), params, "cat") is None


def test_config_means_and_objectives_of():
    trials = pd.DataFrame({"config_id": ["c1", "c0", "c1", "c0"], "model.depth": ["2", "1", "2", "1"],
                           "val_acc": [0.5, 0.9, 0.7, np.nan]})
    t = config_means(trials, "config_id", ["model.depth"], ["val_acc"])
    assert t["config_id"].tolist() == ["c0", "c1"] and t["val_acc"].tolist() == [0.9, pytest.approx(0.6)]
    assert t["n"].tolist() == [2, 2] and t["model.depth"].tolist() == ["1", "2"]
    assert objectives_of({"sweep.metric": "val_acc,grad_ratio", "sweep.mode": "max,min"}) == [
        ("val_acc", "max"), ("grad_ratio", "min")]
    assert objectives_of({"sweep.metric": "val_acc,grad_ratio", "sweep.mode": "max"}) == []


def test_scales_colours_and_run_urls():
    s = scale_of(pd.Series(["0.0001", "0.001", "0.01", None]))
    assert s.kind == "log" and s.pos("0.001") == pytest.approx(0.5) and s.pos(None) is None
    assert [t for _, t in s.ticks] == ["1e-4", "1e-3", "1e-2"]
    c = scale_of(pd.Series(["em", "dynamic", "uniform"]))
    assert c.kind == "categorical" and [c.pos(v) for v in ("dynamic", "em", "uniform")] == [0, 0.5, 1]
    assert colour(0) == "#d73027" and colour(1) == "#4575b4" and colour(None) == "#bbbbbb"
    assert run_url("http://head:5000/", "7", "abc") == "http://head:5000/#/experiments/7/runs/abc"
    assert run_url("sqlite:///mlflow.db", "7", "abc") is None


# ---------------------------------------------------------------------------------------------------
# A real store with an Optuna-shaped sweep

OBJECTIVES = "val_acc,grad_ratio,starved_frac_max"
MODES = "max,max,min"
N_CANDIDATES = 14


@pytest.fixture(scope="module")
def hunt(tmp_path_factory):
    """An Optuna-shaped sweep: 14 sampled candidate configurations x 2 seeds (depth, routing, lr, init; few
    levels, so the static figures stay few panels and the test fast), 2 depth-0 references, cnn controls at depth 0 and 2, one failed trial; every candidate also
    logs tree_recovery/l{l} and test_acc_transformed."""
    root = tmp_path_factory.mktemp("hunt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("capsweep", artifact_location=str(root / "artifacts"))
    parent = start_sweep(c, exp, "hunt-mini")
    c.log_batch(parent, params=[Param(k, v) for k, v in {
        "sweep.search": "optuna", "sweep.sampler": "nsga2", "sweep.metric": OBJECTIVES, "sweep.mode": MODES,
        "sweep.num_samples": str(N_CANDIDATES), "sweep.seeds": "0,1"}.items()])
    c.set_tag(parent, "capsweep.git_commit", "0123abcdef")
    rng = np.random.default_rng(0)
    n = iter(range(1000))
    recovery = {}
    for i in range(N_CANDIDATES):
        depth = int(rng.integers(1, 5))
        p = {**BASE, "model.depth": depth, "model.routing": str(rng.choice(["dynamic", "em", "uniform"])),
             "train.lr": str(rng.choice(["0.001", "0.01"])), "model.bias": "False",
             "model.init": str(rng.choice(["std", "data"])), "trial.role": "candidate"}
        healthy = p["model.init"] == "data"
        for s in range(2):
            acc = float(np.clip(0.93 - 0.04 * depth * (not healthy) + 0.005 * rng.standard_normal(), 0, 1))
            m = capsnet_metrics(depth, grad_ratio=0.6 if healthy else 10 ** (-depth), seed=s, test_acc=acc,
                                dead_hidden=0.05 if healthy else 0.6, starved=0.02 if healthy else 0.7 + 0.05 * s)
            m["test_acc_transformed"] = acc - 0.2
            for l in range(1, depth + 2):
                m[f"tree_recovery/l{l}"] = 0.1 * l + 0.01 * s
            recovery.setdefault(i, []).append(np.mean([0.1 * l + 0.01 * s for l in range(1, depth + 2)]))
            log_trial(c, exp, parent, "hunt-mini", f"t{next(n):03d}", {**p, "train.seed": s}, m)
    for s in range(2):
        log_trial(c, exp, parent, "hunt-mini", f"t{next(n):03d}",
                  {**BASE, "model.depth": 0, "model.routing": "dynamic", "train.lr": "0.001", "model.bias": "False",
                   "model.init": "std", "trial.role": "reference", "train.seed": s},
                  capsnet_metrics(0, grad_ratio=1, dead_hidden=0, test_acc=0.92 + 0.005 * s, seed=s))
        for depth in (0, 2):
            log_trial(c, exp, parent, "hunt-mini", f"t{next(n):03d}",
                      {**BASE, "model.arch": "cnn", "model.depth": depth, "model.routing": "dynamic", "train.lr": "0.001",
                       "model.bias": "False", "model.init": "std", "trial.role": "control", "train.seed": s},
                      cnn_metrics(depth, 0.95 + 0.002 * s, s))
    log_trial(c, exp, parent, "hunt-mini", f"t{next(n):03d}",
              {**BASE, "model.depth": 3, "model.routing": "em", "train.lr": "0.01", "model.bias": "False",
               "model.init": "std", "trial.role": "candidate", "train.seed": 0}, {}, status="failed",
              error="RuntimeError: " + "a very long error message without spaces " * 3 + "x" * 300)
    c.set_terminated(parent, "FINISHED")
    data = load_sweep("capsweep", uri, "hunt-mini", progress=False)
    verdict = compute_verdict(data)
    out = root / "report"
    paths = write_report(data, verdict, str(out))
    return {"data": data, "verdict": verdict, "paths": paths, "out": out, "recovery": recovery}


def test_report_of_an_optuna_sweep_has_front_importances_links_and_provenance(hunt):
    text = Path(hunt["paths"]["html"]).read_text()
    md = Path(hunt["paths"]["markdown"]).read_text()
    data, v = hunt["data"], hunt["verdict"]
    # the Pareto table lists exactly the brute-force front of the candidate configurations' seed means
    raw = data.trials[(data.trials["status"] == "finished") & (data.trials["trial.role"] == "candidate")]
    cfg_of = {r: c.id for c in v.configurations for r in c.run_ids}
    means = raw.assign(cid=raw["run_id"].map(cfg_of)).groupby("cid")[OBJECTIVES.split(",")].mean()
    front = means.index[_brute_pareto(means.to_numpy(), [True, True, False])].tolist()
    section = text[text.index("id='search'"):text.index("id='figures'")]
    listed = re.findall(r"<tr><td>(c\d+)</td>", section)
    assert sorted(listed) == sorted(front) and 0 < len(front) < len(means)
    assert section.count("class='pt'") == 3 * len(means)           # 3 objectives: 3 pairs of panels
    assert section.count("aria-label='importance for ") == 3
    assert f"Pareto front: {len(front)} of {len(means)} candidate configurations" in md
    # the optional probes get their columns, next to the ones they extend
    header = re.search(r"<tr><th>id</th>.*?</tr>", text).group(0)
    titles = re.findall(r"<th>(.*?)</th>", header)
    assert titles[titles.index("test acc") + 1] == "test acc (transformed)"
    assert titles[titles.index("tree score") + 1] == "tree recovery"
    # ... with the mean over seeds of the per-trial mean over routed layers, derived here by hand
    i0 = min(hunt["recovery"])
    first_run = data.trials[data.trials["trial_id"] == "t000"]["run_id"].iloc[0]
    cid = cfg_of[first_run]
    row = re.search(rf"<tr class='main'><td>{cid}</td>.*?</tr>", text).group(0)
    assert f"{np.mean(hunt['recovery'][i0]):.3g}" in re.findall(r"<span class='m'>(.*?)</span>", row)
    # every configuration lists its runs (a sqlite store: ids, with the capsweep ui hint)
    assert "capsweep ui --tracking-uri" in text
    for c in v.configurations:
        for r in c.run_ids:
            assert f"<code>{r}</code>" in text
    # reproducibility: the parent's commit, versions, the command
    repro = text[text.index("id='reproducibility'"):]
    assert "0123abcdef" in repro and "optuna " in repro and "mlflow " in repro and "torch " in repro
    assert "capsweep report hunt-mini --experiment capsweep --tracking-uri" in repro
    assert "sweep.metric=val_acc,grad_ratio,starved_frac_max" in repro
    assert "## Reproducibility" in md and "0123abcdef" in md
    low = text.lower()
    assert "http://" not in low and "https://" not in low and "<script src" not in low


MEASURE = r"""
const vw = document.documentElement.clientWidth;
const cls = e => e.tagName.toLowerCase() + '.' + (e.getAttribute('class') || '');
const wide = [...document.querySelectorAll('body *')].filter(e => {
  const r = e.getBoundingClientRect(); return r.width > 0 && (r.right > vw + 0.5 || r.left < -0.5 || r.width > vw);
}).map(e => cls(e) + ' ' + Math.round(e.getBoundingClientRect().width));
const t = document.getElementById('config-table');
const rows = [...t.querySelectorAll('tr')].map(r => [r.getAttribute('class') || 'head', Math.round(r.getBoundingClientRect().height)]);
const charts = [...document.querySelectorAll('figure.chart svg')].map(s => {const r = s.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)];});
const lines = [...document.querySelectorAll('figure.pc .pl')];
const sel = document.querySelector('figure.pc select');
sel.value = '1'; sel.dispatchEvent(new Event('change'));
const switched = lines.every(l => l.getAttribute('stroke') === l.dataset.c.split('|')[1]);
const legend = [...document.querySelectorAll('figure.pc g.legend')].map(g => g.style.display !== 'none');
const svg = document.querySelector('figure.pc svg');
const axes = [...svg.querySelectorAll('text[font-weight="600"] title')].map(t => t.textContent);
const brush = svg.querySelectorAll('rect.brush')[axes.indexOf('test_acc')], b = brush.getBoundingClientRect();
const ev = (type, target, y) => target.dispatchEvent(new MouseEvent(type, {clientX: b.left + b.width / 2, clientY: y, bubbles: true}));
ev('mousedown', brush, b.top + 1); ev('mousemove', svg, b.top + b.height / 2); ev('mouseup', svg, b.top + b.height / 2);
const offAfterBrush = svg.querySelectorAll('.pl.off').length;
ev('mousedown', brush, b.top + 5); ev('mouseup', svg, b.top + 5);
const offAfterClear = svg.querySelectorAll('.pl.off').length;
const resources = performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:'));
return {vw, iw: window.innerWidth, sw: document.documentElement.scrollWidth, wide: wide.slice(0, 10), nwide: wide.length,
        imgs: [...document.images].map(i => [i.naturalWidth, Math.round(i.getBoundingClientRect().width)]),
        rows, charts, nlines: lines.length, switched, legend, offAfterBrush, offAfterClear, resources,
        height: document.documentElement.scrollHeight};
"""


@pytest.fixture(scope="module")
def browser():
    binary, reason = browser_helpers.chromium()
    if reason:
        pytest.skip(reason)
    return binary


def test_report_fits_1400px_and_every_figure_and_chart_shows(hunt, browser, tmp_path):
    page = Path(hunt["paths"]["html"])
    got = browser_helpers.measure(browser, page, MEASURE, WIDTH)
    print(json.dumps({k: got[k] for k in ("vw", "iw", "sw", "nwide", "height", "nlines", "offAfterBrush")}))
    print("row heights:", got["rows"])
    assert got["iw"] == WIDTH and got["sw"] <= got["vw"] <= WIDTH, got
    assert got["nwide"] == 0, got["wide"]
    pngs = sorted(p for p in hunt["out"].iterdir() if p.suffix == ".png")
    assert len(got["imgs"]) == len(pngs) >= 4
    assert all(nat > 0 and 0 < shown <= got["vw"] for nat, shown in got["imgs"]), got["imgs"]
    # parallel coordinates + 3 Pareto panels + 3 importance bars, each drawn with a real size
    assert len(got["charts"]) == 7 and all(w > 200 and h > 100 for w, h in got["charts"]), got["charts"]
    finished = int((hunt["data"].trials["status"] == "finished").sum())
    assert got["nlines"] == finished
    assert got["switched"] and got["legend"] == [False, True, False]
    assert 0 < got["offAfterBrush"] < finished and got["offAfterClear"] == 0
    assert got["resources"] == []                      # nothing fetched: the page is self-contained
    # one configuration row is a few lines tall; its reasons under it, folded beyond the failed checks
    heights = {k: max(h for c, h in got["rows"] if c == k) for k in {c for c, _ in got["rows"]}}
    assert heights["main"] <= 120 and heights["head"] <= 80 and heights["why"] <= 400, heights
    shot = browser_helpers.screenshot(browser, page, tmp_path / "report.png", WIDTH, 2400)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_link_to_the_ui_of_a_tracking_server(hunt):
    """On an http(s) store each configuration's runs are links to the MLflow UI's run pages."""
    from dataclasses import replace

    from analysis.report import _runs_html
    data = replace(hunt["data"], tracking_uri="http://head:5000/")
    cfg = next(c for c in hunt["verdict"].configurations if len(c.run_ids) == 2)
    got = _runs_html(data, cfg.run_ids)
    seeds = data.trials.set_index("run_id").loc[cfg.run_ids, "seed"].tolist()
    want = [f"<a href='http://head:5000/#/experiments/{data.experiment_id}/runs/{r}'>seed {s}</a>"
            for r, s in zip(cfg.run_ids, seeds)]
    assert got == "<span class='runs'>MLflow runs: " + ", ".join(want) + "</span>"
