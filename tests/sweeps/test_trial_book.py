"""The trial book (sweeps/trial_book.py): every rule of a trial's status, retries and run name, with plain
values (no Ray, no MLflow)."""
from __future__ import annotations

from capsmodels.contract import DIVERGED, FAILED, FINISHED, INTERRUPTED, RUNNING, STOPPED
from sweeps.trial_book import TrialBook


def test_names_are_unique_within_the_sweep():
    book = TrialBook()
    assert [book.name("d1-it3-dynamic-s0") for _ in range(3)] == \
        ["d1-it3-dynamic-s0", "d1-it3-dynamic-s0-2", "d1-it3-dynamic-s0-3"]
    book.known("t9", "d2-it3-dynamic-s0", FINISHED, closed=True, retries=0, lineage=False)
    assert book.name("d2-it3-dynamic-s0") == "d2-it3-dynamic-s0-2"     # taken by an earlier driver


def test_a_trial_runs_and_ends_with_its_last_results_status():
    book = TrialBook()
    assert book.start("a") is False and book.statuses["a"] == RUNNING
    assert book.is_open("a") and book.is_open("never-seen")
    assert book.final_status("a", {"status": FINISHED}, None) == FINISHED
    assert "a" in book.ended and not book.is_open("a")
    book.start("b")
    assert book.final_status("b", {"epoch": 3}, None) == STOPPED           # ASHA ended it early
    book.start("c")
    assert book.final_status("c", {"status": FINISHED}, "Traceback: boom") == FAILED   # an error wins


def test_divergence_is_kept_from_the_result_that_says_so():
    book = TrialBook()
    book.start("a")
    book.result("a", {"epoch": 0, "status": "running"})
    assert book.statuses["a"] == RUNNING
    book.result("a", {"epoch": 1, "status": DIVERGED})
    assert book.statuses["a"] == DIVERGED
    book.start("a")                                    # a restore does not forget it
    assert book.statuses["a"] == DIVERGED
    assert book.final_status("a", {"epoch": 1}, None) == DIVERGED


def test_ctrl_c_leaves_a_training_trial_for_resume_but_closes_one_that_ended():
    book = TrialBook(interrupted=True)
    book.start("a")
    book.start("b")
    assert book.final_status("a", {"epoch": 2, "status": "running"}, None) is None
    assert "a" not in book.ended and book.statuses["a"] == RUNNING
    assert book.final_status("b", {"status": FINISHED}, None) == FINISHED
    assert book.interrupt_running(lambda tid: True) == ["a"]
    assert book.statuses["a"] == INTERRUPTED


def test_an_interrupted_trial_reopens_when_it_starts_again():
    book = TrialBook()
    book.known("a", "d1-s0", INTERRUPTED, closed=True, retries=1, lineage=True)
    assert "a" not in book.ended                          # interrupted is not final
    assert book.start("a") is True and book.statuses["a"] == RUNNING
    assert book.start("a") is False                       # once


def test_interrupt_running_skips_trials_without_a_run_and_ended_ones():
    book = TrialBook()
    for tid in ("a", "b", "c"):
        book.start(tid)
    book.final_status("c", {"status": FINISHED}, None)
    assert book.interrupt_running(lambda tid: tid != "b") == ["a"]
    assert book.statuses == {"a": INTERRUPTED, "b": RUNNING, "c": FINISHED}


def test_retries_count_on_from_what_an_earlier_driver_logged():
    book = TrialBook()
    book.known("a", "n", RUNNING, closed=False, retries=2, lineage=False)
    assert book.retried("a") == 3 and book.retried("new") == 1


def test_known_runs_closed_with_a_final_status_have_ended():
    book = TrialBook()
    book.known("a", "n1", FINISHED, closed=True, retries=0, lineage=True)
    book.known("b", "n2", FINISHED, closed=False, retries=0, lineage=False)    # tag written, run not closed
    book.known("c", "n3", RUNNING, closed=True, retries=0, lineage=False)
    assert book.ended == {"a"} and book.lineage == {"a"} and book.names == {"n1", "n2", "n3"}


def test_the_sweep_stops_early_when_tune_has_not_ended_every_planned_trial():
    assert not TrialBook(expected_trials=2).stops_early(["TERMINATED", "ERROR"])
    assert TrialBook(expected_trials=3).stops_early(["TERMINATED", "ERROR"])       # one never made
    assert TrialBook().stops_early(["TERMINATED", "PENDING"])
    assert TrialBook(interrupted=True).stops_early([])
    assert not TrialBook().stops_early([])


def test_counts_and_summary():
    book = TrialBook()
    for tid, last, err in (("a", {"status": FINISHED}, None), ("b", {"status": FINISHED}, None),
                           ("c", {}, "boom"), ("d", {"status": DIVERGED}, None)):
        book.start(tid)
        book.final_status(tid, last, err)
    book.start("e")
    assert book.ended_counts() == {FINISHED: 2, FAILED: 1, DIVERGED: 1}
    assert book.summary(runs=5) == {"trials_finished": 2, "trials_diverged": 1, "trials_failed": 1,
                                    "trials_stopped": 0, "trials_total": 5}
