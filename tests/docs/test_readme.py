"""The README starts with the two commands, and .ci/run runs exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 5]
    commands = [l for l in block if l and not l.startswith("#")]
    assert len(commands) == 2
    main_job, tests = commands
    assert "capsweep run smoke" in main_job and "capsweep report" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
