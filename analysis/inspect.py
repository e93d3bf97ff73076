"""Read sweeps back from an MLflow store: `capsweep ls`, `status`, `export`, `compare`, and the read side
of `capsweep confirm` and `capsweep dashboard` (the exploration, its logged spec, its verdict).

Everything here reads what the runner wrote (tags and params of capsmodels/contract.py; the parent's
`sweep.*` params; `report/verdict.json` after `capsweep report`), so it works the same on a local
SQLite store and on a cluster's MLflow server while a submitted sweep runs. No Ray, no torch: these
commands answer in seconds. The best configuration(s) the runner logs at a sweep's end are the
writer's (sweeps/best.py).
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from capsmodels.contract import (CANDIDATE, FAILED, FINISHED, HEARTBEAT_STALE_S, INTERRUPTED, ROLE_KEY,
                                 RUN_PARENT, RUNNING, STATUSES, TAG_ROLE, TAG_STATUS, TAG_SWEEP, heartbeat_age,
                                 SweepParams, resume_command, sweep_state)
from capsmodels.errors import CapsweepError

VERDICT_PATH = "report/verdict.json"
SPEC_PATH = "spec.yaml"             # the resolved spec, on every parent run (sweeps/runner.py)
STATES = ("running", FINISHED, FAILED, INTERRUPTED)
KEY_PROBES = ("test_acc", "grad_ratio", "act_grad_min", "starved_worst", "dead_worst")


class InspectError(CapsweepError, ValueError):
    """Bad input (no store, no such sweep or experiment): one line naming it; exit 2."""


@dataclass
class Sweep:
    name: str
    experiment: str
    experiment_id: str
    parent: Any                                         # the MLflow parent run
    trials: list = field(default_factory=list)          # rows of trial_rows()

    @property
    def params(self) -> dict:
        return self.parent.data.params

    @property
    def settings(self) -> SweepParams:
        """The parent run's `sweep.*` params (capsmodels.contract.SweepParams)."""
        return SweepParams.from_params(self.params)

    @property
    def space(self) -> list[str]:
        return self.settings.space

    @property
    def objectives(self) -> tuple[list[str], list[str]]:
        return self.settings.metrics, self.settings.modes

    @property
    def expected(self) -> Optional[int]:
        return self.settings.trials


# ---- store access ---------------------------------------------------------------------------------
def open_client(uri: str):
    """An MlflowClient on an existing store (created/migrated under its lock, analysis/store.py); a SQLite
    file that does not exist is bad input, not a new empty store; a server that does not answer is one
    line within store_timeout_s(), not a hang."""
    from analysis.store import StoreInitError, open_client as open_store
    try:
        client = open_store(uri)
    except StoreInitError as e:
        raise InspectError(str(e)) from None
    if client is None:
        raise InspectError(f"--tracking-uri: no MLflow store at {uri} (run a sweep first, or pass --tracking-uri)")
    return client


def _experiments(client, experiment: Optional[str]) -> list:
    if experiment is None:
        return client.search_experiments()
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise InspectError(f"--experiment: {experiment!r} not found; experiments there: {', '.join(names) or '(none)'}")
    return [exp]


def sweeps(client, experiment: Optional[str] = None) -> list[Sweep]:
    """Every sweep (parent run) of the experiment (None: of every experiment), oldest first."""
    from analysis.store import search_all
    out = []
    for exp in _experiments(client, experiment):
        for run in search_all(client, exp.experiment_id, f"tags.`{TAG_ROLE}` = '{RUN_PARENT}'"):
            name = run.data.tags.get(TAG_SWEEP) or run.info.run_name
            out.append(Sweep(name, exp.name, exp.experiment_id, run))
    return sorted(out, key=lambda s: s.parent.info.start_time or 0)


def find_sweep(client, name: str, experiment: str) -> Sweep:
    found = [s for s in sweeps(client, experiment) if s.name == name]
    if not found:
        names = sorted({s.name for s in sweeps(client, experiment)})
        raise InspectError(f"sweep: {name!r} not found in experiment {experiment!r}; sweeps there: "
                           f"{', '.join(names) or '(none)'}")
    sweep = found[-1]              # the most recent parent of that name, as `capsweep report` does
    sweep.trials = trial_rows(client, sweep)
    return sweep


def trial_rows(client, sweep: Sweep) -> list[dict]:
    """The sweep's trial runs as rows (analysis/store.py, trial_rows)."""
    from analysis.store import trial_rows as rows
    return rows(client, sweep.experiment_id, sweep.parent.info.run_id)


def state(sweep: Sweep, now: Optional[float] = None) -> str:
    """running / finished / failed / interrupted (capsmodels/contract.py, sweep_state): a sweep whose
    driver's heartbeat is older than HEARTBEAT_STALE_S is interrupted, also when its driver died
    without a word (SIGKILL, a lost node) and its parent still says running."""
    import time
    return sweep_state(sweep.parent.info.status, sweep.parent.data.tags, time.time() if now is None else now)


def stale_note(sweep: Sweep, now: Optional[float] = None) -> Optional[str]:
    """For an interrupted sweep: why, and the command that continues it."""
    import time
    now = time.time() if now is None else now
    tags = sweep.parent.data.tags
    if state(sweep, now) != INTERRUPTED:
        return None
    age = heartbeat_age(tags, now)
    why = (f"its driver stopped (no heartbeat for {age:.0f} s; the limit is {HEARTBEAT_STALE_S:.0f} s)"
           if tags.get(TAG_STATUS, RUNNING) == RUNNING else "its driver was stopped")
    return f"{why}; continue it with: {resume_command(tags, sweep.name)}"


def _as_of(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """Trials of an interrupted sweep still tagged running were interrupted with it."""
    if state(sweep) != INTERRUPTED:
        return rows
    return [{**r, "status": INTERRUPTED} if r["status"] == RUNNING else r for r in rows]


def status_counts(rows: list[dict]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {k: v for k, v in counts.items() if v}


def logged_verdict(client, sweep: Sweep) -> Optional[dict]:
    """The verdict.json `capsweep report` logged on the parent run, or None."""
    try:
        names = [a.path for a in client.list_artifacts(sweep.parent.info.run_id, "report")]
    except Exception:  # noqa: BLE001 - an artifact store that is not reachable: no verdict to show
        return None
    if VERDICT_PATH not in names:
        return None
    from analysis.store import scoped_environ
    with tempfile.TemporaryDirectory() as tmp, \
            scoped_environ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):   # stderr: our one line
        path = client.download_artifacts(sweep.parent.info.run_id, VERDICT_PATH, tmp)
        return json.loads(Path(path).read_text())


# ---- the commands' bodies -------------------------------------------------------------------------
def ls_lines(client, experiment: Optional[str]) -> list[str]:
    found = sweeps(client, experiment)
    if not found:
        return ["no sweeps in this store"]
    lines = [f"{'sweep':20s} {'experiment':14s} {'state':12s} {'trials':>9s}  {'by status':40s} verdict"]
    for s in found:
        rows = _as_of(s, trial_rows(client, s))
        counts = status_counts(rows)
        total = f"{len(rows)}/{s.expected}" if s.expected else str(len(rows))
        by = ", ".join(f"{n} {k}" for k, n in counts.items()) or "-"
        v = logged_verdict(client, s)
        verdict = f"escaped: {v['escaped']} ({v['instrument']})" if v else "-"
        lines.append(f"{s.name:20s} {s.experiment:14s} {state(s):12s} {total:>9s}  {by:40s} {verdict}")
    return lines


def ls_notes(client, experiment: Optional[str]) -> list[str]:
    """For stderr below `ls`'s table: how each interrupted sweep continues."""
    notes = [(s.name, stale_note(s)) for s in sweeps(client, experiment)]
    return [f"capsweep: sweep {name!r} is interrupted: {note}" for name, note in notes if note]


def best_so_far(sweep: Sweep) -> Optional[tuple[str, float, dict]]:
    """(metric, value, row) of the best single trial so far on the first objective, candidates of
    any status (a running trial counts with its last epoch)."""
    metrics, modes = sweep.objectives
    if not metrics:
        return None
    m, sign = metrics[0], (1.0 if (modes or ["max"])[0] == "max" else -1.0)
    scored = [(r["metrics"][m], r) for r in sweep.trials
              if r["role"] == CANDIDATE and math.isfinite(r["metrics"].get(m, math.nan))]
    if not scored:
        return None
    value, row = max(scored, key=lambda t: sign * t[0])
    return m, value, row


def status_lines(sweep: Sweep) -> list[str]:
    sweep.trials = _as_of(sweep, sweep.trials)
    counts = status_counts(sweep.trials)
    ended = sum(n for k, n in counts.items() if k not in (RUNNING, INTERRUPTED))
    total = sweep.expected or len(sweep.trials)
    lines = [f"sweep {sweep.name!r} (experiment {sweep.experiment!r}): {state(sweep)}, {ended}/{total} trials ended",
             "  trials: " + (", ".join(f"{n} {k}" for k, n in counts.items()) or "none started yet")
             + (f", {total - len(sweep.trials)} not started" if total > len(sweep.trials) else "")]
    note = stale_note(sweep)
    if note:
        lines.append(f"  interrupted: {note}")
    best = best_so_far(sweep)
    if best:
        m, value, row = best
        where = ", ".join(f"{k}={row['params'].get(k)}" for k in sweep.space)
        # named as the MLflow UI lists it (the run name); Tune's trial id last, for Ray's logs
        lines.append(f"  best so far: {m}={value:.4g} (run {row['run_name'] or row['run_id']}, {row['status']}, "
                     f"seed {row['seed']}" + (f"; {where}" if where else "") + f"; Tune trial {row['trial_id']})")
    return lines


def export_rows(sweep: Sweep) -> tuple[list[str], list[list]]:
    """The trial table: identity columns, every param, every metric's final value."""
    params = sorted({k for r in sweep.trials for k in r["params"]} - {ROLE_KEY})
    metrics = sorted({k for r in sweep.trials for k in r["metrics"]})
    header = ["trial_id", "run_id", "status", "role", "seed", *params, *metrics]
    body = [[r["trial_id"], r["run_id"], r["status"], r["role"], r["seed"],
             *(r["params"].get(k, "") for k in params), *(r["metrics"].get(k, "") for k in metrics)]
            for r in sweep.trials]
    return header, body


def write_csv(header: list[str], body: list[list], out: TextIO) -> None:
    w = csv.writer(out)
    w.writerow(header)
    w.writerows(body)


def verdict_of(client, sweep: Sweep, uri: str) -> tuple[dict, str]:
    """(verdict, where from): the logged verdict.json, else computed now by the analysis package
    with its default thresholds (nothing is written)."""
    v = logged_verdict(client, sweep)
    if v is not None:
        return v, "logged report"
    from analysis.errors import AnalysisError
    from analysis.load import load_sweep
    from analysis.verdict import Thresholds, annotate, compute_verdict
    try:
        data = load_sweep(sweep.experiment, uri, sweep.name, progress=False)
    except AnalysisError as e:
        raise InspectError(f"sweep {sweep.name!r}: {e}") from None
    # the same object a logged verdict.json holds (this module reads verdicts as their JSON)
    return compute_verdict(data, Thresholds(), annotate(data), None).to_json(), "computed now (default thresholds)"


def logged_spec(client, sweep: Sweep) -> Optional[str]:
    """The spec.yaml the runner logged on the sweep's parent run (sweeps/runner.py), or None."""
    try:
        names = [a.path for a in client.list_artifacts(sweep.parent.info.run_id)]
    except Exception:  # noqa: BLE001 - an artifact store that is not reachable: no spec to read
        return None
    if SPEC_PATH not in names:
        return None
    from analysis.store import scoped_environ
    with tempfile.TemporaryDirectory() as tmp, \
            scoped_environ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        return Path(client.download_artifacts(sweep.parent.info.run_id, SPEC_PATH, tmp)).read_text()


def confirm_section(sweep: Sweep, uri: str) -> dict:
    """What `capsweep confirm` re-runs: the `confirm` section of the sweep's verdict, computed now by
    the analysis package with its default thresholds (ranked candidates, default top and seeds, every
    seed the sweep used; analysis/verdict.py)."""
    from analysis.errors import AnalysisError
    from analysis.load import load_sweep
    from analysis.verdict import compute_verdict
    try:
        data = load_sweep(sweep.experiment, uri, sweep.name, progress=False)
    except AnalysisError as e:
        raise InspectError(f"sweep {sweep.name!r}: {e}") from None
    return compute_verdict(data).confirm


def key_probes(verdict: dict) -> dict[int, dict]:
    """Per depth, the candidate configuration with the best mean test accuracy and its key probes
    (seed means as the verdict reports them)."""
    out: dict[int, dict] = {}
    for c in verdict.get("configurations", []):
        if c.get("role") != CANDIDATE:
            continue
        fig = c.get("figures", {})
        acc = (fig.get("test_acc") or {}).get("mean")
        d = int(c.get("depth", -1))
        if acc is None or (d in out and out[d]["test_acc"] >= acc):
            continue
        out[d] = {"label": c.get("label", ""), "escaped": c.get("escaped"),
                  **{p: (fig.get(p) or {}).get("mean") for p in KEY_PROBES}}
    return out


def compare_lines(a: tuple[Sweep, dict, str], b: tuple[Sweep, dict, str]) -> list[str]:
    (sa, va, fa), (sb, vb, fb) = a, b

    def cell(x) -> str:
        if x is None:
            return "n/a"
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    rows = [("verdict from", fa, fb), ("escaped", va["escaped"], vb["escaped"]),
            ("instrument", va["instrument"], vb["instrument"])]
    for k in ("trials", "finished", "failed", "diverged", "configurations", "candidates", "controls"):
        rows.append((k, va["counts"].get(k), vb["counts"].get(k)))
    rows.append(("escaping configurations", len(va.get("escapes", [])), len(vb.get("escapes", []))))
    pa, pb = key_probes(va), key_probes(vb)
    for d in sorted(set(pa) | set(pb)):
        for p in ("test_acc", "grad_ratio", "act_grad_min", "starved_worst", "dead_worst"):
            rows.append((f"depth {d} best {p}", pa.get(d, {}).get(p), pb.get(d, {}).get(p)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}s}  {sa.name + ' (' + sa.experiment + ')':28s}  {sb.name + ' (' + sb.experiment + ')'}"]
    lines += [f"{name:{width}s}  {cell(x):28s}  {cell(y)}" for name, x, y in rows]
    return lines


def csv_text(sweep: Sweep) -> str:
    buf = io.StringIO()
    write_csv(*export_rows(sweep), buf)
    return buf.getvalue()


def write_export(sweep: Sweep, path: Optional[str]) -> str:
    """Write the trial table to `path` ('-' or None: stdout). Returns where it went."""
    text = csv_text(sweep)
    if path in (None, "-"):
        sys.stdout.write(text)
        return "stdout"
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise InspectError(f"--csv: cannot write {path}: {e.strerror or e}") from None
    return path


# ---- the read side of `capsweep confirm` and `capsweep dashboard` ----------------------------------------
class StoreReader:
    """What the writer's commands read of a store before they write (sweeps/confirm.py plans a
    confirmation from an exploration; sweeps/dashboard.py finds an Optuna sweep's journal): handed to
    them by the CLI (analysis/cli.py, `reader`), so sweeps reads sweeps back through analysis without
    importing it. Each method raises InspectError (one line) for bad input."""

    def __init__(self, uri: str):
        self.uri = uri
        self.client = open_client(uri)

    def find(self, name: str, experiment: str) -> Sweep:
        """The most recent sweep of that name, with its trial rows."""
        return find_sweep(self.client, name, experiment)

    def latest(self, name: str, experiment: str) -> Sweep:
        """The most recent sweep of that name, without reading its trials."""
        sweep = next((s for s in reversed(sweeps(self.client, experiment)) if s.name == name), None)
        return sweep if sweep is not None else find_sweep(self.client, name, experiment)   # its one-line refusal

    def spec_text(self, sweep: Sweep) -> Optional[str]:
        return logged_spec(self.client, sweep)

    def confirm_section(self, sweep: Sweep) -> dict:
        return confirm_section(sweep, self.uri)

    def sweep_names(self, experiment: str) -> set[str]:
        """The sweep names of an experiment (none when it does not exist yet)."""
        try:
            return {s.name for s in sweeps(self.client, experiment)}
        except InspectError:
            return set()
