"""Typed configuration of one training run: model, data and training sections.

The same schema is used by `capsweep train CONFIG.yaml` and as the base of every sweep trial, so a
trial's resolved config can be replayed with `capsweep train` unchanged. Plain dataclasses (OmegaConf
is imported only inside `load`, which reads a YAML file and dotted overrides: `capsmodels` stays free
of the sweep stack at import).

Presets (timm style) are partial dicts applied on top of the dataclass defaults and below the
user's file, so `model.preset: sabour` gives Sabour's network and any key in the file still wins.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from capsmodels.catalogue import DATASETS  # noqa: F401 - re-exported: the allowed data.name values
from capsmodels.presets import PRESETS
from capsmodels import registry
from capsmodels.errors import CapsweepError
from capsmodels.registry import SQUASHES  # noqa: F401 - re-exported: the allowed model.squash values

# std, fan, data: capsweep's own; tsai, mazzia, hahn: the routing families' authors' W inits
# (capsmodels.layers.init_weights), which model.family_defaults: published chooses
INITS = ("std", "fan", "data", "tsai", "mazzia", "hahn")
FAMILY_DEFAULTS = ("uniform", "published")   # model.family_defaults
PRIMARY_NORMS = ("squash", "layernorm", "batchnorm")   # model.primary_norm (capsmodels.layers.PrimaryCaps)
SCHEDULES = ("sequential", "concurrent")     # model.schedule (capsmodels.networks.CapsNet)
ARCHS = ("capsnet", "cnn")
DEVICES = ("auto", "cpu", "cuda")
COMPILES = ("none", "default", "reduce-overhead")   # train.compile (capsmodels.fast.COMPILE_MODES)
TEST_TRANSFORMS = ("none", "affine")   # data.test_transform (capsmodels.transforms.TRANSFORMS)


def routing_names() -> tuple[str, ...]:
    """The allowed `model.routing` values: the registry's families once the package that assembles them
    (`capsmodels.routing`) is imported. Imported here, on the first question, not when this module is:
    `import capsmodels.config` stays free of torch, and the schema names no family."""
    import capsmodels.routing  # noqa: F401 - registers the built-in families
    return registry.routing_names()


def get_routing(name: str) -> registry.RoutingFamily:
    """The registered family `name` (after the built-ins are in; see routing_names)."""
    import capsmodels.routing  # noqa: F401
    return registry.get_routing(name)


def __getattr__(name: str):
    """`ROUTINGS`: the registered routing families, asked for when read, so importing this module does
    not import the families (and torch)."""
    if name == "ROUTINGS":
        return routing_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(CapsweepError, ValueError):
    """A config value that is not allowed. Its message is one line naming the field and what is allowed."""


@dataclass
class ModelConfig:
    """CapsNet family (or the CNN baseline). Defaults are Sabour et al. 2017 except where noted."""
    preset: str = "small"             # name in capsmodels.presets.PRESETS, applied below the file
    arch: str = "capsnet"             # capsnet | cnn (plain CNN baseline of matched size)
    conv_channels: list = field(default_factory=lambda: [256])   # stem conv layers (ReLU)
    conv_kernel: int = 9
    primary_channels: int = 32        # capsule channels of PrimaryCaps
    primary_dim: int = 8              # pose dimension of each primary capsule
    primary_kernel: int = 9
    primary_stride: int = 2
    depth: int = 0                    # hidden fully connected capsule layers; 0 = Sabour's CapsNet
    num_caps: int = 32                # capsules per hidden layer
    caps_dim: int = 8                 # pose dimension of hidden capsules
    out_dim: int = 16                 # pose dimension of class capsules
    routing: str = "dynamic"          # a family of capsmodels.registry: dynamic | em | uniform (c = 1/n_out)
    iterations: int = 3               # routing iterations (1 = uniform couplings for dynamic)
    detach_inner: bool = False        # detach u_hat in inner routing iterations (as some public code)
    bias: bool = False                # bias before the squash (Peer et al. 2019)
    squash: str = "sabour"            # sabour | exp | tanh
    init: str = "std"                 # std: N(0, init_std) as public code | fan: ||s|| ~ 1 if inputs
                                      # had length squash_length(1) | data: measured (capsmodels.init)
    init_std: float = 0.01
    init_scale: float = 1.0           # multiplier on the fan-based scale (a sweep axis in `hunt`)
    init_target: float = 1.0          # init data: mean pre-squash length ||s|| hit per capsule layer
    bias_init: float = 0.1            # constant start of the bias when bias is on (Peer; Sabour's code)
    decoder: bool = True              # masked reconstruction decoder 512-1024-pixels
    recon_weight: float = 0.0005
    cnn_width: int = 0                # cnn baseline: hidden width of its dense layer (0 = matched size)
    residual: bool = False            # skip connections between hidden capsule layers (Gugglberger et al.
                                      # 2021): layer l's pose + layer l-residual_dist's routed pose
                                      # (residual and pose_norm: capsnet only; the cnn ignores them)
    residual_dist: int = 2            # distance of a skip (their code's default skip_dist = 2)
    pose_norm: bool = False           # LayerNorm (no gain/offset) of each capsule's pose before it is passed
                                      # on to the next capsule layer (primaries and hidden layers)
    family_defaults: str = "uniform"  # uniform: every family starts as this config says (a controlled
                                      # comparison) | published: the routing family's authors' start (its
                                      # registry entry's init, squash, primary_norm, schedule) replaces those
                                      # fields (resolve_start; docs/PROBES.md, "Routing families and remedies")
    primary_norm: str = "squash"      # squash (Sabour) | layernorm (Tsai: LayerNorm with gain and offset) |
                                      # batchnorm (Hahn: BN'd poses, activations sigmoid(BN(conv)))
    schedule: str = "sequential"      # sequential: each layer routes to the end before the next |
                                      # concurrent: every layer's pass r before any pass r+1 (attention only)


@dataclass
class DataConfig:
    name: str = "mnist5k"
    root: Optional[str] = None        # None: $CAPSWEEP_DATA, else ~/.cache/capsweep (+ system paths)
    train_size: float = 1.0           # <= 1.0: fraction of the training split; > 1: a count
    val_size: float = 0.1             # carved from training data (fraction or count)
    test_size: Optional[float] = None  # None: the whole test split; else a stratified subset
    augment: bool = False             # Sabour's random shift by up to 2 pixels
    download: bool = True             # fetch official files (checksum-verified) when missing
    sign_samples: int = 4000          # size of the synthetic `sign` task
    test_transform: str = "none"      # none | affine: test_acc_transformed on warped test images
                                      # (capsmodels.transforms; docs/PROBES.md), ranges below
    affine_rotation: float = 20.0     # degrees, U(-r, r) per test image
    affine_shear: float = 0.1         # x' = x + shear * y, U(-s, s)
    affine_scale_min: float = 0.8     # isotropic scale, U(min, max)
    affine_scale_max: float = 1.2
    affine_translate: float = 3.0     # pixels per axis, U(-t, t)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    lr_decay: float = 1.0             # multiplicative per epoch (Sabour used 0.96), after the warmup
    warmup_epochs: float = 0.0        # linear lr warmup, per step, from lr/W to lr over this many epochs
                                      # (W steps; 0 = none), then lr_decay per epoch (capsmodels.train)
    patience: int = 0                 # stop when val_acc has not improved for this many epochs (0 = off:
                                      # train all `epochs`, the cap); the logged model is the best-val epoch's
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    threads: int = 0                  # torch intra-op threads; 0 = leave torch's default
    max_steps_per_epoch: int = 0      # 0 = full epoch (a cap for smoke runs)
    eval_batch: int = 256             # size of the fixed probe batch D from the validation split
    grad_window: int = 10             # K: grad norms averaged over the last K steps of an epoch
    dead_tau: float = 0.01            # a capsule is dead when max_x a_j(x) < tau
    progress: bool = False            # tqdm bar per epoch (capsweep train turns it on)
    check_every: int = 0              # steps between the host's reads of the loss sum for a non-finite
                                      # loss (0 = once, at the epoch's end): no wait for the GPU per step;
                                      # a diverged run is rewound and replayed, so it reports as if checked
                                      # every step (capsmodels.train)
    compile: str = "none"             # none | default | reduce-overhead: the training step through
                                      # torch.compile (reduce-overhead: CUDA graphs too; capsmodels.fast)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _choice(field_name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{field_name}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _at_least(field_name: str, value: Any, low: float, what: str = "") -> None:
    if value < low:
        raise ConfigError(f"{field_name}: {value!r} is not allowed; must be >= {low}{what}")


def validate(cfg: RunConfig) -> RunConfig:
    """Range and choice checks that types alone cannot express. Raises ConfigError (one line).

    Shape checks that need the dataset's input size (a kernel larger than the image) live in
    `capsmodels.networks.check_fits`, which is called before training starts.
    """
    _choice("model.family_defaults", cfg.model.family_defaults, FAMILY_DEFAULTS)
    _choice("model.routing", cfg.model.routing, routing_names())
    cfg.model = resolve_start(cfg.model)
    m, d, t = cfg.model, cfg.data, cfg.train
    _choice("model.preset", m.preset, tuple(PRESETS))
    _choice("model.arch", m.arch, ARCHS)
    _choice("model.squash", m.squash, SQUASHES)
    _choice("model.init", m.init, INITS)
    _choice("model.primary_norm", m.primary_norm, PRIMARY_NORMS)
    _choice("model.schedule", m.schedule, SCHEDULES)
    if m.arch == "capsnet" and m.schedule not in get_routing(m.routing).schedules:
        raise ConfigError(f"model.schedule: {m.schedule!r} is not allowed with model.routing {m.routing!r}; "
                          "only attention routes concurrently (Tsai et al.): use sequential")
    if m.schedule == "concurrent" and (m.init == "data" or m.detach_inner):
        what = "model.init: data" if m.init == "data" else "model.detach_inner: true"
        raise ConfigError(f"{what} is not allowed with model.schedule: concurrent; init data fits each layer "
                          "on a sequential forward, detach_inner is defined per layer: use schedule sequential")
    _choice("data.name", d.name, DATASETS)
    _choice("train.device", t.device, DEVICES)
    _at_least("model.depth", m.depth, 0)
    _at_least("model.iterations", m.iterations, 1)
    for name in ("primary_channels", "primary_dim", "num_caps", "caps_dim", "out_dim",
                 "conv_kernel", "primary_kernel", "primary_stride"):
        _at_least(f"model.{name}", getattr(m, name), 1)
    if not m.conv_channels or any(int(c) < 1 for c in m.conv_channels):
        raise ConfigError(f"model.conv_channels: {list(m.conv_channels)!r} is not allowed; "
                          "must be a non-empty list of positive integers")
    if m.init_std <= 0 or m.init_scale <= 0:
        raise ConfigError("model.init_std/model.init_scale: must be > 0")
    if not (math.isfinite(m.init_target) and m.init_target > 0):
        raise ConfigError(f"model.init_target: {m.init_target!r} is not allowed; must be a finite number > 0")
    if not math.isfinite(m.bias_init):
        raise ConfigError(f"model.bias_init: {m.bias_init!r} is not allowed; must be a finite number")
    _at_least("model.recon_weight", m.recon_weight, 0.0)
    _at_least("model.residual_dist", m.residual_dist, 1)
    if m.pose_norm and m.arch == "capsnet" and min(m.primary_dim, m.caps_dim) < 2:
        raise ConfigError(f"model.pose_norm: true is not allowed with primary_dim {m.primary_dim} and caps_dim "
                          f"{m.caps_dim}; a pose of 1 entry normalises to 0: use dims >= 2")
    if not (0 < d.train_size <= 1.0 or (d.train_size > 1 and float(d.train_size).is_integer())):
        raise ConfigError(f"data.train_size: {d.train_size!r} is not allowed; "
                          "use a fraction in (0, 1] or a whole count > 1")
    if not (0 < d.val_size < 1.0 or (d.val_size >= 1 and float(d.val_size).is_integer())):
        raise ConfigError(f"data.val_size: {d.val_size!r} is not allowed; "
                          "use a fraction in (0, 1) or a whole count >= 1")
    if d.test_size is not None and not (0 < d.test_size <= 1.0 or
                                        (d.test_size > 1 and float(d.test_size).is_integer())):
        raise ConfigError(f"data.test_size: {d.test_size!r} is not allowed; "
                          "use null, a fraction in (0, 1] or a whole count > 1")
    _choice("data.test_transform", d.test_transform, TEST_TRANSFORMS)
    for name in ("affine_rotation", "affine_shear", "affine_translate"):
        _at_least(f"data.{name}", getattr(d, name), 0.0)
    if not 0 < d.affine_scale_min <= d.affine_scale_max:
        raise ConfigError(f"data.affine_scale_min/affine_scale_max: {d.affine_scale_min!r}/"
                          f"{d.affine_scale_max!r} is not allowed; need 0 < min <= max")
    _at_least("train.epochs", t.epochs, 1)
    _at_least("train.batch_size", t.batch_size, 1)
    if not t.lr > 0:
        raise ConfigError(f"train.lr: {t.lr!r} is not allowed; must be > 0")
    if not 0 < t.lr_decay <= 1:
        raise ConfigError(f"train.lr_decay: {t.lr_decay!r} is not allowed; must be in (0, 1]")
    _at_least("train.weight_decay", t.weight_decay, 0.0)      # Adam raises on a negative one
    _at_least("train.warmup_epochs", t.warmup_epochs, 0.0, " (epochs of linear lr warmup; 0 = none)")
    _at_least("train.patience", t.patience, 0, " (epochs without a better val_acc before stopping; 0 = off)")
    _at_least("train.threads", t.threads, 0)
    _at_least("train.max_steps_per_epoch", t.max_steps_per_epoch, 0)
    _at_least("train.eval_batch", t.eval_batch, 2)
    _at_least("train.grad_window", t.grad_window, 1)
    _at_least("train.check_every", t.check_every, 0, " (steps between checks for a non-finite loss; 0 = each epoch's end)")
    _choice("train.compile", t.compile, COMPILES)
    if not 0 < t.dead_tau < 1:
        raise ConfigError(f"train.dead_tau: {t.dead_tau!r} is not allowed; must be in (0, 1)")
    return cfg


def resolve_start(m: ModelConfig) -> ModelConfig:
    """The model config as the network starts: with `family_defaults: published`, the routing family's
    authors' start (capsmodels.registry, `RoutingFamily.published`: W init, squash, primary
    normalisation, schedule, each citing the authors' code) replaces those fields, whatever the config
    said; a family without one (dynamic, em, uniform), the cnn and `uniform` keep the config as it is.
    Idempotent; a new ModelConfig, the argument is not changed. `validate` applies it, so every run
    config that was validated (a trial's logged params and config.yaml included) shows the start used."""
    if m.family_defaults != "published" or m.arch != "capsnet":
        return m
    start = get_routing(m.routing).published
    return dataclasses.replace(m, **start.values()) if start is not None else m


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig of a YAML file (or none: the defaults) with dotted `key=value` overrides on top,
    as `capsweep train CONFIG.yaml model.depth=2` reads it: defaults <- preset <- file <- overrides.

    The file and the override values are read by OmegaConf, as the sweep specs are (YAML values,
    `${...}` interpolation, safe loading: a python tag is an error, never executed); imported here
    only, so importing this module stays free of it. Every problem is a one-line ConfigError.
    """
    from omegaconf import OmegaConf
    raw: Any = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: {path} is not a file")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(p), resolve=True) or {}
        except Exception as e:  # noqa: BLE001 - YAML errors of every kind
            raise ConfigError(f"config {p}: cannot be read as YAML: {' '.join(str(e).split())[:200]}")
        if not isinstance(raw, dict):
            raise ConfigError(f"config {p}: must be a mapping with model/data/train sections")
    try:
        cli = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))) if overrides else {}
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"override: {' '.join(str(e).split())[:200]}; write key=value")
    return from_dict(_merge(raw, cli))


def from_dict(raw: dict) -> RunConfig:
    """Build a RunConfig from a nested dict: dataclass defaults <- model preset <- raw.

    Unknown sections or keys raise ConfigError naming the key. Types are coerced the way YAML users
    expect (an int where a float is declared); anything else that does not fit raises.
    """
    raw = raw or {}
    sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
    for sec, values in raw.items():
        if sec not in sections:
            raise ConfigError(f"{sec}: unknown section; allowed: {', '.join(sections)}")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{sec}: {values!r} is not allowed; expected a mapping of {sec} fields")
    preset = (raw.get("model") or {}).get("preset", ModelConfig.preset)
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: {preset!r} is not allowed; choose one of {', '.join(PRESETS)}")
    merged = _merge({"model": dict(PRESETS[preset])}, {k: dict(v or {}) for k, v in raw.items()})
    built = {}
    for sec, cls in sections.items():
        values = merged.get(sec, {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{sec}.{key}: unknown key; allowed: {', '.join(fields)}")
            default = getattr(cls(), key)
            if default is None:  # Optional fields: the annotation says which type
                default = "" if "str" in str(fields[key].type) else None
                if value is None:
                    kwargs[key] = None
                    continue
            kwargs[key] = _coerce(f"{sec}.{key}", value, default)
        built[sec] = cls(**kwargs)
    return validate(RunConfig(**built))


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Coerce a YAML value to the type of the field's default, with a one-line error when it cannot."""
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"{name}: null is not allowed; expected {type(default).__name__}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: {value!r} is not allowed; expected true or false")
    if isinstance(value, float) and not math.isfinite(value):
        # .inf / .nan in YAML: no field means "unbounded", and NaN slips past every range check
        raise ConfigError(f"{name}: {value!r} is not allowed; expected a finite number")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{name}: {value!r} is not allowed; expected an integer")
        return int(value)
    if isinstance(default, float) or default is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: {value!r} is not allowed; expected a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: {value!r} is not allowed; expected a string")
        return value
    if isinstance(default, list):   # lists of whole numbers (model.conv_channels)
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in value):
            raise ConfigError(f"{name}: {value!r} is not allowed; expected a list of integers")
        return [int(v) for v in value]
    return value


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'model': {'depth': 2}} -> {'model.depth': 2}: the MLflow param names."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
