"""The report's first lines read right for every outcome of the verdict (docs/PROBES.md, "The answer and
the instrument"): yes, no, undecided, inconclusive and "to confirm", in report.md, report.html and
verdict.json. Each sweep is a synthetic trial table (tests/analysis/test_verdict_calibration.py) with accuracies
set by hand where the outcome hinges on them, so every outcome is certain, not drawn."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from analysis.report import render_html, render_markdown, write_report
from analysis.verdict import verdict_json
from analysis.verdict import compute_verdict
from tests.helpers.synthetic import synthetic_sweep

SPREAD = np.array([-0.004, -0.002, 0.0, 0.002, 0.004])      # 5 seeds around a mean, sd 0.0032


def _set_acc(sweep, where: dict, mean: float) -> None:
    """Seeds of the configuration `where` (param -> value) get accuracies mean + SPREAD; their per-image
    correctness is dropped, so the test-set term is binomial over test_n = 10,000 images."""
    t = sweep.trials
    rows = np.ones(len(t), bool)
    for k, v in where.items():
        rows &= t[k].eq(str(v)).to_numpy()
    t.loc[rows, "test_acc"] = mean + SPREAD[: rows.sum()]
    t.loc[rows, "test_correct"] = None


def _sweep(kind: str):
    rng = np.random.default_rng(5)
    capsnet = {"model.arch": "capsnet"}
    if kind == "inconclusive":          # no cnn control: nothing shows the checks let a healthy net pass
        return synthetic_sweep(rng, [("capsnet", 0, "healthy"), ("capsnet", 3, "healthy")], name=kind)
    configs = [("capsnet", 0, "healthy"), ("capsnet", 3, "collapsed" if kind == "no" else "healthy",
                                                    {"model.iterations": 1}),
               ("cnn", 0, "healthy"), ("cnn", 3, "healthy")]
    if kind == "to confirm":
        configs.insert(2, ("capsnet", 3, "collapsed", {"model.iterations": 2}))
    sweep = synthetic_sweep(rng, configs, name=kind.replace(" ", "-"))
    _set_acc(sweep, {"model.arch": "cnn", "model.depth": 0}, 0.92)
    _set_acc(sweep, {"model.arch": "cnn", "model.depth": 3}, 0.93)         # the control passes for sure
    _set_acc(sweep, {**capsnet, "model.depth": 0}, 0.90)
    if kind in ("yes", "undecided"):
        _set_acc(sweep, {**capsnet, "model.depth": 3, "model.iterations": 1}, 0.91)
    if kind == "to confirm":
        # diff -0.001, se = sqrt(2 x 1e-5/5 + binomial 1.8e-5) = 0.0047: p ~ 0.045 < alpha, but Holm
        # over the 2 candidates asks 0.025
        _set_acc(sweep, {**capsnet, "model.depth": 3, "model.iterations": 1}, 0.899)
    if kind == "undecided":             # a seed stopped by the scheduler: neither passes nor fails
        t = sweep.trials
        t.loc[t.index[t["model.depth"].eq("3") & t["model.arch"].eq("capsnet")][0], "status"] = "stopped"
    return sweep


FIRST = {"yes": "Escaped: YES", "no": "Escaped: NO", "undecided": "Escaped: UNDECIDED",
         "inconclusive": "Inconclusive: no healthy control in the sweep",
         "to confirm": "To confirm: 1 candidate(s) worth confirming"}
ANSWER = {"yes": "Yes: 1 of 1 candidate", "no": "No: each of the 1 candidate", "undecided": "Undecided: none of 1",
          "inconclusive": "Inconclusive: the sweep has no healthy cnn control",
          "to confirm": "To confirm: no candidate escapes with the chance of any false 'yes' held at 0.05 over all 2"}


@pytest.mark.parametrize("outcome", list(FIRST))
def test_first_lines_for_every_outcome(outcome, tmp_path):
    data = _sweep(outcome)
    v = compute_verdict(data)
    assert v.outcome == outcome, (v.answer, [c.reasons for c in v.configurations])
    assert v.escaped == (outcome if outcome in ("yes", "no") else "undecided")
    if outcome == "to confirm":        # the whole report once (figures are slow); the others: its text
        paths = write_report(data, v, str(tmp_path))
        md_text, html, head = (open(paths[k]).read() for k in ("markdown", "html", "verdict"))
    else:
        md_text, html, head = render_markdown(v, []), render_html(data, v, [], str(tmp_path)), verdict_json(v)
    md = md_text.splitlines()
    assert md[0] == f"# {FIRST[outcome]}", md[:6]
    assert md[2].startswith(f"**Instrument: {v.instrument}.**")
    answer = next(line for line in md if line.startswith("**Answer.**"))
    assert answer.startswith(f"**Answer.** {ANSWER[outcome]}"), answer
    assert any(line.startswith("**The sweep is a family.**") for line in md[:12])
    assert re.search(r'<div class="answer \w+">' + re.escape(FIRST[outcome].replace("'", "&#x27;")), html)
    assert head.splitlines()[0].startswith(
        json.dumps({"escaped": v.escaped, "instrument": v.instrument, "outcome": outcome})[:-1])
    if outcome in ("to confirm", "inconclusive", "undecided"):
        confirm = next((line for line in md[:14] if line.startswith("**Confirmation.**")), "")
        assert "capsweep confirm" in confirm and f"--top {v.confirm['top']}" in confirm, md[:14]
    if outcome == "to confirm":
        c = next(c for c in v.configurations if c.verdict == "to confirm")
        assert c.p_value <= 0.05 < c.p_holm and "iterations=1" in v.answer
        assert v.confirm["ranked"][0]["id"] == c.id and v.confirm["top"] == 1
        assert v.confirm["ranked"][0]["params"]["model.iterations"] == "1"
