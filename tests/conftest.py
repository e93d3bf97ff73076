"""Fixtures every test package can ask for: a new real SQLite MLflow store (`mlflow_store`, the one store
factory: tests/helpers/runs.py `make_store`), and for the cluster tests the `cluster` extra installed and
one real PostgreSQL server. (Imports of the cluster helpers stay inside the fixtures: every test session
loads this file.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import pg as pg_helpers


@pytest.fixture
def mlflow_store(tmp_path):
    """A new SQLite MLflow store with the experiment `capsweep` (tests.helpers.runs.Store). Module- or
    package-wide stores call `make_store` on a folder of their own."""
    from tests.helpers.runs import make_store
    return make_store(tmp_path / "store")


@pytest.fixture(scope="session")
def cluster_extra() -> list[str]:
    """The `cluster` extra installed into this environment (what cluster.yaml's install line,
    `pip install -c .../sweeps/constraints.txt -e ".../capsweep[cluster]"`, adds on every node), at the
    lock's versions: pip runs only for what is missing."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    from tests.helpers.cluster import cluster_requirements
    reqs = cluster_requirements()
    missing = []
    for text in reqs:
        req = Requirement(text)
        try:
            ok = req.specifier.contains(version(req.name), prereleases=True)
        except PackageNotFoundError:
            ok = False
        if not ok:
            missing.append(text)
    if missing:
        from sweeps.lock import LOCK        # the versions every other install takes (README "Versions")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(LOCK), *missing],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"pip install {missing} failed: {proc.stderr[-2000:]}"
    return reqs


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of this machine's Debian package, with the head's max_connections; apt-get
    installs the package first when it is missing (as root; otherwise the tests that need it skip)."""
    from tests.helpers.cluster import load_cluster, pg_max_connections
    reason = pg_helpers.ensure_debian_packages({"initdb": "postgresql", "psql": "postgresql-client"})
    if reason:
        pytest.skip(reason)
    pg = pg_helpers.start_postgres(pg_max_connections(load_cluster()))
    try:
        yield pg
    finally:
        pg.stop()
