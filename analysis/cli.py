"""`capsweep report`: read a sweep from MLflow, decide the verdict, write the report, log it to MLflow.

    capsweep report --experiment NAME [--tracking-uri URI] [--sweep NAME] [--out DIR]
                    [--grad-ratio-min X] [--dead-frac-max X] [--acc-tolerance X] [--grad-floor X]
                    [--chance-margin X] [--num-classes N] [--bootstrap N] [--seed N] [--no-log-artifacts]

Also `python -m analysis ...`. Exit codes: 0 report written, 1 bad input (one line on stderr: missing
store, experiment or sweep, no finished trial, runs without the probes), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from analysis.errors import AnalysisError, one_line

PROG = "capsweep report"


def build_parser() -> argparse.ArgumentParser:
    from analysis.verdict import Thresholds
    d = Thresholds()
    p = argparse.ArgumentParser(prog=PROG, description="Decide whether any CapsNet configuration of a sweep "
                                "escapes vanishing gradients and capsule starvation, and write the report.")
    p.add_argument("--experiment", default="capsweep", help="MLflow experiment name (default: capsweep)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--sweep", default=None, help="sweep name (default: the most recent sweep of the experiment)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<sweep>)")
    p.add_argument("--grad-ratio-min", type=float, default=d.grad_ratio_min,
                   help=f"grad_ratio lower bound must reach this (default {d.grad_ratio_min})")
    p.add_argument("--dead-frac-max", type=float, default=d.dead_frac_max,
                   help=f"worst hidden layer dead_frac upper bound at most this, in [0, 1] (default {d.dead_frac_max})")
    p.add_argument("--acc-tolerance", type=float, default=d.acc_tolerance,
                   help=f"accuracy may be this far below the depth-0 CapsNet (default {d.acc_tolerance})")
    p.add_argument("--grad-floor", type=float, default=d.grad_floor,
                   help=f"min layer grad norm / shallow median grad norm, lower bound (default {d.grad_floor})")
    p.add_argument("--chance-margin", type=float, default=d.chance_margin,
                   help=f"accuracy must exceed 1/num_classes by this (default {d.chance_margin})")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the task (default: from data.name)")
    p.add_argument("--bootstrap", type=int, default=d.n_boot, help=f"bootstrap resamples (default {d.n_boot})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"bootstrap seed (default {d.seed})")
    p.add_argument("--no-log-artifacts", action="store_true",
                   help="do not log the report on the sweep's parent run")
    return p


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Range checks argparse types cannot express; parser.error exits 2 with the usage."""
    if not a.grad_ratio_min >= 0:
        p.error(f"--grad-ratio-min: {a.grad_ratio_min} is not allowed; must be >= 0")
    if not 0 <= a.dead_frac_max <= 1:
        p.error(f"--dead-frac-max: {a.dead_frac_max} is not allowed; must be in [0, 1]")
    if not -1 <= a.acc_tolerance <= 1:
        p.error(f"--acc-tolerance: {a.acc_tolerance} is not allowed; must be in [-1, 1] (a fraction)")
    if not a.grad_floor >= 0:
        p.error(f"--grad-floor: {a.grad_floor} is not allowed; must be >= 0")
    if not 0 <= a.chance_margin < 1:
        p.error(f"--chance-margin: {a.chance_margin} is not allowed; must be in [0, 1)")
    if a.num_classes is not None and a.num_classes < 2:
        p.error(f"--num-classes: {a.num_classes} is not allowed; must be >= 2")
    if a.bootstrap < 100:
        p.error(f"--bootstrap: {a.bootstrap} is not allowed; must be >= 100")
    if not a.experiment:
        p.error("--experiment: must not be empty")


# A tracking server that does not answer should fail in seconds, not after minutes of retries
# (MLflow's defaults: 7 retries with exponential backoff, 120 s timeout). The user's settings win.
_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def _quiet_mlflow() -> None:
    """MLflow and alembic log INFO lines (database migrations) to stderr; keep stderr for our own lines."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check(parser, args)
    except SystemExit as e:  # argparse printed usage + error (2) or --help (0)
        return int(e.code) if isinstance(e.code, int) else 2
    import warnings
    saved_env = {k: os.environ.get(k) for k in _ENV_DEFAULTS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library deprecation noise is not the user's business
            _quiet_mlflow()
            return _run(args)
    except AnalysisError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # MLflow/network/disk errors: one line, the traceback only on request
        if os.environ.get("CAPSWEEP_DEBUG"):
            raise
        print(f"{PROG}: error: {type(e).__name__}: {one_line(e)} (set CAPSWEEP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    finally:  # main() may run inside another program (the sweeps CLI, tests): leave its env as it was
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(args: argparse.Namespace) -> int:
    from analysis.load import load_sweep
    from analysis.report import default_out_dir, log_report, write_report
    from analysis.verdict import Thresholds, annotate, compute_verdict
    th = Thresholds(grad_ratio_min=args.grad_ratio_min, dead_frac_max=args.dead_frac_max,
                    acc_tolerance=args.acc_tolerance, grad_floor=args.grad_floor,
                    chance_margin=args.chance_margin, num_classes=args.num_classes,
                    n_boot=args.bootstrap, seed=args.seed)
    data = load_sweep(args.experiment, args.tracking_uri, args.sweep)
    for note in data.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    annotated = annotate(data)
    verdict = compute_verdict(data, th, annotated)
    out = args.out or default_out_dir(data.sweep)
    try:
        paths = write_report(data, verdict, out, annotated)
    except OSError as e:
        raise AnalysisError(f"cannot write the report to {out}: {e.strerror or e}") from None
    print(f"escaped: {verdict['escaped']} -- {verdict['answer']}")
    print(f"report: {paths['html']} (also report.md, verdict.json in {out})")
    if args.no_log_artifacts:
        return 0
    try:                    # the report is written either way: say where, then whether MLflow has it
        logged = log_report(data, out)
    except Exception as e:  # noqa: BLE001 - an artifact store that refuses or is away
        if os.environ.get("CAPSWEEP_DEBUG"):
            raise
        print(f"{PROG}: error: the report is in {out} but was not logged to MLflow: "
              f"{type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"logged to MLflow: {logged}" if logged else "not logged to MLflow: the sweep has no parent run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
