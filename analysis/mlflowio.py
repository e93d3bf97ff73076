"""The two MLflow chores the sweep runner and the analysis share: reading every page of a run search,
and scoping the `MLFLOW_HTTP_*` settings of one piece of work.

Why here: `analysis` may import mlflow (the contract module, `capsmodels.contract`, may not), and
`sweeps` builds on `analysis` anyway (its report). The module imports mlflow only inside functions.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

PAGE = 1000     # runs per search_runs page: MLflow's REST cap is 50,000, but big pages cost server memory


def search_all(client, experiment_id: str, filter_string: str = "", progress: bool = False,
               what: str = "runs") -> list:
    """All active runs of `experiment_id` matching `filter_string`, page by page. `progress`: a
    counter on stderr (`loading <what>: N`)."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=PAGE,
                                  page_token=token)
        out.extend(page)
        if progress:
            print(f"\rloading {what}: {len(out)}", end="", file=sys.stderr, flush=True)
        token = page.token
        if not token:
            break
    if progress:
        print(file=sys.stderr)
    return out


@contextmanager
def scoped_environ(values: Mapping[str, str], override: bool = True) -> Iterator[None]:
    """Set environment variables for the `with` block and restore them after, so a caller that runs
    inside another program (tests, the sweeps CLI calling the report) leaves its environment as it was.
    override=False: a variable the user set already wins."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if override or k not in os.environ:
            os.environ[k] = str(v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mlflow_http_env(max_retries: int, timeout_s: float, override: bool = False):
    """MLflow's HTTP client retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7 with exponential
    backoff) and waits (MLFLOW_HTTP_REQUEST_TIMEOUT, default 120 s) for minutes inside one call; the
    sweep logger buffers and retries itself and the report should fail in seconds, so each sets its
    own bounds for its block. MLflow reads both at every request."""
    return scoped_environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(max_retries)),
                           "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}, override=override)


def quote(s: Optional[str]) -> str:
    """Escape a value for an MLflow filter string literal."""
    return (s or "").replace("\\", "\\\\").replace("'", "\\'")
