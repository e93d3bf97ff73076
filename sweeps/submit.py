"""`capsweep submit`: send a sweep to a running Ray cluster as a Ray job (Ray Jobs API).

The job's entrypoint is the same `capsweep run SPEC key=value ...` a user types locally; it runs on
the head node as the sweep driver, joins the cluster (RAY_ADDRESS=auto inside a job) and logs to the
tracking URI of the spec (a cluster uses an MLflow server, see cluster.yaml). When submitted from a
capsweep checkout, the checkout travels as the job's working directory, so the cluster runs the
code you have; otherwise the cluster's installed capsweep is used.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from sweeps.spec import SweepSpec, resolve_spec_path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "ray_results", "reports", "**/__pycache__",
            ".pytest_cache", ".hypothesis", "docs/findings"]


class SubmitError(RuntimeError):
    """The cluster could not take the job. One line."""


def job_address(address: str) -> str:
    if address.startswith(("http://", "https://", "ray://")):
        return address
    host = address.split(":")[0]
    return f"http://{host}:8265"


def check_cluster_ready(spec: SweepSpec) -> None:
    """A sweep on a cluster must log where it survives the job: refuse what would be lost."""
    uri = spec.mlflow.tracking_uri
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise SubmitError(f"mlflow.tracking_uri: {uri!r} would be written inside the job's temporary folder "
                          "on the head node; pass mlflow.tracking_uri=http://127.0.0.1:5000 (the head's "
                          "MLflow server) or export MLFLOW_TRACKING_URI")
    if not Path(spec.storage_path).expanduser().is_absolute():
        raise SubmitError(f"storage_path: {spec.storage_path!r} is relative to the job's temporary folder; "
                          "trials on other nodes need shared storage: storage_path=/shared/ray_results")


def submit(spec_arg: str, overrides: list[str], spec: SweepSpec, address: str,
           working_dir: Optional[str] = None, extra_env: Optional[list[str]] = None,
           resume: bool = False) -> str:
    from ray.job_submission import JobSubmissionClient
    from sweeps.tracking import git_commit
    check_cluster_ready(spec)
    path = resolve_spec_path(spec_arg)
    env = {}
    commit = git_commit()
    if commit:
        env["CAPSWEEP_GIT_COMMIT"] = commit      # the shipped folder has no .git
    for item in extra_env or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SubmitError(f"--env: {item!r} is not KEY=VALUE")
        env[k] = v
    runtime_env: dict = {"env_vars": env} if env else {}
    wd = Path(working_dir) if working_dir else (PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").exists() else None)
    if wd is not None:
        runtime_env["working_dir"] = str(wd)
        runtime_env["excludes"] = EXCLUDES
        try:
            rel = path.resolve().relative_to(wd.resolve())
            spec_in_job = str(rel)
        except ValueError:
            # a spec outside the shipped folder: send its text inside the working dir is not possible,
            # so pass it inline through the environment
            runtime_env.setdefault("env_vars", {})["CAPSWEEP_SPEC_TEXT"] = path.read_text()
            spec_in_job = "$CAPSWEEP_SPEC_FILE"
    else:
        spec_in_job = str(path)
    flags = ["--resume"] if resume else []
    entry = ["python", "-m", "sweeps.cli", "run", spec_in_job, *overrides, *flags]
    entrypoint = " ".join(shlex.quote(a) for a in entry)
    if spec_in_job == "$CAPSWEEP_SPEC_FILE":
        entrypoint = ('CAPSWEEP_SPEC_FILE=$(mktemp --suffix=.yaml) && printf "%s" "$CAPSWEEP_SPEC_TEXT" '
                      '> "$CAPSWEEP_SPEC_FILE" && python -m sweeps.cli run "$CAPSWEEP_SPEC_FILE" '
                      + " ".join(shlex.quote(a) for a in [*overrides, *flags]))
    try:
        client = JobSubmissionClient(job_address(address))
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None,
                                 metadata={"capsweep.sweep": spec.name})
    except Exception as e:  # noqa: BLE001 - connection errors of several libraries
        text = " ".join(str(e).split())
        if "nauthori" in text or "uthentication" in text or "token" in text.lower():
            raise SubmitError(f"--address: Ray at {job_address(address)} refused the job (authentication); "
                              "export RAY_AUTH_MODE=token and point RAY_AUTH_TOKEN_PATH at the cluster's "
                              "token (ray get-auth-token), then submit again") from None
        raise SubmitError(f"--address: cannot submit to Ray at {job_address(address)} "
                          f"({' '.join(str(e).split())[:200]}); is the cluster up (ray up cluster.yaml) "
                          "and its dashboard port forwarded?") from None
