"""`capsweep submit`: send a sweep to a running Ray cluster as a Ray job (Ray Jobs API).

The job's entrypoint is the same `capsweep run SPEC key=value ...` a user types locally; it runs on
the head node as the sweep driver, joins the cluster (RAY_ADDRESS=auto inside a job) and logs to the
tracking URI of the spec (a cluster uses an MLflow server, see cluster.yaml). When submitted from a
capsweep checkout, the checkout travels as the job's working directory, so the cluster runs the
code you have; otherwise the cluster's installed capsweep is used.

An Optuna sweep needs `max_concurrent`: without it Ray Tune keeps one trial pending at a time
(`tune_controller._get_max_pending_trials` gives 1 for any searcher but its own grid/random generator),
so the autoscaler only ever sees one trial's demand and the cluster never grows. When the spec leaves it
at 0, `submit` sets it to the trials the cluster can hold at once (`trial_concurrency`).
"""
from __future__ import annotations

import dataclasses
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import yaml

from capsmodels.contract import GIT_COMMIT_ENV, TAG_SWEEP
from capsmodels.errors import CapsweepError
from sweeps.spec import SweepSpec, resolve_spec_path

NODE_GROUP_LABEL = "ray.io/node-group"   # Ray labels a node with the launcher's node type (RAY_NODE_TYPE_NAME)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "ray_results", "reports", "**/__pycache__",
            ".pytest_cache", ".hypothesis", "docs/findings"]


class SubmitError(CapsweepError, RuntimeError):
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
    from sweeps import storage
    if storage.is_uri(spec.storage_path):      # s3://, gs://, ... are shared by every node; file:// must be absolute
        if storage.scheme(spec.storage_path) != "file" or spec.storage_path.startswith("file:///"):
            return
        raise SubmitError(f"storage_path: {spec.storage_path!r} is not an absolute file:// URI; use "
                          "file:///shared/ray_results or an s3:// / gs:// bucket")
    if not Path(spec.storage_path).expanduser().is_absolute():
        raise SubmitError(f"storage_path: {spec.storage_path!r} is relative to the job's temporary folder; "
                          "trials on other nodes need shared storage: storage_path=/shared/ray_results")


def autoscaler_ceiling(cfg: dict, resource: str) -> float:
    """The most of `resource` (GPU, CPU) a cluster-launcher config lets the cluster hold: the head's plus
    its worker types', taking the types with the most per node first, each up to its max_workers, all
    within the global max_workers (every node counts 1 against that bound, so this order is optimal)."""
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    total = float((types[head].get("resources") or {}).get(resource, 0))
    workers = sorted(((float((t.get("resources") or {}).get(resource, 0)), int(t.get("max_workers", 0)))
                      for name, t in types.items() if name != head), reverse=True)
    slots = int(cfg.get("max_workers", sum(n for _, n in workers)))
    for amount, n in workers:
        take = min(n, slots)
        total += take * amount
        slots -= take
    return total


def launched_from(cfg: dict, nodes: list[dict]) -> bool:
    """Whether the running cluster's nodes are of this config's node types: `ray up` labels each node
    with its type (ray.io/node-group), the head with head_node_type."""
    types = set(cfg.get("available_node_types") or {})
    groups = [(n.get("labels") or {}).get(NODE_GROUP_LABEL) for n in nodes]
    heads = [g for n, g in zip(nodes, groups) if n.get("is_head_node")]
    return bool(heads) and heads[0] == cfg.get("head_node_type") and all(g in types for g in groups)


def trial_concurrency(spec: SweepSpec, nodes: list[dict], cluster_config: Optional[Path]) -> tuple[int, str]:
    """(trials the cluster can run at once, why): its GPUs (CPUs for CPU-only trials) divided by what one
    trial asks. The GPUs are those of the alive nodes now or, when the cluster was started from
    `cluster_config`, as many as its autoscaler bounds allow, whichever is more."""
    resource, per = ("GPU", spec.resources.gpu) if spec.resources.gpu > 0 else ("CPU", spec.resources.cpu)
    now = sum(float((n.get("resources_total") or {}).get(resource, 0)) for n in nodes)
    capacity, why = now, f"{now:g} {resource} on the cluster's nodes now"
    if cluster_config is not None and cluster_config.is_file():
        cfg = yaml.safe_load(cluster_config.read_text())
        if isinstance(cfg, dict) and cfg.get("available_node_types") and launched_from(cfg, nodes):
            ceiling = autoscaler_ceiling(cfg, resource)
            if ceiling > capacity:
                capacity, why = ceiling, f"up to {ceiling:g} {resource} within {cluster_config.name}'s autoscaler bounds"
    return math.floor(capacity / per + 1e-9), f"{why}, resources.{resource.lower()}={per:g} per trial"


def _alive_nodes(address: str) -> list[dict]:
    from ray.util.state import list_nodes
    nodes = list_nodes(address=job_address(address), detail=True, limit=10000, raise_on_missing_output=False)
    as_dicts = [dataclasses.asdict(n) if dataclasses.is_dataclass(n) else dict(n) for n in nodes]
    return [n for n in as_dicts if n.get("state") == "ALIVE"]


def _concurrency_override(spec: SweepSpec, address: str, wd: Optional[Path]) -> list[str]:
    """`max_concurrent=N` for an Optuna sweep that leaves it at 0 (see the module's docstring)."""
    if spec.search.algorithm != "optuna" or spec.max_concurrent:
        return []
    n, why = trial_concurrency(spec, _alive_nodes(address), (wd or PROJECT_ROOT) / "cluster.yaml")
    if n < 1:
        raise SubmitError(f"max_concurrent: 0 leaves an Optuna sweep one pending trial at a time, and the cluster "
                          f"holds no whole trial to count from ({why}); set max_concurrent=N, the trials to run at once")
    print(f"capsweep: max_concurrent={n} ({why}); set max_concurrent to choose another", file=sys.stderr)
    return [f"max_concurrent={n}"]


# names of environment variables that hold secrets (matched anywhere in the name, any case)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY",
                         re.IGNORECASE)


def secret_exposures(extra_env: list[str], overrides: list[str], spec_text: str) -> list[str]:
    """What a Ray job would publish: the job's environment and entrypoint (and so the overrides and the
    spec, which travels with it) are readable by anyone who can list jobs (`ray job list`, the
    dashboard). Secret-looking variable names, and URIs with a user and password in them."""
    from capsmodels.contract import redact
    found = []
    for item in extra_env:
        name, _, value = item.partition("=")
        if SECRET_NAME.search(name):
            found.append(f"--env {name}")
        elif redact(value) != value:
            found.append(f"--env {name} (a URI with a password)")
    found += [f"override {o.split('=', 1)[0]} (a URI with a password)" for o in overrides if redact(o) != o]
    if redact(spec_text) != spec_text:
        found.append("the spec file (a URI with a password)")
    return found


def check_secrets(extra_env: list[str], overrides: list[str], spec_path: Path, allow: bool) -> None:
    """Refuse to publish secrets in a job unless --allow-secret-env; with it, warn."""
    found = secret_exposures(extra_env, overrides, spec_path.read_text(errors="replace"))
    if not found:
        return
    where = "; ".join(found)
    if not allow:
        raise SubmitError(f"{where}: looks like a secret, and a Ray job's environment and entrypoint are readable by "
                          "anyone who can list jobs (ray job list, the dashboard); give the head node's driver its "
                          "credentials instead (MLFLOW_TRACKING_USERNAME/PASSWORD in its environment, or "
                          "~/.mlflow/credentials; README, 'Security'), or pass --allow-secret-env")
    print(f"capsweep: warning: {where}: published in the Ray job, readable by anyone who can list jobs "
          "(--allow-secret-env given)", file=sys.stderr)


def submit(spec_arg: str, overrides: list[str], spec: SweepSpec, address: str,
           working_dir: Optional[str] = None, extra_env: Optional[list[str]] = None,
           resume: bool = False, trust: bool = False, allow_secret_env: bool = False) -> str:
    from ray.job_submission import JobSubmissionClient
    from sweeps.provenance import git_commit
    check_cluster_ready(spec)
    path = resolve_spec_path(spec_arg)
    check_secrets(list(extra_env or []), list(overrides), path, allow_secret_env)
    env = {}
    commit = git_commit()
    if commit:
        env[GIT_COMMIT_ENV] = commit      # the shipped folder has no .git
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
    flags = (["--resume"] if resume else []) + (["--trust"] if trust else [])
    entry = ["python", "-m", "sweeps.cli", "run", spec_in_job, *overrides, *flags]
    entrypoint = " ".join(shlex.quote(a) for a in entry)
    if spec_in_job == "$CAPSWEEP_SPEC_FILE":
        entrypoint = ('CAPSWEEP_SPEC_FILE=$(mktemp --suffix=.yaml) && printf "%s" "$CAPSWEEP_SPEC_TEXT" '
                      '> "$CAPSWEEP_SPEC_FILE" && python -m sweeps.cli run "$CAPSWEEP_SPEC_FILE" '
                      + " ".join(shlex.quote(a) for a in [*overrides, *flags]))
    try:
        client = JobSubmissionClient(job_address(address))
        if not resume:                           # a resumed sweep keeps the searcher it was started with
            extra = _concurrency_override(spec, address, wd)
            entrypoint += "".join(" " + shlex.quote(a) for a in extra)
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None,
                                 metadata={TAG_SWEEP: spec.name})
    except SubmitError:
        raise
    except Exception as e:  # noqa: BLE001 - connection errors of several libraries
        text = " ".join(str(e).split())
        if "nauthori" in text or "uthentication" in text or "token" in text.lower():
            raise SubmitError(f"--address: Ray at {job_address(address)} refused the job (authentication); "
                              "export RAY_AUTH_MODE=token and point RAY_AUTH_TOKEN_PATH at the cluster's "
                              "token (ray get-auth-token), then submit again") from None
        raise SubmitError(f"--address: cannot submit to Ray at {job_address(address)} "
                          f"({' '.join(str(e).split())[:200]}); is the cluster up (ray up cluster.yaml) "
                          "and its dashboard port forwarded?") from None
