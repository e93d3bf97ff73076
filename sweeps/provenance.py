"""Where a run came from: its code (git commit), its command, its user, its data.

The git commit is tagged on every run twice: `capsweep.git_commit` (capsweep's own) and MLflow's
standard `mlflow.source.git.commit`, beside `mlflow.source.name`, `mlflow.source.type` and
`mlflow.user`, which MLflow's UI shows as the run's source and user. `dataset_inputs` describes the
splits a run trained and was tested on, for `MlflowClient.log_inputs` (the run's Datasets).

Standard library only at import: `capsweep submit` needs the commit before it ships the checkout to a
cluster, and must not import Ray Tune or MLflow for it.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from capsmodels.contract import GIT_COMMIT_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> Optional[str]:
    """The project's git commit, when it runs from a checkout; a cluster job's shipped folder has no
    .git, so `capsweep submit` passes the commit in $CAPSWEEP_GIT_COMMIT and that wins."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# MLflow's standard tags (mlflow.utils.mlflow_tags)
TAG_SOURCE_COMMIT, TAG_SOURCE_NAME = "mlflow.source.git.commit", "mlflow.source.name"
TAG_SOURCE_TYPE, TAG_USER = "mlflow.source.type", "mlflow.user"
DATA_CONTEXT = "mlflow.data.context"       # MLflow's input tag: what the dataset was used for
SPLIT_ROWS = "capsweep.rows"               # input tag: the split's number of examples


def source_name(argv: Optional[list] = None) -> str:
    """The command that made the run, as typed: `capsweep run smoke --num-cpus 2` (also when it ran as
    `python -m sweeps.cli`)."""
    from capsmodels.contract import redact       # `mlflow.tracking_uri=http://user:password@host` stays out
    argv = list(sys.argv if argv is None else argv)
    return redact(" ".join(["capsweep", *argv[1:]]))[:500]


def standard_tags(commit: Optional[str]) -> dict[str, str]:
    """MLflow's standard provenance tags of a run made by this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):          # a container user with no passwd entry
        user = os.environ.get("USER", "unknown")
    tags = {TAG_SOURCE_NAME: source_name(), TAG_SOURCE_TYPE: "LOCAL", TAG_USER: user}
    if commit:
        tags[TAG_SOURCE_COMMIT] = commit
    return tags


def dataset_inputs(name: str, splits: dict) -> list[dict]:
    """One entry per split: name, context (train / val / test), digest (sha256 of the split's images
    and labels as trained on, so a different seed, size or file shows as a different digest), rows.

    splits: {context: (x, y)} of tensors or arrays (anything with `.numpy()` or `.tobytes()`)."""
    out = []
    for context, (x, y) in splits.items():
        h = hashlib.sha256()
        for a in (x, y):
            a = a.numpy() if hasattr(a, "numpy") else a
            h.update(a.tobytes())
        out.append({"name": name, "context": context, "digest": h.hexdigest()[:16], "rows": int(len(y))})
    return out
