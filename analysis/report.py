"""Write the report of one sweep: verdict.json, the PNG figures, report.md (links to the PNGs) and
report.html (one self-contained file: PNGs as base64 data URIs, inline CSS, no external reference, so
it can be mailed or opened from the MLflow UI's artifact view); then log them on the sweep's parent run
under `report/`.

Order of both documents: the answer, the instrument (controls), the test with its margin and level (the
first lines); notes; the configurations table (candidates, then controls, then references; each
candidate's and control's checks under its row, the full list folded in a <details>); the thresholds
and rules; failed/diverged trials; the figures (and the ones skipped, with why); the trends table
(raw and Holm-adjusted p); the definitions live in docs/PROBES.md.
"""
from __future__ import annotations

import base64
import html
import os
from typing import Optional

from analysis import plots
from analysis.verdict import annotate, verdict_json
from capsmodels.contract import CANDIDATE, CONTROL, REFERENCE

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
    ("starved_frac_max", "worst hidden layer starved_frac shown at most"),
    ("dead_frac_max", "worst hidden layer dead_frac shown at most"),
    ("frozen_frac_max", "worst hidden layer frozen_frac shown at most"),
    ("chance_margin", "accuracy must exceed chance (1/num_classes) by"),
    ("num_classes", "number of classes"),
    ("chance_accuracy_floor", "so test accuracy shown at least"),
    ("dead_tau", "a capsule is dead when its largest activation is below tau ="),
]
_ROLE_ORDER = {CANDIDATE: 0, CONTROL: 1, REFERENCE: 2}
_VERDICT_ORDER = {"escaped": 0, "passes": 0, "undecided": 1, "not escaped": 2, "fails": 2}
_OUTCOME_CLASS = {"pass": "ok", "fail": "bad", "inconclusive": "unk"}
_ANSWER_CLASS = {"yes": "yes", "no": "no", "undecided": "und"}
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
.small{font-size:.85em}
"""


def _t(s) -> str:
    """Escape text for HTML; '://' is written as an entity so no URL-looking text appears raw."""
    return html.escape("" if s is None else str(s)).replace("://", "&#58;//")


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


def _cell(cfg: dict, key: str, null: Optional[str]) -> tuple[str, str, str]:
    """One table cell as (value, interval, null): the figure's mean, its bounds and, for a routing
    statistic, 'null x' (its null's mean); or the accuracy difference with its Welch bounds."""
    if key == "_acc_diff":
        test = (_check_of(cfg, "accuracy") or {}).get("test")
        if not test or test.get("diff") is None:
            return "n/a", "", ""
        return (*_interval({"mean": test["diff"], "lo": test["lo"], "hi": test["hi"]}, signed=True), "")
    value, ci = _interval(cfg["figures"][key])
    null_mean = cfg["figures"][null]["mean"] if null else None
    return value, ci, f"null {_n(null_mean)}" if null and (value != "n/a" or null_mean is not None) else ""


def _check_of(cfg: dict, name: Optional[str]) -> Optional[dict]:
    return next((c for c in cfg.get("checks") or [] if c["name"] == name), None)


def _sorted_configs(verdict: dict) -> list[dict]:
    return sorted(verdict["configurations"],
                  key=lambda c: (_ROLE_ORDER.get(c["role"], 3), _VERDICT_ORDER.get(c["verdict"], 3),
                                 c["depth"] if c["depth"] is not None else -1, c["id"]))


def _why(cfg: dict) -> str:
    """'fails: accuracy, dead; undecided: frozen' (empty when every check passes)."""
    parts = []
    for outcome, word in (("fail", "fails"), ("inconclusive", "undecided")):
        names = [c["name"] for c in cfg["checks"] if c["outcome"] == outcome]
        if names:
            parts.append(f"{word}: {', '.join(names)}")
    return "; ".join(parts)


def _headline(verdict: dict) -> tuple[str, str]:
    word = {"yes": "YES", "no": "NO", "undecided": "UNDECIDED"}[verdict["escaped"]]
    return f"Escaped: {word}", f"Instrument: {verdict['instrument']}"


def write_report(data, verdict: dict, out_dir: str, annotated: Optional[tuple] = None) -> dict[str, str]:
    """Write verdict.json, the figures, report.md and report.html into out_dir; return their paths.
    annotated: `annotate(data)` when the caller has it already (it computed the verdict from it)."""
    os.makedirs(out_dir, exist_ok=True)
    trials, _, swept = annotated or annotate(data)
    figures = plots.make_plots(trials, data.histories, verdict, out_dir, swept)
    paths = {"verdict": os.path.join(out_dir, "verdict.json"),
             "markdown": os.path.join(out_dir, "report.md"),
             "html": os.path.join(out_dir, "report.html")}
    texts = {"verdict": verdict_json(verdict), "markdown": render_markdown(verdict, figures),
             "html": render_html(data, verdict, figures, out_dir)}   # all rendered before any is written
    for key, text in texts.items():
        with open(paths[key], "w") as f:
            f.write(text)
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
    c = verdict["counts"]
    answer, instrument = _headline(verdict)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>capsweep report: {_t(verdict['sweep'])}</title>", f"<style>{CSS}</style></head><body>",
        f'<div class="answer {_ANSWER_CLASS[verdict["escaped"]]}">{_t(answer)}</div>',
        f'<div class="instrument {_INSTRUMENT_CLASS.get(verdict["instrument"], "und")}">{_t(instrument)}. '
        f'<span style="font-weight:400">{_t(verdict["instrument_text"])}.</span></div>',
        f'<p class="test"><b>Test.</b> {_t(verdict["test"])}. <b>Answer.</b> {_t(verdict["answer"])}.</p>',
        f"<h1>capsweep report &mdash; sweep <code>{_t(verdict['sweep'])}</code></h1>",
        f"<p class='muted small'>Experiment <code>{_t(verdict['experiment'])}</code> at "
        f"<code>{_t(verdict['tracking_uri'])}</code>; parent run <code>{_t(verdict['parent_run_id'])}</code>; "
        f"references from {_t(verdict['reference_source'])}. "
        f"{c['trials']} trials: {_t(_status_text(c))}; {c['configurations']} configurations, "
        f"{c['candidates']} candidate(s), {c['controls']} control(s). Read in {data.load_seconds:.1f} s "
        f"(histories: {_t(data.history_method)}).</p>",
    ]
    parts += [f'<div class="note">{_t(n)}</div>' for n in verdict["notes"]]

    level = f"{100 * (1 - 2 * verdict['thresholds']['alpha']):g}%"
    parts.append("<h2>Configurations</h2>")
    parts.append(f"<p class='small'>Each cell: mean over the configuration's finished seeds [two-sided {level} "
                 "t interval, each end the one-sided bound the verdict uses]; grad ratio and min act_grad: "
                 "geometric mean (their checks work on log10). &Delta; acc: candidate &minus; matched depth-0 "
                 "reference with its Welch bounds. Colour: the check on that column passes (green), fails (red) "
                 "or is undecided (yellow). Tree score and routing dynamics: with the same statistic on the null "
                 "(votes permuted across inputs) below. n/a: the probe is not logged (never counted as evidence). "
                 "Under each row: the checks that did not pass; unfold for every check.</p>")
    ncols = 4 + len(COLUMNS)
    parts.append("<table><tr><th>id</th><th>configuration</th><th>verdict</th><th>seeds</th>"
                 + "".join(f"<th>{title}</th>" for _, title, _, _ in COLUMNS) + "</tr>")
    for cfg in _sorted_configs(verdict):
        total = sum(cfg["statuses"].values())
        vcls = _OUTCOME_CLASS.get(cfg["outcome"], "")
        role = f"{cfg['role']}: " if cfg["role"] == CONTROL else ""
        cells = []
        for key, _, check, null in COLUMNS:
            chk = _check_of(cfg, check)
            cls = f"num {_OUTCOME_CLASS[chk['outcome']]}" if chk else "num"
            value, ci, null_text = _cell(cfg, key, null)
            cells.append(f"<td class='{cls}'><span class='m'>{_t(value)}</span>"
                         + (f"<br><span class='ci'>{_t(ci).replace(', ', ',<wbr> ')}</span>" if ci else "")
                         + (f"<br><span class='ci'>{_t(null_text)}</span>" if null_text else "") + "</td>")
        row_cls = "reference" if cfg["role"] == REFERENCE else "main"
        parts.append(f"<tr class='{row_cls}'><td>{cfg['id']}</td><td>{_t(cfg['label'])}</td>"
                     f"<td class='v {vcls}'>{_t(role + cfg['verdict'])}</td>"
                     f"<td class='num'>{cfg['n_seeds']}/{total}</td>{''.join(cells)}</tr>")
        if cfg["checks"]:
            why = _why(cfg)
            shown = "".join(f"<li>{_t(ch['text'])}</li>" for ch in cfg["checks"] if ch["outcome"] != "pass")
            every = "".join(f"<li><b>{_t(ch['outcome'])}</b>: {_t(ch['text'])}</li>" for ch in cfg["checks"])
            ref = cfg["reference"] or {}
            ref_text = (f"reference: {ref.get('how')} depth-0 {ref.get('arch')} from {ref.get('source')}, "
                        f"{ref.get('n_trials')} trial(s)") if ref.get("n_trials") else "no reference"
            head = f"<b>{_t(why)}</b><ul class='checks'>{shown}</ul>" if shown else ""
            summary = f"{'' if shown else '<b>every check passes</b>; '}all checks ({_t(ref_text)})"
            parts.append(f"<tr class='why'><td></td><td colspan='{ncols - 1}'>{head}<details><summary>{summary}"
                         f"</summary><ul class='checks'>{every}</ul></details></td></tr>")
    parts.append("</table>")

    parts.append("<h2>Thresholds and rules</h2><table><tr><th>parameter</th><th>meaning</th><th>value</th></tr>")
    for key, text in THRESHOLD_TEXT:
        v = verdict["thresholds"].get(key)
        parts.append(f"<tr><td><code>{key}</code></td><td>{_t(text)}</td><td class='num'>{_t(_fmt(v))}</td></tr>")
    parts.append("</table><ol>" + "".join(f"<li>{_t(r)}</li>" for r in verdict["rules"]) + "</ol>"
                 "<p class='muted small'>Definitions of every probe and check: docs/PROBES.md in the capsweep "
                 "repository.</p>")

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
    parts.append(_trends_html(verdict["trends"], verdict["thresholds"]["alpha"]))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


TRENDS_TEXT = ("One point per CapsNet configuration (its mean over seeds), never per seed. Numeric factors: "
               "Spearman's rank correlation rho (booleans as 0/1); categorical factors: Kruskal-Wallis H "
               "across levels. Other swept factors vary along with the one tested. p: raw; p (Holm): "
               "adjusted across all {m} tests of this report.")


def _trends_html(trends: list[dict], alpha: float) -> str:
    if not trends:
        return "<p>No factor varied across CapsNet configurations.</p>"
    m = sum(t["p_value"] is not None for t in trends)
    rows = [f"<p class='small'>{_t(TRENDS_TEXT.format(m=m))} Bold: Holm-adjusted p &lt; {alpha:g}.</p>"
            "<table><tr><th>factor</th><th>probe</th><th>test</th><th>statistic</th>"
            "<th>p</th><th>p (Holm)</th><th>configurations</th><th>levels</th><th>note</th></tr>"]
    for t in trends:
        sig = t["p_holm"] is not None and t["p_holm"] < alpha
        stat = ("rho = " if t["test"] == "spearman" else "H = ") + _n(t["statistic"])
        rows.append(f"<tr{' class=sig' if sig else ''}><td>{_t(t['factor'])}</td><td>{_t(t['probe'])}</td>"
                    f"<td>{t['test']}</td><td class='num'>{stat}</td><td class='num'>{_n(t['p_value'])}</td>"
                    f"<td class='num'>{_n(t['p_holm'])}</td><td class='num'>{t['n']}</td>"
                    f"<td class='num'>{t['levels']}</td><td>{_t(t['note'])}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


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


# ---------------------------------------------------------------------------------------------------
# Markdown

def _md(s) -> str:
    return str(s if s is not None else "").replace("|", "\\|").replace("\n", " ")


def _md_cell(value: str, ci: str, null_text: str) -> str:
    """'0.25 [0.2, 0.3] (null 0.07)'."""
    return " ".join(p for p in (value, ci, f"({null_text})" if null_text else "") if p)


def render_markdown(verdict: dict, figures: list[dict]) -> str:
    c = verdict["counts"]
    answer, instrument = _headline(verdict)
    level = f"{100 * (1 - 2 * verdict['thresholds']['alpha']):g}%"
    out = [f"# {answer}", "", f"**{instrument}.** {verdict['instrument_text']}.", "",
           f"**Test.** {verdict['test']}.", "", f"**Answer.** {verdict['answer']}.", "",
           f"capsweep report of sweep `{verdict['sweep']}`: experiment `{verdict['experiment']}` at "
           f"`{verdict['tracking_uri']}`, parent run `{verdict['parent_run_id']}`, references from "
           f"{verdict['reference_source']}. {c['trials']} trials: {_status_text(c)}; {c['configurations']} "
           f"configurations, {c['candidates']} candidate(s), {c['controls']} control(s).", ""]
    out += [f"> {n}" for n in verdict["notes"]] + ([""] if verdict["notes"] else [])
    titles = [html.unescape(t) for _, t, _, _ in COLUMNS]
    out += ["## Configurations", "",
            f"Mean over finished seeds [two-sided {level} t interval]; grad ratio and min act_grad: geometric "
            "means; delta acc: candidate - reference with its Welch bounds; tree score and routing dyn.: with their "
            "null (votes permuted across inputs). Checks that did not pass: below the table. n/a: not logged.", "",
            "| id | configuration | verdict | seeds | " + " | ".join(titles) + " |",
            "|" + "---|" * (4 + len(COLUMNS))]
    for cfg in _sorted_configs(verdict):
        v = f"**{cfg['verdict']}**" if cfg["escaped"] else cfg["verdict"]
        if cfg["role"] == CONTROL:
            v = f"control: {v}"
        out.append(f"| {cfg['id']} | {_md(cfg['label'])} | {v} | {cfg['n_seeds']}/{sum(cfg['statuses'].values())} | "
                   + " | ".join(_md(_md_cell(*_cell(cfg, key, null))) for key, _, _, null in COLUMNS) + " |")
    out += ["", "### Why (checks that did not pass)", ""]
    for cfg in _sorted_configs(verdict):
        bad = [ch for ch in cfg["checks"] if ch["outcome"] != "pass"]
        if cfg["checks"]:
            out.append(f"- **{cfg['id']}** ({cfg['verdict']}): " + ("; ".join(
                f"{ch['outcome']}: {_md(ch['text'])}" for ch in bad) if bad else "every check passes"))
    out += ["", "## Thresholds and rules", "", "| parameter | meaning | value |", "|---|---|---|"]
    out += [f"| `{k}` | {_md(text)} | {_md(_fmt(verdict['thresholds'].get(k)))} |" for k, text in THRESHOLD_TEXT]
    out += [""] + [f"{i}. {r}" for i, r in enumerate(verdict["rules"], 1)]
    out += ["", "Definitions: docs/PROBES.md.", "", "## Failed, diverged and unfinished trials", ""]
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
        m = sum(t["p_value"] is not None for t in verdict["trends"])
        out += [TRENDS_TEXT.format(m=m), "",
                "| factor | probe | test | statistic | p | p (Holm) | configurations | levels | note |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {t['factor']} | {t['probe']} | {t['test']} | {_n(t['statistic'])} | {_n(t['p_value'])} | "
                f"{_n(t['p_holm'])} | {t['n']} | {t['levels']} | {_md(t['note'])} |" for t in verdict["trends"]]
    else:
        out.append("No factor varied across CapsNet configurations.")
    return "\n".join(out) + "\n"


def default_out_dir(sweep: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sweep) or "sweep"
    return os.path.join("reports", safe)


__all__ = ["write_report", "log_report", "render_html", "render_markdown", "default_out_dir"]
