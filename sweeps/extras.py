"""The trials a sweep's space forgot: depth-0 CapsNet references and CNN controls.

Why: the verdict (docs/PROBES.md, "Configurations and roles") judges each deep candidate against a depth-0
CapsNet trained the same way, and checks its own thresholds on a healthy network of the same depth
(the `cnn` control). A sweep over depth 1 and 3 only (`capsdim`), or one where Optuna picks the depth
(`hunt`), has neither, so no candidate could ever pass. The runner therefore adds them as ordinary
Ray Tune trials (logged, resumed and counted like the others) with the param `trial.role`:
`candidate` for the space's own trials, `reference` or `control` for these. Each runs once per seed.

References (`references: true`, the default) are added when a candidate can be a CapsNet deeper than
0. They are depth-0 CapsNets matched on the swept keys except model.depth, model.arch and the hidden
layers' shape (model.num_caps, model.caps_dim: there are no hidden layers at depth 0):
- `grid` keys under grid or random search: every value (Tune crosses grid keys with everything, so
  the match is exact). A grid search whose keys are all `grid` and whose depth grid holds 0 already
  has every candidate's twin: nothing is added.
- keys Tune or Optuna samples (`choice`; `grid` under optuna): every level while all combinations
  number at most MAX_LEVEL_COMBOS, else the base value. A sampled value cannot be matched in
  advance, so the report compares on the levels it can.
- ranges: the base value.
Controls (`controls: true`): `model.arch: cnn` at depth 0 and at every depth a candidate can take (each
grid/choice value, each integer of an int range, at most MAX_CONTROL_DEPTHS of them), the base config
otherwise; the depth-0 cnn is the deeper controls' reference.
None are added when a grid search crosses model.arch through cnn with its depths itself.

A sweep of explicit `points` (`capsweep confirm`) gets the same, matched point by point: the reference
of a CapsNet point deeper than 0 is its depth-0 twin (the point's own keys, those above excepted),
and the controls are the cnn at depth 0 and at each point's depth. An added trial that is one of the
points already (a depth-0 CapsNet point is its own reference) or another added trial is added once.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Union

from capsmodels import config as runcfg
from capsmodels.contract import CANDIDATE, CONTROL, REFERENCE, ROLE_KEY, role_of
from sweeps.schema import SEED_KEY, SpecError, SweepSpec, candidate_trials, configs

UNMATCHED = ("model.depth", "model.arch", "model.num_caps", "model.caps_dim")
MAX_LEVEL_COMBOS = 8
MAX_CONTROL_DEPTHS = 12


def _entry(spec: SweepSpec, key: str) -> tuple:
    """(kind, values) of a space key, (None, None) when the key is not swept."""
    entry = spec.space.get(key)
    return next(iter(entry.items())) if entry else (None, None)


def _crossed(spec: SweepSpec, key: str) -> bool:
    """Tune runs every value of this key with every other one (grid_search) instead of sampling it."""
    return _entry(spec, key)[0] == "grid" and spec.search.algorithm != "optuna"


def depths(spec: SweepSpec) -> Union[range, list]:
    """Every depth a candidate can take (a range for int kinds: never listed before it is checked)."""
    if spec.points:
        return sorted({configs(spec).of(p).model.depth for p in spec.points})
    kind, values = _entry(spec, "model.depth")
    if kind is None:
        return [configs(spec).base.model.depth]
    if kind in ("grid", "choice"):
        return sorted({int(v) for v in values})
    return range(int(values[0]), int(values[1]) + 1)


def _archs(spec: SweepSpec) -> list:
    if spec.points:
        return sorted({configs(spec).of(p).model.arch for p in spec.points})
    kind, values = _entry(spec, "model.arch")
    return list(values) if kind else [configs(spec).base.model.arch]


def reference_points(spec: SweepSpec) -> list[dict]:
    """The depth-0 CapsNet configurations to add (before seeds), as dotted params."""
    if spec.points:
        return _point_references(spec) if spec.references else []
    if not spec.references or "capsnet" not in _archs(spec) or max(depths(spec)) == 0:
        return []
    if spec.search.algorithm == "grid" and all(_crossed(spec, k) for k in spec.space) and 0 in depths(spec):
        return []
    matched = [k for k in spec.space if k not in UNMATCHED]
    crossed = [k for k in matched if _crossed(spec, k)]
    sampled = [k for k in matched if k not in crossed and _entry(spec, k)[0] in ("grid", "choice")]
    levels = {k: list(_entry(spec, k)[1]) for k in crossed + sampled}
    if math.prod(len(v) for v in levels.values()) > MAX_LEVEL_COMBOS:
        sampled = []                  # crossed keys stay: their match is exact and required
    keys = crossed + sampled
    return [{**dict(zip(keys, combo)), "model.depth": 0, "model.arch": "capsnet"}
            for combo in itertools.product(*(levels[k] for k in keys))]


def control_points(spec: SweepSpec) -> list[dict]:
    """The `cnn` configurations to add (before seeds): one per depth, base config otherwise."""
    if not spec.controls:
        return []
    if "cnn" in _archs(spec) and _crossed(spec, "model.arch") and \
            (_crossed(spec, "model.depth") or "model.depth" not in spec.space):
        return []
    ds = depths(spec)
    if len(ds) > MAX_CONTROL_DEPTHS:
        raise SpecError(f"controls: model.depth takes {len(ds)} values ({ds[0]}..{ds[-1]}); controls run one "
                        f"cnn per depth and seed, at most {MAX_CONTROL_DEPTHS} depths: narrow the range or "
                        "set controls: false")
    # depth 0 always: a control is judged against its own shallow twin (the depth-0 cnn), as a
    # candidate is against the depth-0 CapsNet (docs/PROBES.md, "The verdict")
    cnns = [{"model.arch": "cnn", "model.depth": d} for d in sorted({0, *(int(d) for d in ds)})]
    return _new_configs(spec, cnns) if spec.points else cnns


def _point_references(spec: SweepSpec) -> list[dict]:
    """The depth-0 twin of each CapsNet point deeper than 0: its keys but UNMATCHED, at depth 0."""
    twins = []
    for p in spec.points:
        model = configs(spec).of(p).model
        if model.arch == "capsnet" and model.depth > 0:
            twins.append({**{k: v for k, v in p.items() if k not in UNMATCHED},
                          "model.depth": 0, "model.arch": "capsnet"})
    return _new_configs(spec, twins)


def _new_configs(spec: SweepSpec, added: list[dict]) -> list[dict]:
    """`added` without those whose trial config is one of the points' or an earlier one's."""
    def key(p: dict) -> str:
        return repr(sorted(configs(spec).flat(p).items()))
    seen = {key(p) for p in spec.points}
    out = []
    for p in added:
        k = key(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def extra_trials(spec: SweepSpec) -> list[dict]:
    """Every added trial's params (references first), each once per seed, with train.seed and trial.role."""
    out = []
    for role, points in ((REFERENCE, reference_points(spec)), (CONTROL, control_points(spec))):
        out += [{**p, SEED_KEY: seed, ROLE_KEY: role} for p in points for seed in spec.seeds]
    return out


def complete(spec: SweepSpec, point: dict, keys: Iterable[str]) -> dict:
    """`point` with each of `keys` it leaves open set to what the base config gives that trial.
    Tune's points_to_evaluate must fix every key of the space, or Tune would sample or expand it."""
    missing = [k for k in keys if k not in point]
    if not missing:
        return dict(point)
    resolved = configs(spec).flat(point)
    return {**point, **{k: resolved[k] for k in missing}}


def role(config: dict) -> str:
    """A trial's role from its Tune config (trials of sweeps started before roles existed: candidate)."""
    return config.get(ROLE_KEY, CANDIDATE)


def check(spec: SweepSpec) -> None:
    """Spec validation: the extra trials are few enough and each is a valid run config."""
    for field, kind, points in (("references", REFERENCE, reference_points(spec)),
                                ("controls", CONTROL, control_points(spec))):
        for p in points:
            try:
                configs(spec).of(p)
            except runcfg.ConfigError as e:
                where = ", ".join(f"{k}={v}" for k, v in p.items())
                raise SpecError(f"{field}: the added {kind} trial ({where}) is invalid: {e}; "
                                f"set {field}: false or fix base") from None


def trial_counts(spec: SweepSpec) -> dict:
    """{candidate, reference, control}: trials per role (this module adds the last two)."""
    roles = [p[ROLE_KEY] for p in extra_trials(spec)]
    return {CANDIDATE: candidate_trials(spec), REFERENCE: roles.count(REFERENCE),
            CONTROL: roles.count(CONTROL)}


def judged_counts(spec: SweepSpec) -> dict:
    """{candidate, reference, control}: trials per role as the verdict will judge them, by arch and
    depth (capsmodels.contract.role_of: every depth-0 network is a reference, the depth-0 cnn included,
    and a deeper cnn a control), not by who added them (`trial_counts`, the `trial.role` param).
    Why: the verdict's error control is over its candidates, and a space that holds depth 0 or a cnn
    (the depth sweep: depth grid [0, 1, ...]) has references and controls of its own.
    A space trial whose arch or depth is sampled (optuna, `choice` under random search, a range) is
    counted a candidate: which role it gets is known only once it is drawn."""
    out = {CANDIDATE: 0, REFERENCE: 0, CONTROL: 0}

    def add(points: list[dict], each: int) -> None:
        for p in points:
            cfg = configs(spec).of(p).model
            out[role_of(cfg.arch, cfg.depth)] += each
    add(reference_points(spec) + control_points(spec), len(spec.seeds))
    own = candidate_trials(spec)
    if spec.points:
        add(spec.points, own // len(spec.points))
        return out
    kinds = {k: _entry(spec, k)[0] for k in ("model.arch", "model.depth")}
    if not all(kind is None or _crossed(spec, k) for k, kind in kinds.items()):
        out[CANDIDATE] += own
        return out
    cells = list(itertools.product(_archs(spec), depths(spec)))
    for arch, depth in cells:
        out[role_of(arch, int(depth))] += own // len(cells)
    return out


def total_trials(spec: SweepSpec) -> int:
    """How many trials (MLflow child runs) the sweep will have when it completes, extras included."""
    return sum(trial_counts(spec).values())
