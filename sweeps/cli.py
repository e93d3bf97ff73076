"""The `capsweep` command: train, run, submit, validate, ui, report.

Exit codes: 0 done; 2 bad input or a refused start (one line on stderr, nothing started);
1 a sweep or report that failed while running; 130 interrupted (resume with --resume).
Heavy imports (torch, ray, mlflow) happen inside the subcommands, so `capsweep --help` and the
validation errors come back at once.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def _err(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"capsweep: error: {msg}", file=sys.stderr)
    return code


def _input_errors():
    from capsmodels.config import ConfigError
    from capsmodels.store import DataError
    from sweeps.spec import SpecError
    return (ConfigError, DataError, SpecError)


# ---- train --------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from capsmodels import config as runcfg
    if args.config and "=" in args.config and not Path(args.config).is_file():
        args.overrides = [args.config, *args.overrides]     # `capsweep train key=value ...`
        args.config = None
    try:
        cfg = runcfg.load(args.config, args.overrides)
        cfg.train.progress = not args.quiet
        from capsmodels import train
        splits, model, device = train.prepare(cfg)       # data and shape errors before training
    except _input_errors() as e:
        return _err(str(e))
    from capsmodels import networks
    print(f"capsweep train: {cfg.model.preset}/{cfg.model.arch} depth={cfg.model.depth} "
          f"routing={cfg.model.routing}x{cfg.model.iterations} on {cfg.data.name} "
          f"({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test), "
          f"{networks.count_parameters(model):,} parameters, device {device}", file=sys.stderr)

    def report(metrics: dict) -> None:
        print(_format_epoch(metrics), flush=True)

    try:
        final = train.fit(cfg, report, prepared=(splits, model, device))
    except KeyboardInterrupt:
        return _err("interrupted", EXIT_INTERRUPTED)
    print(_format_final(final))
    return 0 if final.get("status") != "diverged" else EXIT_FAILED


def _format_epoch(m: dict) -> str:
    keys = ("train_loss", "train_acc", "val_acc", "test_acc", "grad_ratio", "dead_frac_max", "images_per_s")
    parts = [f"epoch {int(m.get('epoch', 0)) + 1}"] + [f"{k}={m[k]:.4g}" for k in keys if k in m]
    if m.get("status") == "diverged":
        parts.append("DIVERGED (non-finite loss)")
    return "  ".join(parts)


def _format_final(m: dict) -> str:
    groups = ("loss", "acc", "grad_norm", "grad_rms", "act_grad", "grad_ratio", "starved_frac", "act_mean",
              "dead_frac", "frozen_frac", "tree_score", "routing_dynamics", "squash_gain", "images_per_s",
              "peak_mem_mb", "status")
    # grouped in this order; a key matching several groups is shown under the first; anything else last
    keys = dict.fromkeys(k for g in groups for k in sorted(m) if k.startswith(g) or k.endswith("_" + g))
    keys.update(dict.fromkeys(k for k in sorted(m) if k != "epoch"))
    lines = ["final metrics:"]
    lines += [f"  {k:24s} {m[k]:.6g}" if isinstance(m[k], float) else f"  {k:24s} {m[k]}" for k in keys]
    return "\n".join(lines)


# ---- run ----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from sweeps.spec import describe_trials, load_spec
    try:
        spec = load_spec(args.spec, args.overrides)
        print(f"capsweep: sweep {spec.name!r}: {describe_trials(spec)}", flush=True)
        from sweeps import runner, tracking
        result = runner.run_sweep(spec, resume=args.resume, address=args.address, num_cpus=args.num_cpus,
                                  verbose=args.verbose)
    except _input_errors() as e:
        return _err(str(e))
    except Exception as e:  # refusals and tracking errors are one line; the rest is a real failure
        from sweeps import runner, tracking
        if isinstance(e, (runner.SweepRefused, tracking.TrackingUnavailable)):
            return _err(str(e))
        raise
    counts = {}
    for s in result.statuses.values():
        counts[s] = counts.get(s, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"\ncapsweep: sweep {result.name!r}: {result.trials} trials ({summary})")
    print(f"  MLflow: experiment {result.experiment!r} at {result.tracking_uri}, parent run {result.parent_run_id}")
    print(f"  Ray Tune state: {result.storage / result.name}")
    print(f"  open the MLflow UI:  {_ui_command(result.tracking_uri)}")
    print(f"  write the report:    capsweep report --experiment {shlex.quote(result.experiment)} "
          f"--sweep {shlex.quote(result.name)}" + _uri_flag(result.tracking_uri))
    if result.interrupted:
        again = ["capsweep", "run", args.spec, *args.overrides, "--resume"]
        print(f"capsweep: sweep {result.name!r} did not finish; continue it with: "
              + " ".join(map(shlex.quote, again)), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _uri_flag(uri: str) -> str:
    from capsmodels.contract import DEFAULT_TRACKING_URI
    return "" if uri == DEFAULT_TRACKING_URI else f" --tracking-uri {shlex.quote(uri)}"


def _ui_command(uri: str) -> str:
    from capsmodels.contract import DEFAULT_TRACKING_URI
    if uri == DEFAULT_TRACKING_URI:
        return "capsweep ui   (or: mlflow ui, in this folder)"
    return f"capsweep ui --tracking-uri {shlex.quote(uri)}"


# ---- validate -----------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from sweeps.spec import SpecError, describe_trials, load_spec
    code = 0
    for name in args.specs:
        try:
            spec = load_spec(name, args.overrides)
            print(f"{name}: ok ({describe_trials(spec)}, search {spec.search.algorithm})")
        except SpecError as e:
            print(f"capsweep: error: {name}: {e}", file=sys.stderr)
            code = EXIT_BAD_INPUT
    return code


# ---- submit -------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from sweeps.spec import load_spec
    try:
        spec = load_spec(args.spec, args.overrides)     # validate here, not on the cluster
    except _input_errors() as e:
        return _err(str(e))
    from sweeps import submit
    try:
        job_id = submit.submit(args.spec, args.overrides, spec, address=args.address,
                               working_dir=args.working_dir, extra_env=args.env, resume=args.resume)
    except submit.SubmitError as e:
        return _err(str(e))
    print(f"capsweep: submitted sweep {spec.name!r} as Ray job {job_id}")
    print(f"  follow its logs:  ray job logs --follow {job_id} --address {submit.job_address(args.address)}")
    print(f"  its status:       ray job status {job_id} --address {submit.job_address(args.address)}")
    print(f"  stop it:          ray job stop {job_id} --address {submit.job_address(args.address)}")
    return 0


# ---- ui -----------------------------------------------------------------------------------------
def cmd_ui(args: argparse.Namespace) -> int:
    uri = args.tracking_uri
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"capsweep: warning: the MLflow UI will listen on {args.host}: anyone who can reach it can "
              "read and change runs (see README, 'Security')", file=sys.stderr)
    print(f"capsweep: MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C stops it)", file=sys.stderr)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


# ---- report -------------------------------------------------------------------------------------
def cmd_report(argv: list[str]) -> int:
    from analysis.cli import main as report_main
    return report_main(argv)


def build_parser() -> argparse.ArgumentParser:
    import os
    from capsmodels.contract import DEFAULT_TRACKING_URI, TRACKING_URI_ENV
    p = argparse.ArgumentParser(prog="capsweep", description="CapsNet sweeps with Ray Tune, Optuna and MLflow")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one configuration with a progress bar")
    t.add_argument("config", nargs="?", help="run config YAML (model/data/train sections)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.depth=2")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="run a sweep (local Ray, or a cluster with --address)")
    r.add_argument("spec", help="a sweep spec YAML, or a shipped spec name (smoke, depth, routing, ...)")
    r.add_argument("overrides", nargs="*", help="key=value overrides of the spec, e.g. num_samples=4")
    r.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    r.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2, 3))
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="validate sweep specs without running them")
    v.add_argument("specs", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("submit", help="send a sweep to a running Ray cluster as a Ray job")
    s.add_argument("spec")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--address", default=os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS")
                   or "http://127.0.0.1:8265", help="Ray dashboard/jobs address (default http://127.0.0.1:8265)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    s.add_argument("--working-dir", default=None,
                   help="ship this folder as the job's working dir (default: the capsweep checkout when run from one)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (e.g. MLFLOW_TRACKING_URI); repeatable")
    s.set_defaults(func=cmd_submit)

    u = sub.add_parser("ui", help="open the MLflow UI on the sweep store (127.0.0.1)")
    u.add_argument("--tracking-uri", default=os.environ.get(TRACKING_URI_ENV, DEFAULT_TRACKING_URI))
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)

    sub.add_parser("report", help="analyse a sweep: verdict.json, report.html/.md, plots (see report --help)",
                   add_help=False)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return cmd_report(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [o for o in getattr(args, "overrides", []) if "=" not in o]
    if bad and args.command != "validate":
        return _err(f"override: {bad[0]!r} is not key=value")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
