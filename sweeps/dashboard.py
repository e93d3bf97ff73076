"""`capsweep dashboard SWEEP`: Optuna's own dashboard (optuna-dashboard, the `dashboard` extra) on the
sweep's Optuna study, read-only, on 127.0.0.1.

Where the study is. An Optuna sweep keeps its study in a journal file on the driver's disk,
`optuna.journal` in the local folder of <storage_path>/<name> (sweeps/runner.py, sweeps/search.py;
the study is named after the sweep). The parent run records that file's absolute path (tag
TAG_OPTUNA_JOURNAL); a sweep from before the tag is found through the spec.yaml on its parent run,
with a relative storage_path read from the current folder as `capsweep run --resume` reads it.

Why read-only. The journal is the search's state: `capsweep run --resume` re-reads every trial told so
far from it. optuna-dashboard can delete studies and write notes; here every write raises (the
dashboard shows the error) and every read goes to the live journal, so a running sweep's new trials
appear as they are told.

Refusals, one line each and before anything starts (exit 2): the extra is not installed; no such
sweep; a grid or random sweep (no Optuna study); a journal that is not on this machine (a cluster's
driver keeps it on the head node: run the command there).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from optuna.storages import BaseStorage

from capsmodels.errors import CapsweepError

HEALTH_PATH = "/api/meta"          # optuna-dashboard's cheapest JSON endpoint
EXTRA_HINT = ("pip install -c sweeps/constraints.txt -e '.[dashboard]' (in the capsweep checkout), or "
              "pip install optuna-dashboard")


class DashboardError(CapsweepError, ValueError):
    """The dashboard cannot open this sweep: one line, exit 2."""


class ReadOnlyStudy(CapsweepError, RuntimeError):
    """A write through the dashboard (delete a study, a note): refused, the journal is the sweep's."""

    def __init__(self):
        super().__init__("capsweep dashboard is read-only: the study is the sweep's search state "
                         "(capsweep run --resume reads it)")


class ReadOnlyStorage(BaseStorage):
    """An Optuna storage that reads through to `inner` and refuses every write."""

    def __init__(self, inner: BaseStorage):
        self._inner = inner

    # -- writes: refused
    def create_new_study(self, *a: Any, **k: Any) -> int:
        raise ReadOnlyStudy()

    def delete_study(self, *a: Any, **k: Any) -> None:
        raise ReadOnlyStudy()

    def set_study_user_attr(self, *a: Any, **k: Any) -> None:
        raise ReadOnlyStudy()

    def set_study_system_attr(self, *a: Any, **k: Any) -> None:
        raise ReadOnlyStudy()

    def create_new_trial(self, *a: Any, **k: Any) -> int:
        raise ReadOnlyStudy()

    def set_trial_param(self, *a: Any, **k: Any) -> None:
        raise ReadOnlyStudy()

    def set_trial_state_values(self, *a: Any, **k: Any) -> bool:
        raise ReadOnlyStudy()

    def set_trial_intermediate_value(self, *a: Any, **k: Any) -> None:
        raise ReadOnlyStudy()

    def set_trial_user_attr(self, *a: Any, **k: Any) -> None:
        raise ReadOnlyStudy()

    def set_trial_system_attr(self, *a: Any, **k: Any) -> None:
        raise ReadOnlyStudy()

    # -- reads: the live journal
    def get_study_id_from_name(self, study_name: str) -> int:
        return self._inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int):
        return self._inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_system_attrs(study_id)

    def get_all_studies(self):
        return self._inner.get_all_studies()

    def get_trial(self, trial_id: int):
        return self._inner.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states=None):
        return self._inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state=None) -> int:
        return self._inner.get_n_trials(study_id, state)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)


def extra_missing() -> Optional[str]:
    """The one-line refusal when optuna-dashboard is not installed, else None."""
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        return f"capsweep dashboard needs the dashboard extra (optuna-dashboard): {EXTRA_HINT}"
    return None


def journal_path(reader, sweep) -> Path:
    """The sweep's Optuna journal on this machine (module docstring), or DashboardError. `reader` reads
    the sweep's logged spec when its parent does not name the journal (analysis/inspect.py, StoreReader)."""
    from capsmodels.contract import TAG_OPTUNA_JOURNAL, SweepParams
    search = SweepParams.from_params(sweep.params).search
    if search and search != "optuna":
        raise DashboardError(f"sweep {sweep.name!r} searched with {search}: it has no Optuna study "
                             "(only search.algorithm: optuna sweeps have one)")
    tagged = sweep.parent.data.tags.get(TAG_OPTUNA_JOURNAL)
    if tagged:
        path = Path(tagged)
    else:
        from sweeps.spec import SpecError, journal_file, load_spec
        text = reader.spec_text(sweep)
        if text is None:
            raise DashboardError(f"sweep {sweep.name!r}: its parent run records neither its Optuna journal nor "
                                 "its spec; nothing says where the study is")
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp, "spec.yaml")
            f.write_text(text)
            try:
                spec = load_spec(str(f))
            except SpecError as e:
                raise DashboardError(f"sweep {sweep.name!r}: its logged spec does not load: {e}") from None
        if spec.search.algorithm != "optuna":
            raise DashboardError(f"sweep {sweep.name!r} searched with {spec.search.algorithm}: it has no "
                                 "Optuna study (only search.algorithm: optuna sweeps have one)")
        path = journal_file(spec)
    if not path.is_file():
        raise DashboardError(f"sweep {sweep.name!r}: its Optuna journal {path} is not on this machine (a "
                             "cluster's driver keeps it on the head node: run capsweep dashboard there)")
    return path


def study_id(path: Path, name: str) -> int:
    """The id of study `name` in the journal, or DashboardError (the search has not started yet)."""
    from sweeps.search import journal_storage
    try:
        return journal_storage(path).get_study_id_from_name(name)
    except KeyError:
        raise DashboardError(f"sweep {name!r}: its Optuna journal {path} holds no study {name!r} yet "
                             "(the search starts with the sweep's first trial)") from None


def server_command(path: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "sweeps.dashboard", str(path), host, str(port)]


def _serve(path: str, host: str, port: int) -> None:
    """The server process: optuna-dashboard on the journal, read-only (bottle's single-threaded wsgiref)."""
    import optuna_dashboard

    from sweeps.search import journal_storage
    optuna_dashboard.run_server(ReadOnlyStorage(journal_storage(path)), host=host, port=port)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
