"""The analysis tests' shared store (tests/helpers/analysis_store.py says what it holds), built once for
the package, and the verdict of its sweep "s1"."""
from __future__ import annotations

import pytest

from analysis.load import load_sweep
from analysis.verdict import compute_verdict
from tests.helpers.analysis_store import build_store


@pytest.fixture(scope="package")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="package")
def s1(store):
    data = load_sweep("capsweep", store["uri"], "s1", progress=False)
    return data, compute_verdict(data)
