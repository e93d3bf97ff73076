"""The lock file, sweeps/constraints.txt (sweeps/lock.py): it pins every dependency the project names, at
a version pyproject.toml allows, and every install goes through it: README commands 1 and 2, .ci/run,
the tests' `cluster` extra and cluster.yaml's nodes. torch is left to its own install line, at the
version the lock's header records."""
from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sweeps import lock

ROOT = Path(__file__).resolve().parents[2]
PINS, TORCH = lock.read()
LOCK_REL = "sweeps/constraints.txt"


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```", lines.index("```bash") + 1)]
    return [l for l in block if l and not l.startswith("#")]


def pip_installs(command: str) -> list[list[str]]:
    """The arguments of every `pip install` in a shell line (`a && b && ...`)."""
    out = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                out.append(words[i + 2:])
    return out


def constraint(args: list[str]) -> str | None:
    return args[args.index("-c") + 1] if "-c" in args else None


def test_the_lock_pins_every_direct_dependency_at_a_version_pyproject_allows():
    reqs = lock.project_requirements()
    names = {canonicalize_name(r.name) for r in reqs}
    assert {"ray", "optuna", "mlflow", "omegaconf", "numpy", "pytest", "hypothesis", "psycopg", "boto3"} <= names
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in PINS, "torch is installed by its own line, never constrained"
            continue
        assert name in PINS, f"{req} is not pinned in {LOCK_REL}"
        assert req.specifier.contains(PINS[name], prereleases=True), f"{name}=={PINS[name]} breaks {req}"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in PINS.values()), "every line is name==version"


def test_the_extras_a_dependency_is_named_with_are_pinned_too():
    """ray[tune,default] (always installed) and psycopg[binary] (when the cluster extra is): what those
    extras add, as the installed distribution declares it, is in the lock."""
    checked = 0
    for req in lock.project_requirements():
        if not req.extras:
            continue
        try:
            declared = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in declared:
            sub = Requirement(text)
            env = default_environment()
            if sub.marker and any(sub.marker.evaluate({**env, "extra": e}) for e in req.extras) \
                    and not sub.marker.evaluate({**env, "extra": ""}):
                assert canonicalize_name(sub.name) in PINS, f"{req}: {sub.name} is not pinned"
                checked += 1
    assert checked >= 3


def test_torch_and_what_only_torch_needs_are_left_to_the_torch_install():
    """A GPU user's own torch build must survive `pip install -c`: the lock names neither torch nor
    sympy (torch 2.5 pins sympy==1.13.1); what torch shares with the rest (filelock, jinja2) is pinned.
    Checked against the installed distributions, not the file: pins() follows the requirements."""
    found = lock.pins([Requirement("mlflow"), Requirement("filelock"), Requirement("torch")])
    assert "torch" not in found and "sympy" not in found and "networkx" not in found
    assert {"mlflow", "flask", "jinja2", "filelock"} <= set(found)
    assert {n: PINS[n] for n in found} == found
    assert "torch" not in PINS and "sympy" not in PINS and "mpmath" not in PINS
    assert re.fullmatch(r"\d+\.\d+\.\d+", TORCH), "the header records the tested torch"


def test_this_environment_is_the_lock():
    """The suite runs in the environment the lock describes (CI installs through it): every locked
    distribution that is installed here has the locked version. A failure means the lock is stale:
    rerun the suite in the new environment and `python -m sweeps.lock` (README "Versions")."""
    stale = {}
    for name, version in PINS.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if have != version:
            stale[name] = (version, have)
    assert not stale, f"{LOCK_REL} (locked, installed): {stale}"
    assert metadata.version("torch").split("+")[0] == TORCH


def test_readme_commands_and_ci_install_through_the_lock_with_the_tested_torch():
    commands = readme_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    for command in (*commands, ci):
        installs = pip_installs(command)
        torch_step, project_step = installs[0], installs[-1]
        assert torch_step == ["-q", f"torch=={TORCH}"], command
        assert "-e" in project_step and constraint(project_step) == LOCK_REL, command
    others = re.findall(r"pip install [^`\n#]*", (ROOT / "README.md").read_text())
    assert len(others) >= 4
    for text in others:     # every other install of the project or of MLflow, but the lock's own renewal (-U)
        for args in pip_installs(text):
            if ("-e" in args or any("mlflow" in a for a in args)) and "-U" not in args:
                assert constraint(args) is not None and constraint(args).endswith(LOCK_REL), text
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert '"-c", str(LOCK)' in conftest and "from sweeps.lock import LOCK" in conftest


@pytest.mark.parametrize("role", ["head_setup_commands", "worker_setup_commands"])
def test_cluster_nodes_install_through_the_synced_lock(role):
    """Each role's setup as the head's autoscaler (v2) reads it: Ray prepares the config `ray up` already
    prepared once more (prepare_config twice), and each install runs once, through the lock."""
    from ray.autoscaler._private.util import prepare_config
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mounted = {local.rstrip("/"): remote for remote, local in cfg["file_mounts"].items()}
    remote_lock = f"{mounted['./sweeps']}/constraints.txt"            # the lock travels with sweeps/
    commands = prepare_config(prepare_config(cfg))[role]
    installs = [args for c in commands if "pip install" in c for args in pip_installs(c) if args != ["-q", "-U", "pip"]]
    assert installs[0] == ["-q", f"torch=={TORCH}"]
    for args in installs[1:]:
        assert constraint(args) == remote_lock, args
    ray = [a for args in installs for a in args if a.startswith("ray[")]
    assert len(ray) == 1 and Requirement(ray[0]).specifier == Requirement(f"ray=={PINS['ray']}").specifier
    assert len([args for args in installs if "-e" in args and "[cluster]" in args[-1]]) == 1


def test_lock_file_round_trips_and_check_reports_a_difference(tmp_path, capsys):
    text = lock.render({"mlflow": "1.0", "ray": "2.0"}, "9.9.9")
    path = tmp_path / "c.txt"
    path.write_text(text)
    assert lock.read(path) == ({"mlflow": "1.0", "ray": "2.0"}, "9.9.9")
    assert lock.main(["--check", "--output", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"ray: 2.0 in the file, {metadata.version('ray')} here" in out
    assert f"omegaconf: not locked in the file, {metadata.version('omegaconf')} here" in out
    assert "torch: 9.9.9 in the file" in out
    assert lock.main(["--check"]) == 0           # this environment is the lock (the extras it lacks aside)
    assert "matches this environment" in capsys.readouterr().out
