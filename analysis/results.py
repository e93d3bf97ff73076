"""The verdict's typed results: one `ConfigResult` per configuration, and the `Verdict` that holds them
with the sweep's answer.

Why typed: `compute_verdict` used to return one nested dict that the report, the plots and `capsweep
status` read by string keys, so a renamed or missing key surfaced as a KeyError in one branch of the
HTML. They now read attributes, checked where the object is made. verdict.json is `Verdict.to_json()`
(its keys in the order they have always had: the committed findings' files are byte-identical), and a
logged verdict.json reads back with `Verdict.from_json`, lenient to older files that lack newer fields.

A check stays a record (`{"name", "outcome", "text", "p_value", ...detail}`): its detail fields differ per
check and are shown as they are (docs/PROBES.md lists them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ConfigResult:
    """One configuration of the sweep (its seeds pooled): what it is, its verdict and why, its figures."""
    id: str                          # c00, c01, ...: stable within one report
    label: str                       # the swept params that name it, short
    role: str                        # candidate | reference | control
    arch: Optional[str]
    depth: Optional[int]
    trial_role: list                 # the trial.role params its trials carry
    params: dict                     # swept param -> value
    verdict: str                     # the words the report shows: escaped, not escaped, to confirm, ...
    outcome: Optional[str]           # pass | fail | inconclusive (None: a reference, or not selected)
    escaped: bool                    # a candidate that escapes family-wise, under a validated instrument
    checks: list = field(default_factory=list)      # check records, in the order they were made
    reasons: list = field(default_factory=list)     # why it is not escaped (the checks that did not pass, ...)
    reference: Optional[dict] = None                # the matched depth-0 reference it was compared with
    p_value: Optional[float] = None                 # intersection-union p-value: the largest of its checks'
    selected: bool = True            # False: tuned on validation and not chosen (`select`), not judged
    n_seeds: int = 0                 # finished seeds
    seeds: list = field(default_factory=list)
    statuses: dict = field(default_factory=dict)    # status -> trials
    figures: dict = field(default_factory=dict)     # probe -> {mean, lo, hi, n, ...} over finished seeds
    run_ids: list = field(default_factory=list)
    p_holm: Optional[float] = None   # Holm-adjusted over the sweep's candidates (candidates only)

    def check(self, name: str) -> Optional[dict]:
        """The check called `name`, or None."""
        return next((c for c in self.checks if c.get("name") == name), None)

    def to_json(self) -> dict:
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "id", "label", "role", "arch", "depth", "trial_role", "params", "verdict", "outcome", "escaped",
            "checks", "reasons", "reference", "p_value")}
        if not self.selected:
            out["selected"] = False
        out.update({k: getattr(self, k) for k in ("n_seeds", "seeds", "statuses", "figures", "run_ids")})
        if self.p_holm is not None:
            out["p_holm"] = self.p_holm
        return out

    @classmethod
    def from_json(cls, d: dict) -> "ConfigResult":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {"id": "", "label": "", "role": "candidate", "arch": None, "depth": None, "trial_role": [],
                    "params": {}, "verdict": "", "outcome": None, "escaped": False}
        return cls(**{**required, **{k: v for k, v in d.items() if k in names}})


@dataclass
class Verdict:
    """The sweep's answer and the results it rests on (docs/PROBES.md, "The verdict")."""
    escaped: str                     # yes | no | undecided
    instrument: str                  # validated | control failed | control undecided | no control
    outcome: str                     # yes | no | undecided | inconclusive | to confirm
    answer: str                      # the sentence the report starts with
    instrument_text: str
    test: str                        # the test, its margin and level, in words
    family: Optional[dict]           # the family-wise step: method, alpha, candidates, text
    experiment: str
    sweep: str
    tracking_uri: str
    parent_run_id: Optional[str]
    reference_source: str            # "this sweep" or "sweep NAME"
    thresholds: dict
    rules: list
    counts: dict                     # trials, configurations, candidates, controls, then per status
    swept_params: list
    selected_on_validation: list
    escapes: list                    # [{id, label}] of the escaped candidates
    confirm: dict                    # the confirmation plan (`capsweep confirm`)
    confirmed_by: list               # the sweeps that confirm this one
    configurations: list[ConfigResult]
    failed_trials: list
    trends: list
    notes: list

    @property
    def candidates(self) -> list[ConfigResult]:
        return [c for c in self.configurations if c.role == "candidate" and c.selected]

    def to_json(self) -> dict:
        """verdict.json's object (analysis.verdict.verdict_json writes it as text)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["configurations"] = [c.to_json() for c in self.configurations]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Verdict":
        """A logged verdict.json; fields an older capsweep did not write take neutral values."""
        defaults = {f.name: None for f in dataclasses.fields(cls)}
        defaults.update(outcome=d.get("escaped", "undecided"), answer="", instrument_text="", test="",
                        experiment="", sweep="", tracking_uri="", reference_source="", thresholds={}, rules=[],
                        counts={}, swept_params=[], selected_on_validation=[], escapes=[], confirm={},
                        confirmed_by=[], failed_trials=[], trends=[], notes=[])
        raw = {**defaults, **{k: v for k, v in d.items() if k in defaults}}
        raw["configurations"] = [ConfigResult.from_json(c) for c in d.get("configurations") or []]
        return cls(**raw)
