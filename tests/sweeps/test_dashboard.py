"""`capsweep dashboard SWEEP` (sweeps/dashboard.py): optuna-dashboard on the sweep's Optuna study.

The store and the study are made as a sweep makes them, without Ray: the runner's own `create_parent`
writes the parent run of a real spec (the shipped `hunt`, an optuna nsga2 search), and Optuna writes
the study into the journal file the runner uses (`journal_file(spec)`, sweeps/search.py's storage).
Then a real optuna-dashboard is started by the real command: it lists the sweep's study with its
trials, refuses to delete it (read-only: the journal is the search's state), listens on 127.0.0.1
only and stops with everything it started on SIGTERM. Refusals are one line, exit 2.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from sweeps import cli, dashboard
from sweeps.runner import create_parent
from sweeps.search import journal_storage
from sweeps.spec import journal_file, load_spec
from tests.helpers.sweep import ROOT, capsweep_cmd, env_for_subprocess
from tests.helpers.procs import alive, descendants, free_port, kill_group, listening_addresses, read_until
from tests.helpers.runs import make_store

N_TRIALS = 5


def _sweep(root: Path, client: MlflowClient, exp: str, name: str, search: str = "optuna") -> tuple:
    """A parent run as the runner writes it, for the shipped hunt spec named `name` (grid: the smoke spec)."""
    spec = load_spec("hunt" if search == "optuna" else "smoke", [f"name={name}", f"storage_path={root / 'ray'}"])
    return spec, create_parent(client, exp, spec)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    st = make_store(root)
    uri, client, exp = st.uri, st.client, st.experiment_id
    spec, parent = _sweep(root, client, exp, "hunt-a")
    study = optuna.create_study(storage=journal_storage(journal_file(spec)), study_name="hunt-a",
                                directions=["maximize", "maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_int("depth", 0, 3), 0.5), n_trials=N_TRIALS)
    _sweep(root, client, exp, "grid-a", search="grid")
    nofile, _ = _sweep(root, client, exp, "hunt-b")              # a parent, but no journal on this machine
    return {"root": root, "uri": uri, "client": client, "spec": spec, "parent": parent, "nofile": nofile}


def test_the_parent_run_records_where_the_study_is(store):
    tags = store["client"].get_run(store["parent"]).data.tags
    path = Path(tags["capsweep.optuna_journal"])
    assert path.is_absolute() and path == journal_file(store["spec"]).resolve() and path.is_file()
    assert path == (store["root"] / "ray" / "hunt-a" / "optuna.journal").resolve()


def test_a_sweep_from_before_the_tag_is_found_through_its_logged_spec(store, monkeypatch):
    """No tag: the spec.yaml on the parent run gives storage_path and name (absolute here)."""
    from analysis.inspect import StoreReader
    reader = StoreReader(store["uri"])
    sweep = reader.latest("hunt-a", "capsweep")
    del sweep.parent.data.tags["capsweep.optuna_journal"]       # as an older capsweep wrote it
    assert dashboard.journal_path(reader, sweep) == journal_file(store["spec"])
    assert dashboard.study_id(journal_file(store["spec"]), "hunt-a") == 0


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, json.loads(r.read() or b"{}")


def test_dashboard_serves_the_study_read_only_on_loopback_and_stops_with_everything(store):
    port = free_port()
    proc = subprocess.Popen(capsweep_cmd("dashboard", "hunt-a", "--tracking-uri", store["uri"], "--port", str(port)),
                            cwd=store["root"], env=env_for_subprocess(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = read_until(proc.stderr, "Optuna dashboard on", "error")   # sweeps/ui.py: START_TIMEOUT_S
        m = re.search(r"Optuna dashboard on (http://127\.0\.0\.1:(\d+))/dashboard/studies/(\d+) for sweep 'hunt-a'",
                      lines[-1])
        assert m, lines
        base, study_id = m.group(1), int(m.group(3))
        assert int(m.group(2)) == port and set(listening_addresses(port)) == {"127.0.0.1"}
        code, body = _get(f"{base}/api/studies")
        (summary,) = body["study_summaries"]
        assert summary["study_name"] == "hunt-a" and summary["study_id"] == study_id
        code, body = _get(f"{base}/api/studies/{study_id}")
        assert code == 200 and len(body["trials"]) == N_TRIALS
        assert sorted(p["name"] for p in body["trials"][0]["params"]) == ["depth", "x"]
        # a write through the dashboard is refused, and the journal still holds the study
        req = urllib.request.Request(f"{base}/api/studies/{study_id}", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 500
        again = journal_storage(journal_file(store["spec"]))
        assert [s.study_name for s in again.get_all_studies()] == ["hunt-a"]
        assert len(again.get_all_trials(study_id)) == N_TRIALS
        below = descendants(proc.pid)
        assert below
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        assert alive(below) == set() and listening_addresses(port) == []
    finally:
        kill_group(proc, signal.SIGKILL, 30)


@pytest.mark.parametrize("args, says", [
    (["grid-a"], "sweep 'grid-a' searched with grid: it has no Optuna study"),
    (["nosuch"], "sweep: 'nosuch' not found in experiment 'capsweep'; sweeps there: grid-a, hunt-a, hunt-b"),
    (["hunt-b"], "sweep 'hunt-b': its Optuna journal "),
    ([], "dashboard: name the sweep"),
])
def test_refusals_are_one_line_and_exit_2(store, capsys, args, says):
    code = cli.main(["dashboard", *args, "--tracking-uri", store["uri"], "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("capsweep: error: ") and says in err, err
    if args == ["hunt-b"]:
        assert "is not on this machine" in err and str(journal_file(store["nofile"])) in err


def test_without_the_extra_it_says_how_to_install_it(store):
    """optuna-dashboard not importable (sys.modules[name] = None is how Python marks a module absent):
    one line naming the extra, exit 2, before the store is read."""
    code = ("import sys; sys.modules['optuna_dashboard'] = None; from sweeps.cli import main; "
            f"sys.exit(main(['dashboard', 'hunt-a', '--tracking-uri', 'sqlite:////nonexistent/x.db']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_for_subprocess(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("capsweep: error: capsweep dashboard needs the dashboard extra (optuna-dashboard): "
                                  "pip install -c sweeps/constraints.txt -e '.[dashboard]'")
