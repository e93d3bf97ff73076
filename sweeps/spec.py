"""Sweep specs: typed OmegaConf configs merged as defaults <- file <- CLI dotlist, then validated.

A spec is YAML like

    name: depth
    base: {model: {preset: tiny}, data: {name: mnist5k}, train: {epochs: 2}}   # the `capsweep train` schema
    space:
      model.depth: {grid: [0, 1, 2]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    search: {algorithm: optuna, sampler: tpe}
    metric: val_acc
    mode: max
    seeds: [0, 1]
    references: true     # depth-0 CapsNet references the space forgot (sweeps/extras.py)
    controls: true       # model.arch: cnn controls at every swept depth (sweeps/extras.py)

Instead of a `space`, a grid sweep can name its configurations one by one (`capsweep confirm` writes
such specs): each point runs once per seed, beside the references and controls its points need.

    points:
      - {model.depth: 2, model.iterations: 3}
      - {model.depth: 3, model.routing: em}
    confirms: depth      # the exploration sweep this one confirms (param sweep.confirms, tag capsweep.confirms)

Everything is validated here, before Ray or MLflow start: a mistake costs one line and exit 2, not a
cluster allocation. YAML is read with OmegaConf (yaml.SafeLoader underneath: no object construction).
"""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capsmodels import config as runcfg
from analysis.store import resolve_tracking_uri
from capsmodels.contract import LAYER_METRICS, SCALAR_METRICS, parse_layer_metric
from sweeps import budget, extras
from sweeps.extras import judged_counts, total_trials, trial_counts  # noqa: F401 - re-exported
from sweeps.schema import (ALGORITHMS, KEEP_BASE, MODES, NAME_RE, RUN_SECTIONS, SAMPLERS,  # noqa: F401 - re-exported
                           SCHEDULERS, SEED_KEY, SPACE_KINDS, BudgetSpec, MlflowSpec, ResourcesSpec, SchedulerSpec,
                           SearchSpec, SpecError, SweepSpec, _fail, candidate_trials, grid_size, objectives,
                           TrialConfigs, configs, probe_values, resolve_trial, searched_keys, trial_config)

CONFIG_DIR = Path(__file__).parent / "configs"
# The spec's metric is checked against the metrics every trial reports (SCALAR_METRICS) and the
# per-layer ones (LAYER_METRICS, l = 0 .. depth+1), capsmodels/contract.py, so a typo fails before a
# single trial runs. ROLE_KEY (trial.role) is a param of every trial, not a run-config key.


def resolve_spec_path(spec: str) -> Path:
    """A path, or the name of a shipped spec (`smoke` -> sweeps/configs/smoke.yaml)."""
    p = Path(spec)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    _fail(f"spec: {spec!r} is neither a file nor a shipped spec; shipped specs: {names}")


def load_spec(spec: str, overrides: Optional[list[str]] = None) -> SweepSpec:
    """defaults <- file <- CLI `key=value` overrides, typed and validated. Raises SpecError."""
    path = resolve_spec_path(spec)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, OSError, OmegaConf errors
        _fail(f"spec {path}: cannot be read as YAML: {_one_line(e)}")
    if not isinstance(file_cfg, DictConfig):
        _fail(f"spec {path}: must be a mapping of fields, got {type(file_cfg).__name__}")
    if not file_cfg:        # an empty file would run a default sweep nobody asked for
        _fail(f"spec {path}: is empty; a spec names at least its base config and space (see sweeps/configs/)")
    try:
        cli_cfg = OmegaConf.from_dotlist(list(overrides or []))
    except Exception as e:
        _fail(f"override: {_one_line(e)}; write overrides as key=value")
    merged = OmegaConf.merge(file_cfg, cli_cfg)
    if OmegaConf.select(merged, "mlflow.tracking_uri") is None:
        # a spec that names no store follows MLflow's own convention: $MLFLOW_TRACKING_URI, else its default
        merged = OmegaConf.merge(merged, {"mlflow": {"tracking_uri": resolve_tracking_uri(None)}})
    return from_config(merged, origin=str(path))


BOOL_FIELDS = ("references", "controls", "reuse_actors")


def from_config(raw: DictConfig | dict, origin: str = "spec") -> SweepSpec:
    """Type-check against the SweepSpec schema, then validate meaning."""
    schema = OmegaConf.structured(SweepSpec)
    if isinstance(raw, dict):
        raw = OmegaConf.create(raw)
    for name in BOOL_FIELDS:
        # OmegaConf would read 2 or "yes" as true; a switch that turns trials on and off takes a bool
        value = _plain(raw.get(name)) if isinstance(raw, DictConfig) and name in raw else None
        if value is not None and not isinstance(value, bool):
            _fail(f"{name}: {value!r} is not allowed; expected true or false")
    try:
        merged = OmegaConf.merge(schema, raw)
        spec: SweepSpec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        _fail(_omegaconf_message(e))
    spec.base = _plain(spec.base)
    spec.space = _flatten_space(_plain(spec.space))
    spec.points = [_flatten_point(p) for p in _plain(spec.points)]
    validate(spec)
    return spec


def _flatten_space(space: dict, prefix: str = "") -> dict:
    """Accept nested keys too: a CLI override `space.model.init={grid: [std, fan]}` arrives as
    {'model': {'init': {...}}}; the spec's own form is {'model.init': {...}}."""
    out: dict = {}
    for key, value in (space or {}).items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and not (set(value) & set(SPACE_KINDS)) and \
                all(isinstance(v, dict) for v in value.values()):
            out.update(_flatten_space(value, full + "."))
        else:
            out[full] = value
    return out


def _flatten_point(point: Any) -> Any:
    """A point's nested keys as dotted ones ({'model': {'depth': 2}} -> {'model.depth': 2}); anything
    that is not a mapping is left for `validate` to name."""
    if not isinstance(point, dict):
        return point
    out: dict = {}
    for key, value in point.items():
        if isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in _flatten_point(value).items()})
        else:
            out[str(key)] = value
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        allowed = ", ".join(f.name for f in fields(SweepSpec))
        top = key.split(".")[0] if key else ""
        if key and "." not in key:
            return f"{key}: unknown field; allowed: {allowed}"
        return f"{key}: unknown field" + (f" of {top}" if top else "")
    if "Incompatible value 'None'" in msg and key:      # `key=` or `key= ` on the command line, `key:` in YAML
        return f"{key}: empty; give it a value (or leave the key out for its default)"
    if key:
        return f"{key}: {msg}"
    return msg


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def max_layer_index(base: runcfg.RunConfig, space: dict, point_depths: tuple = ()) -> int:
    """The largest capsule layer index any trial of this sweep can report (depth + 1)."""
    depths = [base.model.depth, *point_depths]
    entry = space.get("model.depth")
    if entry:
        depths += [int(v) for v in probe_values(*next(iter(entry.items())))]
    return max(depths) + 1


def _validate_select(spec: SweepSpec) -> None:
    """`select`: swept keys the verdict tunes on validation (docs/PROBES.md, "Tuned on validation")."""
    if not isinstance(spec.select, (list, tuple)):
        _fail(f"select: {spec.select!r} is not allowed; a list of swept keys, e.g. [train.lr]")
    swept = searched_keys(spec)
    for key in spec.select:
        if key in ("model.depth", "model.arch", SEED_KEY):
            _fail(f"select: {key!r} is not allowed; depth, architecture and seed are what the verdict compares, "
                  "not hyperparameters to tune away")
        if key not in swept:
            _fail(f"select: {key!r} is not swept; choose among {', '.join(swept) or '(no swept key)'}")


def metric_allowed(name: str, max_layer: int) -> bool:
    if name in SCALAR_METRICS:
        return True
    parsed = parse_layer_metric(name)
    return parsed is not None and parsed[0] in LAYER_METRICS and parsed[1] <= max_layer


def validate(spec: SweepSpec) -> SweepSpec:
    """Meaning checks; each failure is one line naming the field and what is allowed."""
    if not NAME_RE.match(spec.name):
        _fail(f"name: {spec.name!r} is not allowed; use letters, digits, '_', '-', '.' (at most 100, "
              "not starting with '.' or '-'), it names the Ray experiment folder and the MLflow parent run")
    if spec.search.algorithm not in ALGORITHMS:
        _fail(f"search.algorithm: {spec.search.algorithm!r} is not allowed; choose one of {', '.join(ALGORITHMS)}")
    if spec.search.sampler is not None and spec.search.sampler not in SAMPLERS:
        _fail(f"search.sampler: {spec.search.sampler!r} is not allowed; choose one of {', '.join(SAMPLERS)}")
    if spec.search.algorithm != "optuna":
        spec.search.sampler = None          # grid and random search sample no Optuna study
    elif spec.search.sampler is None:
        spec.search.sampler = "tpe"
    if spec.scheduler.name not in SCHEDULERS:
        _fail(f"scheduler.name: {spec.scheduler.name!r} is not allowed; choose one of {', '.join(SCHEDULERS)}")
    if spec.num_samples < 1:
        _fail(f"num_samples: {spec.num_samples} is not allowed; must be >= 1")
    if not spec.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in spec.seeds):
        _fail(f"seeds: {spec.seeds!r} is not allowed; must be a non-empty list of integers >= 0")
    if len(set(spec.seeds)) != len(spec.seeds):
        _fail(f"seeds: {spec.seeds!r} has repeats; each seed once")
    if spec.resources.cpu <= 0 or spec.resources.gpu < 0:
        _fail("resources: cpu must be > 0 and gpu >= 0 (fractions allowed)")
    if spec.resources.gpu > 1 and not float(spec.resources.gpu).is_integer():
        _fail(f"resources.gpu: {spec.resources.gpu} is not allowed; fractions only below 1 (0.5, 0.25, ...)")
    if spec.max_concurrent < 0:
        _fail(f"max_concurrent: {spec.max_concurrent} is not allowed; must be >= 0 (0 = as resources allow)")
    if spec.max_failures < 0:
        _fail(f"max_failures: {spec.max_failures} is not allowed; must be >= 0")
    if spec.scheduler.grace_period < 1 or spec.scheduler.reduction_factor < 2:
        _fail("scheduler: grace_period must be >= 1 and reduction_factor >= 2")
    if not spec.storage_path:
        _fail("storage_path: must not be empty")
    storage_dir(spec)       # a URI scheme Ray Tune cannot read fails here, before Ray starts
    if not spec.mlflow.experiment.strip():
        _fail("mlflow.experiment: must not be empty")
    if not re.match(r"^(sqlite:///|https?://|file:|postgresql(\+\w+)?://|mysql(\+\w+)?://|databricks)",
                    spec.mlflow.tracking_uri):
        _fail(f"mlflow.tracking_uri: {spec.mlflow.tracking_uri!r} is not allowed; use sqlite:///PATH, "
              "http(s)://HOST:PORT, postgresql://..., or file:PATH")

    if spec.confirms and not NAME_RE.match(spec.confirms):
        _fail(f"confirms: {spec.confirms!r} is not a sweep name; letters, digits, '_', '-', '.'")
    base = _validate_base(spec)
    _validate_space(spec, base)
    point_depths = _validate_points(spec, base)
    _validate_select(spec)
    extras.check(spec)
    budget.check_sizes(spec)    # every probe value's network against the bounds

    metrics, modes = objectives(spec)
    if isinstance(spec.mode, list) and len(spec.mode) != len(metrics):
        _fail(f"mode: {len(spec.mode)} modes for {len(metrics)} metrics; give one mode per metric")
    for m in modes:
        if m not in MODES:
            _fail(f"mode: {m!r} is not allowed; choose min or max")
    max_layer = max_layer_index(base, spec.space, point_depths)
    for m in metrics:
        if not metric_allowed(m, max_layer):
            _fail(f"metric: {m!r} is not reported by trials; use one of {', '.join(SCALAR_METRICS)} "
                  f"or a per-layer probe {'|'.join(LAYER_METRICS)}/l<0..{max_layer}>")
    if len(metrics) > 1:
        if spec.search.algorithm != "optuna":
            _fail("metric: several objectives need search.algorithm: optuna (sampler nsga2 or tpe)")
        if spec.search.sampler == "cmaes":
            _fail("search.sampler: cmaes optimises one objective; use nsga2 or tpe for several metrics")
        if spec.scheduler.name != "none":
            _fail("scheduler.name: asha needs a single metric; use none with several objectives")
    if spec.search.algorithm == "grid":
        for key, entry in spec.space.items():
            kind = next(iter(entry))
            if kind not in ("grid", "choice"):
                _fail(f"space.{key}: {kind} needs search.algorithm random or optuna; grid search takes grid/choice lists")
    if spec.search.algorithm == "optuna" and not spec.space:
        _fail("space: optuna needs at least one entry to search over")
    return spec


def _validate_base(spec: SweepSpec) -> runcfg.RunConfig:
    try:
        return configs(spec).base
    except runcfg.ConfigError as e:
        _fail(f"base.{e}")


def _check_key(where: str, key: str, base_dict: dict) -> None:
    """A space or point key names one run-config field, never the seed."""
    if key == SEED_KEY:
        _fail(f"{where}: seeds are set by the `seeds` field, not searched over")
    sec, _, name = key.partition(".")
    if sec not in RUN_SECTIONS or not name or name not in base_dict.get(sec, {}):
        _fail(f"{where}: unknown key; use a dotted run-config key such as model.depth, train.lr")


def _validate_points(spec: SweepSpec, base: runcfg.RunConfig) -> tuple[int, ...]:
    """Each point is {dotted key: value} and, applied to the raw base, a valid run config; no two
    points are the same configuration. Returns the depth of each point."""
    if not spec.points:
        return ()
    if spec.space:
        _fail("points: explicit configurations replace the space; give space or points, not both")
    if spec.search.algorithm != "grid":
        _fail(f"points: explicit configurations run under search.algorithm: grid, not {spec.search.algorithm}")
    base_dict = runcfg.to_dict(base)
    seen: dict[str, int] = {}
    depths = []
    for i, point in enumerate(spec.points):
        where = f"points[{i}]"
        if not isinstance(point, dict) or not point:
            _fail(f"{where}: {point!r} is not allowed; each point is a mapping of dotted run-config keys "
                  "to values, e.g. {model.depth: 2, model.iterations: 3}")
        for key in point:
            _check_key(f"{where}.{key}", key, base_dict)
        try:
            cfg = configs(spec).of(point)
        except runcfg.ConfigError as e:
            _fail(f"{where}: gives an invalid trial: {e}")
        same = repr(sorted(runcfg.flatten(runcfg.to_dict(cfg)).items()))      # the config just built
        if same in seen:
            _fail(f"{where}: the same configuration as points[{seen[same]}]; list each configuration once")
        seen[same] = i
        depths.append(cfg.model.depth)
    return tuple(depths)


def _validate_space(spec: SweepSpec, base: runcfg.RunConfig) -> None:
    """Each entry is {kind: values}; each value, applied to the raw base (so a sampled
    `model.preset` brings its own defaults), must give a valid run config."""
    base_dict = runcfg.to_dict(base)
    for key, entry in spec.space.items():
        where = f"space.{key}"
        _check_key(where, key, base_dict)
        if not isinstance(entry, dict) or len(entry) != 1:
            _fail(f"{where}: must be one of {{{' | '.join(SPACE_KINDS)}: values}}")
        kind, values = next(iter(entry.items()))
        if kind not in SPACE_KINDS:
            _fail(f"{where}: {kind!r} is not a space kind; allowed: {', '.join(SPACE_KINDS)}")
        if not isinstance(values, list) or not values:
            _fail(f"{where}.{kind}: must be a non-empty list")
        if kind not in ("grid", "choice"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                _fail(f"{where}.{kind}: must be [low, high] numbers")
            lo, hi = values
            if not lo < hi:
                _fail(f"{where}.{kind}: empty range [{lo}, {hi}]; low must be < high")
            if kind in ("loguniform", "logint") and lo <= 0:
                _fail(f"{where}.{kind}: log ranges need low > 0, got {lo}")
            if kind in ("int", "logint") and not (float(lo).is_integer() and float(hi).is_integer()):
                _fail(f"{where}.{kind}: int ranges need whole bounds, got [{lo}, {hi}]")
        for v in probe_values(kind, values):
            try:
                configs(spec).of({key: v})
            except runcfg.ConfigError as e:
                _fail(f"{where}: value {v!r} gives an invalid trial: {e}")


def describe_trials(spec: SweepSpec) -> str:
    """'N trials (C candidates, R references, K controls)', each trial counted in the role the verdict
    judges it in (a depth-0 CapsNet of the space is a reference: sweeps/extras.py judged_counts)."""
    n = judged_counts(spec)
    return (f"{sum(n.values())} trials ({n['candidate']} candidates, {n['reference']} references, "
            f"{n['control']} controls)")


def to_yaml(spec: SweepSpec) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(spec))


OPTUNA_JOURNAL = "optuna.journal"    # the Optuna study (sweeps/search.py), in storage.local_dir(<storage>/<name>)


def journal_file(spec: SweepSpec) -> Path:
    """The Optuna journal of an optuna sweep: on the driver's disk, in the local folder of
    <storage>/<name> (sweeps/runner.py keeps its MLflow spool there too; sweeps/dashboard.py reads it)."""
    from sweeps import storage
    return storage.local_dir(storage.join(storage_dir(spec), spec.name)) / OPTUNA_JOURNAL


def storage_dir(spec: SweepSpec, root: Optional[Path] = None) -> str:
    """Where Ray Tune keeps the sweep: an absolute local folder, or a URI as Ray Tune takes it
    (`s3://`, `gs://`, `file://`, ...: sweeps/storage.py). The experiment folder below it is
    <storage>/<name>; `name` is checked by NAME_RE, so it cannot climb out of the storage folder."""
    from sweeps import storage
    scheme = storage.scheme(spec.storage_path)
    if scheme is not None:
        if scheme not in storage.SCHEMES:
            _fail(f"storage_path: {spec.storage_path!r} is not allowed; use a local path or a URI Ray Tune "
                  f"reads ({', '.join(s + '://' for s in storage.SCHEMES)})")
        if not storage.URI_RE.sub("", spec.storage_path).strip("/"):
            _fail(f"storage_path: {spec.storage_path!r} names no bucket or folder")
        return spec.storage_path.rstrip("/")
    p = Path(spec.storage_path).expanduser()
    if not p.is_absolute():
        p = (root or Path.cwd()) / p
    p = p.resolve()
    exp = (p / spec.name).resolve()
    if p not in exp.parents:
        _fail(f"name: {spec.name!r} would place results outside storage_path {p}")
    return str(p)
