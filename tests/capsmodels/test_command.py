"""The one error base and the one command runner of both CLIs (capsmodels/errors.py, capsmodels/command.py):
each user-facing error is a CapsweepError carrying its exit code, and every command prints it the same way."""
from __future__ import annotations

import importlib
import inspect

import pytest

from capsmodels.command import OneLineParser, fail, one_line_failures, parsed, run_command
from capsmodels.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, CapsweepError, one_line

# every error the commands report to the user, with the code it exits with and the base it kept
ERRORS = [
    ("capsmodels.config", "ConfigError", 2, ValueError), ("capsmodels.store", "DataError", 2, Exception),
    ("capsmodels.fetch", "FetchError", 2, Exception), ("capsmodels.formats", "FormatError", 2, Exception),
    ("sweeps.schema", "SpecError", 2, ValueError), ("sweeps.runner", "SweepRefused", 2, RuntimeError),
    ("sweeps.write_queue", "TrackingUnavailable", 2, RuntimeError), ("sweeps.confirm", "ConfirmError", 2, ValueError),
    ("sweeps.train_run", "TrainRunError", 2, RuntimeError), ("sweeps.dashboard", "DashboardError", 2, ValueError),
    ("sweeps.evaluate", "EvalError", 2, ValueError), ("sweeps.submit", "SubmitError", 2, RuntimeError),
    ("sweeps.models", "ModelNotFound", 2, LookupError), ("sweeps.models", "UnsafeModel", 2, ValueError),
    ("sweeps.storage", "UnsafeFile", 2, ValueError), ("sweeps.tune_guard", "UntrustedState", 2, RuntimeError),
    ("analysis.errors", "AnalysisError", 2, Exception), ("analysis.inspect", "InspectError", 2, ValueError),
    ("analysis.store", "StoreInitError", 2, RuntimeError),
]


@pytest.mark.parametrize("module,name,code,base", ERRORS, ids=[e[1] for e in ERRORS])
def test_every_user_error_is_a_capsweep_error_with_its_code_and_old_base(module, name, code, base):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, CapsweepError) and issubclass(cls, base)
    assert cls.exit_code == code


def test_a_raise_may_carry_another_code_and_the_ui_error_keeps_code():
    assert CapsweepError("x").exit_code == EXIT_BAD_INPUT
    assert CapsweepError("x", exit_code=EXIT_FAILED).exit_code == EXIT_FAILED
    assert CapsweepError("x").exit_code == EXIT_BAD_INPUT      # the class's default is untouched
    from sweeps.ui import UIError
    e = UIError("server exited", 1)
    assert e.code == e.exit_code == 1 and str(e) == "server exited"


def test_only_the_command_module_reads_capsweep_debug():
    """One CAPSWEEP_DEBUG handling: the environment variable is read by capsmodels.errors.debug only."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[2]
    named = re.compile(r"[\"']CAPSWEEP_DEBUG[\"']")      # the variable's name as a string: where it is read
    readers = sorted(str(p.relative_to(root)) for pkg in ("capsmodels", "sweeps", "analysis")
                     for p in (root / pkg).rglob("*.py") if named.search(p.read_text()))
    assert readers == ["capsmodels/errors.py"]


def test_run_command_prints_one_line_and_returns_the_errors_code(capsys):
    def refuse():
        raise CapsweepError("spec x.yaml: model.depth: -1 is not allowed; must be >= 0")
    assert run_command("capsweep", refuse) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "capsweep: error: spec x.yaml: model.depth: -1 is not allowed; must be >= 0\n"

    def fail_late():
        raise CapsweepError("MLflow at sqlite:///m.db failed at the end of training", exit_code=EXIT_FAILED)
    assert run_command("capsweep", fail_late) == EXIT_FAILED
    assert run_command("capsweep", lambda: None) == 0 and run_command("capsweep", lambda: 3) == 3


def test_the_line_masks_a_uris_password(capsys):
    def refuse():
        raise CapsweepError("tracking URI postgresql://me:s3cret@db/mlflow: refused")
    run_command("capsweep", refuse)
    err = capsys.readouterr().err
    assert "s3cret" not in err and "postgresql://" in err


def test_ctrl_c_is_one_line_and_130(capsys):
    def interrupted():
        raise KeyboardInterrupt
    assert run_command("capsweep report", interrupted) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "capsweep report: error: interrupted\n"


def test_an_unexpected_error_is_a_traceback_unless_the_command_reads_a_store(capsys, monkeypatch):
    monkeypatch.delenv("CAPSWEEP_DEBUG", raising=False)

    def broken():
        raise ConnectionError("the server\nwent away")
    with pytest.raises(ConnectionError):      # a real failure of a sweep: its traceback
        run_command("capsweep", broken)
    assert run_command("capsweep", broken, failures_as_line=True) == EXIT_FAILED
    assert capsys.readouterr().err == ("capsweep: error: ConnectionError: the server went away "
                                       "(set CAPSWEEP_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("CAPSWEEP_DEBUG", "1")
    with pytest.raises(ConnectionError):
        run_command("capsweep", broken, failures_as_line=True)


def test_one_line_failures_names_what_failed_and_lets_capsweep_errors_through(monkeypatch):
    monkeypatch.delenv("CAPSWEEP_DEBUG", raising=False)
    with pytest.raises(CapsweepError) as e:
        with one_line_failures("the report is in out/ but was not logged to MLflow: ", hint=False):
            raise PermissionError("denied")
    assert str(e.value) == "the report is in out/ but was not logged to MLflow: PermissionError: denied"
    assert e.value.exit_code == EXIT_FAILED and isinstance(e.value.__cause__, PermissionError)
    with pytest.raises(CapsweepError) as e:
        with one_line_failures():
            raise CapsweepError("no sweep 'x'")
    assert str(e.value) == "no sweep 'x'" and e.value.exit_code == EXIT_BAD_INPUT


def test_one_line_cuts_long_messages():
    assert one_line("a\n  b") == "a b"
    assert one_line("x" * 400) == "x" * 300 + "..."


def test_the_parser_errors_are_one_line_and_parsed_returns_the_code(capsys):
    p = OneLineParser(prog="capsweep report")
    p.add_argument("--alpha", type=float)
    assert parsed(lambda: p.parse_args(["--alpha", "x"])) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capsweep report: error: argument --alpha")
    assert err.rstrip().endswith("(see capsweep report --help)")
    assert parsed(lambda: p.parse_args(["--help"])) == 0
    assert parsed(lambda: p.parse_args(["--alpha", "0.1"])).alpha == 0.1


def test_fail_prints_and_returns(capsys):
    assert fail("capsweep", "override: 'x' is not key=value") == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "capsweep: error: override: 'x' is not key=value\n"


def test_both_clis_use_the_runner_and_no_own_parser_class():
    from analysis import cli as reading
    from sweeps import cli as writing
    for mod in (reading, writing):
        src = inspect.getsource(mod)
        assert "run_command(" in src and "OneLineParser" in src
        assert "class _Parser" not in src
