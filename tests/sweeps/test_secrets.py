"""Secrets stay out of what capsweep prints, logs and publishes (issue 18, item 7).

- The userinfo of a URI (`http://alice:S3cretPw@host`) is masked wherever capsweep prints or records
  it: errors, the run summary, --dry-run, the parent's spec.yaml, `mlflow.source.name`, the report.
- `capsweep submit` refuses secret-looking `--env` names and URIs with a password (a Ray job's
  environment and entrypoint are readable through `ray job list`) unless --allow-secret-env.
The default run checks each place on its own; with -m slow a real sweep against a real MLflow server
with the password in its URI, then its report, and the password found nowhere (output, store, files).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from capsmodels.contract import redact
from sweeps.cli import main
from tests.helpers.sweep import capsweep_cmd, env_for_subprocess, parents, run, write_spec

SECRET = "S3cretPw"
URI = f"http://alice:{SECRET}@127.0.0.1:5000"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("text, shown", [
    ("http://alice:S3cretPw@host:5000/x", "http://***@host:5000/x"),
    ("run mlflow.tracking_uri=https://tok3n@h.example/api --num-cpus 2", "run mlflow.tracking_uri=https://***@h.example/api --num-cpus 2"),
    ("postgresql+psycopg://u:p%40ss@db:5432/mlflow", "postgresql+psycopg://***@db:5432/mlflow"),
    ("sqlite:///data/a@b.db", "sqlite:///data/a@b.db"),            # no userinfo: a path
    ("s3://bucket/key@v2 and mail alice@example.org", "s3://bucket/key@v2 and mail alice@example.org"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact_masks_userinfo_only(text, shown):
    assert redact(text) == shown


def test_the_command_recorded_on_runs_has_no_password():
    from sweeps.provenance import source_name
    name = source_name(["capsweep", "run", "depth", f"mlflow.tracking_uri={URI}"])
    assert SECRET not in name and name == "capsweep run depth mlflow.tracking_uri=http://***@127.0.0.1:5000"


def test_the_parent_spec_artifact_has_no_password(tmp_path):
    from sweeps import runner
    from analysis.store import open_client as open_store
    from sweeps.spec import load_spec
    client = open_store(f"sqlite:///{tmp_path}/mlflow.db", create=True)
    exp = client.create_experiment("capsweep", artifact_location=str(tmp_path / "art"))
    spec = load_spec(str(write_spec(tmp_path / "s.yaml", "s", "model.depth: {grid: [0]}", tracking_uri=URI)), [])
    rid = runner.create_parent(client, exp, spec)
    text = open(client.download_artifacts(rid, "spec.yaml", str(tmp_path))).read()
    assert SECRET not in text and yaml.safe_load(text)["mlflow"]["tracking_uri"] == "http://***@127.0.0.1:5000"


def test_dry_run_and_errors_print_no_password(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", "s", "model.depth: {grid: [0]}")
    assert main(["run", str(spec), f"mlflow.tracking_uri={URI}", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "http://***@127.0.0.1:5000" in out
    assert main(["run", str(spec), f"mlflow.tracking_uri=http://alice:{SECRET}@127.0.0.1:9"]) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err and err.count("\n") == 1 and "***@127.0.0.1:9" in err


CLUSTER = ["mlflow.tracking_uri=http://127.0.0.1:5000", "storage_path=/shared/ray_results"]


@pytest.mark.parametrize("extra, says", [
    (["--env", "MLFLOW_TRACKING_PASSWORD=hunter2"], "--env MLFLOW_TRACKING_PASSWORD"),
    (["--env", "aws_secret_access_key=x"], "--env aws_secret_access_key"),
    (["--env", "HF_TOKEN=x"], "--env HF_TOKEN"),
    (["--env", f"MLFLOW_TRACKING_URI={URI}"], "--env MLFLOW_TRACKING_URI (a URI with a password)"),
    ([f"mlflow.tracking_uri={URI}"], "override mlflow.tracking_uri (a URI with a password)"),
])
def test_submit_refuses_secrets_in_the_job_unless_allowed(tmp_path, capsys, extra, says):
    """Refused in one line before Ray is asked anything (the address here answers nobody)."""
    spec = write_spec(tmp_path / "s.yaml", "s", "model.depth: {grid: [0]}")
    overrides = CLUSTER if not extra[0].startswith("mlflow.") else [*extra, CLUSTER[1]]
    flags = extra if extra[0] == "--env" else []
    argv = ["submit", str(spec), *overrides, *flags, "--address", "http://127.0.0.1:9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "--allow-secret-env" in err and "hunter2" not in err, err
    assert SECRET not in err
    assert main([*argv, "--allow-secret-env"]) == 2              # now it gets as far as Ray's address
    err = capsys.readouterr().err
    assert "warning: " in err and "cannot submit to Ray at http://127.0.0.1:9" in err and SECRET not in err


def test_plain_env_names_pass_the_check(tmp_path):
    from sweeps.submit import secret_exposures
    assert secret_exposures(["MLFLOW_TRACKING_URI=http://127.0.0.1:5000", "RAY_AUTH_MODE=token",
                             "CUBLAS_WORKSPACE_CONFIG=:4096:8"], ["train.lr=0.01"], "name: x\n") == []


@pytest.mark.slow     # a real server and sweep (~1-2 min); the default run checks each place above
def test_a_sweep_with_a_password_in_its_uri_leaves_it_nowhere(tmp_path):
    from tests.helpers.procs import free_port, start_mlflow_server, stop
    port = free_port()
    db, art = tmp_path / "srv.db", tmp_path / "artifacts"
    server = start_mlflow_server(db, art, port)
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    try:
        spec = write_spec(tmp_path / "p.yaml", "pw", "model.depth: {grid: [0]}", seeds="[0]", epochs=1,
                          tracking_uri=uri)
        env = env_for_subprocess()
        proc = run(capsweep_cmd("run", str(spec), "--num-cpus", "1"), tmp_path, env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rep = run(capsweep_cmd("report", "pw", "--tracking-uri", uri, "--out", str(tmp_path / "rep")), tmp_path, env)
        assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-2000:]
        for out in (proc.stdout, proc.stderr, rep.stdout, rep.stderr):
            assert SECRET not in out
        from mlflow.tracking import MlflowClient
        client = MlflowClient(f"http://127.0.0.1:{port}")
        assert len(parents(client)) == 1
        stop(server)
        server = None
        files = [db, *art.rglob("*"), *(tmp_path / "rep").rglob("*")]
        for path in files:
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    finally:
        if server is not None:
            stop(server)
