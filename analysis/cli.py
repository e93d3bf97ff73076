"""`capsweep report`: read a sweep from MLflow, decide the verdict, write the report, log it to MLflow;
and the other commands of `capsweep` that only read a store (ls, status, compare, export: bodies in
analysis/inspect.py), which the capsweep parser (sweeps/cli.py) dispatches here.

    capsweep report [SWEEP] [--experiment NAME] [--tracking-uri URI] [--reference SWEEP] [--out DIR]
                    [--alpha A] [--acc-margin D] [--grad-margin DECADES] [--grad-ratio-min X] [--grad-ratio-max X]
                    [--starved-frac-max X] [--dead-frac-max X] [--frozen-frac-max X]
                    [--chance-margin X] [--num-classes N] [--no-log-artifacts]

SWEEP (or `--sweep SWEEP`, the same): the sweep to report, by default the experiment's most recent.
Also `python -m analysis ...`. Exit codes, as every capsweep subcommand: 0 report written; 2 bad input
or bad arguments (one line on stderr: missing store, experiment or sweep, no finished trial, runs
without the probes, a flag out of range); 1 a failure while running (the store fails mid-read, the
report cannot be written or logged); 130 interrupted. Both CLIs run their commands through
capsmodels/command.py (one-line errors, the exit code a CapsweepError carries, CAPSWEEP_DEBUG).
The rules the flags set: docs/PROBES.md, "The verdict".
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Optional

from analysis.errors import AnalysisError
from analysis.inspect import InspectError  # noqa: F401 - the read-only commands' bad input (a CapsweepError)
from analysis.store import mlflow_http_env
from capsmodels.command import OneLineParser, fail, one_line_failures, parsed, run_command
from capsmodels.contract import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, TRACKING_URI_ENV, redact
from capsmodels.errors import EXIT_FAILED, CapsweepError

PROG = "capsweep report"
REPLACED = {"--acc-tolerance": "--acc-margin (a non-inferiority margin)",
            "--grad-floor": "--grad-margin (decades of min act_grad against the reference)"}
IGNORED = {"--bootstrap": "the verdict uses t bounds, not a bootstrap",
           "--seed": "the verdict uses t bounds, not a bootstrap"}


def build_parser() -> argparse.ArgumentParser:
    from analysis.verdict import Thresholds
    d = Thresholds()
    p = OneLineParser(prog=PROG, description="Decide whether any CapsNet configuration of a sweep escapes "
                       "vanishing gradients and capsule starvation, and write the report. A candidate (CapsNet, "
                       "depth >= 1) escapes when every check passes at level --alpha: accuracy and gradient floor "
                       "non-inferior to the matched depth-0 CapsNet (Welch one-sided test with a margin), grad_ratio, "
                       "starved, dead and frozen fractions and accuracy against chance shown on the right side of "
                       "their thresholds by one-sided t bounds. Definitions: docs/PROBES.md.")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                   help=f"MLflow experiment name (default: {DEFAULT_EXPERIMENT})")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI (default: ${TRACKING_URI_ENV}, else {DEFAULT_TRACKING_URI})")
    p.add_argument("sweep", nargs="?", default=None, metavar="SWEEP",
                   help="sweep name (or --sweep SWEEP; default: the most recent sweep of the experiment)")
    p.add_argument("--sweep", dest="sweep_opt", default=None, metavar="SWEEP", help=argparse.SUPPRESS)
    p.add_argument("--reference", default=None, metavar="SWEEP",
                   help="take the depth-0 reference trials from this other sweep of the same experiment "
                        "(matched on the shared params) instead of the sweep's own")
    p.add_argument("--out", default=None, help="output folder (default: reports/<sweep>)")
    p.add_argument("--ui-url", default=None, metavar="URL",
                   help="the MLflow UI's address (as `capsweep ui` prints it, e.g. http://127.0.0.1:5000): the "
                        "report links each MLflow run id to its page (default: only when the store is an http(s) "
                        "tracking server, which serves the UI itself)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"level of every one-sided test and bound, in (0, 0.5) (default {d.alpha})")
    p.add_argument("--acc-margin", type=float, default=d.acc_margin,
                   help="non-inferiority margin of test accuracy against the depth-0 reference, absolute "
                        f"fraction in [0, 1) (default {d.acc_margin})")
    p.add_argument("--grad-margin", type=float, default=d.grad_margin,
                   help="non-inferiority margin of log10 min act_grad against the reference, in decades, "
                        f">= 0 (default {d.grad_margin})")
    p.add_argument("--grad-ratio-min", type=float, default=d.grad_ratio_min,
                   help=f"grad_ratio (act_grad/l1 / act_grad/l{{L}}) must be shown at least this, > 0 "
                        f"(default {d.grad_ratio_min})")
    p.add_argument("--grad-ratio-max", type=float, default=d.grad_ratio_max,
                   help=f"... and at most this (a collapsed class layer gives 1e4 and more), > grad-ratio-min "
                        f"(default {d.grad_ratio_max:g})")
    for name, what in (("starved", "starved_frac"), ("dead", "dead_frac"), ("frozen", "frozen_frac")):
        v = getattr(d, f"{name}_frac_max")
        p.add_argument(f"--{name}-frac-max", type=float, default=v,
                       help=f"worst hidden layer's {what} must be shown at most this, in [0, 1] (default {v})")
    p.add_argument("--chance-margin", type=float, default=d.chance_margin,
                   help=f"accuracy must be shown above 1/num_classes by this, in [0, 1) (default {d.chance_margin})")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the task (default: from data.name)")
    p.add_argument("--select", default=None, metavar="KEY[,KEY]",
                   help="swept keys to tune on validation (e.g. train.lr): per configuration of the other params "
                        "the value with the best mean val_acc is judged, the others are not (default: the "
                        "sweep's own `select:`; '' for none)")
    p.add_argument("--no-log-artifacts", action="store_true",
                   help="do not log the report on the sweep's parent run")
    for flag in IGNORED:
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    return p


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    """Range checks argparse types cannot express; each error is one line, exit 2. Also the one sweep
    name of the positional and --sweep. Returns `a`."""
    if a.sweep is not None and a.sweep_opt is not None and a.sweep != a.sweep_opt:
        p.error(f"sweep: named twice ({a.sweep!r} and --sweep {a.sweep_opt!r}); name it once")
    a.sweep = a.sweep if a.sweep is not None else a.sweep_opt
    rules = [
        ("--alpha", a.alpha, 0 < a.alpha < 0.5, "must be in (0, 0.5)"),
        ("--acc-margin", a.acc_margin, 0 <= a.acc_margin < 1, "must be in [0, 1) (a fraction)"),
        ("--grad-margin", a.grad_margin, 0 <= a.grad_margin < 300, "must be in [0, 300) (decades)"),
        ("--grad-ratio-min", a.grad_ratio_min, 0 < a.grad_ratio_min < float("inf"), "must be > 0 and finite"),
        ("--grad-ratio-max", a.grad_ratio_max, a.grad_ratio_min < a.grad_ratio_max < float("inf"),
         "must be finite and above --grad-ratio-min"),
        ("--starved-frac-max", a.starved_frac_max, 0 <= a.starved_frac_max <= 1, "must be in [0, 1]"),
        ("--dead-frac-max", a.dead_frac_max, 0 <= a.dead_frac_max <= 1, "must be in [0, 1]"),
        ("--frozen-frac-max", a.frozen_frac_max, 0 <= a.frozen_frac_max <= 1, "must be in [0, 1]"),
        ("--chance-margin", a.chance_margin, 0 <= a.chance_margin < 1, "must be in [0, 1)"),
    ]
    for flag, value, ok, allowed in rules:
        if not ok:
            p.error(f"{flag}: {value} is not allowed; {allowed}")
    if a.num_classes is not None and a.num_classes < 2:
        p.error(f"--num-classes: {a.num_classes} is not allowed; must be >= 2")
    if not a.experiment:
        p.error("--experiment: must not be empty")
    if a.ui_url is not None and not re.match(r"^https?://[^/\s]+", a.ui_url):
        p.error(f"--ui-url: {a.ui_url!r} is not allowed; give the UI's http(s) address, e.g. http://127.0.0.1:5000")
    if a.reference is not None and (not a.reference or a.reference == a.sweep):
        p.error(f"--reference: {a.reference!r} is not allowed; must name another sweep of the experiment")
    return a


def _quiet_mlflow() -> None:
    """MLflow and alembic log INFO lines (database migrations) to stderr; keep stderr for our own lines."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for old, new in REPLACED.items():
        if any(a == old or a.startswith(old + "=") for a in argv):
            return fail(PROG, f"{old} was replaced by {new} (see {PROG} --help)")
    args = parsed(lambda: _check(parser, parser.parse_args(argv)))
    if isinstance(args, int):       # argparse's one-line error (2) or --help (0)
        return args
    # MLflow/network/disk errors are one line too, the traceback only with CAPSWEEP_DEBUG
    return run_command(PROG, lambda: _report(args), failures_as_line=True)


def _report(args: argparse.Namespace) -> int:
    import warnings
    from capsmodels.progress import Status
    # a status line on a terminal: the store, the verdict and the figures take seconds (erased on the way
    # out, before an error's line)
    with Status(PROG) as status:
        status("opening the store")
        # a tracking server that does not answer fails the report in seconds, not after minutes of
        # MLflow's own retries; the user's settings win, and the block restores the environment (main()
        # may run inside another program: the sweeps CLI, tests)
        with warnings.catch_warnings(), mlflow_http_env(max_retries=2, timeout_s=30, override=False):
            warnings.simplefilter("ignore")  # library deprecation noise is not the user's business
            _quiet_mlflow()
            return _run(args, status)


def _init_store(tracking_uri: Optional[str]) -> None:
    """Migrate an existing SQLite store under its lock before reading it (analysis/store.py); a missing
    one is left to load_sweep's one-line refusal. StoreInitError (one line, exit 2) otherwise."""
    from analysis.store import open_client, resolve_tracking_uri
    open_client(resolve_tracking_uri(tracking_uri))      # a server that does not answer: one line within seconds


def _run(args: argparse.Namespace, status=None) -> int:
    from analysis.load import load_sweep
    from analysis.report import default_out_dir, log_report, write_report
    from analysis.verdict import Thresholds, annotate, compute_verdict
    th = Thresholds(alpha=args.alpha, acc_margin=args.acc_margin, grad_margin=args.grad_margin,
                    grad_ratio_min=args.grad_ratio_min, grad_ratio_max=args.grad_ratio_max,
                    starved_frac_max=args.starved_frac_max,
                    dead_frac_max=args.dead_frac_max, frozen_frac_max=args.frozen_frac_max,
                    chance_margin=args.chance_margin, num_classes=args.num_classes)
    for flag, why in IGNORED.items():
        if getattr(args, flag.lstrip("-")) is not None:
            print(f"{PROG}: note: {flag} is ignored: {why}", file=sys.stderr)
    say = status or (lambda what: None)
    _init_store(args.tracking_uri)
    say(f"reading sweep {args.sweep!r}" if args.sweep else "reading the most recent sweep")
    # on a terminal the status line says what happens; load_sweep's own counters would write over it
    counters = False if getattr(status, "enabled", False) else None
    data = load_sweep(args.experiment, args.tracking_uri, args.sweep, progress=counters)
    reference = None
    if args.reference:
        if args.reference == data.sweep:
            raise AnalysisError(f"--reference {args.reference!r} is the sweep being reported; name another")
        reference = load_sweep(args.experiment, args.tracking_uri, args.reference, history_keys=(), progress=counters)
    say(f"deciding the verdict ({len(data.trials)} trials)")
    annotated = annotate(data)
    select = None if args.select is None else [k for k in args.select.split(",") if k]
    unknown = [k for k in select or [] if k not in annotated[2]]
    if unknown:
        raise AnalysisError(f"--select: {', '.join(unknown)} is not swept in sweep {data.sweep!r}; choose among "
                            f"{', '.join(annotated[2]) or '(no swept param)'}")
    # what the report shows and verdict.json records: the store's URI without its userinfo (the real one
    # stays in `data`, which logs the report to the store)
    import dataclasses
    shown = dataclasses.replace(data, tracking_uri=redact(data.tracking_uri), notes=[redact(n) for n in data.notes])
    verdict = compute_verdict(shown, th, annotated, reference, select)
    out = args.out or default_out_dir(data.sweep)
    try:
        paths = write_report(shown, verdict, out, annotated, ui_url=args.ui_url, progress=say)
    except OSError as e:
        raise CapsweepError(f"cannot write the report to {out}: {e.strerror or e}", exit_code=EXIT_FAILED) from None
    if status is not None:
        status.done()
    for note in data.notes:
        print(f"{PROG}: note: {redact(note)}", file=sys.stderr)
    print(f"escaped: {verdict.escaped} -- {verdict.answer}")
    if (verdict.confirm or {}).get("command") and verdict.outcome != "yes":
        print(f"next: {verdict.confirm['command']}   (re-runs them on fresh seeds; docs/PROBES.md)")
    print(f"instrument: {verdict.instrument} -- {verdict.instrument_text}")
    print(f"report: {paths['html']} (also report.md, verdict.json in {out})")
    if args.no_log_artifacts:
        return 0
    # the report is written either way: say where, then whether MLflow has it (an artifact store that
    # refuses or is away: one line, exit 1)
    with one_line_failures(f"the report is in {out} but was not logged to MLflow: ", hint=False):
        logged = log_report(data, out)
    print(f"logged to MLflow: {logged}" if logged else "not logged to MLflow: the sweep has no parent run")
    return 0


# ---- the commands of `capsweep` that only read a store ------------------------------------------------
def reader(uri: str):
    """What `capsweep confirm` and `capsweep dashboard` read of the store at `uri`
    (analysis/inspect.py, StoreReader); InspectError when there is no store or it does not answer."""
    from analysis.inspect import StoreReader
    return StoreReader(uri)


# ---- ls / status / compare / export (analysis/inspect.py), dispatched by the capsweep parser (sweeps/cli.py),
# which runs them (capsmodels/command.py): InspectError is bad input (exit 2); a store that fails while it is
# read is one line (exit 1), the traceback only with CAPSWEEP_DEBUG
def cmd_ls(args: argparse.Namespace) -> int:
    from analysis import inspect as si
    with one_line_failures():
        client = si.open_client(args.tracking_uri)
        print("\n".join(si.ls_lines(client, args.experiment)))
        for note in si.ls_notes(client, args.experiment):
            print(note, file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from analysis import inspect as si
    with one_line_failures():
        print("\n".join(si.status_lines(si.find_sweep(si.open_client(args.tracking_uri), args.sweep,
                                                        args.experiment))))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from analysis import inspect as si
    if args.a == args.b:
        raise si.InspectError(f"compare: {args.a!r} twice; name two different sweeps")
    with one_line_failures():
        client = si.open_client(args.tracking_uri)
        both = []
        for name in (args.a, args.b):
            sweep = si.find_sweep(client, name, args.experiment)
            both.append((sweep, *si.verdict_of(client, sweep, args.tracking_uri)))
        print("\n".join(si.compare_lines(*both)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from analysis import inspect as si
    with one_line_failures():
        sweep = si.find_sweep(si.open_client(args.tracking_uri), args.sweep, args.experiment)
        where = si.write_export(sweep, args.csv)
        if where != "stdout":
            print(f"capsweep: {len(sweep.trials)} trials of sweep {sweep.name!r} written to {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
