"""Write the constraints (lock) file, sweeps/constraints.txt, from the environment the tests passed in.

    .venv/bin/python -m sweeps.lock            # after the suite passed in .venv: rewrite the file
    .venv/bin/python -m sweeps.lock --check    # exit 1 when .venv differs from the file

Why a lock: pyproject.toml names floors (`optuna>=3.6`), so a fresh install takes whatever is newest
that day, versions no test has seen (Optuna 5.1's NSGA-II broke `capsweep run hunt` that way). Every
install (README commands, .ci/run, conftest's `cluster` extra, cluster.yaml's nodes) goes through
`pip install -c sweeps/constraints.txt`, so each gets the versions of the last passing run.

What it pins: every distribution the project needs (its dependencies and all its extras), followed
through their own requirements as installed here, each at its installed version; not the project
itself. Not torch, nor what only torch needs (sympy, mpmath, networkx, the nvidia-* and triton
wheels): torch is installed by its own line first, `torch==2.13.0` (the version this file records in its
header), and a GPU machine installs its own CUDA build (>=2.3) instead; pins of torch's own
dependencies would refuse that build. The file lives in sweeps/ because cluster.yaml syncs that folder
to every node (not .ci/ nor the top level).
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(__file__).resolve().parent / "constraints.txt"
UNPINNED = "torch"         # installed by its own line (README, .ci/run, cluster.yaml), never constrained
TORCH_LINE = re.compile(r"^# torch==(\S+)", re.M)


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The project's dependencies and every extra's, as pyproject.toml writes them."""
    try:
        import tomllib
    except ImportError:                       # Python 3.10
        from pip._vendor import tomli as tomllib
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def _applies(req: Requirement, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (list(extras) or [""]))


def pins(reqs: Iterable[Requirement], strict: bool = True) -> dict[str, str]:
    """{canonical name: installed version} of `reqs` and everything they need here, torch and what only
    torch needs left out. strict: a requirement that is not installed is an error (the lock must be
    complete); else it is skipped (`--check` on an environment without every extra)."""
    found: dict[str, str] = {}
    todo = [(r, ()) for r in reqs]
    seen_extras: dict[str, set[str]] = {}
    while todo:
        req, parent_extras = todo.pop()
        name = canonicalize_name(req.name)
        if name == UNPINNED or not _applies(req, parent_extras):
            continue
        extras = set(req.extras)
        if name in found and extras <= seen_extras[name]:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if not strict:
                continue
            raise SystemExit(f"capsweep lock: {req} is required but not installed in {sys.prefix}; "
                             "install the project with all its extras first") from None
        found[name] = dist.version
        seen_extras[name] = seen_extras.get(name, set()) | extras
        todo += [(Requirement(r), tuple(seen_extras[name])) for r in dist.requires or []]
    return dict(sorted(found.items()))


def torch_version() -> str:
    """The tested torch, without its local build tag (2.13.0+cpu -> 2.13.0)."""
    return metadata.version("torch").split("+")[0]


def render(found: dict[str, str], torch: str) -> str:
    head = [
        "# capsweep's constraints (lock) file: the versions the test suite passed with. Written by",
        "#   .venv/bin/python -m sweeps.lock",
        f"# on Python {platform.python_version()}, {platform.system()} {platform.machine()}. Used as "
        "`pip install -c sweeps/constraints.txt ...`",
        "# by the README commands, .ci/run, tests/conftest.py and cluster.yaml's node setup.",
        f"# torch=={torch} is tested but not pinned here (nor what only torch needs): it is installed by",
        "# its own line first, and a GPU machine installs its own CUDA build (>=2.3) instead.",
    ]
    return "\n".join(head + [f"{n}=={v}" for n, v in found.items()]) + "\n"


def read(path: Path = LOCK) -> tuple[dict[str, str], str]:
    """({name: version} pinned, the tested torch version) of a lock file."""
    text = path.read_text()
    found = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version
    m = TORCH_LINE.search(text)
    return found, (m.group(1) if m else "")


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=LOCK)
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    torch = torch_version()
    if args.check:          # what is installed here against the file; an extra not installed is no difference
        found = pins(project_requirements(), strict=False)
        old, old_torch = read(args.output)
        diff = [f"{n}: {old.get(n, 'not locked')} in the file, {_installed(n) or '-'} here"
                for n in sorted(set(old) | set(found)) if _installed(n) and old.get(n) != _installed(n)]
        if torch != old_torch:
            diff.append(f"torch: {old_torch or '-'} in the file, {torch} here")
        print("\n".join(diff) or f"{args.output}: matches this environment")
        return 1 if diff else 0
    found = pins(project_requirements())
    args.output.write_text(render(found, torch))
    print(f"wrote {args.output}: {len(found)} pins; torch {torch} recorded, not pinned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
