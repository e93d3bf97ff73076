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


def test_the_shipped_specs_table_counts_what_the_specs_run():
    """README's table of shipped specs: each row's 'candidates + references + controls' is what
    `capsweep validate` counts for that spec (sweeps/extras.py judged_counts), and covers every spec."""
    import re

    from sweeps.spec import CONFIG_DIR, judged_counts, load_spec
    rows = {m.group(1): tuple(int(x) for x in m.group(2, 3, 4)) for m in re.finditer(
        r"^\| `(\w+)` \|.*\| (\d+) \+ (\d+) \+ (\d+) \|$", (ROOT / "README.md").read_text(), re.M)}
    shipped = {p.stem for p in Path(CONFIG_DIR).glob("*.yaml")}
    assert set(rows) == shipped
    for name, want in rows.items():
        n = judged_counts(load_spec(name))
        assert (n["candidate"], n["reference"], n["control"]) == want, name
