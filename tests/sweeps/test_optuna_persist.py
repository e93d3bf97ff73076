"""The Optuna study of an optuna sweep lives in a journal file (sweeps/search.py, `journal_storage`):
other tools open it, and a restored searcher continues it (told trials are kept, never re-asked).

The searcher is driven as Tune drives it (suggest / on_trial_complete, SearchGenerator save and
restore for `--resume`), with no Ray cluster; the values Optuna holds are checked against seed means
worked out by hand.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from sweeps import search
from tests.helpers.sweep import optuna_spec

SCORES = {0: 0.2, 1: 0.4}        # val_acc per seed: every configuration's seed mean is 0.3 + 0.1 * k


def load(path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))


def tell(alg, k: int, tag: str) -> dict:
    """One configuration, both seeds (2 Tune trials), completed with val_acc seed+0.1k per seed."""
    a, b = alg.suggest(f"{tag}{k}a"), alg.suggest(f"{tag}{k}b")
    assert {x: v for x, v in a.items() if x != "train.seed"} == {x: v for x, v in b.items() if x != "train.seed"}
    alg.on_trial_complete(f"{tag}{k}a", {"val_acc": SCORES[0] + 0.1 * k})
    alg.on_trial_complete(f"{tag}{k}b", {"val_acc": SCORES[1] + 0.1 * k})
    return a


def test_study_is_written_to_the_journal_as_it_goes(tmp_path):
    journal = tmp_path / "sweep" / "optuna.journal"
    _, alg, _, _ = search.build(optuna_spec([0, 1]), journal=journal)
    configs = [tell(alg, k, "t") for k in range(3)]
    study = load(journal)                        # another process's view: the file alone
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.value for t in done] == pytest.approx([0.3, 0.4, 0.5])
    for t, c in zip(done, configs):
        assert t.params == {k: c[k] for k in ("model.depth", "model.routing", "train.lr")}
    assert study.best_value == pytest.approx(0.5) and study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_optuna_cli_opens_the_journal(tmp_path):
    """The journal is an ordinary Optuna storage: Optuna's own CLI (as optuna-dashboard) reads it."""
    journal = tmp_path / "optuna.journal"
    _, alg, _, _ = search.build(optuna_spec([0, 1]), journal=journal)
    for k in range(2):
        tell(alg, k, "t")
    out = subprocess.run([str(__import__("pathlib").Path(sys.executable).with_name("optuna")), "best-trial",
                          "--study-name", "s", "--storage", str(journal), "--storage-class", "JournalFileBackend",
                          "-f", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["value"] == pytest.approx(0.4)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_restored_searcher_continues_the_study_without_re_asking(tmp_path, sampler):
    """--resume: Tune restores the searcher from its last save; trials told after that save are in
    the journal, and the restored study sees them too (the journal is the study's source of truth).
    NSGA-II too: its sampler holds a thread lock that is dropped on save and made anew on restore."""
    from ray.tune.search import SearchGenerator
    journal = tmp_path / "optuna.journal"
    spec = optuna_spec([0, 1], sampler=sampler)
    _, alg, _, _ = search.build(spec, journal=journal)
    tell(alg, 0, "t")
    SearchGenerator(alg).save_to_dir(str(tmp_path), "s1")     # Tune's searcher checkpoint
    told = [tell(alg, k, "t") for k in (1, 2)]                  # told after the checkpoint, then a crash
    _, fresh, _, _ = search.build(spec)                          # the resuming driver's searcher ...
    SearchGenerator(fresh).restore_from_dir(str(tmp_path))      # ... restored as Tune does it
    study = search_study(fresh)
    before = [(t.number, t.params, t.value) for t in study.trials if t.state.name == "COMPLETE"]
    assert [v for *_, v in before] == pytest.approx([0.3, 0.4, 0.5])
    assert before[1][1] == {k: told[0][k] for k in before[1][1]}
    nxt = tell(fresh, 3, "r")                                    # the search goes on ...
    study = load(journal)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert [t.number for t in complete] == [0, 1, 2, 3]          # ... with the next number: nothing re-asked
    assert [t.value for t in complete] == pytest.approx([0.3, 0.4, 0.5, 0.6])
    assert complete[3].params == {k: nxt[k] for k in complete[3].params}
    assert [(t.number, t.params, t.value) for t in complete[:3]] == before     # told trials untouched


def test_searcher_with_a_journal_pickles(tmp_path):
    """Tune pickles the searcher into its experiment state; the study's storage must survive that."""
    _, alg, _, _ = search.build(optuna_spec([0]), journal=tmp_path / "j")
    alg.suggest("a")
    alg.on_trial_complete("a", {"val_acc": 0.7})
    back = pickle.loads(pickle.dumps(alg))
    assert [t.value for t in search_study(back).trials if t.state.name == "COMPLETE"] == pytest.approx([0.7])


def search_study(alg) -> optuna.Study:
    while hasattr(alg, "searcher"):
        alg = alg.searcher
    return alg._ot_study
