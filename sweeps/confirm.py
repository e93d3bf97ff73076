"""`capsweep confirm SWEEP`: re-run an exploration's most promising candidates on fresh seeds.

Why: an exploration's "escaped: yes" is a claim about all its candidates at once, so its family-wise
test (Holm over the candidates, docs/PROBES.md) grows conservative as the sweep grows: among hundreds
of candidates a real escape seldom clears it. Careful researchers explore, then confirm: the N most
promising candidates (ranked by the exploration's verdict, analysis/verdict.py, its `confirm`
section) run again on S seeds the exploration never used, beside fresh matched depth-0 references and
cnn controls, and the confirmation's own verdict, error-controlled over its N only, is the answer.

The confirmation is an ordinary sweep, written to ./confirm/<name>.yaml before it starts, so it can be
read, rerun and resumed like any other (`capsweep run confirm/<name>.yaml --resume`):
- `points`: each chosen configuration exactly, from the params its trials logged (strings in MLflow,
  read back as `key=value` overrides are and checked through the run-config schema: every value must
  give back the logged string), written as its differences from the exploration's base;
- `seeds`: max(exploration's seeds) + 1, ... (S of them), so no seed repeats one it was chosen on;
- `scheduler: none` (a seed ASHA stops would weaken the test) and grid search over exactly the points;
- references and controls on (sweeps/extras.py adds the depth-0 twin of each point and the cnn at
  depth 0 and at each point's depth);
- `confirms: SWEEP`: the runner logs param `sweep.confirms` and tag `capsweep.confirms` on the parent
  run, the link both reports show;
- the exploration's base, metric, resources, storage and MLflow settings and budget; then the user's
  `key=value` overrides.
Every refusal (no such sweep, nothing to confirm, --top < 1, --seeds < 2, a name taken) is a
ConfirmError or InspectError line before anything is written.

What it reads of the store (the exploration, its logged spec, its verdict's confirm section, the names
taken) comes through a reader the CLI hands it (analysis/inspect.py, StoreReader): the reading is the
analysis side's, the spec this module writes is the sweeps side's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf

from capsmodels import config as runcfg
from capsmodels.errors import CapsweepError
from sweeps.run_writer import param_str
from sweeps.spec import NAME_RE, SpecError, SweepSpec, TrialConfigs, from_config, storage_dir, to_yaml

CONFIRM_DIR = Path("confirm")       # where the generated specs go, in the working folder
SUFFIX = "-confirm"                 # <SWEEP>-confirm, then <SWEEP>-confirm2, ...
MIN_SEEDS = 2                       # a seed-to-seed variance needs two
# what a confirmation takes over from its exploration's spec (the rest is the confirmation's own)
KEPT = ("base", "resources", "max_concurrent", "max_failures", "reuse_actors", "storage_path", "mlflow",
        "budget")


class ConfirmError(CapsweepError, ValueError):
    """Why a confirmation cannot be planned. One line."""


@dataclass
class Plan:
    spec: SweepSpec             # the validated confirmation
    path: Path                  # where its YAML goes
    exploration: str
    chosen: list[dict]          # the ranked entries it re-runs, most promising first
    ranked: int                 # how many candidates the exploration has worth confirming
    seeds_used: list[int]       # every seed of the exploration


SPEC_PATH = "spec.yaml"             # the resolved spec on every parent run (sweeps/runner.py, create_parent)


def plan(reader, exploration: str, experiment: str, top: Optional[int] = None,
         seeds: Optional[int] = None, overrides: Optional[list[str]] = None, name: Optional[str] = None,
         out_dir: Path = CONFIRM_DIR) -> Plan:
    """The confirmation of sweep `exploration` of `experiment`, read through `reader` (the store's
    analysis/inspect.py StoreReader). top / seeds: None takes the verdict's defaults. Reads only;
    writes nothing."""
    for flag, value, low, why in (("--top", top, 1, "confirm at least 1 candidate"),
                                  ("--seeds", seeds, MIN_SEEDS, "a seed-to-seed variance needs at least 2")):
        if value is not None and value < low:
            raise ConfirmError(f"{flag}: {value} is not allowed; {why}")
    if name is not None and not NAME_RE.match(name):
        raise ConfirmError(f"--name: {name!r} is not allowed; use letters, digits, '_', '-', '.' (at most 100)")
    sweep = reader.find(exploration, experiment)
    text = reader.spec_text(sweep)
    if text is None:
        raise ConfirmError(f"sweep {exploration!r} has no {SPEC_PATH} on its parent run "
                           f"({sweep.parent.info.run_id}); its spec cannot be taken over")
    explored = yaml.safe_load(text) or {}
    section = reader.confirm_section(sweep)
    ranked = list(section.get("ranked") or [])
    if not ranked:
        raise ConfirmError(f"sweep {exploration!r}: no candidate configuration to confirm (every candidate "
                           "failed a check, or the sweep has none)")
    top = int(section["top"]) if top is None else top
    n_seeds = int(section["seeds"]) if seeds is None else seeds
    used = sorted({int(s) for s in section.get("seeds_used") or []})
    fresh = list(range(max(used, default=-1) + 1, max(used, default=-1) + 1 + n_seeds))
    chosen = ranked[:top]
    base = explored.get("base") or {}
    raw = {k: explored[k] for k in KEPT if k in explored}
    metrics = explored.get("metric", "val_acc")
    modes = explored.get("mode", "max")
    raw.update({
        "name": name or _clip(exploration) + SUFFIX,
        "points": [typed_point(base, c["params"], f"{exploration} {c['id']}") for c in chosen],
        "search": {"algorithm": "grid"}, "num_samples": 1, "seeds": fresh,
        "metric": metrics[0] if isinstance(metrics, list) else metrics,   # grid search: one objective
        "mode": modes[0] if isinstance(modes, list) else modes,
        "scheduler": {"name": "none"}, "references": True, "controls": True, "confirms": exploration,
    })
    try:
        cli = OmegaConf.from_dotlist(list(overrides or []))
    except Exception as e:  # noqa: BLE001 - OmegaConf's grammar errors
        raise SpecError(f"override: {' '.join(str(e).split())[:300]}; write overrides as key=value") from None
    named = name is not None or OmegaConf.select(cli, "name") is not None
    spec = from_config(OmegaConf.merge(OmegaConf.create(raw), cli), origin=f"confirmation of {exploration}")
    _check(spec, exploration, used)
    taken = reader.sweep_names(spec.mlflow.experiment)
    if named:
        why = _taken(spec, taken, out_dir)
        if why:
            raise ConfirmError(f"name: {spec.name!r} is taken ({why}); choose another with --name, or continue "
                               f"that sweep with: capsweep run {out_dir / (spec.name + '.yaml')} --resume")
    else:
        for i in itertools.count(2):
            if not _taken(spec, taken, out_dir):
                break
            spec.name = f"{_clip(exploration, len(str(i)))}{SUFFIX}{i}"
    return Plan(spec, out_dir / f"{spec.name}.yaml", exploration, chosen, len(ranked), used)


def typed_point(base: dict, params: dict, where: str) -> dict:
    """A configuration's logged params (strings) as typed values: each read as a `key=value` override
    is (OmegaConf), the whole checked by the run-config schema (TrialConfigs), and every value must
    log as the same string again (sweeps/run_writer.param_str). Only the keys whose value differs from
    what the base gives are kept, when the base and those keys give back every value."""
    try:
        typed = runcfg.flatten(OmegaConf.to_container(
            OmegaConf.from_dotlist([f"{k}={v}" for k, v in params.items()]), resolve=False))
    except Exception as e:  # noqa: BLE001 - a value OmegaConf's grammar cannot read
        raise ConfirmError(f"{where}: its logged params cannot be read back ({' '.join(str(e).split())[:200]})")
    configs = TrialConfigs(base)
    try:
        resolved = configs.flat(typed)
        defaults = configs.flat({})
    except runcfg.ConfigError as e:
        raise ConfirmError(f"{where}: its logged params are not a valid configuration of this capsweep ({e})")
    for key, text in params.items():
        if param_str(resolved.get(key)) != str(text):
            raise ConfirmError(f"{where}: param {key}={text!r} reads back as {resolved.get(key)!r}; "
                               "it cannot be re-run exactly")
    diff = {k: resolved[k] for k in typed if resolved[k] != defaults.get(k)}
    diff = diff or {"model.depth": resolved["model.depth"]}   # the base config itself, named by its depth
    if configs.flat(diff) == resolved:
        return diff
    return {k: resolved[k] for k in typed}     # e.g. a preset whose values the point partly undoes


def _clip(exploration: str, extra: int = 0) -> str:
    """The exploration's name, short enough that name + suffix fits a sweep name (100 characters)."""
    return exploration[:100 - len(SUFFIX) - extra]


def _check(spec: SweepSpec, exploration: str, used: list[int]) -> None:
    """What makes a sweep a confirmation, also after the user's overrides."""
    if not spec.points:
        raise ConfirmError("points: a confirmation runs the chosen configurations; do not override points")
    if spec.scheduler.name != "none":
        raise ConfirmError(f"scheduler.name: {spec.scheduler.name!r} is not allowed; a confirmation runs every "
                           "seed to its end (a stopped seed weakens the test): none")
    if len(spec.seeds) < MIN_SEEDS:
        raise ConfirmError(f"seeds: {spec.seeds} is not allowed; a confirmation needs at least {MIN_SEEDS} seeds")
    reused = sorted(set(spec.seeds) & set(used))
    if reused:
        raise ConfirmError(f"seeds: {reused} were used by sweep {exploration!r}; a confirmation runs on fresh "
                           "seeds only")


def _taken(spec: SweepSpec, names: set[str], out_dir: Path) -> Optional[str]:
    """Why spec.name cannot be used (a sweep, Ray state or a spec file of that name), or None."""
    if spec.name in names:
        return f"a sweep of that name is in experiment {spec.mlflow.experiment!r}"
    path = out_dir / f"{spec.name}.yaml"
    if path.exists():
        return f"{path} exists"
    from sweeps import storage
    folder = storage.join(storage_dir(spec), spec.name)
    try:
        state = storage.listdir(folder)
    except Exception:  # noqa: BLE001 - storage this machine cannot read (a cluster's): the runner checks it
        state = []
    return f"Ray state in {folder}" if state else None


def describe(p: Plan) -> list[str]:
    """The plan in a few lines: what is re-run, on which seeds."""
    lines = [f"capsweep: confirming {len(p.chosen)} of {p.ranked} candidate configuration(s) of sweep "
             f"{p.exploration!r} that did not fail, on fresh seeds {', '.join(map(str, p.spec.seeds))} "
             f"(the exploration used {', '.join(map(str, p.seeds_used)) or 'none'}):"]
    for c in p.chosen:
        lo = c.get("acc_lo")
        bound = f", accuracy lower bound {lo:+.4f}" if isinstance(lo, (int, float)) else ""
        lines.append(f"  {c['id']}  {c.get('label', '')}  ({c.get('outcome', '?')}{bound})")
    return lines


def write(p: Plan, command: str) -> None:
    """The spec file, never over another one (exclusive create): the confirmation as it will run."""
    p.path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {command}\n# the confirmation of sweep {p.exploration!r}: run it again, or continue it, with\n"
              f"#   capsweep run {p.path} [--resume]\n")
    with open(p.path, "x") as f:
        f.write(header + to_yaml(p.spec))
