"""The names `sweeps` writes and `analysis` reads: the one home of each shared fact.

Why one module: the sweep runner writes MLflow runs that the analysis reads back, possibly on another
machine and with another version of the code; a tag, status or metric name spelt in two places drifts
(the analysis once lacked a dataset the data module had). Standard library only, so importing it (and
so importing `analysis`) never pulls in torch, ray or mlflow; `tests/analysis/test_analysis.py` checks that in a
fresh interpreter. Metric definitions: docs/PROBES.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from capsmodels.catalogue import DATASETS, NUM_CLASSES

__all__ = ["DATASETS", "NUM_CLASSES"]     # re-exported: the class counts live in capsmodels.catalogue

# ---- MLflow tags -------------------------------------------------------------------------------------
TAG_ROLE = "capsweep.role"            # RUN_PARENT or RUN_TRIAL
TAG_SWEEP = "capsweep.sweep"          # the sweep's name: keeps several sweeps of one experiment apart
TAG_TRIAL = "capsweep.trial_id"       # Ray Tune's trial id: finds a trial's run again after a retry
TAG_SEED = "capsweep.seed"
TAG_STATUS = "capsweep.status"        # one of STATUSES
TAG_ERROR = "capsweep.error"
TAG_COMMIT = "capsweep.git_commit"
TAG_RETRIES = "capsweep.retries"
TAG_TEST_CORRECT = "capsweep.test_correct"   # per-image test correctness at the best-val epoch (encode_correct)
TAG_CONFIRMS = "capsweep.confirms"    # on a confirmation sweep's parent: the exploration it confirms
TAG_HEARTBEAT = "capsweep.heartbeat"  # on a parent: unix time (s) of its driver's last sign of life
TAG_OPTUNA_JOURNAL = "capsweep.optuna_journal"   # on an Optuna sweep's parent: its study's journal file (driver's disk)
TAG_VERSION_PREFIX = "capsweep.version."   # on a parent: capsweep.version.<package> = the driver's version at start
TAG_PARENT = "mlflow.parentRunId"     # MLflow's own nesting tag
TAG_RUN_NAME = "mlflow.runName"
RUN_PARENT, RUN_TRIAL = "parent", "trial"     # values of TAG_ROLE

# The per-image correctness of the test split (in the split's order) packed 8 images to a byte
# (numpy.packbits, big-endian bit order) and written as "n:<images>;<base64>", so the analysis can pair
# two configurations image by image (analysis.stats.test_set_variance). 10,000 images are 1,676
# characters; MLflow's tag limit (8,000) holds up to 47,000 images, more than any test split capsweep
# reads (SVHN's 26,032).
CORRECT_MAX_CHARS = 8000


def encode_correct(packed: bytes, n: int) -> str:
    """The tag value for `n` images whose 0/1 correctness numpy.packbits packed into `packed`."""
    import base64
    return f"n:{n};" + base64.b64encode(packed).decode("ascii")


def decode_correct(value: str) -> tuple[int, bytes]:
    """(n, packed bytes) from an `encode_correct` value; ValueError when it is not one."""
    import base64
    head, _, body = str(value).partition(";")
    if not head.startswith("n:") or not head[2:].isdigit():
        raise ValueError(f"not a correctness tag: {str(value)[:40]!r}")
    n = int(head[2:])
    packed = base64.b64decode(body.encode("ascii"), validate=True)
    if len(packed) != (n + 7) // 8:
        raise ValueError(f"correctness tag holds {len(packed)} bytes for {n} images")
    return n, packed


# ---- trial statuses (TAG_STATUS; also a trial's reported `status` metric value) ----------------------
FINISHED, DIVERGED, FAILED, STOPPED = "finished", "diverged", "failed", "stopped"
INTERRUPTED, RUNNING, INCOMPLETE = "interrupted", "running", "incomplete"
ENDED = (FINISHED, DIVERGED)                  # the epoch that ended the training: nothing left to run
FINAL = (FINISHED, DIVERGED, FAILED, STOPPED)  # a trial's last status (STOPPED: ended early by ASHA)
# every status, in the order reports list them; INCOMPLETE is set by analysis.load for finished runs
# without the probes, INTERRUPTED when the sweep's driver stopped
STATUSES = (FINISHED, DIVERGED, FAILED, STOPPED, INTERRUPTED, RUNNING, INCOMPLETE)

# ---- a sweep's state, from its parent run -------------------------------------------------------------
# The driver writes TAG_HEARTBEAT on its parent every HEARTBEAT_EVERY_S while it runs. A parent still
# tagged running whose heartbeat is older than HEARTBEAT_STALE_S belongs to a driver that died without a
# word (SIGKILL, a lost node): `capsweep ls`, `status` and the report call that sweep interrupted.
# (Readers compare with their own clock: the cluster's machines keep NTP time.)
HEARTBEAT_EVERY_S, HEARTBEAT_STALE_S = 10.0, 60.0
SWEEP_STATES = (RUNNING, FINISHED, FAILED, INTERRUPTED)


def sweep_state(run_status: str, tags: dict, now: float) -> str:
    """running / finished / failed / interrupted of a sweep from its parent run's MLflow status and tags;
    `now` in unix seconds. A running sweep without a heartbeat (started by an earlier capsweep) stays
    running: nothing tells."""
    if run_status == "FAILED":
        return FAILED
    tag = tags.get(TAG_STATUS, RUNNING)
    state = tag if tag in SWEEP_STATES else RUNNING
    if state == RUNNING and heartbeat_age(tags, now) > HEARTBEAT_STALE_S:
        return INTERRUPTED
    return state


def heartbeat_age(tags: dict, now: float) -> float:
    """Seconds since the parent's last heartbeat (-inf without one)."""
    try:
        return now - float(tags[TAG_HEARTBEAT])
    except (KeyError, TypeError, ValueError):
        return float("-inf")


def resume_command(tags: dict, name: str) -> str:
    """How to continue a sweep: the command that started it (MLflow's mlflow.source.name tag) with
    --resume, or the generic form."""
    source = str(tags.get("mlflow.source.name", ""))
    words = [w for w in source.split() if w != "--resume"]
    if len(words) >= 3 and words[:2] == ["capsweep", "run"]:
        return " ".join(words + ["--resume"])
    return f"capsweep run <the spec of {name!r}> --resume"


# ---- run-config keys the cnn control does not read ----------------------------------------------------
# `model.arch: cnn` (capsmodels/networks.py CNN) has no routing, squash, capsule init, decoder or capsule
# remedies; a sweep's controls still carry the base config's values of these keys. Reports leave them out
# of a cnn configuration's label ("arch=cnn depth=1", not "... iterations=3"). tests/capsmodels/test_networks.py
# checks that changing any of them leaves a cnn's weights and outputs as they were.
CNN_UNUSED_KEYS = tuple(f"model.{k}" for k in (
    "routing", "iterations", "detach_inner", "bias", "squash", "init", "init_std", "init_scale", "init_target",
    "bias_init", "decoder", "recon_weight", "out_dim", "residual", "residual_dist", "pose_norm"))

# ---- trial roles (the sweep param ROLE_KEY; docs/PROBES.md, "Configurations and roles") -------------
ROLE_KEY = "trial.role"               # a param of every trial, not a run-config key
SEED_KEY = "train.seed"               # the run-config key a sweep sets from its `seeds` (never searched over)
CANDIDATE, REFERENCE, CONTROL = "candidate", "reference", "control"
ROLES = (CANDIDATE, REFERENCE, CONTROL)


def role_of(arch: str, depth: int | None) -> str:
    """How the verdict judges a trial: reference (depth 0), candidate (a CapsNet at depth >= 1 or of
    unknown depth) or control (any other arch). Not the ROLE_KEY param, which says who added the trial
    (the sweep's space: candidate; sweeps/extras.py: reference or control), so a depth-0 CapsNet of the
    space carries trial.role=candidate and is judged a reference."""
    if depth == 0:
        return REFERENCE
    return CANDIDATE if arch == "capsnet" else CONTROL


# ---- the sweep's settings, as params of its parent run (`sweep.*`) --------------------------------------
SWEEP_PARAM_PREFIX = "sweep."


def _words(value) -> list[str]:
    """A comma-joined param as its words ('' and None: none)."""
    return [w for w in str(value or "").split(",") if w]


def _whole(value) -> int | None:
    """A param holding a count, or None when it is absent or not a whole number."""
    text = str(value or "")
    return int(text) if text.isdigit() else None


@dataclass
class SweepParams:
    """The settings a sweep's parent run records as `sweep.*` params: written once by the runner when it
    creates the parent (`to_params`), read back by `capsweep ls/status`, the report, the verdict's `select`
    and `confirms`, `capsweep dashboard` and a resumed driver (`from_params`). Reading is lenient: a sweep
    from an older capsweep (or another tool) lacks some of them, and an absent one reads as empty."""
    search: str = ""                  # sweep.search: grid | random | optuna
    sampler: str = ""                 # sweep.sampler: optuna's sampler (absent for grid and random)
    metrics: list[str] = field(default_factory=list)   # sweep.metric, comma-joined (several: the objectives)
    modes: list[str] = field(default_factory=list)     # sweep.mode, one per metric
    num_samples: int | None = None    # sweep.num_samples
    seeds: list[int] = field(default_factory=list)     # sweep.seeds
    scheduler: str = ""               # sweep.scheduler: none | asha
    trials: int | None = None         # sweep.trials: every trial planned, references and controls included
    space: list[str] = field(default_factory=list)     # sweep.space: the keys that name a configuration
    counts: dict[str, int] = field(default_factory=dict)    # sweep.<role>s: the trials planned per role (ROLES)
    confirms: str = ""                # sweep.confirms: the exploration this sweep confirms
    select: list[str] = field(default_factory=list)    # sweep.select: swept keys the verdict tunes on validation

    def to_params(self) -> dict[str, str]:
        """The params as MLflow holds them (strings), in the order the runner logs them."""
        p = SWEEP_PARAM_PREFIX
        out = {f"{p}search": self.search, **({f"{p}sampler": self.sampler} if self.sampler else {}),
               f"{p}metric": ",".join(self.metrics), f"{p}mode": ",".join(self.modes),
               f"{p}num_samples": self.num_samples, f"{p}seeds": ",".join(map(str, self.seeds)),
               f"{p}scheduler": self.scheduler, f"{p}trials": self.trials, f"{p}space": ",".join(self.space),
               **{f"{p}{role}s": n for role, n in self.counts.items()}}
        if self.confirms:
            out[f"{p}confirms"] = self.confirms
        if self.select:
            out[f"{p}select"] = ",".join(self.select)
        return {k: str(v) for k, v in out.items()}

    @classmethod
    def from_params(cls, params: dict) -> "SweepParams":
        """The settings from a parent run's params (every key, or only the `sweep.*` ones)."""
        def get(name: str):
            return params.get(SWEEP_PARAM_PREFIX + name)
        return cls(search=str(get("search") or ""), sampler=str(get("sampler") or ""), metrics=_words(get("metric")),
                   modes=_words(get("mode")), num_samples=_whole(get("num_samples")),
                   seeds=[int(s) for s in _words(get("seeds")) if s.lstrip("-").isdigit()],
                   scheduler=str(get("scheduler") or ""),
                   trials=_whole(get("trials")), space=_words(get("space")),
                   counts={r: n for r in ROLES if (n := _whole(get(r + "s"))) is not None},
                   confirms=str(get("confirms") or ""), select=_words(get("select")))


# ---- the environment and the store -------------------------------------------------------------------
INJECT_FAILURE_ENV = "CAPSWEEP_INJECT_FAILURE"   # tests: "key=value" makes matching trials raise
GIT_COMMIT_ENV = "CAPSWEEP_GIT_COMMIT"           # set by `capsweep submit`: a shipped folder has no .git
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"         # MLflow's own convention, read when a spec names no store
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"     # MLflow's own default store, in the working folder
DEFAULT_EXPERIMENT = "capsweep"

# ---- secrets out of what capsweep prints and logs: the userinfo of URIs (`http://alice:S3cretPw@host`) ------
# A tracking URI may carry a user and password (MLflow accepts them in the URI, and so do database URIs),
# and capsweep prints URIs in its messages and records commands and specs in MLflow (the parent's
# `spec.yaml`, `mlflow.source.name`). Every such place passes the text through `redact`; what reaches the
# store and the screen is `http://***@host`.
MASK = "***"
# scheme://userinfo@ : userinfo stops at the first '@' (RFC 3986 forbids a raw '@' in it), and has no
# '/', whitespace or quote before it
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"<>]+)@")


def redact(text: str) -> str:
    """`text` with the userinfo of every URI in it replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(text))

# ---- metrics every trial reports (docs/PROBES.md) -----------------------------------------------------
# test_acc_transformed: only when data.test_transform != none; tree_recovery, tree_direction, tree_concentration
# (+ _null): only on `parts` (a truth)
SCALAR_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "test_acc_transformed",
                  "grad_ratio", "dead_frac_max", "starved_frac_max", "frozen_frac_max",
                  "images_per_s", "peak_mem_mb", "time_s")
# per capsule layer l = 0 .. depth+1, logged as `<name>/l<l>` (layer_metric)
LAYER_METRICS = ("grad_norm", "grad_rms", "act_grad", "starved_frac", "act_mean", "dead_frac", "frozen_frac",
                 "tree_score", "tree_score_null", "routing_dynamics", "routing_dynamics_null", "squash_gain",
                 "tree_recovery", "tree_direction", "tree_direction_null", "tree_concentration",
                 "tree_concentration_null")
EPOCH_METRIC = "epoch"                # step = epoch; the value equals the step
GRAD_PROBES = ("grad_norm", "act_grad")   # a capsweep trial logs one of these per layer


_LAYER_METRIC = re.compile(r"(?P<name>[a-z_]+)/l(?P<l>\d+)")


def layer_metric(name: str, layer: int | str) -> str:
    """The logged name of a per-layer metric: `act_grad/l3` (layer may be '' for a prefix). The one
    place the form is written: the probes write through it, every reader parses with parse_layer_metric."""
    return f"{name}/l{layer}"


def parse_layer_metric(key: str) -> tuple[str, int] | None:
    """(name, layer) of a per-layer metric's logged name (`act_grad/l3` -> ('act_grad', 3)); None for any
    other key (a scalar, a `best/` copy, a `log10_` companion)."""
    m = _LAYER_METRIC.fullmatch(str(key))
    return (m.group("name"), int(m.group("l"))) if m else None


# ---- stopping and the best-validation epoch (train.patience; docs/PROBES.md, "Stopping and the best
# epoch"). The verdict scores a trial at its best-validation epoch, so the trial logs that epoch's figures
# beside the per-epoch ones: MLflow's latest value of `best/<name>` is the best-val epoch's `<name>`.
TAG_STOP_REASON = "capsweep.stop_reason"   # on a trial's run: why its training ended, one of STOP_REASONS
STOP_PATIENCE = "patience"     # val_acc did not improve for train.patience epochs (status FINISHED)
STOP_EPOCHS = "epochs"         # the cap train.epochs was reached (status FINISHED)
STOP_DIVERGED = "diverged"     # a non-finite loss (status DIVERGED)
STOP_SCHEDULER = "scheduler"   # ended early by ASHA (status STOPPED): set by the driver, not the trial
STOP_REASONS = (STOP_PATIENCE, STOP_EPOCHS, STOP_DIVERGED, STOP_SCHEDULER)
REPORT_STOP_REASON = "stop_reason"   # the key of the reason in the report of the epoch that ended training
BEST_EPOCH = "best_epoch"      # metric, every epoch: the epoch of the best val_acc so far (absent: none yet)
BEST_MONITOR = "val_acc"       # what "best" means: the highest val_acc, the earliest epoch on a tie
BEST_PREFIX = "best/"          # best/<name>: <name> at the best-val epoch, logged at every improving epoch
# bookkeeping that gets no best/ copy: it says how the run went, not what the network is
BEST_EXCLUDED = ("epoch", "time_s", "images_per_s", "peak_mem_mb", BEST_EPOCH, "test_n")
TEST_N = "test_n"              # metric: the number of test images (the length of the correctness vector)
# the test split's per-image correctness at the best-val epoch (TAG_TEST_CORRECT, encode_correct above) is
# in every epoch's report under this key (the best so far); the driver tags the run with it at the end
REPORT_TEST_CORRECT = "test_correct"


def best_metric(name: str) -> str:
    """The logged name of `name` at the best-val epoch: `best/test_acc`, `best/act_grad/l1`."""
    return BEST_PREFIX + name


def correct_tags(text: str, limit: int = CORRECT_MAX_CHARS) -> dict[str, str]:
    """The run tags that hold encode_correct's `text`: {TAG_TEST_CORRECT: text} when it fits one tag
    (every test split capsweep knows), else `<TAG>.0`, `.1`, ... of at most `limit` characters each,
    joined in index order by `correct_from_tags`. MLflow 3 TRUNCATES a longer tag value with only a
    warning (MAX_TAG_VAL_LENGTH 8,000, MLFLOW_TRUNCATE_LONG_VALUES on by default), so never send one."""
    if len(text) <= limit:
        return {TAG_TEST_CORRECT: text}
    return {f"{TAG_TEST_CORRECT}.{i}": text[start:start + limit]
            for i, start in enumerate(range(0, len(text), limit))}


def correct_from_tags(tags: dict) -> str | None:
    """encode_correct's text back from a run's tags (either form of correct_tags); None when absent.
    A NaN/None value (a pandas column of runs without the tag) counts as absent."""
    whole = tags.get(TAG_TEST_CORRECT)
    if isinstance(whole, str) and whole:
        return whole
    parts = []
    while isinstance(tags.get(f"{TAG_TEST_CORRECT}.{len(parts)}"), str):
        parts.append(tags[f"{TAG_TEST_CORRECT}.{len(parts)}"])
    return "".join(parts) or None


# ---- the versions a sweep records (TAG_VERSION_PREFIX) and a report prints --------------------------------
VERSION_PACKAGES = ("capsweep", "torch", "ray", "mlflow", "optuna", "numpy", "pandas", "scipy")


def installed_versions(names: tuple = VERSION_PACKAGES) -> dict[str, str]:
    """{'python': ..., package: version or 'not installed'} from package metadata: nothing is imported
    (the analysis never imports torch)."""
    import sys
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out


# ---- log10 companions, for MLflow's charts --------------------------------------------------------
# act_grad lives near 1e-14 in a starved network: MLflow's default charts draw it on a linear axis with
# ticks "0 0 0". Where capsweep writes metrics to MLflow (sweeps/run_writer.py numeric_metrics: trials,
# `train --save`, `eval --log`) each of these also goes as `log10_<name>` (`log10_act_grad/l3`, so the
# UI groups them in a section of their own beside the raw one); a value <= 0 or not finite has none.
# The raw metric stays the data: the analysis reads it, never the companion.
LOG10_PREFIX = "log10_"
LOG10_LAYER_METRICS = ("act_grad", "grad_norm", "grad_rms")      # per layer: log10_<name>/l<l>
LOG10_SCALAR_METRICS = ("grad_ratio",)


def log10_name(name: str) -> str | None:
    """`log10_act_grad/l3` for `act_grad/l3` (a probe of tiny scale), else None."""
    base, _, layer = name.partition("/l")
    if (base in LOG10_LAYER_METRICS and layer.isdigit()) or (not layer and name in LOG10_SCALAR_METRICS):
        return LOG10_PREFIX + name
    return None
