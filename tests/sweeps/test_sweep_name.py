"""One sweep per name in a store (issue 18, item 5): the name is claimed in the store when the parent
run is created (sweeps/runner.py, claim_name), so two drivers that both passed preflight (two folders
sharing one store: the storage lock does not reach) never leave two parents. No Ray in the default run;
the two real drivers racing are under -m slow."""
from __future__ import annotations

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.sweep import capsweep_cmd, children, env_for_subprocess, parents, write_spec


@pytest.fixture()
def store_and_spec(tmp_path):
    from analysis.store import open_client as open_store
    from sweeps.spec import load_spec
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = open_store(uri, create=True)
    exp = client.create_experiment("capsweep")
    spec = load_spec(str(write_spec(tmp_path / "cc.yaml", "cc", "model.depth: {grid: [0]}", seeds="[0]",
                                    tracking_uri=uri, storage=str(tmp_path / "ray"))), [])
    return client, exp, spec


def _active_parents(client, exp) -> list:
    return client.search_runs([exp], "tags.`capsweep.role` = 'parent' and tags.`capsweep.sweep` = 'cc'")


def test_a_second_parent_of_a_name_is_deleted_and_refused(store_and_spec):
    from sweeps import runner
    client, exp, spec = store_and_spec
    first = runner.create_parent(client, exp, spec)
    with pytest.raises(runner.SweepRefused) as e:
        runner.create_parent(client, exp, spec)
    assert "\n" not in str(e.value) and first in str(e.value) and str(e.value).startswith("name: ")
    assert [r.info.run_id for r in _active_parents(client, exp)] == [first]
    deleted = client.search_runs([exp], "tags.`capsweep.sweep` = 'cc'", run_view_type=2)     # DELETED_ONLY
    assert len(deleted) == 1 and deleted[0].info.run_id != first


def test_of_two_parents_created_before_either_looked_one_keeps_the_name(store_and_spec):
    """Both drivers created their parent before either looked: the first to look sees the other and
    gives way (its parent deleted); the second then sees only its own and keeps the name. (Had both
    looked before either deleted, both would give way: no sweep runs twice in any order.)"""
    from sweeps import runner
    client, exp, spec = store_and_spec
    tags = {"capsweep.role": "parent", "capsweep.sweep": "cc", "capsweep.status": "running"}
    a, b = (client.create_run(exp, tags=tags, run_name="cc").info.run_id for _ in range(2))
    with pytest.raises(runner.SweepRefused):
        runner.claim_name(client, exp, spec, a)
    runner.claim_name(client, exp, spec, b)
    assert [r.info.run_id for r in _active_parents(client, exp)] == [b]


def test_a_sweep_refused_after_taking_its_lock_leaves_no_storage_folder(tmp_path):
    """Issue 18 ("a refused run leaves ray_results/ behind"): what acquire_lock made goes again."""
    from sweeps import runner
    root = str(tmp_path / "ray_results")
    lock = runner.acquire_lock(root, "cc")
    assert (tmp_path / "ray_results" / ".cc.lock").exists()
    lock.release()
    runner.discard_lock_folder(root, lock)
    assert not (tmp_path / "ray_results").exists()
    lock = runner.acquire_lock(root, "cc")
    (tmp_path / "ray_results" / "other").mkdir()           # a folder in use keeps what is not ours
    lock.release()
    runner.discard_lock_folder(root, lock)
    assert sorted(p.name for p in (tmp_path / "ray_results").iterdir()) == ["other"]


@pytest.mark.slow     # two real drivers (~1-2 min); the default run checks the claim on a real store above
def test_two_drivers_of_one_name_from_two_folders_leave_one_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from analysis.store import open_client as open_store
    open_store(uri, create=True)
    procs = []
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        spec = write_spec(tmp_path / side / "cc.yaml", "cc", "model.depth: {grid: [0]}", seeds="[0]", epochs=1,
                          tracking_uri=uri)
        procs.append(subprocess.Popen(capsweep_cmd("run", str(spec), "--num-cpus", "1"), cwd=tmp_path / side,
                                      env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    client = MlflowClient(uri)
    alive = parents(client)
    assert len(alive) == codes.count(0) <= 1, (codes, outs)
    for code, (out, err) in zip(codes, outs):
        assert code in (0, 2), err[-2000:]
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "name: " in err, err
    assert len(children(client, sweep="cc")) == codes.count(0)
    for side, code in zip(("a", "b"), codes):
        if code == 2:                                    # the refused driver left no storage folder
            assert not (tmp_path / side / "ray_results").exists()
