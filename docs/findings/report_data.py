"""The committed findings reports as tables: one `Report` per folder under docs/findings/.

The source of every number docs/FINDINGS.md states is what `capsweep report` committed, not an MLflow
store: `verdict.json` (per-configuration figures, checks, trends, thresholds, counts), the extra probe
columns only `report.md` carries (the report writes `test acc (transformed)` and `tree recovery`, a
mean over the routed layers, into the table but not into the JSON), and the sweep spec beside them
(`findings-<sweep>.yaml`: data sizes, epochs, the grid). Reading is tolerant: keys a later verdict
format adds ("outcome", "family", "confirm", per-configuration "p_value"/"p_holm") are kept in the
raw dicts and flattened when they are scalars, and keys an older file lacks read as missing, never as
an error, so a re-run committed in the new format still loads and old reports keep rendering.

Standard library, numpy, pandas and PyYAML (a project dependency) only: no torch, no MLflow.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

FINDINGS_DIR = Path(__file__).resolve().parent

# report.md columns the verdict's figures already hold (by slug), so only the extra ones are parsed
_TABLE_COLUMNS_IN_JSON = {"id", "configuration", "verdict", "seeds", "test_acc", "acc_vs_ref", "grad_ratio",
                          "min_act_grad", "starved", "dead", "frozen", "tree_score", "routing_dyn"}
_CELL = re.compile(r"^\s*(?P<mean>[-+]?[\d.]+(?:e[-+]?\d+)?)\s*(?:\[(?P<lo>[^,\]]+),\s*(?P<hi>[^\]]+)\])?"
                   r"\s*(?:\(null (?P<null>[^)]+)\))?\s*$")


@dataclass
class Report:
    """One committed report folder. `configs`: one row per configuration (columns below); `trends`: the
    verdict's rank trends; `raw`: verdict.json as read; `spec`: the sweep spec (or {} when absent)."""
    name: str
    folder: Path
    raw: dict
    configs: pd.DataFrame
    trends: pd.DataFrame
    spec: dict = field(default_factory=dict)

    @property
    def thresholds(self) -> dict:
        return self.raw.get("thresholds") or {}

    @property
    def counts(self) -> dict:
        return self.raw.get("counts") or {}

    def config(self, cid: str) -> dict:
        """The raw verdict.json entry of configuration `cid`."""
        for c in self.raw.get("configurations", []):
            if c.get("id") == cid:
                return c
        raise KeyError(f"{self.name}: no configuration {cid!r}")


def slug(title: str) -> str:
    """'test acc (transformed)' -> 'test_acc_transformed': a report.md column title as a key."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower().replace("δ", "").replace("&delta;", "")).strip("_")


def param_name(full: str) -> str:
    """'model.depth' -> 'depth': the name a selector uses (the last dotted part)."""
    return full.rsplit(".", 1)[-1]


def _num(x) -> float:
    """A JSON number or None as a float (NaN when missing or not a number)."""
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def parse_cell(text: str) -> dict:
    """One report.md cell: '0.589 [0.465, 0.714]' -> {mean, lo, hi} (a bare number: lo = hi = mean;
    'n/a' -> NaN)."""
    m = _CELL.match(text)
    if not m:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(m["mean"])
    lo = float(m["lo"]) if m["lo"] else mean
    hi = float(m["hi"]) if m["hi"] else mean
    return {"mean": mean, "lo": lo, "hi": hi}


def table_columns(report_md: str) -> dict[str, dict[str, dict]]:
    """{config_id: {key: {mean, lo, hi}}} for the Configurations-table columns of report.md that
    verdict.json does not hold (e.g. 'tree recovery', 'test acc (transformed)')."""
    lines = report_md.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("| id |"))
    except StopIteration:
        return {}
    head = [slug(c) for c in lines[start].strip().strip("|").split("|")]
    out: dict[str, dict[str, dict]] = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        row = dict(zip(head, cells))
        out[row["id"]] = {k: parse_cell(v) for k, v in row.items() if k not in _TABLE_COLUMNS_IN_JSON}
    return out


def _config_row(c: dict, extra: dict[str, dict]) -> dict:
    """One configuration as a flat row: identity, params (short and full names, as strings), verdict,
    scalar keys of any format, every figure as `<key>` (mean), `<key>.lo`, `<key>.hi`, `<key>.n`, and
    the report.md extras the same way."""
    row: dict = {k: v for k, v in c.items() if isinstance(v, (str, int, float, bool)) or v is None}
    row["depth"] = int(c["depth"]) if c.get("depth") is not None else None
    for full, v in (c.get("params") or {}).items():
        row[full] = str(v)
        if param_name(full) != "depth":          # depth stays the verdict's int
            row.setdefault(param_name(full), str(v))
    statuses = c.get("statuses") or {}
    row["n_finished"] = int(statuses.get("finished", 0))
    # every trial the configuration ran, whatever its end (n_seeds counts the finished ones only)
    row["n_trials"] = int(sum(statuses.values())) if statuses else int(c.get("n_seeds") or 0)
    figures = {**{k: v for k, v in (c.get("figures") or {}).items() if isinstance(v, dict)},
               **{k: v for k, v in extra.items() if k not in (c.get("figures") or {})}}
    for key, fig in figures.items():
        row[key] = _num(fig.get("mean"))
        for part in ("lo", "hi", "n", "sd"):
            row[f"{key}.{part}"] = _num(fig.get(part))
    for chk in c.get("checks") or []:
        name = str(chk.get("name", "")).replace(" ", "_")
        row[f"check.{name}"] = chk.get("outcome")
        test = chk.get("test") or {}
        for part in ("diff", "lo", "hi", "power", "p_value"):
            if part in test:
                row[f"check.{name}.{part}"] = _num(test.get(part))
    return row


def load_spec(name: str, sweep: Optional[str], root: Path = FINDINGS_DIR) -> dict:
    """The sweep spec the report was made from: root/<name>/spec.yaml (a report keeps its own spec, so
    a spec edited for the next run cannot change what an old report's claims read), else the one
    committed beside it (root/<sweep>.yaml, root/findings-<name>.yaml); {} when there is none."""
    import yaml                       # a project dependency (pyproject), like numpy and pandas
    for cand in [f"{name}/spec.yaml"] + ([f"{sweep}.yaml"] if sweep else []) + [f"findings-{name.replace('_', '-')}.yaml"]:
        path = root / cand
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def load(name: str, root: Path = FINDINGS_DIR) -> Report:
    """Read report folder `root/name` (verdict.json required, report.md optional)."""
    folder = root / name
    raw = json.loads((folder / "verdict.json").read_text())
    md = folder / "report.md"
    extras = table_columns(md.read_text()) if md.is_file() else {}
    rows = [_config_row(c, extras.get(c.get("id"), {})) for c in raw.get("configurations", [])]
    configs = pd.DataFrame(rows)
    trends = pd.DataFrame(raw.get("trends") or [])
    return Report(name, folder, raw, configs, trends, load_spec(name, raw.get("sweep"), root))


def report_names(root: Path = FINDINGS_DIR) -> list[str]:
    """Every folder under docs/findings/ with a verdict.json: a new report folder is picked up as is."""
    return sorted(p.parent.name for p in root.glob("*/verdict.json"))


def geometric(values) -> float:
    """Geometric mean of positive values (NaN when none): how the report averages gradient probes."""
    v = np.asarray([x for x in values if x == x and x > 0], float)
    return float(np.exp(np.log(v).mean())) if len(v) else math.nan
