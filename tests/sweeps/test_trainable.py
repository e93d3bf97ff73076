"""The trial's own per-epoch state file: written whole or not at all, read back as written."""
from __future__ import annotations

import torch

from sweeps.trainable import load_state, save_state


def test_state_round_trip_replaces_the_previous_epoch_atomically(tmp_path):
    path = tmp_path / "trial_state" / "abc_00001.pt"
    assert load_state(path) is None and load_state(None) is None
    save_state(path, {"epoch": 0, "w": torch.arange(3.0), "metrics": {"epoch": 0, "status": "running"}})
    save_state(path, {"epoch": 1, "w": torch.arange(4.0), "metrics": {"epoch": 1, "status": "finished"}})
    state = load_state(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert state["metrics"] == {"epoch": 1, "status": "finished"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["abc_00001.pt"], "no temporary file left"


def test_a_writer_killed_mid_save_leaves_the_last_whole_state(tmp_path):
    path = tmp_path / "t.pt"
    save_state(path, {"epoch": 3})
    (tmp_path / ".t.pt.999.tmp").write_bytes(b"\x80\x02half a pickle")    # what a SIGKILL mid-write leaves
    assert load_state(path) == {"epoch": 3}


def test_a_trials_files_sit_beside_its_state_locally_and_on_object_stores():
    from sweeps.models import trial_paths
    assert trial_paths("/s/m/trial_state", "t_1") == ("/s/m/trial_state/t_1.pt", "/s/m/trial_models/t_1")
    assert trial_paths("s3://b/x/m/trial_state", "t_1") == ("s3://b/x/m/trial_state/t_1.pt",
                                                           "s3://b/x/m/trial_models/t_1")


def test_final_files_written_weights_first_and_read_back(tmp_path):
    from sweeps.models import FINAL_FILE, read_json, write_final
    net = torch.nn.Linear(3, 2)
    assert read_json(str(tmp_path / "m"), FINAL_FILE) is None
    write_final(str(tmp_path / "m"), net, {"epoch": 0, "status": "finished", "test_acc": 0.5})
    assert read_json(str(tmp_path / "m"), FINAL_FILE) == {"epoch": 0, "status": "finished", "test_acc": 0.5}
    weights = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert torch.equal(weights["weight"], net.weight.detach())
