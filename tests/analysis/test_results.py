"""The verdict's typed results (analysis/results.py) against the verdict.json files committed under
docs/findings/: each reads back into a Verdict and writes the same JSON object again, an older file
(before `outcome`, `family` and `p_value` existed) included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.results import ConfigResult, Verdict
from analysis.verdict import verdict_json

FINDINGS = Path(__file__).resolve().parents[2] / "docs" / "findings"
FILES = sorted(FINDINGS.glob("*/verdict.json"))


@pytest.mark.parametrize("path", FILES, ids=[p.parent.name for p in FILES])
def test_every_committed_verdict_reads_back_and_writes_the_same(path):
    raw = json.loads(path.read_text())
    v = Verdict.from_json(raw)
    assert len(v.configurations) == len(raw["configurations"])
    assert all(isinstance(c, ConfigResult) for c in v.configurations)
    if "outcome" in raw:                            # written by this capsweep: the same text, byte for byte
        assert verdict_json(v) == path.read_text()
    else:                                           # an older file: its fields kept, the new ones neutral
        back = v.to_json()
        assert {k: back[k] for k in raw if k != "configurations"} == {k: raw[k] for k in raw if k != "configurations"}
        assert v.outcome == raw["escaped"] and v.family is None
        assert [c.to_json() for c in v.configurations] == [{**c, "p_value": None} for c in raw["configurations"]]


def test_a_configuration_reads_its_checks_by_name_and_keeps_json_order():
    c = ConfigResult(id="c01", label="depth=2", role="candidate", arch="capsnet", depth=2, trial_role=["candidate"],
                     params={"model.depth": 2}, verdict="escaped", outcome="pass", escaped=True,
                     checks=[{"name": "seeds", "outcome": "pass"}, {"name": "accuracy", "outcome": "pass"}])
    assert c.check("accuracy") == {"name": "accuracy", "outcome": "pass"} and c.check("dead") is None
    assert list(c.to_json())[:10] == ["id", "label", "role", "arch", "depth", "trial_role", "params", "verdict",
                                      "outcome", "escaped"]
    assert "selected" not in c.to_json() and "p_holm" not in c.to_json()     # only when they say something
    c.selected, c.p_holm = False, 0.2
    assert c.to_json()["selected"] is False and list(c.to_json())[-1] == "p_holm"
    assert ConfigResult.from_json(c.to_json()) == c
