#!/usr/bin/env python3
"""Render docs/FINDINGS.md from the committed findings reports, or check that it matches them.

    python docs/findings/claims.py            # write docs/FINDINGS.md from FINDINGS.template.md
    python docs/findings/claims.py --check    # exit 1, one line per difference, when FINDINGS.md differs
                                              # from what the data give or the template has a bare number

Every number FINDINGS.md states is a claim: a function of the committed reports in docs/findings/<report>/
(verdict.json, report.md, the spec beside them; claim_library for the generic ones, this file for the
few a section computes in its own way) that the template names in a placeholder. The prose stays
hand-written in the template; its numbers never are (template_render.bare_numbers).

Adding a report: commit its folder under docs/findings/ (verdict.json, report.md) and its spec
(findings-<name>.yaml); placeholders `{{<folder>.fig(...)}}`, `count`, `range`, `rho`, ... work on it
at once. A claim only one section needs is a function registered here with `@claim("<folder>.<name>")`.

Standard library, numpy, pandas (and PyYAML for the specs); `analysis.stats` for the report's own
statistics; `capsmodels.config`/`presets` (plain data) for the settings the reports do not record.
No torch, no MLflow store: it works from the committed files alone.
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import claim_library as lib                                   # noqa: E402
import report_data                                            # noqa: E402
import template_render                                        # noqa: E402
from claim_library import ClaimError, Num, claim, join, one, select  # noqa: E402

TEMPLATE = HERE / "FINDINGS.template.md"
FINDINGS = REPO / "docs" / "FINDINGS.md"
CODE = "code"                  # the placeholder namespace of settings read from capsmodels' config


# ---------------------------------------------------------------------------------------------------
# Claims on any report that FINDINGS' sections phrase in their own way

def chance_floor(r) -> float:
    """The verdict's chance floor: 1/num_classes + chance_margin."""
    t = r.thresholds
    return float(t.get("chance_accuracy_floor", 1 / t["num_classes"] + t["chance_margin"]))


@claim()
def at_chance(r, sel) -> Num:
    """How many selected configurations end at chance: mean test accuracy over their seeds below
    the verdict's chance floor (1/num_classes + chance_margin, 0.15 for ten classes)."""
    rows = select(r, sel)
    return Num(int((rows["test_acc"] < chance_floor(r)).sum()), "d")


@claim()
def above_chance(r, sel) -> str:
    """The selected configurations whose mean test accuracy is at or above the chance floor, each as
    'cNN (label) averages m [lo, hi]' (or 'none')."""
    rows = select(r, sel)
    rows = rows[rows["test_acc"] >= chance_floor(r)]
    if rows.empty:
        return "none"
    return join([f"{row['id']} ({lib.short_label(row)}) averages {row['test_acc']:.3f} "
                 f"[{row['test_acc.lo']:.3f}, {row['test_acc.hi']:.3f}]" for _, row in rows.iterrows()])


@claim()
def chance_floor_value(r, sel) -> Num:
    """The verdict's chance floor itself (1/num_classes + chance_margin)."""
    return Num(chance_floor(r), ".2f")


@claim()
def trains_all(r, sel) -> str:
    """'every' when every selected configuration's chance check passes (the lower t bound of its test
    accuracy is above the chance floor), else 'N of M'."""
    rows = select(r, sel)
    ok = int((rows.get("check.chance") == "pass").sum())
    return "every" if ok == len(rows) else f"{ok} of {len(rows)}"


@claim()
def accuracy_check(r, sel) -> str:
    """The accuracy check of the one selected configuration as its Welch bounds of candidate minus
    reference: '[-0.009, +0.019]'."""
    row = one(r, sel)
    return f"[{row['check.accuracy.lo']:+.3f}, {row['check.accuracy.hi']:+.3f}]"


@claim()
def holm_level(r, sel) -> Num:
    """The level the most promising candidate's p-value must be under for the sweep to say yes: Holm's
    first step, alpha / the number of candidates in the family (verdict.json `family`)."""
    fam = r.raw.get("family") or {}
    if not fam.get("candidates"):
        raise ClaimError(f"{r.name}: verdict.json has no family of candidates")
    return Num(float(fam["alpha"]) / int(fam["candidates"]), ".2g")


@claim()
def plan(r, field: str, sel) -> object:
    """A field of the report's confirmation plan (verdict.json `confirm`): `seeds` (fresh seeds per
    configuration), `top` (how many candidates), `command`; `ids` the ranked candidates it re-runs."""
    p = r.raw.get("confirm") or {}
    if field == "ids":
        return join([c["id"] for c in (p.get("ranked") or [])[: int(p.get("top") or 0)]] or ["none"])
    if field not in p:
        raise ClaimError(f"{r.name}: the confirmation plan has no {field!r}")
    v = p[field]
    return Num(v, "d") if isinstance(v, int) else str(v)


@claim()
def verdict_of(r, sel) -> str:
    """The verdict of the one selected configuration, as the report's table reads it."""
    return str(one(r, sel)["verdict"])


@claim()
def configs_table(r, sel) -> str:
    """The selected configurations as the report's first table reads them, in id order: verdict,
    test accuracy (mean over finished seeds), the accuracy check's difference to the matched depth-0
    reference with its Welch bounds, grad_ratio, the gradient floor (smallest act_grad over the routed
    layers) and the worst hidden layer's starved and dead fractions."""
    rows = select(r, sel).sort_values("id")
    lines = ["| id | configuration | verdict | test acc | Δ acc vs ref [Welch bounds] | grad ratio "
             "| min act_grad | starved | dead |", "|" + "---|" * 9]
    for _, row in rows.iterrows():
        label = " ".join(t for t in str(row["label"]).split() if not t.startswith("arch=capsnet"))
        diff = row.get("check.accuracy.diff")
        delta = ("n/a" if diff is None or diff != diff else
                 f"{diff:+.3f} [{row['check.accuracy.lo']:+.3f}, {row['check.accuracy.hi']:+.3f}]")
        cells = [row["id"], label, str(row["verdict"]), f"{row['test_acc']:.3f}", delta,
                 lib.fmt(row["grad_ratio"], "sci2"), lib.fmt(row["act_grad_min"], "sci2"),
                 lib.fmt(row.get("starved_worst"), ".2g"), lib.fmt(row.get("dead_worst"), ".2g")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Tables rendered whole

def _acc_cell(r, row, margin: float) -> str:
    """A test accuracy cell: bold with its starved/dead fractions when the network trains (chance
    check passes) but its hidden capsules starve or die beyond the thresholds; the Welch bounds when
    the verdict is undecided."""
    text = f"{row['test_acc']:.3f}"
    t = r.thresholds
    if row.get("check.chance") == "pass" and (row["starved_worst"] > t["starved_frac_max"]
                                              or row["dead_worst"] > t["dead_frac_max"]):
        text = (f"**{text}** (starved {lib.fmt(row['starved_worst'], '.2g')}, "
                f"dead {lib.fmt(row['dead_worst'], '.2g')})")
    if row["verdict"] == "undecided":
        text += (f" (undecided: [{row['check.accuracy.lo']:+.2f}, {row['check.accuracy.hi']:+.2f}] "
                 f"vs {-margin:+.2f})")
    return text


@claim("remedies.table")
def remedies_table(r, routings: str, sel) -> str:
    """Test accuracy at one depth (the selector) of each routing family (rows, in the order given)
    under no remedy, residual, pose_norm and both, with the depth-0 references without and with
    pose_norm; mean over seeds, cells marked as `_acc_cell` says."""
    remedies = [("none", "false", "false"), ("residual", "true", "false"), ("pose_norm", "false", "true"),
                ("residual + pose_norm", "true", "true")]
    depth = next(v for k, op, v in sel if k == "depth")
    n = lib.seeds(r, sel=sel).value
    margin = float(r.thresholds["acc_margin"])
    head = (f"| depth {depth}, test acc ({n} seeds) | " + " | ".join(name for name, _, _ in remedies)
            + " | depth-0 reference (without / with pose_norm) |")
    lines = [head, "|" + "---|" * (len(remedies) + 2)]
    for routing in routings.split():
        cells = [_acc_cell(r, one(r, sel + [("routing", "=", routing), ("residual", "=", res),
                                             ("pose_norm", "=", pn), ("arch", "=", "capsnet")]), margin)
                 for _, res, pn in remedies]
        refs = [one(r, [("depth", "=", "0"), ("arch", "=", "capsnet"), ("routing", "=", routing),
                        ("residual", "=", "false"), ("pose_norm", "=", pn)])["test_acc"]
                for pn in ("false", "true")]
        lines.append(f"| {routing} | " + " | ".join(cells) + f" | {refs[0]:.3f} / {refs[1]:.3f} |")
    return "\n".join(lines)


@claim("parse_tree.table")
def parse_tree_table(r, routings: str, sel) -> str:
    """Per routing family (columns, in the order given) at depth 0 and 3 of the parts sweep: test
    accuracy, tree_recovery (report.md's mean over the routed layers: at depth 0 the class layer
    alone) and, where the report has them, its two halves tree_direction and tree_concentration, and
    the accuracy on the affine-transformed test set; the largest tree_recovery of a row in
    bold, a configuration at chance marked collapsed."""
    fams = routings.split()
    depths = sorted({int(d) for d in r.configs.loc[r.configs["arch"] == "capsnet", "depth"]})
    row_of = {(d, f): one(r, sel + [("arch", "=", "capsnet"), ("depth", "=", str(d)), ("routing", "=", f)])
              for d in depths for f in fams}
    lines = ["| `parts`, init " + str(r.spec.get("base", {}).get("model", {}).get("init", "")) + " | "
             + " | ".join(fams) + " |", "|" + "---|" * (len(fams) + 1)]
    for d in depths:
        accs = []
        for f in fams:
            row = row_of[(d, f)]
            cell = f"{row['test_acc']:.3f}"
            accs.append(cell + (" (collapsed)" if row["test_acc"] < chance_floor(r) else ""))
        lines.append(f"| depth {d}: test acc | " + " | ".join(accs) + " |")
        tr = [row_of[(d, f)]["tree_recovery"] for f in fams]
        best = max((v for v in tr if v == v), default=math.nan)
        what = "class layer" if d == 0 else "mean over the routed layers"
        cells = ["n/a" if v != v else (f"**{v:.3f}**" if v == best else f"{v:.3f}") for v in tr]
        lines.append(f"| depth {d}: tree_recovery ({what}) | " + " | ".join(cells) + " |")
        for half in ("tree_direction", "tree_concentration"):      # its two halves, where logged
            if half in r.configs.columns:
                vals = [row_of[(d, f)][half] for f in fams]
                lines.append(f"| depth {d}: {half} | " + " | ".join("n/a" if v != v else f"{v:.3f}" for v in vals)
                             + " |")
    trans = [" / ".join(f"{row_of[(d, f)]['test_acc_transformed']:.2f}" for d in depths) for f in fams]
    lines.append("| test acc, affine-transformed test set (" + " / ".join(f"depth {d}" for d in depths)
                 + ") | " + " | ".join(trans) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Settings the reports do not record: capsmodels' config defaults and presets (plain data, no torch)

@claim("code.config")
def code_config(path: str, sel, spec: str = "") -> Num:
    """A default of capsmodels' config dataclasses, `model.init_std` or `data.affine_rotation`: the
    setting a findings spec did not override ran at it."""
    from capsmodels import config
    section, name = path.split(".")
    cls = {"model": config.ModelConfig, "data": config.DataConfig, "train": config.TrainConfig}[section]
    return Num(getattr(cls(), name), "g")


@claim()
def preset(r, name: str, sel) -> str:
    """A preset's capsule network in words: stem, primary capsules (and how many on 28x28), hidden
    and class capsule layers, the class count from the report's data (capsmodels/presets.py; a
    preset is plain data)."""
    from capsmodels.presets import PRESETS
    p = PRESETS[name]
    num_classes = int(r.thresholds["num_classes"])
    k, ch = p["conv_kernel"], p["conv_channels"]
    side = ((28 - k + 1) - p["primary_kernel"]) // p["primary_stride"] + 1
    return (f"conv {'/'.join(map(str, ch))}@{k}x{k}; {p['primary_channels']}x{p['primary_dim']}D primary "
            f"capsules at {p['primary_kernel']}x{p['primary_kernel']} stride {p['primary_stride']}, i.e. "
            f"{side * side * p['primary_channels']} primaries on 28x28; hidden layers of "
            f"{p['num_caps']}x{p['caps_dim']}D capsules; {num_classes}x{p['out_dim']}D class capsules")


# ---------------------------------------------------------------------------------------------------
# Rendering and the check

@lru_cache(maxsize=None)
def _report(root: Path, name: str):
    return report_data.load(name, root)


def make_context(root: Path):
    """What a placeholder's namespace names: a report folder under `root`, or None for `code`."""
    names = report_data.report_names(root)

    def context(ns: str):
        if ns == CODE:
            return None
        if ns not in names:
            raise ClaimError(f"no report folder {ns}/ under {root} (have: {', '.join(names)})")
        return _report(root, ns)
    return context


def depth_levels(root: Path) -> set[float]:
    """Every depth some committed report holds: the levels prose may name without a placeholder."""
    return set().union(*(lib.numeric_levels(_report(root, n), "depth") for n in report_data.report_names(root)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 when FINDINGS.md differs from the rendering or the template "
                         "has a bare number")
    ap.add_argument("--template", type=Path, default=TEMPLATE, help="template (default: %(default)s)")
    ap.add_argument("--findings", type=Path, default=FINDINGS, help="the rendered file (default: %(default)s)")
    ap.add_argument("--reports", type=Path, default=HERE,
                    help="folder holding the report folders and specs (default: %(default)s)")
    args = ap.parse_args(argv)
    text = args.template.read_text()
    rendered, problems = template_render.render(text, make_context(args.reports), where=args.template.name)
    unanswered = bool(problems)                  # a placeholder the data could not answer
    problems += template_render.bare_numbers(text, depth_levels(args.reports), where=args.template.name)
    if args.check:
        have = args.findings.read_text() if args.findings.is_file() else ""
        if not unanswered:                       # a half-rendered text would differ everywhere
            problems += template_render.diff_lines(have, rendered, where=args.findings.name)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    args.findings.write_text(rendered)
    print(f"wrote {args.findings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
