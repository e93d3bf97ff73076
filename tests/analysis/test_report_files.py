"""A report folder changes as a whole (issue 18: a report killed at 4 s left old and new files mixed):
analysis/staging.py, which `write_report` writes through. Plain folders, no MLflow."""
from __future__ import annotations

import os

import pytest

from analysis.staging import staged_dir


def _write(folder: str, names: dict) -> None:
    for name, text in names.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def _files(folder) -> dict:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_new_report_appears_whole_at_the_end(tmp_path):
    out = tmp_path / "reports" / "s"
    with staged_dir(str(out)) as stage:
        _write(stage, {"verdict.json": "{}", "report.md": "new"})
        assert not out.exists()                          # nothing visible while it is written
    assert _files(out) == {"report.md": "new", "verdict.json": "{}"}
    assert [p.name for p in out.parent.iterdir()] == ["s"]


def test_a_new_report_replaces_the_old_one_as_a_whole(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    _write(str(out), {"verdict.json": "old", "report.md": "old", "old_figure.png": "old"})
    with staged_dir(str(out)) as stage:
        _write(stage, {"verdict.json": "new", "report.md": "new"})
        assert _files(out)["verdict.json"] == "old"      # the old report stays whole meanwhile
    assert _files(out) == {"report.md": "new", "verdict.json": "new"}       # no figure of the old one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_report_that_fails_leaves_the_old_one_as_it_was(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    _write(str(out), {"verdict.json": "old", "report.md": "old"})
    with pytest.raises(RuntimeError):
        with staged_dir(str(out)) as stage:
            _write(stage, {"verdict.json": "new"})
            raise RuntimeError("killed half way")
    assert _files(out) == {"report.md": "old", "verdict.json": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_leftovers_of_a_killed_report_are_cleared_and_a_shared_folder_is_never_renamed(tmp_path):
    (tmp_path / ".here.partial-99").mkdir()               # what a SIGKILLed report leaves beside its folder
    out = tmp_path / "here"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    with staged_dir(str(out)) as stage:
        _write(stage, {"verdict.json": "new", "report.md": "new"})
    assert _files(out)["notes.txt"] == "mine" and (out / "data").is_dir() and _files(out)["verdict.json"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
