"""Run a validated sweep: preflight checks, then Ray Tune with MLflow logging; resume and Ctrl-C.

Order matters: every check that can refuse (tracking store reachable, the sweep name free or resumable,
no other driver on the storage folder, the datasets readable) happens before Ray starts or any MLflow
run is created, so a refused sweep leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock, Timeout
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from analysis.store import (StoreInitError, child_runs, init_store, mlflow_http_env, scoped_environ,
                            sqlite_path)
from capsmodels import config as runcfg
from capsmodels import datasets as datamod
from capsmodels.contract import (FINAL, INJECT_FAILURE_ENV, INTERRUPTED, ROLE_KEY, RUN_PARENT, RUNNING, TAG_COMMIT,
                                 TAG_CONFIRMS, TAG_HEARTBEAT, TAG_OPTUNA_JOURNAL, TAG_ROLE, TAG_RUN_NAME,
                                 TAG_STATUS, TAG_SWEEP, TAG_VERSION_PREFIX, SweepParams, installed_versions,
                                 redact)
from capsmodels.errors import CapsweepError
from sweeps import extras, models, search, storage, tracking, tune_guard
from sweeps.heartbeat import Heartbeat, beat_value
from sweeps.provenance import git_commit
from sweeps.spec import (OPTUNA_JOURNAL, SEED_KEY, SpecError, SweepSpec, journal_file, objectives, probe_values,
                         configs, searched_keys, storage_dir, to_yaml, total_trials, trial_counts)
from sweeps.trainable import run_trial

INJECT_ENV = (INJECT_FAILURE_ENV,)     # passed on to the trials' workers


class SweepRefused(CapsweepError, RuntimeError):
    """A sweep that must not start (name taken, nothing to resume, storage in use). One line."""


@dataclass
class SweepResult:
    name: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    storage: str                # a local folder or a URI (sweeps/storage.py)
    trials: int
    statuses: dict
    interrupted: bool


def load_datasets(spec: SweepSpec) -> dict:
    """Load every dataset a trial can ask for once in the driver; Ray's object store shares them."""
    data = configs(spec).base.data
    names = [data.name]
    entry = spec.space.get("data.name")
    if entry:
        names += list(next(iter(entry.values())))
    names += [configs(spec).of(p).data.name for p in spec.points]
    return {name: datamod.load_raw(name, data.root, data.download, data.sign_samples)
            for name in dict.fromkeys(names)}


def check_shapes(spec: SweepSpec, raws: dict) -> None:
    """Every trial's network must fit its input, checked before Ray starts. Grid and choice values
    of the model and data keys are combined; ranges contribute their two ends; then the added
    references and controls (sweeps/extras.py). A sweep of explicit points: each point."""
    import itertools
    from capsmodels import networks
    keys, options = [], []
    for key, entry in spec.space.items():
        if not key.startswith(("model.", "data.name")):
            continue
        keys.append(key)
        options.append(probe_values(*next(iter(entry.items()))))
    combos = itertools.islice(itertools.product(*options), 5000)
    added = extras.reference_points(spec) + extras.control_points(spec)
    own = spec.points or (dict(zip(keys, c)) for c in combos)
    for params in itertools.chain(own, added):
        cfg = configs(spec).of(params)
        try:
            networks.check_fits(cfg, raws[cfg.data.name].in_shape)
        except runcfg.ConfigError as e:
            where = ", ".join(f"{k}={v}" for k, v in params.items())
            raise SpecError(f"base.{e}" + (f" (trial with {where})" if where else "")) from None


class _TrialParams:
    """Picklable callables for the logger (Tune pickles callbacks into its experiment state)."""

    def __init__(self, spec: SweepSpec):
        self.configs = configs(spec)

    def resolved(self, config: dict) -> dict:
        """The trial's full nested run config: base <- sampled params <- schema defaults."""
        return runcfg.to_dict(self.configs.of(config))

    def params(self, config: dict) -> tuple[dict, int]:
        """Flattened params (MLflow), with `trial.role`, and seed of one trial."""
        resolved = self.resolved(config)
        return {**runcfg.flatten(resolved), ROLE_KEY: extras.role(config)}, int(resolved["train"]["seed"])

    def yaml(self, config: dict) -> str:
        import yaml
        return yaml.safe_dump(self.resolved(config), sort_keys=False)


def preflight(spec: SweepSpec, resume: bool) -> tuple[MlflowClient, str, Optional[Any], str]:
    """Checks that refuse a sweep before anything starts. Returns (client, experiment id, parent, exp dir).
    An existing SQLite store is created/migrated under its lock first (analysis/store.py)."""
    exp_dir = storage.join(storage_dir(spec), spec.name)
    check_writable(storage_dir(spec))
    uri = spec.mlflow.tracking_uri
    db = sqlite_path(uri)
    if db is not None and db.exists():
        _init_store(uri)
    if db is None:      # before any client: a missing database driver fails in its constructor
        tracking.check_reachable(uri)
    client = MlflowClient(uri) if db is None or db.exists() else None
    if db is not None and not os.access(
            db.parent if db.parent.exists() else Path.cwd(), os.W_OK):
        raise SweepRefused(f"mlflow.tracking_uri: cannot write {db}")
    exp = client.get_experiment_by_name(spec.mlflow.experiment) if client else None
    parent = tracking.find_parent(client, exp.experiment_id, spec.name) if exp else None
    client = client or _LazyClient(uri)
    has_state = _can_restore(exp_dir)
    if resume:
        if parent is None and not has_state:
            raise SweepRefused(f"--resume: no sweep named {spec.name!r} in experiment "
                               f"{spec.mlflow.experiment!r} nor Ray state in {exp_dir}; start it without --resume")
        if not has_state and _trial_runs(client, parent)[0]:
            raise SweepRefused(_NO_STATE.format(name=spec.name, exp_dir=exp_dir))
        # a parent and no Tune state, no trial that reported: the driver stopped at start-up, before Tune
        # ran; --resume starts the sweep from its spec under that parent (_run_sweep)
    else:
        if parent is not None:
            state = parent.info.status
            raise SweepRefused(
                f"name: a sweep named {spec.name!r} already exists in experiment {spec.mlflow.experiment!r} "
                f"(parent run {parent.info.run_id}, {state}); use --resume to continue it, or name=<new name>")
        if storage.listdir(exp_dir):
            raise SweepRefused(f"storage_path: {exp_dir} already holds a Ray experiment named {spec.name!r}; "
                               "use --resume to continue it, or name=<new name>")
    return client, (exp.experiment_id if exp else ""), parent, exp_dir


def check_writable(root: str) -> None:
    """storage_path must take files (a read-only mount, a full disk, no permission): one line before
    anything starts. A probe file is written and removed in the nearest folder that exists, so a
    refused sweep leaves no folder behind. Object stores (s3://, ...) are left to Ray Tune."""
    import errno
    import tempfile
    if storage.scheme(root) not in (None, "file"):
        return
    folder = Path(storage.local_dir(root))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:      # 1 MiB: an empty file fits on a full disk, a trial's state (tens of MB) does not
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".capsweep-write-check-") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
    except OSError as e:
        why = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the disk",
               errno.EACCES: "permission denied"}.get(e.errno, e.strerror or str(e))
        raise SweepRefused(f"storage_path: cannot write {root} ({why} at {folder})") from None


_NO_STATE = ("--resume: sweep {name!r} has trial runs in MLflow but no Ray Tune state in {exp_dir}; "
             "was it run with another storage_path?")


def _trial_runs(client, parent) -> tuple[list, list]:
    """(runs that logged an epoch, runs that did not) among the parent's trial runs."""
    if parent is None:
        return [], []
    runs = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    started = [r for r in runs if "epoch" in r.data.metrics]
    return started, [r for r in runs if "epoch" not in r.data.metrics]


def _mark_interrupted(client, parent_id: Optional[str]) -> None:
    """The driver stops before Tune took over (Ctrl-C, Ray did not start): the parent says so, so
    that `ls` and `--resume` see an interrupted sweep. Best effort: the store may be the problem."""
    if not parent_id:
        return
    try:
        with mlflow_http_env(max_retries=0, timeout_s=5, override=True):
            client.set_tag(parent_id, TAG_STATUS, INTERRUPTED)
            client.set_terminated(parent_id, "KILLED")
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


class StartupInterrupt:
    """Ctrl-C between the parent run and Tune's own SIGINT handling (Ray starting, the Tuner built).

    Python raises KeyboardInterrupt wherever the main thread is, and in some places (an at-fork
    handler of `logging` while Ray spawns its processes) the exception is only printed as "Exception
    ignored in ..." and the sweep goes on. So the handler also records the Ctrl-C, `check` raises it
    again before Tune starts, and KeyboardInterrupts that Python can only "ignore" are not printed."""

    def __init__(self):
        self.hit = False
        self._saved: Optional[tuple] = None

    def __enter__(self) -> "StartupInterrupt":
        import signal
        import sys
        import threading
        if threading.current_thread() is threading.main_thread():
            self._saved = (signal.getsignal(signal.SIGINT), sys.unraisablehook)
            signal.signal(signal.SIGINT, self._handler)
            hook = sys.unraisablehook
            sys.unraisablehook = lambda u: None if issubclass(u.exc_type, KeyboardInterrupt) else hook(u)
        return self

    def _handler(self, sig, frame):
        self.hit = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def release(self) -> None:
        """Before Tune's fit, which installs its own handler (and the logger chains onto it)."""
        if self._saved is not None:
            import signal
            import sys
            signal.signal(signal.SIGINT, self._saved[0])
            sys.unraisablehook = self._saved[1]
            self._saved = None

    def __exit__(self, *exc) -> None:
        self.release()


def check_trial_files(exp_dir: str) -> None:
    """--resume reads every unfinished trial's state and weights: refuse, in one line and before Ray
    starts, when one of them is not plain weights (a planted pickle payload), instead of failing its
    trial later. The trial and the driver load them with weights_only anyway (storage.load_torch)."""
    state_dir = storage.join(exp_dir, models.STATE_DIR)
    files = [storage.join(state_dir, n) for n in storage.listdir(state_dir) if n.endswith(".pt")]
    mdir = storage.join(exp_dir, models.MODELS_DIR)
    files += [storage.join(mdir, t, models.WEIGHTS_FILE) for t in storage.listdir(mdir)]
    for path in files:
        why = storage.unsafe_reason(path)
        if why:
            raise SweepRefused(f"--resume: {path} is not a plain weights file ({why}); refusing to unpickle it; "
                               + storage.TRUST_HINT)


def _init_store(uri: str) -> None:
    try:
        init_store(uri)
    except StoreInitError as e:
        raise SweepRefused(str(e)) from None


class _LazyClient:
    """An MlflowClient created on first use, after the store is created under its lock: a refused
    sweep must not create an empty mlflow.db."""

    def __init__(self, uri: str):
        self._uri, self._client = uri, None

    def __getattr__(self, name: str):
        if self._client is None:
            _init_store(self._uri)
            self._client = MlflowClient(self._uri)
        return getattr(self._client, name)


def _can_restore(exp_dir: str) -> bool:
    from ray.tune import Tuner
    try:
        return Tuner.can_restore(exp_dir)
    except Exception:  # noqa: BLE001 - a folder that is not an experiment, storage not reachable
        return False


def lock_dir(root: str) -> Path:
    """Where the driver's lock lives: the storage folder itself, or for a URI a local folder named
    after it (one driver per sweep on this machine; object stores have no locks)."""
    if storage.scheme(root) in (None, "file"):
        return storage.local_dir(root)
    return storage.local_dir(root).parent / ("locks-" + hashlib.sha1(root.encode()).hexdigest()[:12])


def acquire_lock(root: str, name: str) -> FileLock:
    """One driver per sweep and storage folder: a second one is refused instead of corrupting state."""
    where = lock_dir(root)
    where.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(where / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SweepRefused(f"sweep {name!r}: another driver is running it on {root} "
                           f"(lock {lock.lock_file}); wait for it or stop it first") from None
    return lock


def create_parent(client: MlflowClient, experiment_id: str, spec: SweepSpec) -> str:
    tags = {TAG_ROLE: RUN_PARENT, TAG_SWEEP: spec.name, TAG_STATUS: RUNNING, TAG_RUN_NAME: spec.name,
            TAG_HEARTBEAT: beat_value()}
    commit = git_commit()
    if commit:
        tags[TAG_COMMIT] = commit
    if spec.confirms:        # a confirmation names its exploration (`capsweep confirm`); reports show it
        tags[TAG_CONFIRMS] = spec.confirms
    # the driver's package versions at the start (the report's reproducibility block shows them)
    tags.update({TAG_VERSION_PREFIX + k: v for k, v in installed_versions().items()})
    if spec.search.algorithm == "optuna":     # where `capsweep dashboard` finds the study (sweeps/dashboard.py)
        tags[TAG_OPTUNA_JOURNAL] = str(journal_file(spec).resolve())
    run = client.create_run(experiment_id, tags=tags, run_name=spec.name)
    rid = run.info.run_id
    claim_name(client, experiment_id, spec, rid)
    client.log_batch(rid, params=[Param(k, v) for k, v in sweep_params(spec).to_params().items()])
    client.log_text(rid, redact(to_yaml(spec)), "spec.yaml")      # the URI's password is not the run's
    return rid


def sweep_params(spec: SweepSpec) -> SweepParams:
    """The settings the parent run records as `sweep.*` params (capsmodels.contract.SweepParams; the
    analysis reads them back: the objectives, the space, the trials planned, `select`, `confirms`)."""
    metrics, modes = objectives(spec)
    return SweepParams(search=spec.search.algorithm, sampler=spec.search.sampler or "", metrics=list(metrics),
                       modes=list(modes), num_samples=spec.num_samples, seeds=list(spec.seeds),
                       scheduler=spec.scheduler.name, trials=total_trials(spec), space=list(searched_keys(spec)),
                       counts=dict(trial_counts(spec)), confirms=spec.confirms or "", select=list(spec.select or []))


def discard_lock_folder(root: str, lock: FileLock) -> None:
    """A refused sweep leaves no storage folder: remove the lock file and the folder acquire_lock made,
    if nothing else is in it."""
    try:
        Path(lock.lock_file).unlink(missing_ok=True)
        folder = lock_dir(root)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass


def claim_name(client, experiment_id: str, spec: SweepSpec, run_id: str) -> None:
    """The sweep's name is its parent run: after creating ours, no other parent of that name may exist.

    Why after, not before: preflight's check and the creation are two calls, and two drivers (two
    folders sharing one store, where the storage lock does not reach) can both pass the check. MLflow has
    no unique key on run names, so the claim is create-then-look: a driver that sees another parent of
    its name after creating its own deletes its own and is refused. Two drivers that look after both
    created theirs are both refused (run again); whichever looked first, when only its own was there,
    keeps the name. Never two parents, whatever the timing; no clocks compared."""
    others = [r for r in client.search_runs(
        [experiment_id], f"tags.`{TAG_ROLE}` = '{RUN_PARENT}' and tags.`{TAG_SWEEP}` = '{spec.name}'",
        max_results=10) if r.info.run_id != run_id]
    if others:
        client.delete_run(run_id)
        raise SweepRefused(
            f"name: another driver started a sweep named {spec.name!r} in experiment {spec.mlflow.experiment!r} at "
            f"the same time (parent run {others[0].info.run_id}); this one stopped before starting anything; "
            "use --resume to continue that sweep once its driver is gone, or name=<new name>")


def init_ray(address: Optional[str], num_cpus: Optional[int]) -> bool:
    """Start (or connect to) Ray for the sweep; True when this call did, so the sweep shuts it down at
    its end. A Ray session the caller already opened (a notebook, a script running several sweeps, the
    tests) is used as it is and left running: `address` and `num_cpus` then do not apply."""
    import ray
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in INJECT_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenAuthNotice())
        _warn_if_local_ray_is_open()
        token = local_token_path()
        had_token = token is None or token.exists()
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True, configure_logging=True, logging_level="WARNING")
        if not had_token and token.exists():
            os.chmod(token, 0o600)       # Ray writes it with the umask's mode; the token is the key to this Ray
    return True


def local_token_path() -> Optional[Path]:
    """The file of the token that guards a local Ray (Ray 2.60: RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token; None when the token is given in RAY_AUTH_TOKEN itself)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _warn_if_local_ray_is_open() -> None:
    """The local Ray's processes (gcs_server, raylet, workers) listen on every interface of this machine:
    Ray 2.60 turns a 127.0.0.1 node address into the machine's own and binds its gRPC servers to all
    interfaces. What guards them is Ray's token authentication, on by default for a new local Ray; a user
    who turned it off (RAY_AUTH_MODE=disabled) is told what that leaves open."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        print(f"capsweep: warning: RAY_AUTH_MODE={mode}: the local Ray listens on all of this machine's network "
              "interfaces, and without its token anyone who reaches its ports can run code here (README, "
              "'Security'); unset RAY_AUTH_MODE to keep token authentication on", file=sys.stderr, flush=True)


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's warning that a new local Ray has token authentication on ("Set RAY_AUTH_MODE=disabled
    to opt out"): it warns about Ray's own safe default on every local sweep, and a newcomer reads it
    as a problem. The default is kept (the token is ~/.ray/auth_token, made on the first run); setting
    RAY_AUTH_MODE=token instead would silence it too, but only before Ray reads its config, which an
    imported `ray.tune` already did. Any other message of that logger (auth off, no token) still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _reporter(spec: SweepSpec):
    from ray.tune import CLIReporter
    metrics, _ = objectives(spec)
    cols = {"epoch": "epoch", "val_acc": "val_acc", "grad_ratio": "grad_ratio",
            "dead_frac_max": "dead_max"}
    for m in metrics:
        cols.setdefault(m, m.replace("/", "_"))
    params = {k: k.split(".")[-1] for k in searched_keys(spec)[:6]}
    params[SEED_KEY] = "seed"
    params[ROLE_KEY] = "role"
    return CLIReporter(metric_columns=cols, parameter_columns=params, max_report_frequency=15,
                       print_intermediate_tables=True)


def run_sweep(spec: SweepSpec, resume: bool = False, address: Optional[str] = None,
              num_cpus: Optional[int] = None, verbose: int = 1, keep_state: bool = False,
              trust: bool = False) -> SweepResult:
    """The whole sweep. Raises SpecError/SweepRefused/DataError/TrackingUnavailable before Ray starts.

    The environment is set for the sweep only, and the user's settings win: Tune's classic progress
    table (our columns), and MLflow calls that fail fast (1 retry, 20 s) instead of blocking Tune's
    event loop for minutes inside one call, since the logger buffers and retries itself."""
    import logging
    # MLflow logs every SQLite OperationalError (a full disk, a lock) with its traceback; the write
    # queue reports it in one line and retries, so the driver's stderr keeps to that line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # MLflow prints "View run ... at: <tracking URI>" at each run's end on a server store: a line per trial,
    # with the URI's password if it has one
    with scoped_environ({"RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"},
                        override=False), \
            mlflow_http_env(max_retries=1, timeout_s=20, override=False):
        return _run_sweep(spec, resume, address, num_cpus, verbose, keep_state, trust)


def _run_sweep(spec: SweepSpec, resume: bool, address: Optional[str], num_cpus: Optional[int],
               verbose: int, keep_state: bool = False, trust: bool = False) -> SweepResult:
    _USED.discard(spec.name)
    client, experiment_id, parent, exp_dir = preflight(spec, resume)
    if resume and not trust:
        check_trial_files(exp_dir)
    root = storage_dir(spec)
    raws = load_datasets(spec)           # DataError here: before Ray and before any MLflow run
    check_shapes(spec, raws)
    root_existed = storage.scheme(root) not in (None, "file") or storage.exists(root)
    lock = acquire_lock(root, spec.name)
    parent_id = None
    try:
        guard = tune_guard.TuneStateGuard(exp_dir)
        restore = resume and _restorable(spec, client, parent, exp_dir, guard, trust)
        if not restore:
            guard.reset()
        if not experiment_id:
            experiment_id = tracking.get_or_create_experiment(client, spec.mlflow.experiment)
        expected = total_trials(spec)
        with StartupInterrupt() as startup:
            if parent is None:
                parent_id = create_parent(client, experiment_id, spec)
            else:
                parent_id = parent.info.run_id
                # the size planned when the sweep started (Tune's restored search makes those trials, even
                # if this code or the overrides would plan another, e.g. a sweep from before references)
                expected = SweepParams.from_params(parent.data.params).trials or expected
                client.update_run(parent_id, status="RUNNING")
                client.set_tag(parent_id, TAG_STATUS, RUNNING)
            with Heartbeat(spec.mlflow.tracking_uri, parent_id):      # `ls` tells a dead driver
                own_ray = init_ray(address, num_cpus)
                startup.check()
                return _tune(spec, raws, client, experiment_id, parent_id, root, exp_dir, restore, verbose,
                             expected, keep_state, own_ray, trust, guard, startup)
    except KeyboardInterrupt:      # Ctrl-C before Tune took over (the parent being written, Ray starting)
        _mark_interrupted(client, parent_id or _parent_id(client, experiment_id, spec.name))
        raise
    except SweepRefused:                 # refused after the lock (the name, Tune's state): leave nothing
        lock.release()
        if not root_existed:
            discard_lock_folder(root, lock)
        raise
    except Exception:
        if parent_id and spec.name not in _USED:      # Tune never ran: nothing else closes the parent
            _mark_interrupted(client, parent_id)
        raise
    finally:
        lock.release()


def _parent_id(client, experiment_id: str, name: str) -> Optional[str]:
    try:
        found = tracking.find_parent(client, experiment_id, name) if experiment_id else None
    except Exception:  # noqa: BLE001 - best effort, as _mark_interrupted
        return None
    return found.info.run_id if found else None


def _restorable(spec: SweepSpec, client, parent, exp_dir: str, guard: tune_guard.TuneStateGuard,
                trust: bool) -> bool:
    """--resume: True to restore Tune's state (put back from the driver's private copy first,
    sweeps/tune_guard.py); False when Tune never ran a step of this sweep here (a driver that stopped
    at start-up: only a parent, or a tuner.pkl and no copy of a step), and the sweep starts from its
    spec under the same parent; its trial runs without an epoch (if any) are deleted, since their
    trials start again under new ids."""
    copied = guard.files()
    stepped = any(n.startswith("experiment_state-") for n in copied)
    if _can_restore(exp_dir) and (trust or stepped or not copied):
        try:
            guard.restore(trust)     # no copy at all (Tune state this machine never saw): refused
        except tune_guard.UntrustedState as e:
            raise SweepRefused(str(e)) from None
        return True
    started, empty = _trial_runs(client, parent)
    if started:
        raise SweepRefused(_NO_STATE.format(name=spec.name, exp_dir=exp_dir))
    for run in empty:
        client.delete_run(run.info.run_id)
    print(f"capsweep: sweep {spec.name!r} stopped before Ray Tune ran a step; starting it from its spec "
          "under the same parent run", flush=True)
    return False


_BOUND: dict[str, Any] = {}      # sweep name -> the MlflowSweepLogger of this driver
_USED: set[str] = set()          # sweeps whose BoundLogger reached this driver's logger


class BoundLogger(Callback):
    """The sweep's Tune callback as Tune saves it: only the sweep's name. Each hook goes to the
    MlflowSweepLogger this driver bound to that name (`bind`).

    Why: `Tuner.restore` (Ray 2.60) takes the callbacks from the run config it saved in `tuner.pkl`
    and has no public argument to replace them; reaching into `tuner._local_tuner` to swap them is
    Ray's private API. With this indirection the restored callback is this class again, and it logs
    through the logger the resuming driver created (and whose statuses it reads after `fit`)."""

    def __init__(self, sweep: str):
        self.sweep = sweep

    def _target(self):
        _USED.add(self.sweep)
        return _BOUND[self.sweep]


def _delegate(name: str):
    def hook(self, *args, **kwargs):
        return getattr(self._target(), name)(*args, **kwargs)
    hook.__name__ = hook.__qualname__ = name
    return hook


for _hook in ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore", "on_trial_save",
              "on_trial_result", "on_trial_complete", "on_trial_recover", "on_trial_error", "on_checkpoint",
              "on_experiment_end", "get_state", "set_state"):
    setattr(BoundLogger, _hook, _delegate(_hook))


def bind(logger: Any, sweep: str) -> BoundLogger:
    """Register `logger` as the target of the sweep's callback and return the callback."""
    _BOUND[sweep] = logger
    _USED.discard(sweep)
    return BoundLogger(sweep)


def sweep_logger(spec: SweepSpec, experiment_id: str, parent_id: str, exp_dir: str, expected: int,
                 keep_state: bool = False, trust: bool = False) -> tracking.MlflowSweepLogger:
    """The sweep's MLflow logger (sweeps/tracking.py), the one way this driver makes it: at the start,
    and again after `fit` when Tune restored an older sweep's own pickled logger (it reads what MLflow
    has of the sweep when it is made). Its write spool lives in the experiment's local folder."""
    tp = _TrialParams(spec)
    return tracking.MlflowSweepLogger(spec.mlflow.tracking_uri, experiment_id, parent_id, spec.name,
                                      storage.local_dir(exp_dir), tp.params, tp.yaml, expected_trials=expected,
                                      storage_root=exp_dir, keep_state=keep_state, trust=trust)


def _tune(spec, raws, client, experiment_id, parent_id, root: str, exp_dir: str, resume, verbose,
          expected: int, keep_state: bool = False, own_ray: bool = True,
          trust: bool = False, guard: Optional[tune_guard.TuneStateGuard] = None,
          startup: Optional[StartupInterrupt] = None) -> SweepResult:
    import ray
    from ray import tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=spec.base, raws=raws, cpus=spec.resources.cpu,
                             state_dir=storage.join(exp_dir, models.STATE_DIR), trust=trust),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    local = storage.local_dir(exp_dir)     # the MLflow write spool, Optuna's journal
    local.mkdir(parents=True, exist_ok=True)
    logger = sweep_logger(spec, experiment_id, parent_id, exp_dir, expected, keep_state, trust)
    callback = bind(logger, spec.name)
    if resume:
        # the saved run config (callbacks: a BoundLogger for this sweep, progress reporter) is reused;
        # the searcher, its Optuna study included (the journal), comes back from the experiment state
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=False)
    else:
        param_space, search_alg, scheduler, num_samples = search.build(spec, journal=local / OPTUNA_JOURNAL)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                        reuse_actors=spec.reuse_actors),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=root, callbacks=[callback],
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                progress_reporter=_reporter(spec), verbose=verbose),
        )
    if guard is not None:
        guard.capture_tuner()         # tuner.pkl as this process wrote it
        logger.guard = guard          # the rest of Tune's state after each step
    if startup is not None:
        startup.check()
        startup.release()
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    if guard is not None:
        guard.update(None)            # the state Tune saved as fit ended
    if spec.name not in _USED:
        # a sweep started before BoundLogger existed restores its own pickled MlflowSweepLogger: that
        # one wrote to MLflow, so read the trials' statuses back from there
        logger = sweep_logger(spec, experiment_id, parent_id, exp_dir, expected, keep_state, trust)
    statuses = dict(logger.statuses)
    done = all(s in FINAL for s in statuses.values())
    if len(statuses) < expected or not done:
        interrupted = True
    if interrupted:
        logger.close([], interrupted=True)
    else:
        _log_best(client, parent_id, spec)
    if own_ray:
        ray.shutdown()
    return SweepResult(spec.name, spec.mlflow.experiment, experiment_id, parent_id, spec.mlflow.tracking_uri,
                       root, len(statuses), statuses, interrupted)


def _log_best(client, parent_id: str, spec: SweepSpec) -> None:
    """The best configuration (one objective) or the Pareto set (several) on the parent run:
    `best.json`, tags `capsweep.best.*` and metrics `best.<metric>` (sweeps/best.py)."""
    from sweeps import best as sweep_best
    metrics, modes = objectives(spec)
    try:
        best = sweep_best.log_best(client, parent_id, searched_keys(spec), metrics, modes)
    except Exception as e:  # noqa: BLE001 - the sweep is done; a failed summary must not hide that
        print(f"capsweep: warning: the best configuration was not logged: {' '.join(str(e).split())[:200]}")
        return
    if best:
        print(f"capsweep: best configuration{'s' if len(best) > 1 else ''} logged to the parent run (best.json)")
