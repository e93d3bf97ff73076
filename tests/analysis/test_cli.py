"""`capsweep report` / `python -m analysis` (analysis/cli.py): the report written and logged on the
parent run, its flags, and one-line errors with exit 2.

The store: tests/helpers/analysis_store.py (the `store` and `s1` fixtures of tests/analysis/conftest.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path
import pytest
from mlflow import MlflowClient
from analysis import cli


def test_cli_writes_report_and_logs_it_on_the_parent_run(store, tmp_path, capsys):
    out = tmp_path / "rep"
    code = cli.main(["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "s1",
                     "--out", str(out), "--alpha", "0.1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("escaped: yes")
    assert captured.out.splitlines()[1].startswith("instrument: validated")
    client = MlflowClient(store["uri"])
    logged = {os.path.basename(f.path) for f in client.list_artifacts(store["parent"], "report")}
    assert {"report.html", "report.md", "verdict.json"} <= logged
    assert {f for f in os.listdir(out) if f.endswith(".png")} <= logged
    assert json.loads((out / "verdict.json").read_text())["thresholds"]["alpha"] == 0.1


def test_report_takes_the_sweep_positionally_and_the_store_before_the_subcommand(store, tmp_path, capsys):
    """`capsweep --tracking-uri U report s1` as `status s1` takes its sweep (issue 23, 5)."""
    from sweeps.cli import main as capsweep
    out = tmp_path / "rep"
    assert capsweep(["--tracking-uri", store["uri"], "report", "s1", "--out", str(out), "--no-log-artifacts"]) == 0
    assert json.loads((out / "verdict.json").read_text())["sweep"] == "s1"
    assert "report: " in capsys.readouterr().out


def test_cli_reference_flag(store, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "deep", "--out", str(out),
            "--no-log-artifacts"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.startswith("escaped: undecided")
    assert cli.main(args + ["--reference", "s1"]) == 0
    assert capsys.readouterr().out.startswith("escaped: undecided -- Inconclusive: the sweep has no healthy cnn")
    assert json.loads((out / "verdict.json").read_text())["reference_source"] == "sweep s1"
    assert cli.main(args + ["--reference", "nope"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "sweep 'nope' not found" in line


def test_cli_ignores_the_old_bootstrap_flag_with_a_note(store, tmp_path, capsys):
    assert cli.main(["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "s1", "--out",
                     str(tmp_path / "r"), "--bootstrap", "500", "--no-log-artifacts"]) == 0
    assert "--bootstrap is ignored" in capsys.readouterr().err


def test_cli_says_where_the_report_is_when_mlflow_cannot_take_it(store, tmp_path, capsys):
    """The artifact store refuses the upload (a file where the run's report/ folder must go): the report
    is still written, the verdict and its path are printed, and one line says it is not in MLflow."""
    client = MlflowClient(store["uri"])
    blocker = Path(client.get_run(store["parent"]).info.artifact_uri) / "report"
    moved = blocker.with_name("report.moved")
    if blocker.exists():
        blocker.rename(moved)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    try:
        out = tmp_path / "rep"
        code = cli.main(["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "s1",
                         "--out", str(out)])
    finally:
        blocker.unlink()
        if moved.exists():
            moved.rename(blocker)
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.startswith("escaped: yes") and f"report: {out / 'report.html'}" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"capsweep report: error: the report is in {out} but was not logged to MLflow: ")
    assert (out / "report.html").is_file() and (out / "verdict.json").is_file()


@pytest.mark.parametrize("args, words", [
    (["--experiment", "nope"], "experiment 'nope' not found"),
    (["--experiment", "empty"], "has no runs"),
    (["--experiment", "othertool"], "none written by capsweep"),
    (["--experiment", "noprobes"], "probes"),
    (["--experiment", "capsweep", "--sweep", "s9"], "sweep 's9' not found"),
])
def test_bad_input_is_one_line_and_exit_2(store, tmp_path, capsys, args, words):
    code = cli.main(args + ["--tracking-uri", store["uri"], "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err


def test_missing_sqlite_store_is_not_created(tmp_path, capsys):
    db = tmp_path / "absent.db"
    code = cli.main(["--experiment", "capsweep", "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2 and not db.exists()
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


@pytest.mark.parametrize("args, words", [
    (["--dead-frac-max", "2"], "--dead-frac-max: 2.0 is not allowed; must be in [0, 1]"),
    (["--alpha", "0.7"], "--alpha: 0.7 is not allowed; must be in (0, 0.5)"),
    (["--alpha", "x"], "argument --alpha: invalid float value: 'x'"),
    (["--acc-margin", "-0.1"], "--acc-margin: -0.1 is not allowed"),
    (["--grad-margin", "nan"], "--grad-margin: nan is not allowed"),
    (["--grad-ratio-min", "0"], "--grad-ratio-min: 0.0 is not allowed; must be > 0"),
    (["--acc-tolerance", "0.1"], "--acc-tolerance was replaced by --acc-margin"),
    (["--grad-floor=0.1"], "--grad-floor was replaced by --grad-margin"),
    (["--reference", ""], "--reference: '' is not allowed"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, words, capsys):
    assert cli.main(["--experiment", "capsweep"] + args) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("capsweep report: error: ") and words in line, err
