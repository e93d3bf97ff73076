"""Where a sweep's code came from: the git commit tagged on every run (`capsweep.git_commit`).

Standard library only: `capsweep submit` needs the commit before it ships the checkout to a cluster,
and must not import Ray Tune or MLflow for it.
"""
from __future__ import annotations

import os
import subprocess
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
