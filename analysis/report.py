"""Write the report of one sweep: verdict.json, the PNG figures, report.md (links to the PNGs) and
report.html (one self-contained file: PNGs as base64 data URIs, inline CSS, no external reference, so
it can be mailed or opened from the MLflow UI's artifact view); then log them on the sweep's parent run
under `report/`.

Order of both documents: the answer, the instrument (controls), the test with its margin and level (the
first lines); notes; the configurations table (candidates, then controls, then references; each
candidate's and control's checks under its row, the full list folded in a <details>); the thresholds
and rules; failed/diverged trials; the interactive views (parallel coordinates of the trials coloured by
the key probes; for an Optuna sweep its Pareto front and parameter importances: inline SVG, no library,
analysis/interactive.py and analysis/search_views.py); the figures (and the ones skipped, with why); the
trends table (raw and Holm-adjusted p); the reproducibility block (commits, versions, the sweep's spec and
settings, the command that rebuilds the report). Each configuration lists its MLflow runs (links to the
UI's run pages on a tracking server, else their ids). The definitions live in docs/PROBES.md.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from analysis import interactive, plots, search_views
from capsmodels.contract import redact
from analysis.results import ConfigResult, Verdict
from analysis.staging import staged_dir
from analysis.stats import t_interval
from analysis.verdict import Thresholds, annotate, short_names, verdict_json
from capsmodels.contract import (CANDIDATE, CONTROL, FINISHED, REFERENCE, ROLE_KEY, TAG_COMMIT, TAG_VERSION_PREFIX,
                                 SWEEP_PARAM_PREFIX, VERSION_PACKAGES, SweepParams, installed_versions,
                                 parse_layer_metric)

# (figure key, column title, check whose outcome colours the cell, null figure)
COLUMNS = [
    ("test_acc", "test acc", "chance", None),
    ("_acc_diff", "&Delta; acc vs ref", "accuracy", None),
    ("grad_ratio", "grad ratio", "grad_ratio", None),
    ("act_grad_min", "min act_grad", "gradient floor", None),
    ("starved_worst", "starved", "starved", None),
    ("dead_worst", "dead", "dead", None),
    ("frozen_worst", "frozen", "frozen", None),
    ("tree_score", "tree score", None, "tree_score_null"),
    ("routing_dynamics", "routing dyn.", None, "routing_dynamics_null"),
]
THRESHOLD_TEXT = [
    ("alpha", "level of every one-sided test and bound"),
    ("acc_margin", "non-inferiority margin of test accuracy against the depth-0 reference (absolute)"),
    ("grad_margin", "non-inferiority margin of log10 min act_grad against the reference (decades)"),
    ("grad_ratio_min", "grad_ratio (act_grad/l1 / act_grad/l{L}) shown at least"),
    ("grad_ratio_max", "... and shown at most (a collapsed class layer is far above)"),
    ("starved_frac_max", "worst hidden layer starved_frac shown at most"),
    ("dead_frac_max", "worst hidden layer dead_frac shown at most"),
    ("frozen_frac_max", "worst hidden layer frozen_frac shown at most"),
    ("chance_margin", "accuracy must exceed chance (1/num_classes) by"),
    ("num_classes", "number of classes"),
    ("chance_accuracy_floor", "so test accuracy shown at least"),
    ("dead_tau", "a capsule is dead when its largest activation is below tau ="),
]
_ROLE_ORDER = {CANDIDATE: 0, CONTROL: 1, REFERENCE: 2}
_VERDICT_ORDER = {"escaped": 0, "passes": 0, "to confirm": 0.5, "undecided": 1, "not escaped": 2, "fails": 2}
_OUTCOME_CLASS = {"pass": "ok", "fail": "bad", "inconclusive": "unk"}
_ANSWER_CLASS = {"yes": "yes", "no": "no", "undecided": "und", "inconclusive": "und", "to confirm": "und"}
_INSTRUMENT_CLASS = {"validated": "yes", "control failed": "no"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.4em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.answer{font-size:2.1em;font-weight:700;padding:.3em .6em;border-radius:8px;margin:.3em 0}
.instrument{font-size:1.1em;font-weight:600;padding:.4em .8em;border-radius:6px;margin:.3em 0}
.yes{background:#e3f6e5;color:#11632a} .no{background:#fbe5e5;color:#8a1c1c} .und{background:#fff3cd;color:#6b5000}
.test{margin:.4em 0 .8em 0}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0;width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.ok{background:#e8f6ea} td.bad{background:#fbe0e0} td.unk{background:#fff6d6}
td.v{font-weight:700} .ci{font-size:.85em;color:#555} .m{white-space:nowrap} td.v.ok{color:#11632a} td.v.bad{color:#8a1c1c} td.v.unk{color:#6b5000}
tr.reference td{color:#445} tr.why td{border-top:none;background:#fafafa;font-size:.95em;color:#333}
tr.main td{border-bottom:none}
details summary{cursor:pointer;color:#345} ul.checks{margin:.2em 0 .2em 1.2em;padding:0}
.note{background:#fff7da;border-left:4px solid #e0b400;padding:.4em .8em;margin:.3em 0}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555} .sig{font-weight:700} .muted{color:#777}
td.err{overflow-wrap:anywhere;word-break:break-word;min-width:12em} .small{font-size:.85em} .runs{display:block;font-size:.85em;color:#555;margin-top:.2em;overflow-wrap:anywhere}
tr.refruns td{border-top:none;font-size:.95em} table.repro th{width:16em} table.repro code{white-space:pre-wrap;
overflow-wrap:anywhere} .nav a{color:#345}
.wide{overflow-x:auto;margin:.5em 0} .wide>table{margin:0}
.why-in{position:sticky;left:.3em;max-width:min(100%,calc(100vw - 7em))}
.narrow{display:none} @media (max-width:1000px){.narrow{display:block}}
@media (max-width:900px){body{padding:0 .6em} table{font-size:.75em}}
"""


def _t(s) -> str:
    """Escape text for HTML; '://' is written as an entity so no URL-looking text appears raw."""
    return html.escape("" if s is None else str(s)).replace("://", "&#58;//")


def _tc(s) -> str:
    """`_t`, with `backticked` commands (the answer's `capsweep confirm ...`) set as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _t(s))


def _n(x, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}g}" if signed else f"{x:.{digits}g}"


def _interval(fig: Optional[dict], signed: bool = False) -> tuple[str, str]:
    """('mean', '[lo, hi]'); one seed or equal seeds: no interval; absent: ('n/a', '')."""
    if fig is None or fig.get("mean") is None:
        return "n/a", ""
    m = _n(fig["mean"], signed=signed)
    if fig.get("lo") is None or fig.get("hi") is None or fig["lo"] == fig["hi"]:
        return m, ""
    return m, f"[{_n(fig['lo'], signed=signed)}, {_n(fig['hi'], signed=signed)}]"


def _cell(cfg: ConfigResult, key: str, null: Optional[str]) -> tuple[str, str, str]:
    """One table cell as (value, interval, null): the figure's mean, its bounds and, for a routing
    statistic, 'null x' (its null's mean); or the accuracy difference with its Welch bounds."""
    if key == "_acc_diff":
        test = (_check_of(cfg, "accuracy") or {}).get("test")
        if not test or test.get("diff") is None:
            return "n/a", "", ""
        return (*_interval({"mean": test["diff"], "lo": test["lo"], "hi": test["hi"]}, signed=True), "")
    value, ci = _interval(cfg.figures[key])
    null_mean = cfg.figures[null]["mean"] if null else None
    return value, ci, f"null {_n(null_mean)}" if null and (value != "n/a" or null_mean is not None) else ""


def _check_of(cfg: ConfigResult, name: Optional[str]) -> Optional[dict]:
    return cfg.check(name) if name else None


def _sorted_configs(verdict: Verdict) -> list[ConfigResult]:
    return sorted(verdict.configurations,
                  key=lambda c: (_ROLE_ORDER.get(c.role, 3), _VERDICT_ORDER.get(c.verdict, 3),
                                 c.depth if c.depth is not None else -1, c.id))


def _why(cfg: ConfigResult) -> str:
    """'fails: accuracy, dead; undecided: frozen' (empty when every check passes)."""
    parts = []
    for outcome, word in (("fail", "fails"), ("inconclusive", "undecided")):
        names = [c["name"] for c in cfg.checks if c["outcome"] == outcome]
        if names:
            parts.append(f"{word}: {', '.join(names)}")
    return "; ".join(parts)


def _headline(verdict: Verdict) -> tuple[str, str]:
    """The report's first line and second line. The first says the answer in the words of
    docs/PROBES.md ("The answer"): Escaped: YES / NO / UNDECIDED, or why there is none yet
    (Inconclusive: the control ...; To confirm: ...). A verdict.json from before `outcome` existed
    reads as its `escaped`."""
    outcome = verdict.outcome
    if outcome == "inconclusive":
        inst = verdict.instrument
        why = ("no healthy control in the sweep" if inst == "no control" else
               "the healthy control fails the same checks" if inst == "control failed" else
               "the healthy control does not pass the same checks yet")
        first = f"Inconclusive: {why}"
    elif outcome == "to confirm":
        n = (verdict.confirm or {}).get("top") or 0
        first = f"To confirm: {n} candidate(s) worth confirming"
    else:
        first = "Escaped: " + {"yes": "YES", "no": "NO", "undecided": "UNDECIDED"}[verdict.escaped]
    return first, f"Instrument: {verdict.instrument}"


def _link_text(verdict: Verdict) -> str:
    """The exploration/confirmation link both reports show (`capsweep confirm`), or ''."""
    conf = verdict.confirm or {}
    parts = []
    if conf.get("confirms"):
        parts.append(f"This sweep confirms the exploration {conf['confirms']!r} on fresh seeds; its "
                     f"verdict, error-controlled over its {verdict.counts['candidates']} candidate(s), is "
                     "the answer")
    if verdict.confirmed_by:
        parts.append("Confirmed by: " + ", ".join(verdict.confirmed_by) + " (its report gives the answer)")
    elif conf.get("command") and verdict.outcome in ("to confirm", "inconclusive", "undecided"):
        parts.append(f"Next: `{conf['command']}` re-runs the {conf['top']} most promising candidate(s) on "
                     f"{conf['seeds']} fresh seeds beside fresh references and controls")
    return ". ".join(parts)


def write_report(data, verdict: Verdict, out_dir: str, annotated: Optional[tuple] = None,
                 ui_url: Optional[str] = None, progress=None) -> dict[str, str]:
    """Write verdict.json, the figures, report.md and report.html into out_dir; return their paths.
    annotated: `annotate(data)` when the caller has it already (it computed the verdict from it).
    ui_url: the MLflow UI's address (`capsweep report --ui-url`); with it, or on a store that is an http(s)
    tracking server, MLflow run ids are links to their pages. progress: called with a few words before
    each step that takes time (the CLI prints them)."""
    say = progress or (lambda what: None)
    with staged_dir(out_dir) as stage:       # out_dir takes the new files at once (analysis/staging.py)
        trials, _, swept = annotated or annotate(data)
        say("drawing the figures")
        figures = plots.make_plots(trials, data.histories, verdict, stage, swept)
        say("writing the interactive views and the documents")
        parent = parent_run_record(data)
        views = {"extra": extra_figures(trials, verdict.thresholds["alpha"]),
                 "explore": explore_html(trials, swept, {c.id: c.label for c in verdict.configurations}),
                 "search": search_view(data, trials, swept,
                                       {c.id: c.label for c in verdict.configurations}, parent),
                 "repro": reproducibility(data, verdict, parent, out_dir, ui_url),
                 "ui": ui_base(data.tracking_uri, ui_url)}
        texts = {"verdict": verdict_json(verdict), "markdown": render_markdown(verdict, figures, views),
                 "html": render_html(data, verdict, figures, stage, views)}   # all rendered before any is written
        for key, name in (("verdict", "verdict.json"), ("markdown", "report.md"), ("html", "report.html")):
            with open(os.path.join(stage, name), "w") as f:
                f.write(texts[key])
    paths = {"verdict": os.path.join(out_dir, "verdict.json"),
             "markdown": os.path.join(out_dir, "report.md"),
             "html": os.path.join(out_dir, "report.html")}
    for fig in figures:
        if "file" in fig:
            paths[fig["file"]] = os.path.join(out_dir, fig["file"])
    return paths


def log_report(data, out_dir: str, client=None) -> Optional[str]:
    """Log every file of out_dir on the sweep's parent run under `report/` (MLflow UI: Artifacts).
    Returns the artifact folder URI, or None when the sweep has no parent run."""
    if not data.parent_run_id:
        return None
    from mlflow import MlflowClient
    client = client or MlflowClient(tracking_uri=data.tracking_uri)
    client.log_artifacts(data.parent_run_id, out_dir, artifact_path="report")
    return f"runs:/{data.parent_run_id}/report"


# ---------------------------------------------------------------------------------------------------
# Probe columns that only some sweeps log

# (key, column title, the column it sits after, per-trial metric: a scalar's name, or (name,) for a per-layer
# metric averaged over routed layers l >= 1 as tree_score is); a column appears when some trial logs its metric
EXTRA_COLUMNS = [
    ("test_acc_transformed", "test acc (transformed)", "test_acc", "test_acc_transformed"),
    ("tree_recovery", "tree recovery", "tree_score", ("tree_recovery",)),
    ("tree_direction", "tree direction", "tree_recovery", ("tree_direction",)),
    ("tree_concentration", "tree concentration", "tree_direction", ("tree_concentration",)),
]


def _trial_values(trials: pd.DataFrame, metric) -> Optional[pd.Series]:
    """One value per trial of a plain or per-layer metric (mean over l >= 1); None when nobody logs it."""
    if isinstance(metric, str):
        return trials[metric].astype(float) if metric in trials and trials[metric].notna().any() else None
    cols = [c for c in trials.columns if (p := parse_layer_metric(c)) and p[0] == metric[0] and p[1] >= 1]
    if not cols or not trials[cols].notna().any().any():
        return None
    return trials[cols].astype(float).mean(axis=1, skipna=True)


def extra_figures(trials: pd.DataFrame, alpha: float) -> dict[str, dict[str, dict]]:
    """{config_id: {key: {mean, lo, hi}}} for the EXTRA_COLUMNS some trial logs: mean over a
    configuration's finished seeds with the two-sided (1 - 2 alpha) t interval, clipped to [0, 1]."""
    fin = trials[trials["status"] == FINISHED]
    out: dict[str, dict[str, dict]] = {cid: {} for cid in trials["config_id"].unique()}
    for key, _, _, metric in EXTRA_COLUMNS:
        vals = _trial_values(fin, metric)
        if vals is None:
            continue
        for cid, v in vals.groupby(fin["config_id"]):
            iv = t_interval([x for x in v.tolist() if math.isfinite(x)], alpha)
            clip = (lambda x: None if x is None or x != x else min(1.0, max(0.0, x)))
            out[cid][key] = {"mean": None if iv.mean != iv.mean else iv.mean, "lo": clip(iv.lo), "hi": clip(iv.hi)}
        for cid in out:
            out[cid].setdefault(key, {"mean": None, "lo": None, "hi": None})
    return out


def columns_for(extra: dict[str, dict[str, dict]]) -> list[tuple]:
    """COLUMNS with each logged EXTRA_COLUMNS entry inserted after the column it extends."""
    present = {k for figs in extra.values() for k in figs}
    cols = list(COLUMNS)
    for key, title, after, _ in EXTRA_COLUMNS:
        if key in present:
            at = next(i for i, c in enumerate(cols) if c[0] == after) + 1
            cols.insert(at, (key, title, None, None))
    return cols


def _with_extra(cfg: ConfigResult, extra: dict[str, dict[str, dict]]) -> ConfigResult:
    """The configuration with the extra columns' figures (a copy; the verdict's own is not changed)."""
    return replace(cfg, figures={**cfg.figures, **extra[cfg.id]}) if extra.get(cfg.id) else cfg


# ---------------------------------------------------------------------------------------------------
# Links to MLflow and reproducibility

def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> Optional[str]:
    """The MLflow UI page of a run when `tracking_uri` is a tracking server or a UI (http/https), else None."""
    if not re.match(r"^https?://", tracking_uri or ""):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_base(tracking_uri: str, ui_url: Optional[str] = None) -> Optional[str]:
    """Where the report's run links point: the UI address the user gave (`--ui-url`, e.g. what
    `capsweep ui` prints), else the store itself when it is an http(s) tracking server (it serves the
    UI), else None: a SQLite or file store has no pages to link, its run ids are printed."""
    base = ui_url.split("#", 1)[0] if ui_url else tracking_uri if re.match(r"^https?://", tracking_uri or "") else None
    # never a user or password in a link (the browser asks for them; capsmodels/contract.py, redact masks the rest)
    return re.sub(r"^(https?://)[^/@\s]+@", r"\1", base).rstrip("/") if base else None


def _run_id_html(base: Optional[str], experiment_id: str, run_id: str, text: Optional[str] = None) -> str:
    """A run id as a link to its page in the UI at `base`, else as code."""
    url = run_url(base or "", experiment_id, run_id)
    shown = f"<code>{_t(text or run_id)}</code>"
    return f"<a href='{html.escape(url)}'>{shown}</a>" if url else shown


def parent_run_record(data) -> dict:
    """The sweep's parent run as {'tags': ..., 'params': ...} ({} without a parent or when the store does
    not answer: the report is still written, without what only the parent records)."""
    if not data.parent_run_id:
        return {}
    if data.parent_record:                          # read with the sweep (analysis.load): no second client
        return data.parent_record
    try:
        from mlflow import MlflowClient
        run = MlflowClient(tracking_uri=data.tracking_uri).get_run(data.parent_run_id)
        return {"tags": dict(run.data.tags), "params": dict(run.data.params)}
    except Exception:   # noqa: BLE001 - a store that went away between loading and reporting
        return {}


REPORT_PACKAGES = VERSION_PACKAGES
package_versions = installed_versions      # the report's environment, as a sweep records its own at start


def recorded_versions(tags: dict, params: dict) -> dict[str, str]:
    """{package: version} the sweep's driver recorded at start (tags capsweep.version.<package>); a sweep
    from before those tags: any parent tag or param whose name says version, under its own name."""
    own = {k[len(TAG_VERSION_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_VERSION_PREFIX)}
    if own:
        return own
    return {k: v for k, v in {**params, **tags}.items() if "version" in k.lower()}


def report_command(verdict: Verdict, out_dir: str, ui_url: Optional[str] = None) -> str:
    """A `capsweep report` command that rebuilds this report: the sweep, its store, the reference and
    every threshold that differs from the default."""
    argv = ["capsweep", "report", verdict.sweep, "--experiment", verdict.experiment,
            "--tracking-uri", verdict.tracking_uri]
    src = verdict.reference_source or ""
    if src.startswith("sweep "):
        argv += ["--reference", src[len("sweep "):]]
    th, default = verdict.thresholds, asdict(Thresholds())
    for key in ("alpha", "acc_margin", "grad_margin", "grad_ratio_min", "grad_ratio_max", "starved_frac_max",
                "dead_frac_max", "frozen_frac_max", "chance_margin"):
        if th.get(key) != default[key]:
            argv += [f"--{key.replace('_', '-')}", f"{th[key]:g}"]
    if th.get("num_classes_source") == "given":
        argv += ["--num-classes", str(th["num_classes"])]
    if ui_url:
        argv += ["--ui-url", redact(ui_url)]
    return shlex.join(argv + ["--out", out_dir])


def _invocation() -> Optional[str]:
    """The command line of this process when it is `capsweep report` or `python -m analysis`."""
    prog, args = os.path.basename(sys.argv[0] or ""), sys.argv[1:]
    if prog == "capsweep" and args[:1] == ["report"]:
        return shlex.join(["capsweep", *args])
    if sys.argv[0].endswith(os.path.join("analysis", "__main__.py")):
        return shlex.join(["python", "-m", "analysis", *args])
    return None


def reproducibility(data, verdict: Verdict, parent: dict, out_dir: str,
                    ui_url: Optional[str] = None) -> list[tuple[str, str]]:
    """(what, value) lines of the reproducibility block: the code (git commits of the parent and of the
    trials), the versions the sweep recorded (any parent tag/param naming a version), the versions of
    this report's environment, the sweep's settings and spec, and the commands."""
    tags, params = parent.get("tags", {}), parent.get("params", {})
    commits = data.trials["git_commit"].replace("", np.nan).dropna().value_counts() if "git_commit" in data.trials \
        else pd.Series(dtype=int)
    lines = [("sweep git commit", tags.get(TAG_COMMIT) or tags.get("mlflow.source.git.commit") or
              "not recorded on the parent run"),
             ("trials' git commit(s)", ", ".join(f"{c} ({n} trial(s))" for c, n in commits.items()) or "not recorded")]
    recorded = recorded_versions(tags, params)
    lines.append(("versions the sweep ran with", ", ".join(f"{k} {v}" for k, v in recorded.items())
                  or "none recorded on the parent run (a sweep from before capsweep recorded them)"))
    here = package_versions()
    differ = [k for k, v in here.items() if k in recorded and recorded[k] != v]
    lines.append(("versions that wrote this report", ", ".join(f"{k} {v}" for k, v in here.items())
                  + (f" (differ from the sweep's: {', '.join(differ)})" if differ else "")))
    settings = {k: v for k, v in params.items() if k.startswith(SWEEP_PARAM_PREFIX)}
    if settings:
        lines.append(("sweep settings (parent run params)", ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))))
    for key in ("capsweep.command", "mlflow.source.name"):
        if tags.get(key):
            lines.append((f"sweep command ({key})", tags[key]))
    if data.parent_run_id:
        lines.append(("sweep spec", f"spec.yaml on parent run {data.parent_run_id}; replay: MLFLOW_TRACKING_URI="
                      f"{shlex.quote(data.tracking_uri)} mlflow artifacts download -r {data.parent_run_id} "
                      "-a spec.yaml -d . && capsweep run spec.yaml"))
    lines.append(("report command", report_command(verdict, out_dir, ui_url)))
    invoked = _invocation()
    if invoked:
        lines.append(("invoked as", invoked))
    return lines


def run_lookup(trials: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """run id -> (seed, status), built once for every configuration's run list."""
    return {r: (str(s), str(st)) for r, s, st in zip(trials["run_id"], trials["seed"], trials["status"])}


def _runs_html(data, run_ids: list[str], lookup: Optional[dict[str, tuple[str, str]]] = None,
               base: Optional[str] = None) -> str:
    """The configuration's MLflow runs: links into the UI (`base`, default: the store when it is a
    tracking server; ui_base), else the run ids. lookup: `run_lookup(data.trials)` when the caller lists
    many configurations."""
    lookup = lookup if lookup is not None else run_lookup(data.trials)
    base = base if base is not None else ui_base(data.tracking_uri)
    items = []
    for rid in run_ids:
        seed, status = lookup.get(rid, ("?", "?"))
        url = run_url(base or "", data.experiment_id, rid)
        what = f"seed {seed}" + ("" if status == FINISHED else f" ({status})")
        items.append(f"<a href='{html.escape(url)}'>{_t(what)}</a>" if url
                     else f"{_t(what)}: <code>{_t(rid)}</code>")
    return "<span class='runs'>MLflow runs: " + ", ".join(items) + "</span>"


# ---------------------------------------------------------------------------------------------------
# Interactive views

# (column of the annotated trials, axis label, higher is better) of the verdict's key probes
KEY_PROBES = [("starved_worst", "starved_frac_max (worst hidden)", False), ("grad_ratio", "log10 grad_ratio", True),
              ("test_acc", "test_acc", True)]
PC_PROBES = [("test_acc", "test_acc"), ("grad_ratio", "log10 grad_ratio"), ("act_grad_min", "log10 min act_grad"),
             ("starved_worst", "starved (worst)"), ("dead_worst", "dead (worst)"), ("frozen_worst", "frozen (worst)")]


def explore_html(trials: pd.DataFrame, swept: list[str], labels: dict) -> str:
    """Parallel coordinates of the finished trials: one axis per swept param, then the key probes."""
    fin = trials[trials["status"] == FINISHED].reset_index(drop=True)
    if fin.empty:
        return "<p>No finished trial to draw.</p>"
    names = short_names(swept)
    probes = [(c, l) for c, l in PC_PROBES if c in fin and fin[c].notna().any()]
    dims = [(c, names[c]) for c in swept] + probes
    if len(dims) < 2:
        return "<p>Not drawn: fewer than two axes (no swept param and no probe logged).</p>"
    rows = fin[["config_id", "seed", "role", "run_id"] + [c for c, _ in probes]].to_dict("records")
    tips = [f"{r['config_id']} {labels.get(r['config_id'], '')} seed {r['seed']} ({r['role']}); "
            + ", ".join(f"{l} {_n(r[c])}" for c, l in probes if r[c] == r[c]) + f"; run {r['run_id']}"
            for r in rows]
    return interactive.parallel_coordinates(
        fin, dims, KEY_PROBES, tips, "pc-trials", "Parallel coordinates of the finished trials",
        f"One line per finished trial ({len(fin)}), through its swept params and its last-epoch probes "
        "(log10 axes as the verdict tests them). Colour: the chosen key probe, red = bad, blue = good, grey = "
        "not logged; n/a under an axis: not logged or not set.")


def search_view(data, trials: pd.DataFrame, swept: list[str], labels: dict, parent: dict) -> dict:
    """The Optuna views: {'skipped': why} or {'objectives', 'table' (one row per candidate configuration,
    seed means of the objectives, 'pareto'), 'importances' {metric: {param: share}}, 'params'}."""
    params = parent.get("params", {})
    search = SweepParams.from_params(params).search
    if search != "optuna":
        return {"skipped": f"search is {search or 'not recorded'}, not optuna"}
    objectives = search_views.objectives_of(params)
    if not objectives:
        return {"skipped": "the parent run records no sweep.metric / sweep.mode"}
    raw = data.trials.set_index("run_id")
    cand = trials[(trials["status"] == FINISHED) & ((trials[ROLE_KEY] == CANDIDATE) if ROLE_KEY in trials
                                                    else (trials["role"] == CANDIDATE))]
    metrics = [m for m, _ in objectives]
    missing = [m for m in metrics if m not in raw]
    if missing:
        return {"skipped": f"no trial logs the objective(s) {', '.join(missing)}"}
    rows = cand[["config_id", *swept]].copy()
    for m in metrics:
        rows[m] = pd.to_numeric(raw.loc[cand["run_id"], m], errors="coerce").to_numpy(dtype=float)
    table = search_views.config_means(rows, "config_id", swept, metrics)
    if table.empty:
        return {"skipped": "no finished candidate trial"}
    table["pareto"] = search_views.pareto_front(table, objectives).to_numpy()
    table["label"] = table["config_id"].map(labels)
    varying = [p for p in swept if table[p].astype(str).nunique() > 1]
    imps = {m: search_views.param_importances(table, varying, m, mode) for m, mode in objectives}
    return {"objectives": objectives, "table": table, "importances": imps, "params": varying}


def _objective_text(row: pd.Series, objectives) -> str:
    return ", ".join(f"{m} {_n(row[m])}" for m, _ in objectives)


def search_html(view: dict) -> str:
    if "skipped" in view:
        return f"<p class='muted'>Not drawn: {_t(view['skipped'])}.</p>"
    t, obj = view["table"], view["objectives"]
    parts = []
    if len(obj) >= 2:
        tips = [f"{r['config_id']} {r['label']}: {_objective_text(r, obj)} ({int(r['n'])} seed(s))"
                + ("; on the Pareto front" if r["pareto"] else "") for _, r in t.iterrows()]
        parts.append(interactive.scatter_panels(
            t, obj, t["pareto"].tolist(), t["config_id"].tolist(), tips, "Pareto front of the candidate configurations",
            f"One point per candidate configuration (mean over its finished seeds, as Optuna saw it), each pair of the "
            f"{len(obj)} objectives; dark: on the Pareto front of all {len(obj)} together ({int(t['pareto'].sum())} "
            f"of {len(t)}), grey: dominated. Hover a point to find it in the other panels."))
    front = t[t["pareto"]].sort_values(obj[0][0], ascending=obj[0][1] == "min")
    parts.append("<div class='wide'><table><tr><th>id</th><th>configuration</th><th>seeds</th>"
                 + "".join(f"<th>{_t(m)} ({mode})</th>" for m, mode in obj) + "</tr>")
    parts += [f"<tr><td>{_t(r['config_id'])}</td><td>{_t(r['label'])}</td><td class='num'>{int(r['n'])}</td>"
              + "".join(f"<td class='num'>{_n(r[m])}</td>" for m, _ in obj) + "</tr>" for _, r in front.iterrows()]
    parts.append("</table></div>")
    bars = [interactive.bar_chart(imp, f"importance for {m} ({mode})")
            for (m, mode) in obj if (imp := view["importances"].get(m))]
    if bars:
        parts.append(f"<div class='charts'>{''.join(bars)}</div><p class='small'>Parameter importances: "
                     "Optuna's fANOVA evaluator (seed 0) on a study rebuilt from the candidate configurations' seed "
                     "means, one per objective; shares of the objective's variance, summing to 1.</p>")
    else:
        parts.append("<p class='muted'>Parameter importances not computed: fewer than 3 configurations or no "
                     "varying param.</p>")
    return "\n".join(parts)


def search_markdown(view: dict) -> list[str]:
    if "skipped" in view:
        return [f"Not drawn: {view['skipped']}."]
    t, obj = view["table"], view["objectives"]
    front = t[t["pareto"]].sort_values(obj[0][0], ascending=obj[0][1] == "min")
    out = [f"Pareto front: {len(front)} of {len(t)} candidate configurations (seed means).", "",
           "| id | configuration | seeds | " + " | ".join(f"{m} ({mode})" for m, mode in obj) + " |",
           "|" + "---|" * (3 + len(obj))]
    out += [f"| {r['config_id']} | {_md(r['label'])} | {int(r['n'])} | " + " | ".join(_n(r[m]) for m, _ in obj) + " |"
            for _, r in front.iterrows()]
    for m, mode in obj:
        imp = view["importances"].get(m)
        if imp:
            out += ["", f"Importance for {m} ({mode}), fANOVA: " + ", ".join(f"{p} {v:.2f}" for p, v in imp.items())]
    return out


# ---------------------------------------------------------------------------------------------------
# The page: one list of sections, each rendered to HTML and to Markdown

NAV = [("configurations", "Configurations"), ("explore", "Explore the trials"), ("search", "Hyperparameter search"),
       ("figures", "Figures"), ("trends", "Trends"), ("reproducibility", "Reproducibility")]


@dataclass(frozen=True)
class Page:
    """What every section renders from. data: the SweepData (None for Markdown: it names no live run);
    views: write_report's extra columns, interactive views and reproducibility lines ({}: without them)."""
    verdict: Verdict
    figures: list
    views: dict
    columns: list
    extra: dict
    data: Any = None
    out_dir: str = ""
    ui: Optional[str] = None

    @property
    def level(self) -> str:
        return f"{100 * (1 - 2 * self.verdict.thresholds['alpha']):g}%"


@dataclass(frozen=True)
class Section:
    """One part of the report, written once and rendered twice. Why: report.html and report.md must say
    the same things in the same order; a section that exists only in one format (the interactive explorer)
    returns no lines in the other."""
    name: str
    html: Callable[[Page], list]
    markdown: Callable[[Page], list]


def _page(verdict: Verdict, figures: list, views: Optional[dict], data=None, out_dir: str = "") -> Page:
    views = views or {}
    extra = views.get("extra", {})
    ui = (views["ui"] if "ui" in views else ui_base(data.tracking_uri)) if data is not None else None
    return Page(verdict, figures, views, columns_for(extra), extra, data, out_dir, ui)


# ---- the headline: the answer, the instrument, the test, then where the sweep is ----------------------
def _headline_html(pg: Page) -> list:
    verdict, data, c = pg.verdict, pg.data, pg.verdict.counts
    answer, instrument = _headline(verdict)
    return [
        f'<div class="answer {_ANSWER_CLASS[verdict.outcome]}">{_t(answer)}</div>',
        f'<div class="instrument {_INSTRUMENT_CLASS.get(verdict.instrument, "und")}">{_t(instrument)}. '
        f'<span style="font-weight:400">{_t(verdict.instrument_text)}.</span></div>',
        f'<p class="test"><b>Test.</b> {_t(verdict.test)}. <b>Answer.</b> {_tc(verdict.answer)}.</p>',
        *([f'<p class="test"><b>The sweep is a family.</b> {_t(verdict.family["text"])}.</p>']
          if verdict.family else []),
        *([f'<p class="test"><b>Confirmation.</b> {_tc(_link_text(verdict))}.</p>'] if _link_text(verdict) else []),
        f"<h1>capsweep report &mdash; sweep <code>{_t(verdict.sweep)}</code></h1>",
        f"<p class='muted small'>Experiment <code>{_t(verdict.experiment)}</code> at "
        f"<code>{_t(verdict.tracking_uri)}</code>; parent run "
        f"{_run_id_html(pg.ui, data.experiment_id, verdict.parent_run_id) if verdict.parent_run_id else '<code>None</code>'}; "
        f"references from {_t(verdict.reference_source)}. "
        f"{c['trials']} trials: {_t(_status_text(c))}; {c['configurations']} configurations, "
        f"{c['candidates']} candidate(s), {c['controls']} control(s). Read in {data.load_seconds:.1f} s "
        f"(histories: {_t(data.history_method)}).</p>",
        "<p class='nav small'>" + " &middot; ".join(f"<a href='#{a}'>{t}</a>" for a, t in NAV) + "</p>",
    ]


def _headline_md(pg: Page) -> list:
    verdict, c = pg.verdict, pg.verdict.counts
    answer, instrument = _headline(verdict)
    return [f"# {answer}", "", f"**{instrument}.** {verdict.instrument_text}.", "",
            f"**Test.** {verdict.test}.", "", f"**Answer.** {verdict.answer}.", "",
            *([f"**The sweep is a family.** {verdict.family['text']}.", ""] if verdict.family else []),
            *([f"**Confirmation.** {_link_text(verdict)}.", ""] if _link_text(verdict) else []),
            f"capsweep report of sweep `{verdict.sweep}`: experiment `{verdict.experiment}` at "
            f"`{verdict.tracking_uri}`, parent run `{verdict.parent_run_id}`, references from "
            f"{verdict.reference_source}. {c['trials']} trials: {_status_text(c)}; {c['configurations']} "
            f"configurations, {c['candidates']} candidate(s), {c['controls']} control(s).", ""]


# ---- the notes ------------------------------------------------------------------------------------
def _notes_html(pg: Page) -> list:
    return [f'<div class="note">{_t(n)}</div>' for n in pg.verdict.notes]


def _notes_md(pg: Page) -> list:
    notes = pg.verdict.notes
    return [f"> {n}" for n in notes] + ([""] if notes else [])


# ---- the configurations table, each row's checks under it -----------------------------------------------
def _configurations_html(pg: Page) -> list:
    verdict, data, columns, ui = pg.verdict, pg.data, pg.columns, pg.ui
    parts = ["<h2 id='configurations'>Configurations</h2>"]
    parts.append(f"<p class='small'>Each cell: mean over the configuration's finished seeds [two-sided {pg.level} "
                 "t interval, each end the one-sided bound the verdict uses]; grad ratio and min act_grad: "
                 "geometric mean (their checks work on log10). &Delta; acc: candidate &minus; matched depth-0 "
                 "reference with its Welch bounds. Colour: the check on that column passes (green), fails (red) "
                 "or is undecided (yellow). Tree score and routing dynamics: with the same statistic on the null "
                 "(votes permuted across inputs) below. n/a: the probe is not logged (never counted as evidence). "
                 "Under each row: the checks that did not pass; unfold for every check; then the configuration's "
                 "MLflow runs.</p>")
    if ui is None:
        parts.append(f"<p class='small'>Runs are listed by id: open the store with <code>capsweep ui --tracking-uri "
                     f"{_t(shlex.quote(data.tracking_uri))}</code>; a run's page is <code>#/experiments/"
                     f"{_t(data.experiment_id)}/runs/&lt;run id&gt;</code> under the UI's address (with "
                     "<code>capsweep report --ui-url ADDRESS</code> the ids are links).</p>")
    ncols = 4 + len(columns)
    # a wide table scrolls inside its own box (the page never does); the reasons under a row stay
    # within the window while it scrolls (.why-in: sticky, at most the window's width)
    parts.append("<p class='narrow small muted'>In a narrow window the table scrolls sideways (its right-hand "
                 "columns); the reasons under each row stay in view.</p>")
    parts.append("<div class='wide'><table id='config-table'><tr><th>id</th><th>configuration</th><th>verdict</th>"
                 "<th>seeds</th>"
                 + "".join(f"<th>{title}</th>" for _, title, _, _ in columns) + "</tr>")
    lookup = run_lookup(data.trials)
    for cfg in _sorted_configs(verdict):
        cfg = _with_extra(cfg, pg.extra)
        total = sum(cfg.statuses.values())
        vcls = "unk" if cfg.verdict == "to confirm" else _OUTCOME_CLASS.get(cfg.outcome, "")
        role = f"{cfg.role}: " if cfg.role == CONTROL else ""
        cells = []
        for key, _, check, null in columns:
            chk = _check_of(cfg, check)
            cls = f"num {_OUTCOME_CLASS[chk['outcome']]}" if chk else "num"
            value, ci, null_text = _cell(cfg, key, null)
            cells.append(f"<td class='{cls}'><span class='m'>{_t(value)}</span>"
                         + (f"<br><span class='ci'>{_t(ci).replace(', ', ',<wbr> ')}</span>" if ci else "")
                         + (f"<br><span class='ci'>{_t(null_text)}</span>" if null_text else "") + "</td>")
        row_cls = "reference" if cfg.role == REFERENCE else "main"
        parts.append(f"<tr class='{row_cls}'><td>{cfg.id}</td><td>{_t(cfg.label)}</td>"
                     f"<td class='v {vcls}'>{_t(role + cfg.verdict)}</td>"
                     f"<td class='num'>{cfg.n_seeds}/{total}</td>{''.join(cells)}</tr>")
        runs = _runs_html(data, cfg.run_ids, lookup, ui or "")
        if not cfg.checks:
            parts.append(f"<tr class='refruns'><td></td><td colspan='{ncols - 1}'><div class='why-in'>{runs}</div>"
                         "</td></tr>")
        if cfg.checks:
            why = _why(cfg)
            shown = "".join(f"<li>{_t(ch['text'])}</li>" for ch in cfg.checks if ch["outcome"] != "pass")
            every = "".join(f"<li><b>{_t(ch['outcome'])}</b>: {_t(ch['text'])}</li>" for ch in cfg.checks)
            ref = cfg.reference or {}
            ref_text = (f"reference: {ref.get('how')} depth-0 {ref.get('arch')} from {ref.get('source')}, "
                        f"{ref.get('n_trials')} trial(s)") if ref.get("n_trials") else "no reference"
            head = f"<b>{_t(why)}</b><ul class='checks'>{shown}</ul>" if shown else ""
            summary = f"{'' if shown else '<b>every check passes</b>; '}all checks ({_t(ref_text)})"
            parts.append(f"<tr class='why'><td></td><td colspan='{ncols - 1}'><div class='why-in'>{head}<details>"
                         f"<summary>{summary}</summary><ul class='checks'>{every}</ul></details>{runs}</div></td></tr>")
    parts.append("</table></div>")
    return parts


def _configurations_md(pg: Page) -> list:
    verdict, columns = pg.verdict, pg.columns
    titles = [html.unescape(t) for _, t, _, _ in columns]
    out = ["## Configurations", "",
           f"Mean over finished seeds [two-sided {pg.level} t interval]; grad ratio and min act_grad: geometric "
           "means; delta acc: candidate - reference with its Welch bounds; tree score and routing dyn.: with their "
           "null (votes permuted across inputs). Checks that did not pass: below the table. n/a: not logged.", "",
           "| id | configuration | verdict | seeds | " + " | ".join(titles) + " |",
           "|" + "---|" * (4 + len(columns))]
    for cfg in _sorted_configs(verdict):
        cfg = _with_extra(cfg, pg.extra)
        v = f"**{cfg.verdict}**" if cfg.escaped else cfg.verdict
        if cfg.role == CONTROL:
            v = f"control: {v}"
        out.append(f"| {cfg.id} | {_md(cfg.label)} | {v} | {cfg.n_seeds}/{sum(cfg.statuses.values())} | "
                   + " | ".join(_md(_md_cell(*_cell(cfg, key, null))) for key, _, _, null in columns) + " |")
    out += ["", "### Why (checks that did not pass)", ""]
    for cfg in _sorted_configs(verdict):
        bad = [ch for ch in cfg.checks if ch["outcome"] != "pass"]
        if cfg.checks:
            out.append(f"- **{cfg.id}** ({cfg.verdict}): " + ("; ".join(
                f"{ch['outcome']}: {_md(ch['text'])}" for ch in bad) if bad else "every check passes"))
    return out


# ---- thresholds and rules --------------------------------------------------------------------------
def _thresholds_html(pg: Page) -> list:
    verdict = pg.verdict
    parts = ["<h2>Thresholds and rules</h2><table><tr><th>parameter</th><th>meaning</th><th>value</th></tr>"]
    for key, text in THRESHOLD_TEXT:
        v = verdict.thresholds.get(key)
        parts.append(f"<tr><td><code>{key}</code></td><td>{_t(text)}</td><td class='num'>{_t(_fmt(v))}</td></tr>")
    parts.append("</table><ol>" + "".join(f"<li>{_t(r)}</li>" for r in verdict.rules) + "</ol>"
                 "<p class='muted small'>Definitions of every probe and check: docs/PROBES.md in the capsweep "
                 "repository.</p>")
    return parts


def _thresholds_md(pg: Page) -> list:
    verdict = pg.verdict
    out = ["", "## Thresholds and rules", "", "| parameter | meaning | value |", "|---|---|---|"]
    out += [f"| `{k}` | {_md(text)} | {_md(_fmt(verdict.thresholds.get(k)))} |" for k, text in THRESHOLD_TEXT]
    out += [""] + [f"{i}. {r}" for i, r in enumerate(verdict.rules, 1)]
    return out + ["", "Definitions: docs/PROBES.md."]


# ---- failed, diverged and unfinished trials ----------------------------------------------------------
def _failed_html(pg: Page) -> list:
    failed = pg.verdict.failed_trials
    parts = ["<h2>Failed, diverged and unfinished trials</h2>"]
    if not failed:
        return parts + ["<p>None: every trial finished.</p>"]
    parts.append("<div class='wide'><table><tr><th>trial</th><th>run id</th><th>seed</th><th>status</th>"
                 "<th>configuration</th><th>error</th></tr>")
    for t in failed:
        parts.append(f"<tr><td>{_t(t['trial_id'])}</td><td>{_run_id_html(pg.ui, pg.data.experiment_id, t['run_id'])}</td>"
                     f"<td>{_t(t['seed'])}</td><td>{_t(t['status'])}</td>"
                     f"<td>{t['config_id']}: {_t(t['label'])}</td><td class='err'>{_t(t['error'])}</td></tr>")
    return parts + ["</table></div>"]


def _failed_md(pg: Page) -> list:
    failed = pg.verdict.failed_trials
    out = ["", "## Failed, diverged and unfinished trials", ""]
    if not failed:
        return out + ["None: every trial finished."]
    out += ["| trial | run id | seed | status | configuration | error |", "|---|---|---|---|---|---|"]
    return out + [f"| {_md(t['trial_id'])} | `{t['run_id']}` | {_md(t['seed'])} | {t['status']} | "
                  f"{t['config_id']}: {_md(t['label'])} | {_md(t['error'])} |" for t in failed]


# ---- the interactive explorer (HTML only) and the hyperparameter search --------------------------------
def _explore_html(pg: Page) -> list:
    return ["<h2 id='explore'>Explore the trials</h2>", pg.views.get("explore", "<p class='muted'>Not drawn.</p>")]


def _no_lines(pg: Page) -> list:
    return []


def _search_html(pg: Page) -> list:
    return ["<h2 id='search'>Hyperparameter search</h2>",
            search_html(pg.views.get("search", {"skipped": "not computed"}))]


def _search_md(pg: Page) -> list:
    return ["", "## Hyperparameter search", ""] + search_markdown(pg.views.get("search", {"skipped": "not computed"}))


# ---- figures --------------------------------------------------------------------------------------
def _figures_html(pg: Page) -> list:
    parts = ["<h2 id='figures'>Figures</h2>"]
    for fig in pg.figures:
        if "file" in fig:
            with open(os.path.join(pg.out_dir, fig["file"]), "rb") as f:
                b64 = base64.b64encode(f.read()).decode("ascii")
            parts.append(f"<figure><img alt='{_t(fig['title'])}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption><b>{_t(fig['title'])}.</b> {_t(fig['caption'])}</figcaption></figure>")
    skipped = [f for f in pg.figures if "skipped" in f]
    if skipped:
        parts.append("<p>Not drawn:</p><ul>" + "".join(
            f"<li>{_t(f['title'])}: {_t(f['skipped'])}</li>" for f in skipped) + "</ul>")
    return parts


def _figures_md(pg: Page) -> list:
    out = ["", "## Figures", ""]
    for fig in pg.figures:
        if "file" in fig:
            out += [f"![{fig['title']}]({fig['file']})", "", f"*{fig['title']}.* {fig['caption']}", ""]
    return out + [f"- Not drawn: {fig['title']}: {fig['skipped']}" for fig in pg.figures if "skipped" in fig]


# ---- trends ---------------------------------------------------------------------------------------
TRENDS_TEXT = ("One point per CapsNet configuration (its mean over seeds), never per seed. Numeric factors: "
               "Spearman's rank correlation rho (booleans as 0/1); categorical factors: Kruskal-Wallis H "
               "across levels. Other swept factors vary along with the one tested. p: raw; p (Holm): "
               "adjusted across all {m} tests of this report.")


def _trends_html(pg: Page) -> list:
    trends, alpha = pg.verdict.trends, pg.verdict.thresholds["alpha"]
    parts = ["<h2 id='trends'>Trends</h2>"]
    if not trends:
        return parts + ["<p>No factor varied across CapsNet configurations.</p>"]
    m = sum(t["p_value"] is not None for t in trends)
    rows = [f"<p class='small'>{_t(TRENDS_TEXT.format(m=m))} Bold: Holm-adjusted p &lt; {alpha:g}.</p>"
            "<div class='wide'><table><tr><th>factor</th><th>probe</th><th>test</th><th>statistic</th>"
            "<th>p</th><th>p (Holm)</th><th>configurations</th><th>levels</th><th>note</th></tr>"]
    for t in trends:
        sig = t["p_holm"] is not None and t["p_holm"] < alpha
        stat = ("rho = " if t["test"] == "spearman" else "H = ") + _n(t["statistic"])
        rows.append(f"<tr{' class=sig' if sig else ''}><td>{_t(t['factor'])}</td><td>{_t(t['probe'])}</td>"
                    f"<td>{t['test']}</td><td class='num'>{stat}</td><td class='num'>{_n(t['p_value'])}</td>"
                    f"<td class='num'>{_n(t['p_holm'])}</td><td class='num'>{t['n']}</td>"
                    f"<td class='num'>{t['levels']}</td><td>{_t(t['note'])}</td></tr>")
    rows.append("</table></div>")
    return parts + ["\n".join(rows)]


def _trends_md(pg: Page) -> list:
    trends = pg.verdict.trends
    out = ["", "## Trends", ""]
    if not trends:
        return out + ["No factor varied across CapsNet configurations."]
    m = sum(t["p_value"] is not None for t in trends)
    out += [TRENDS_TEXT.format(m=m), "",
            "| factor | probe | test | statistic | p | p (Holm) | configurations | levels | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    return out + [f"| {t['factor']} | {t['probe']} | {t['test']} | {_n(t['statistic'])} | {_n(t['p_value'])} | "
                  f"{_n(t['p_holm'])} | {t['n']} | {t['levels']} | {_md(t['note'])} |" for t in trends]


# ---- reproducibility ------------------------------------------------------------------------------
def _repro_html(pg: Page) -> list:
    return (["<h2 id='reproducibility'>Reproducibility</h2><table class='repro'>"]
            + [f"<tr><th>{_t(k)}</th><td><code>{_t(v)}</code></td></tr>" for k, v in pg.views.get("repro", [])]
            + ["</table>"])


def _repro_md(pg: Page) -> list:
    return ["", "## Reproducibility", ""] + [f"- {k}: `{_md(v)}`" for k, v in pg.views.get("repro", [])]


SECTIONS = (
    Section("headline", _headline_html, _headline_md),
    Section("notes", _notes_html, _notes_md),
    Section("configurations", _configurations_html, _configurations_md),
    Section("thresholds", _thresholds_html, _thresholds_md),
    Section("failed", _failed_html, _failed_md),
    Section("explore", _explore_html, _no_lines),
    Section("search", _search_html, _search_md),
    Section("figures", _figures_html, _figures_md),
    Section("trends", _trends_html, _trends_md),
    Section("reproducibility", _repro_html, _repro_md),
)


def render_html(data, verdict: Verdict, figures: list[dict], out_dir: str, views: Optional[dict] = None) -> str:
    """report.html: SECTIONS in order, self-contained (CSS, script and figures inlined).
    views: write_report's extra columns, interactive views and reproducibility lines (None: without them)."""
    pg = _page(verdict, figures, views, data, out_dir)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>capsweep report: {_t(verdict.sweep)}</title>",
             f"<style>{CSS}{interactive.CSS}</style></head><body>"]
    parts += [line for section in SECTIONS for line in section.html(pg)]
    parts.append(f"<script>{interactive.SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _status_text(counts: dict) -> str:
    """'20 finished, 1 diverged, 1 failed': the trial statuses that occur."""
    skip = {"trials", "configurations", "candidates", "controls"}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if s not in skip and n)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def _md(s) -> str:
    return str(s if s is not None else "").replace("|", "\\|").replace("\n", " ")


def _md_cell(value: str, ci: str, null_text: str) -> str:
    """'0.25 [0.2, 0.3] (null 0.07)'."""
    return " ".join(p for p in (value, ci, f"({null_text})" if null_text else "") if p)


def render_markdown(verdict: Verdict, figures: list[dict], views: Optional[dict] = None) -> str:
    """report.md: the same SECTIONS as report.html, in the same order (the explorer is HTML only)."""
    pg = _page(verdict, figures, views)
    return "\n".join(line for section in SECTIONS for line in section.markdown(pg)) + "\n"


def default_out_dir(sweep: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sweep) or "sweep"
    return os.path.join("reports", safe)


__all__ = ["write_report", "log_report", "render_html", "render_markdown", "default_out_dir"]
