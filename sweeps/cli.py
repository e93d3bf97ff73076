"""The `capsweep` command: train, run, submit, confirm, validate, ui, dashboard, report, ls, status, compare,
export, eval.

One convention for every subcommand: a sweep is named by a positional argument (`capsweep report
smoke`, `status smoke`, `confirm smoke`; `--sweep NAME` is the same), and the store options
`--tracking-uri` and `--experiment` may come before the subcommand as well as after it (`capsweep
--tracking-uri X ls`; for `run`, `submit` and `validate` they become the spec's `mlflow.tracking_uri` /
`mlflow.experiment`); an option after the subcommand, or an explicit override, wins.

Exit codes (every subcommand): 0 done; 2 bad input or a refused start (one line on stderr naming the
field, nothing started); 1 a sweep or report that failed while running; 130 interrupted (resume with
--resume). Every command runs through capsmodels/command.py, as `capsweep report` does: an error for the
user is a CapsweepError carrying its exit code (capsmodels/errors.py), printed as one line. The read-only commands (report, ls, status, compare, export) are the analysis side's
(analysis/cli.py): this parser dispatches to them, and hands `confirm` and `dashboard` what they read
of a store through it (analysis/inspect.py, StoreReader). sweeps imports nothing else of analysis but
its store module (analysis/store.py).
Heavy imports (torch, ray, mlflow) happen inside the subcommands, so `capsweep --help` and the
validation errors come back at once.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from capsmodels.command import OneLineParser, fail, one_line_failures, parsed, run_command
from capsmodels.contract import BEST_PREFIX, REPORT_TEST_CORRECT
from capsmodels.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, CapsweepError

PROG = "capsweep"


def _err(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    return fail(PROG, msg, code)


def _shown(uri: str) -> str:
    """A URI as capsweep prints it: its userinfo (user:password) masked (capsmodels/contract.py, redact)."""
    from capsmodels.contract import redact
    return redact(uri)


# ---- train --------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from capsmodels import config as runcfg
    if args.config and "=" in args.config and not Path(args.config).is_file():
        args.overrides = [args.config, *args.overrides]     # `capsweep train key=value ...`
        args.config = None
    cfg = runcfg.load(args.config, args.overrides)
    from capsmodels import estimate
    estimate.check(cfg)      # a network too large for the device: one line before anything is built
    cfg.train.progress = not args.quiet
    from capsmodels import train
    splits, model, device = train.prepare(cfg)       # data and shape errors before training
    live = None
    if args.save:      # the store checked and the run opened before training (sweeps/train_run.py)
        from sweeps.train_run import TrainRun
        live = TrainRun.open(args.tracking_uri, args.experiment, cfg, splits, device)
    from capsmodels import networks
    print(f"capsweep train: {cfg.model.preset}/{cfg.model.arch} depth={cfg.model.depth} "
          f"routing={cfg.model.routing}x{cfg.model.iterations} on {cfg.data.name} "
          f"({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test), "
          f"{networks.count_parameters(model):,} parameters, device {device}", file=sys.stderr)

    def report(metrics: dict) -> None:
        print(_format_epoch(metrics), flush=True)
        if live is not None:
            live.epoch(metrics)             # in MLflow as it ends, like a sweep's trial

    try:
        final = train.fit(cfg, report, prepared=(splits, model, device))
    except KeyboardInterrupt:
        if live is not None:
            live.interrupt()
        raise
    print(_format_final(final))
    if live is not None:               # the model and the run's end (sweeps/train_run.py; exit 1 if it fails)
        model_id = live.finish(model, runcfg.to_dict(cfg), splits.in_shape, final)
        print(f"saved: MLflow run {live.run_id} in experiment {args.experiment!r}, model models:/{model_id}; "
              f"evaluate it with: capsweep eval {live.run_id}" + _uri_flag(args.tracking_uri))
    return 0 if final.get("status") != "diverged" else EXIT_FAILED


def _format_epoch(m: dict) -> str:
    keys = ("train_loss", "train_acc", "val_acc", "test_acc", "grad_ratio", "dead_frac_max", "images_per_s")
    parts = [f"epoch {int(m.get('epoch', 0)) + 1}"] + [f"{k}={m[k]:.4g}" for k in keys if k in m]
    if m.get("status") == "diverged":
        parts.append("DIVERGED (non-finite loss)")
    elif m.get("stop_reason") and "best_epoch" in m:      # the model kept is the best epoch's
        parts.append(f"stopped: {m['stop_reason']}, best epoch {int(m['best_epoch']) + 1}")
    return "  ".join(parts)


def _format_final(m: dict) -> str:
    groups = ("loss", "acc", "grad_norm", "grad_rms", "act_grad", "grad_ratio", "starved_frac", "act_mean",
              "dead_frac", "frozen_frac", "tree_score", "routing_dynamics", "squash_gain", "images_per_s",
              "peak_mem_mb", "status")
    # grouped in this order; a key matching several groups is shown under the first; anything else last
    # the best epoch's copies (best/...) and its test correctness (a long code) are for the store
    shown = [k for k in sorted(m) if k != "epoch" and not k.startswith(BEST_PREFIX) and k != REPORT_TEST_CORRECT]
    keys = dict.fromkeys(k for g in groups for k in shown if k.startswith(g) or k.endswith("_" + g))
    keys.update(dict.fromkeys(shown))
    lines = ["final metrics:"]
    lines += [f"  {k:24s} {m[k]:.6g}" if isinstance(m[k], float) else f"  {k:24s} {m[k]}" for k in keys]
    return "\n".join(lines)


# ---- run ----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from sweeps.spec import describe_trials, load_spec
    try:
        spec = load_spec(args.spec, args.overrides)
        refused = _over_budget(spec, args.yes)
        if refused:
            return _err(refused)
        if args.dry_run:
            return _dry_run(spec)
        print(f"capsweep: sweep {spec.name!r}: {describe_trials(spec)}", flush=True)
        from sweeps import runner
        result = runner.run_sweep(spec, resume=args.resume, address=args.address, num_cpus=args.num_cpus,
                                  verbose=args.verbose, keep_state=args.keep_state, trust=args.trust)
    except KeyboardInterrupt:      # Ctrl-C before Tune took over (Tune handles it during the sweep)
        raise CapsweepError("interrupted; continue the sweep with: " + _resume_command(args),
                            exit_code=EXIT_INTERRUPTED) from None
    except CapsweepError:          # refusals, bad input, tracking errors: one line (the runner)
        raise
    except Exception as e:  # noqa: BLE001 - a full disk is one line; the rest is a real failure (traceback)
        disk = _disk_error(e)
        if disk:             # a full or read-only disk mid-sweep (Tune's state, a trial's files, the journal)
            raise CapsweepError(disk + "; free space or fix the folder, then continue with: "
                                + _resume_command(args), exit_code=EXIT_FAILED) from e
        raise
    counts = {}
    for s in result.statuses.values():
        counts[s] = counts.get(s, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"\ncapsweep: sweep {result.name!r}: {result.trials} trials ({summary})")
    print(f"  MLflow: experiment {result.experiment!r} at {_shown(result.tracking_uri)}, parent run {result.parent_run_id}")
    from sweeps.storage import join
    print(f"  Ray Tune state: {join(result.storage, result.name)}")
    print(f"  open the MLflow UI:  {_ui_command(result.tracking_uri)}")
    print(f"  write the report:    capsweep report {shlex.quote(result.name)}" + _experiment_flag(result.experiment)
          + _uri_flag(result.tracking_uri))
    if result.interrupted:
        print(f"capsweep: sweep {result.name!r} did not finish; continue it with: " + _resume_command(args),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _disk_error(e: BaseException) -> Optional[str]:
    """One line for a disk that refuses writes (full, read-only, over quota) anywhere in the error's
    chain (Ray Tune wraps it), naming the file; None for anything else."""
    import errno
    seen: Optional[BaseException] = e
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)):
            return f"{seen.filename or 'a file'}: {seen.strerror}"
        seen = seen.__cause__ or seen.__context__
    return None


def _resume_command(args: argparse.Namespace) -> str:
    return _shown(" ".join(map(shlex.quote, ["capsweep", "run", args.spec, *args.overrides, "--resume"])))


def _dry_run(spec) -> int:
    """--dry-run: the resolved spec and the trial count; nothing starts, nothing is written."""
    from sweeps.spec import describe_trials, storage_dir, to_yaml
    print(_shown(to_yaml(spec)), end="")
    print(f"# {describe_trials(spec)}; Ray Tune state in {_shown(storage_dir(spec))}; "
          f"MLflow {_shown(spec.mlflow.tracking_uri)} experiment {spec.mlflow.experiment!r}")
    return 0


def _uri_flag(uri: str) -> str:
    from capsmodels.contract import DEFAULT_TRACKING_URI
    return "" if uri == DEFAULT_TRACKING_URI else f" --tracking-uri {shlex.quote(_shown(uri))}"


def _experiment_flag(name: str) -> str:
    from capsmodels.contract import DEFAULT_EXPERIMENT
    return "" if name == DEFAULT_EXPERIMENT else f" --experiment {shlex.quote(name)}"


def _ui_command(uri: str) -> str:
    from capsmodels.contract import DEFAULT_TRACKING_URI
    if uri == DEFAULT_TRACKING_URI:
        return "capsweep ui   (or: mlflow ui, in this folder)"
    return f"capsweep ui --tracking-uri {shlex.quote(_shown(uri))}"


# ---- validate -----------------------------------------------------------------------------------
def _over_budget(spec, yes: bool) -> Optional[str]:
    """The one-line refusal of a sweep whose trial count or estimated GPU-hours exceed its budget
    (sweeps/budget.py) when --yes is not given; with --yes the estimate is printed and it goes on."""
    from sweeps import budget
    c = budget.cost(spec)
    why = budget.confirmation(spec, c)
    if why and yes:
        print(f"capsweep: {c.describe()} (over the budget; --yes given)", flush=True)
        return None
    return why


def cmd_validate(args: argparse.Namespace) -> int:
    from sweeps.spec import SpecError, describe_trials, load_spec
    code = 0
    # `validate SPEC... key=value...` as `run SPEC key=value...`; --set key=value still works
    names = [a for a in args.specs if "=" not in a or Path(a).is_file()]
    args.overrides = [a for a in args.specs if a not in names] + args.overrides
    if not names:
        return _err("specs: give at least one spec name or file before the key=value overrides")
    for name in names:
        try:
            spec = load_spec(name, args.overrides)
            print(f"{name}: ok ({describe_trials(spec)}, search {spec.search.algorithm})")
            from sweeps import budget
            c = budget.cost(spec)
            why = budget.confirmation(spec, c)
            print(f"  {c.describe()}" + (f"; warning: over the budget, `capsweep run` and `submit` ask for "
                                         f"--yes ({why.split(': over ')[-1].split(';')[0]})" if why else ""))
        except SpecError as e:
            print(f"capsweep: error: {name}: {e}", file=sys.stderr)
            code = EXIT_BAD_INPUT
    return code


# ---- submit -------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from sweeps.spec import load_spec
    spec = load_spec(args.spec, args.overrides)     # validate here, not on the cluster
    refused = _over_budget(spec, args.yes)
    if refused:
        return _err(refused)
    if args.yes:     # confirmed here: the job's own `capsweep run` gets bounds that admit it
        from sweeps import budget
        args.overrides = [*args.overrides, *budget.admitting(spec)]
    if args.dry_run:
        return _dry_run(spec)
    from sweeps import submit
    job_id = submit.submit(args.spec, args.overrides, spec, address=args.address,
                           working_dir=args.working_dir, extra_env=args.env, resume=args.resume,
                           trust=args.trust, allow_secret_env=args.allow_secret_env)
    print(f"capsweep: submitted sweep {spec.name!r} as Ray job {job_id}")
    print(f"  follow its logs:  ray job logs --follow {job_id} --address {submit.job_address(args.address)}")
    print(f"  its status:       ray job status {job_id} --address {submit.job_address(args.address)}")
    print(f"  stop it:          ray job stop {job_id} --address {submit.job_address(args.address)}")
    return 0


# ---- confirm (sweeps/confirm.py) ----------------------------------------------------------------
def cmd_confirm(args: argparse.Namespace) -> int:
    """Plan the confirmation (reads the store only), write its spec, then `run` it here or `submit` it
    (--address) exactly as those commands run a spec file."""
    from analysis import cli as reading
    from sweeps import confirm
    with one_line_failures():       # a store that fails while it is read: one line, exit 1
        plan = confirm.plan(reading.reader(args.tracking_uri), args.sweep, args.experiment, top=args.top,
                            seeds=args.seeds, overrides=args.overrides, name=args.name)
        refused = _over_budget(plan.spec, args.yes)
        if refused:
            return _err(refused)
        if args.address:     # what `submit` would refuse, refused before the spec file is written
            from sweeps.submit import check_cluster_ready
            check_cluster_ready(plan.spec)
    print("\n".join(confirm.describe(plan)), flush=True)
    if args.dry_run:
        _dry_run(plan.spec)
        print(f"# --dry-run: nothing written or started; the spec would go to {plan.path}")
        return 0
    flags = [f for flag, v in (("--top", args.top), ("--seeds", args.seeds), ("--name", args.name))
             if v is not None for f in (flag, str(v))]
    confirm.write(plan, " ".join(shlex.quote(a) for a in ["capsweep", "confirm", args.sweep, *args.overrides, *flags]))
    again = f"submit {shlex.quote(str(plan.path))} --address {shlex.quote(args.address)}" if args.address \
        else f"run {shlex.quote(str(plan.path))}"
    print(f"capsweep: wrote {plan.path}, the confirmation's spec: `capsweep {again}` runs it, with --resume "
          "it continues it", flush=True)
    # the spec file as `capsweep run FILE` / `capsweep submit FILE --address A` takes it, every other flag
    # at its default
    yes = ["--yes"] if args.yes else []
    if args.address:
        argv = ["submit", str(plan.path), "--address", args.address, *yes]
    else:
        argv = ["run", str(plan.path), "--verbose", str(args.verbose), *yes,
                *(["--num-cpus", str(args.num_cpus)] if args.num_cpus else [])]
    again = build_parser().parse_args(argv)
    return again.func(again)


# ---- ui -----------------------------------------------------------------------------------------
def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the store (sweeps/ui.py): the port tried first, the address printed once the
    server answers, signals passed on to the server's whole process group."""
    from sweeps import ui
    uri = args.tracking_uri
    problem = ui.port_problem(args.host, args.port)     # before the store is touched: a one-line refusal
    if problem:
        return _err(problem)
    from analysis.store import init_store
    init_store(uri)     # create/migrate the store under its lock before the UI opens it
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"capsweep: warning: the MLflow UI will listen on {args.host}: anyone who can reach it can "
              "read and change runs (see README, 'Security')", file=sys.stderr)
    base = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    address = ui_url(base, _experiment_id(uri, args.experiment))
    print(f"capsweep: starting the MLflow UI for {_shown(uri)} (often 20-60 s) ...", file=sys.stderr, flush=True)
    check = f"http://127.0.0.1:{args.port}" if args.host in ("0.0.0.0", "::") else base   # a wildcard: ask loopback

    def ready() -> None:
        print(f"capsweep: MLflow UI on {address} for {_shown(uri)} (Ctrl-C stops it)", file=sys.stderr, flush=True)

    return ui.serve(cmd, check, ready)       # ui.UIError: one line, its own code


# ---- dashboard (sweeps/dashboard.py) -------------------------------------------------------------
def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the sweep's Optuna study, read-only, served and stopped as `capsweep ui` is."""
    from analysis import cli as reading
    from sweeps import dashboard as dash
    from sweeps import ui
    missing = dash.extra_missing()
    if missing:
        return _err(missing)
    problem = ui.port_problem(args.host, args.port)
    if problem:
        return _err(problem)

    reader = reading.reader(args.tracking_uri)
    sweep = reader.latest(args.sweep, args.experiment)      # unknown: its one-line "not found, sweeps there: ..."
    path = dash.journal_path(reader, sweep)
    study = dash.study_id(path, sweep.name)
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"capsweep: warning: the Optuna dashboard will listen on {args.host}: anyone who can reach it "
              "can read the study", file=sys.stderr)
    base = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    check = f"http://127.0.0.1:{args.port}" if args.host in ("0.0.0.0", "::") else base
    print(f"capsweep: starting optuna-dashboard on {path} ...", file=sys.stderr, flush=True)

    def ready() -> None:
        print(f"capsweep: Optuna dashboard on {base}/dashboard/studies/{study} for sweep {args.sweep!r} "
              "(read-only; Ctrl-C stops it)", file=sys.stderr, flush=True)

    return ui.serve(dash.server_command(path, args.host, args.port), check, ready,
                    health_path=dash.HEALTH_PATH, what="optuna-dashboard")


def ui_url(base: str, experiment_id: Optional[str]) -> str:
    """The address to open: the sweep experiment's runs. MLflow 3's UI opens an experiment on its GenAI
    traces overview unless the URL (or the browser's saved toggle) says `workflowType=machine_learning`;
    the experiment's `mlflow.experimentKind` tag alone does not switch it (seen in headless Chromium
    with MLflow 3.17; tests/sweeps/test_ui.py)."""
    if experiment_id is None:
        return base
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def _experiment_id(uri: str, name: str) -> Optional[str]:
    """The id of experiment `name` in the store, or None (no such experiment, or a store that cannot be
    read now: the UI then opens on its experiment list)."""
    try:
        from mlflow import MlflowClient
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else None
    except Exception:  # noqa: BLE001 - the UI still starts; only the printed address is less precise
        return None


def _store_flags(p: argparse.ArgumentParser, experiment: Optional[str]) -> None:
    from analysis.store import resolve_tracking_uri
    from capsmodels.contract import DEFAULT_TRACKING_URI, TRACKING_URI_ENV
    p.add_argument("--tracking-uri", default=resolve_tracking_uri(None),
                   help=f"MLflow tracking URI (default: ${TRACKING_URI_ENV}, else {DEFAULT_TRACKING_URI})")
    p.add_argument("--experiment", default=experiment,
                   help=f"MLflow experiment (default: {experiment or 'every experiment of the store'})")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("capsweep")
    except PackageNotFoundError:
        return "unknown (not installed)"


# ---- eval (sweeps/evaluate.py) ------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> int:
    from sweeps.evaluate import cmd_eval
    return cmd_eval(args)       # EvalError: one line, exit 2


# ---- report -------------------------------------------------------------------------------------
def cmd_report(argv: list[str]) -> int:
    from analysis.cli import main as report_main
    return report_main(argv)


def _sweep_arg(p: argparse.ArgumentParser, what: str) -> None:
    """The sweep's name as every subcommand takes it: positional, or `--sweep NAME` (the same)."""
    p.add_argument("sweep", nargs="?", default=None, metavar="SWEEP", help=f"{what} (or --sweep SWEEP)")
    p.add_argument("--sweep", dest="sweep_opt", default=None, metavar="SWEEP", help=argparse.SUPPRESS)


def _resolve_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One sweep name from the positional and --sweep; errors are one line (exit 2)."""
    if not hasattr(args, "sweep_opt"):
        return
    pos, opt = args.sweep, args.sweep_opt
    if opt is not None and pos is not None and "=" in pos and hasattr(args, "overrides"):
        args.overrides, pos = [pos, *args.overrides], None      # `confirm --sweep S key=value`
    if pos is not None and opt is not None and pos != opt:
        parser.error(f"sweep: named twice ({pos!r} and --sweep {opt!r}); name it once")
    args.sweep = pos if pos is not None else opt
    if not args.sweep:
        parser.error(f"{args.command}: name the sweep, e.g. capsweep {args.command} smoke (capsweep ls lists them)")


GLOBAL_OPTIONS = {"--tracking-uri": "mlflow.tracking_uri", "--experiment": "mlflow.experiment"}
SPEC_COMMANDS = ("run", "submit", "validate")     # they take the store from the spec: globals become overrides


def hoist_globals(argv: list[str]) -> tuple[list[str], list[str]]:
    """`capsweep --tracking-uri X --experiment E CMD ...` -> (`CMD --tracking-uri X --experiment E ...`,
    spec overrides). The options go right after the subcommand, so one given after it still wins; for
    a spec command they become key=value overrides placed before the user's own (which win too)."""
    hoisted: list[tuple[str, str]] = []
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in GLOBAL_OPTIONS:
        name, eq, value = argv[i].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise CapsweepError(f"argument {name}: expected one argument")
            value, i = argv[i + 1], i + 1
        hoisted.append((name, value))
        i += 1
    rest = argv[i:]
    if not hoisted or not rest or rest[0].startswith("-"):
        return rest if hoisted else argv, []
    command, tail = rest[0], rest[1:]
    if command in SPEC_COMMANDS:
        return [command, *tail], [f"{GLOBAL_OPTIONS[n]}={v}" for n, v in hoisted]
    return [command, *(x for n, v in hoisted for x in (n, v)), *tail], []


_TRUST_HELP = ("with --resume: also load trial state files and Ray Tune state that capsweep cannot check "
               "(runs code from the storage folder; README, 'Security')")


def build_parser() -> argparse.ArgumentParser:
    import os
    from analysis.store import resolve_tracking_uri
    from capsmodels.contract import DEFAULT_TRACKING_URI, TRACKING_URI_ENV
    from capsmodels.contract import DEFAULT_EXPERIMENT

    from analysis import cli as reading      # the read-only commands' bodies (ls, status, compare, export)
    p = OneLineParser(prog=PROG, description="CapsNet sweeps with Ray Tune, Optuna and MLflow")
    p.add_argument("--version", action="version", version=f"capsweep {_version()}",
                   help="print capsweep's version and exit")
    p.add_argument("--tracking-uri", dest="global_tracking_uri", metavar="URI",
                   help="MLflow store of the subcommand (before or after it; for run/submit/validate: the spec's "
                        f"mlflow.tracking_uri; default: ${TRACKING_URI_ENV}, else {DEFAULT_TRACKING_URI})")
    p.add_argument("--experiment", dest="global_experiment", metavar="NAME",
                   help="MLflow experiment of the subcommand (before or after it; default: capsweep)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train one configuration with a progress bar")
    t.add_argument("config", nargs="?", help="run config YAML (model/data/train sections)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.depth=2")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--save", action="store_true",
                   help="log the run (params, metrics, datasets) and the trained model to MLflow")
    _store_flags(t, DEFAULT_EXPERIMENT)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="run a sweep (local Ray, or a cluster with --address)")
    r.add_argument("spec", help="a sweep spec YAML, or a shipped spec name (smoke, depth, routing, ...)")
    r.add_argument("overrides", nargs="*", help="key=value overrides of the spec, e.g. num_samples=4")
    r.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    r.add_argument("--trust", action="store_true", help=_TRUST_HELP)
    r.add_argument("--keep-state", action="store_true",
                   help="keep each trial's per-epoch state and weights files after its model is in MLflow")
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    r.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2, 3),
                   help="Ray Tune's progress output: 0 silent, 1 the trial table (default), 2-3 more")
    r.add_argument("--dry-run", action="store_true", help="print the resolved spec and the trial count; start nothing")
    r.add_argument("--yes", action="store_true",
                   help="start a sweep over budget.max_trials / budget.max_hours (its estimate is printed)")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="validate sweep specs without running them")
    v.add_argument("specs", nargs="+", metavar="SPEC_OR_OVERRIDE",
                   help="spec names or files, then key=value overrides applied to each (as `run` takes them)")
    v.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override (repeatable)")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("submit", help="send a sweep to a running Ray cluster as a Ray job")
    s.add_argument("spec", help="a sweep spec YAML, or a shipped spec name")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the spec")
    s.add_argument("--address", default=os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS")
                   or "http://127.0.0.1:8265", help="Ray dashboard/jobs address (default http://127.0.0.1:8265)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    s.add_argument("--trust", action="store_true", help=_TRUST_HELP)
    s.add_argument("--allow-secret-env", action="store_true",
                   help="submit even with secret-looking --env names or a URI with a password (readable in "
                        "`ray job list`)")
    s.add_argument("--working-dir", default=None,
                   help="ship this folder as the job's working dir (default: the capsweep checkout when run from one)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (e.g. MLFLOW_TRACKING_URI); repeatable")
    s.add_argument("--dry-run", action="store_true", help="print the resolved spec and the trial count; submit nothing")
    s.add_argument("--yes", action="store_true",
                   help="submit a sweep over budget.max_trials / budget.max_hours (its estimate is printed)")
    s.set_defaults(func=cmd_submit)

    c = sub.add_parser("confirm", help="re-run an exploration's most promising candidates on fresh seeds, "
                       "beside fresh references and controls, in a new sweep")
    _sweep_arg(c, "the exploration sweep's name")
    c.add_argument("overrides", nargs="*", help="key=value overrides of the generated spec, e.g. base.train.epochs=20")
    c.add_argument("--top", type=int, default=None,
                   help="how many of its ranked candidates to re-run (default: the verdict's, 3)")
    c.add_argument("--seeds", type=int, default=None,
                   help="fresh seeds per configuration, never used by the exploration (default: the verdict's, 8)")
    c.add_argument("--name", default=None, help="the new sweep's name (default: SWEEP-confirm, -confirm2, ...)")
    c.add_argument("--address", default=None,
                   help="submit it as a Ray job to this cluster (as `capsweep submit`); default: run it here")
    c.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    c.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2, 3), help="Ray Tune's progress output")
    c.add_argument("--dry-run", action="store_true",
                   help="print the plan, the spec and the trial count; write and start nothing")
    c.add_argument("--yes", action="store_true",
                   help="start it over budget.max_trials / budget.max_hours (its estimate is printed)")
    _store_flags(c, DEFAULT_EXPERIMENT)
    c.set_defaults(func=cmd_confirm)

    u = sub.add_parser("ui", help="open the MLflow UI on the sweep store (127.0.0.1)")
    u.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                   help="experiment whose runs the printed address opens (default capsweep)")
    u.add_argument("--tracking-uri", default=resolve_tracking_uri(None),
                   help=f"MLflow store to serve (default: ${TRACKING_URI_ENV}, else {DEFAULT_TRACKING_URI})")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    u.set_defaults(func=cmd_ui)

    db = sub.add_parser("dashboard", help="open an Optuna sweep's study in optuna-dashboard (read-only, 127.0.0.1; "
                        "the dashboard extra)")
    _sweep_arg(db, "the sweep's name (an optuna search)")
    db.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    db.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    _store_flags(db, DEFAULT_EXPERIMENT)
    db.set_defaults(func=cmd_dashboard)

    ls = sub.add_parser("ls", help="the sweeps in a store: state, trial counts by status, verdict if reported")
    _store_flags(ls, None)
    ls.set_defaults(func=reading.cmd_ls)

    st = sub.add_parser("status", help="progress of a running or submitted sweep: trials by state, best so far")
    _sweep_arg(st, "the sweep's name")
    _store_flags(st, DEFAULT_EXPERIMENT)
    st.set_defaults(func=reading.cmd_status)

    cp = sub.add_parser("compare", help="two sweeps' verdicts and key probes side by side")
    cp.add_argument("a", help="first sweep's name")
    cp.add_argument("b", help="second sweep's name")
    _store_flags(cp, DEFAULT_EXPERIMENT)
    cp.set_defaults(func=reading.cmd_compare)

    ex = sub.add_parser("export", help="the trial table of a sweep (params and final metrics) as CSV")
    _sweep_arg(ex, "the sweep's name")
    ex.add_argument("--csv", nargs="?", const="-", default="-", metavar="PATH",
                    help="write CSV to PATH (default, or '-': stdout)")
    _store_flags(ex, DEFAULT_EXPERIMENT)
    ex.set_defaults(func=reading.cmd_export)

    ev = sub.add_parser("eval", help="evaluate a logged model (test accuracy and the probes) without training")
    ev.add_argument("model", metavar="RUN_ID_OR_MODEL_URI", help="a run id, runs:/<run id> or models:/<model id>")
    ev.add_argument("overrides", nargs="*", help="key=value overrides of its config, e.g. data.test_transform=affine")
    ev.add_argument("--log", action="store_true", help="log the figures to a new run tagged capsweep.eval_of")
    ev.add_argument("--trust", action="store_true",
                    help="also load a model in MLflow's pickle format (runs code from the store; README, 'Security')")
    _store_flags(ev, DEFAULT_EXPERIMENT)
    ev.set_defaults(func=_cmd_eval)

    sub.add_parser("report", help="analyse a sweep: verdict.json, report.html/.md, plots (see report --help)",
                   add_help=False)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, lambda: _dispatch(argv))


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The subcommand's arguments: one sweep name, key=value overrides also after the flags."""
    args, extra = parser.parse_known_args(argv)
    _resolve_sweep(parser, args)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]    # key=value after the flags: `confirm S --top 3 k=v`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _dispatch(argv: list[str]) -> int:
    """Parse `argv` and run its subcommand (`report` is the analysis CLI's, with its own parser)."""
    argv, spec_overrides = hoist_globals(argv)
    if argv and argv[0] == "report":
        return cmd_report(argv[1:])
    parser = build_parser()
    args = parsed(lambda: _parse(parser, argv))
    if isinstance(args, int):       # one-line error (2), --help / --version (0)
        return args
    if spec_overrides and args.command == "validate":
        args.specs = [*spec_overrides, *args.specs]
    elif spec_overrides:
        args.overrides = [*spec_overrides, *args.overrides]
    bad = [o for o in getattr(args, "overrides", []) if "=" not in o]
    if bad:
        return _err(f"override: {bad[0]!r} is not key=value")
    import os
    # MLflow prints "View run ... at: <tracking URI>" when a run ends on a server store (the URI's
    # password with it); the commands say where their runs are themselves
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return args.func(args)          # CapsweepError and Ctrl-C: one line and their code (run_command)


if __name__ == "__main__":
    sys.exit(main())
