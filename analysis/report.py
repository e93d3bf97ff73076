"""Write the report of one sweep: verdict.json, the PNG figures, report.md (links to the PNGs) and
report.html (one self-contained file: PNGs as base64 data URIs, inline CSS, no external reference, so
it can be mailed or opened from the MLflow UI's artifact view); then log them on the sweep's parent run
under `report/`.

Order of both documents: the answer in a big line, the thresholds and rules, the configurations table
(escaped first, verdict coloured), the failed/diverged trials, the figures (and the ones skipped, with
why), the trends table, notes.
"""
from __future__ import annotations

import base64
import html
import os
from typing import Optional

from analysis import plots
from analysis.verdict import FIGURES, annotate, verdict_json

FIGURE_NAMES = {"grad_ratio": "grad ratio", "dead_worst": "worst dead frac", "tree_score": "tree score",
                "routing_dynamics": "routing dyn.", "test_acc": "test acc", "grad_floor_ratio": "grad floor"}
THRESHOLD_TEXT = [
    ("grad_ratio_min", "grad_ratio lower bound at least"),
    ("dead_frac_max", "worst hidden-layer dead_frac upper bound at most"),
    ("acc_tolerance", "test accuracy may be below the shallow CapsNet's mean by at most"),
    ("grad_floor", "min layer grad norm / shallow median grad norm, lower bound at least"),
    ("chance_margin", "accuracy must exceed chance (1/num_classes) by"),
    ("num_classes", "number of classes"),
    ("chance_accuracy_floor", "so test accuracy lower bound at least"),
    ("dead_tau", "a capsule is dead when its largest activation is below tau ="),
    ("n_boot", "bootstrap resamples (percentile interval of the mean over seeds)"),
    ("confidence", "interval coverage"),
    ("seed", "bootstrap seed"),
]
_ORDER = {"escaped": 0, "not escaped": 1}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.answer{font-size:2.4em;font-weight:700;padding:.4em .6em;border-radius:8px;margin:.4em 0}
.yes{background:#e3f6e5;color:#11632a} .no{background:#fbe5e5;color:#8a1c1c}
.sub{font-size:1.05em;margin:.2em 0 1em 0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.escaped td.v{background:#c9efcf;color:#11632a;font-weight:700}
tr.notescaped td.v{background:#f8d3d3;color:#8a1c1c}
tr.reference td.v,tr.baseline td.v{background:#e6e9f2;color:#34406b}
.note{background:#fff7da;border-left:4px solid #e0b400;padding:.4em .8em;margin:.3em 0}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555} .sig{font-weight:700} .muted{color:#777}
"""


def _t(s) -> str:
    """Escape text for HTML; '://' is written as an entity so no URL-looking text appears raw."""
    return html.escape("" if s is None else str(s)).replace("://", "&#58;//")


def _n(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _interval(fig: dict) -> str:
    if fig["mean"] is None:
        return "n/a"
    if fig["n"] <= 1 or fig["lo"] == fig["hi"]:
        return f"{_n(fig['mean'])}"
    return f"{_n(fig['mean'])} [{_n(fig['lo'])}, {_n(fig['hi'])}]"


def _sorted_configs(verdict: dict) -> list[dict]:
    return sorted(verdict["configurations"],
                  key=lambda c: (_ORDER.get(c["verdict"], 2), c["depth"] if c["depth"] is not None else -1,
                                 -(c["figures"]["test_acc"]["mean"] or 0), c["id"]))


def write_report(data, verdict: dict, out_dir: str, annotated: Optional[tuple] = None) -> dict[str, str]:
    """Write verdict.json, the figures, report.md and report.html into out_dir; return their paths.
    annotated: `annotate(data)` when the caller has it already (it computed the verdict from it)."""
    os.makedirs(out_dir, exist_ok=True)
    trials, _, _ = annotated or annotate(data)
    figures = plots.make_plots(trials, data.histories, verdict, out_dir)
    paths = {"verdict": os.path.join(out_dir, "verdict.json"),
             "markdown": os.path.join(out_dir, "report.md"),
             "html": os.path.join(out_dir, "report.html")}
    with open(paths["verdict"], "w") as f:
        f.write(verdict_json(verdict))
    with open(paths["markdown"], "w") as f:
        f.write(render_markdown(verdict, figures))
    with open(paths["html"], "w") as f:
        f.write(render_html(data, verdict, figures, out_dir))
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
# HTML

def render_html(data, verdict: dict, figures: list[dict], out_dir: str) -> str:
    yes = verdict["escaped"] == "yes"
    c = verdict["counts"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>capsweep report: {_t(verdict['sweep'])}</title>", f"<style>{CSS}</style></head><body>",
        f"<h1>capsweep report &mdash; sweep <code>{_t(verdict['sweep'])}</code></h1>",
        f'<div class="answer {"yes" if yes else "no"}">Escaped: {"YES" if yes else "NO"}</div>',
        f'<p class="sub">{_t(verdict["answer"])}.</p>',
        f"<p class='muted'>Experiment <code>{_t(verdict['experiment'])}</code> at "
        f"<code>{_t(verdict['tracking_uri'])}</code>; parent run <code>{_t(verdict['parent_run_id'])}</code>. "
        f"{c['trials']} trials: {_t(_status_text(c))}; {c['configurations']} configurations, "
        f"{c['candidates']} candidates. Read in {data.load_seconds:.1f} s "
        f"(histories: {_t(data.history_method)}).</p>",
    ]
    parts += [f'<div class="note">{_t(n)}</div>' for n in verdict["notes"]]

    parts.append("<h2>Thresholds</h2><table><tr><th>parameter</th><th>meaning</th><th>value</th></tr>")
    for key, text in THRESHOLD_TEXT:
        v = verdict["thresholds"].get(key)
        parts.append(f"<tr><td><code>{key}</code></td><td>{_t(text)}</td><td class='num'>{_t(_fmt(v))}</td></tr>")
    parts.append("</table><p>A candidate (CapsNet, depth &ge; 1) escapes when all hold, each on the "
                 "conservative side of its interval:</p><ol>")
    parts += [f"<li>{_t(r)}</li>" for r in verdict["rules"]]
    parts.append("</ol>")

    parts.append("<h2>Configurations</h2><table><tr><th>id</th><th>configuration</th><th>verdict</th>"
                 "<th>seeds</th>" + "".join(f"<th>{FIGURE_NAMES[f]}<br><span class='muted'>mean [95% CI]"
                                            "</span></th>" for f in FIGURES) + "<th>why not</th></tr>")
    for cfg in _sorted_configs(verdict):
        cls = {"escaped": "escaped", "not escaped": "notescaped"}.get(cfg["verdict"], cfg["role"])
        total = sum(cfg["statuses"].values())
        parts.append(
            f"<tr class='{cls}'><td>{cfg['id']}</td><td>{_t(cfg['label'])}</td><td class='v'>"
            f"{_t(cfg['verdict'])}</td><td class='num'>{cfg['n_seeds']}/{total}</td>"
            + "".join(f"<td class='num'>{_interval(cfg['figures'][f])}</td>" for f in FIGURES)
            + f"<td>{'<br>'.join(_t(r) for r in cfg['reasons'])}</td></tr>")
    parts.append("</table><p class='muted'>grad floor: min over layers of grad_norm divided by the shallow "
                 "reference's median layer grad_norm. worst dead frac: n/a at depth 0 (no hidden layer).</p>")

    parts.append("<h2>Failed, diverged and unfinished trials</h2>")
    if verdict["failed_trials"]:
        parts.append("<table><tr><th>trial</th><th>run id</th><th>seed</th><th>status</th>"
                     "<th>configuration</th><th>error</th></tr>")
        for t in verdict["failed_trials"]:
            parts.append(f"<tr><td>{_t(t['trial_id'])}</td><td><code>{_t(t['run_id'])}</code></td>"
                         f"<td>{_t(t['seed'])}</td><td>{_t(t['status'])}</td>"
                         f"<td>{t['config_id']}: {_t(t['label'])}</td><td>{_t(t['error'])}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>None: every trial finished.</p>")

    parts.append("<h2>Figures</h2>")
    for fig in figures:
        if "file" in fig:
            with open(os.path.join(out_dir, fig["file"]), "rb") as f:
                b64 = base64.b64encode(f.read()).decode("ascii")
            parts.append(f"<figure><img alt='{_t(fig['title'])}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption><b>{_t(fig['title'])}.</b> {_t(fig['caption'])}</figcaption></figure>")
    skipped = [f for f in figures if "skipped" in f]
    if skipped:
        parts.append("<p>Not drawn:</p><ul>" + "".join(
            f"<li>{_t(f['title'])}: {_t(f['skipped'])}</li>" for f in skipped) + "</ul>")

    parts.append("<h2>Trends</h2>")
    parts.append(_trends_html(verdict["trends"]))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _trends_html(trends: list[dict]) -> str:
    if not trends:
        return "<p>No factor varied across finished CapsNet trials.</p>"
    rows = ["<p>One point per finished CapsNet trial. Numeric factors: Spearman's rank correlation "
            "&rho; (booleans as 0/1); categorical factors: Kruskal-Wallis H across levels. Bold: p &lt; 0.05 "
            "(uncorrected).</p><table><tr><th>factor</th><th>probe</th><th>test</th><th>statistic</th>"
            "<th>p-value</th><th>trials</th><th>levels</th><th>note</th></tr>"]
    for t in trends:
        sig = t["p_value"] is not None and t["p_value"] < 0.05
        stat = ("&rho; = " if t["test"] == "spearman" else "H = ") + _n(t["statistic"])
        rows.append(f"<tr{' class=sig' if sig else ''}><td>{_t(t['factor'])}</td><td>{_t(t['probe'])}</td>"
                    f"<td>{t['test']}</td><td class='num'>{stat}</td><td class='num'>{_n(t['p_value'])}</td>"
                    f"<td class='num'>{t['n']}</td><td class='num'>{t['levels']}</td><td>{_t(t['note'])}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _status_text(counts: dict) -> str:
    """'20 finished, 1 diverged, 1 failed': the trial statuses that occur."""
    skip = {"trials", "configurations", "candidates"}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if s not in skip and n)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


# ---------------------------------------------------------------------------------------------------
# Markdown

def _md(s) -> str:
    return str(s if s is not None else "").replace("|", "\\|").replace("\n", " ")


def render_markdown(verdict: dict, figures: list[dict]) -> str:
    yes = verdict["escaped"] == "yes"
    c = verdict["counts"]
    out = [f"# capsweep report: sweep `{verdict['sweep']}`", "",
           f"## Escaped: **{'YES' if yes else 'NO'}**", "", verdict["answer"] + ".", "",
           f"Experiment `{verdict['experiment']}` at `{verdict['tracking_uri']}`, parent run "
           f"`{verdict['parent_run_id']}`. {c['trials']} trials: {_status_text(c)}; "
           f"{c['configurations']} configurations, {c['candidates']} candidates.", ""]
    out += [f"> {n}" for n in verdict["notes"]] + ([""] if verdict["notes"] else [])
    out += ["## Thresholds", "", "| parameter | meaning | value |", "|---|---|---|"]
    out += [f"| `{k}` | {_md(text)} | {_md(_fmt(verdict['thresholds'].get(k)))} |" for k, text in THRESHOLD_TEXT]
    out += ["", "A candidate (CapsNet, depth >= 1) escapes when all hold, each on the conservative side "
                "of its interval:", ""]
    out += [f"{i}. {r}" for i, r in enumerate(verdict["rules"], 1)]
    out += ["", "## Configurations", "",
            "| id | configuration | verdict | seeds | " + " | ".join(FIGURE_NAMES[f] for f in FIGURES)
            + " | why not |", "|" + "---|" * (5 + len(FIGURES))]
    for cfg in _sorted_configs(verdict):
        v = f"**{cfg['verdict']}**" if cfg["escaped"] else cfg["verdict"]
        out.append(f"| {cfg['id']} | {_md(cfg['label'])} | {v} | {cfg['n_seeds']}/{sum(cfg['statuses'].values())} | "
                   + " | ".join(_interval(cfg["figures"][f]) for f in FIGURES)
                   + f" | {_md('; '.join(cfg['reasons']))} |")
    out += ["", "Values: mean over seeds [95% bootstrap interval].", "",
            "## Failed, diverged and unfinished trials", ""]
    if verdict["failed_trials"]:
        out += ["| trial | run id | seed | status | configuration | error |", "|---|---|---|---|---|---|"]
        out += [f"| {_md(t['trial_id'])} | `{t['run_id']}` | {_md(t['seed'])} | {t['status']} | "
                f"{t['config_id']}: {_md(t['label'])} | {_md(t['error'])} |" for t in verdict["failed_trials"]]
    else:
        out.append("None: every trial finished.")
    out += ["", "## Figures", ""]
    for fig in figures:
        if "file" in fig:
            out += [f"![{fig['title']}]({fig['file']})", "", f"*{fig['title']}.* {fig['caption']}", ""]
    for fig in figures:
        if "skipped" in fig:
            out.append(f"- Not drawn: {fig['title']}: {fig['skipped']}")
    out += ["", "## Trends", ""]
    if verdict["trends"]:
        out += ["Spearman's rho for numeric factors (booleans as 0/1), Kruskal-Wallis H for categorical ones; "
                "one point per finished CapsNet trial.", "",
                "| factor | probe | test | statistic | p-value | trials | levels | note |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {t['factor']} | {t['probe']} | {t['test']} | {_n(t['statistic'])} | {_n(t['p_value'])} | "
                f"{t['n']} | {t['levels']} | {_md(t['note'])} |" for t in verdict["trends"]]
    else:
        out.append("No factor varied across finished CapsNet trials.")
    return "\n".join(out) + "\n"


def default_out_dir(sweep: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sweep) or "sweep"
    return os.path.join("reports", safe)


__all__ = ["write_report", "log_report", "render_html", "render_markdown", "default_out_dir"]
