"""`capsweep eval RUN_ID_OR_MODEL_URI [key=value ...]`: re-examine a trained model without training.

Loads a logged model (sweeps/models.py) and the config it was trained with, applies the overrides
(`data.name=...`, `data.test_transform=affine`, `data.test_size=...`, any run-config key), rebuilds
the splits as training did (same seed, so the same test split) and measures what the training loop
measures after an epoch: val/test loss and accuracy with `capsmodels.train.evaluate`, the probes
of the fixed evaluation batch with `capsmodels.probes.evaluation_probes` (docs/PROBES.md), and with a
`data.test_transform` other than `none` the accuracy on the transformed test images
(`test_acc_transformed`, capsmodels/transforms.py). Gradient norms of training steps
(`grad_norm/l*`, `grad_rms/l*`) need training and are not measured here.

Which overrides: the data it is measured on (`data.*`) and how it is measured (EVAL_KEYS). The rest is
the model as it was trained and logged, and is refused in one line (exit 2) before the store is read:
`model.*` would describe another architecture than the weights (`capsweep eval RUN model.depth=3` used
to run on the logged depth-1 network and print its numbers as if the override had acted), `train.*`
acts only while training, and `train.seed` chose the validation split and the probe batch (another
seed mixes training images into them).

The logged model is the run's best-validation epoch's (capsmodels.train), so on the same data the
figures equal that epoch's, the run's `best/<name>` metrics, exactly (CPU; a test checks test_acc).
With `--log` they go to a new MLflow run tagged `capsweep.eval_of=<source run id>`, whose input is
the evaluated model.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from capsmodels import config as runcfg
from capsmodels.contract import SEED_KEY
from capsmodels.errors import CapsweepError

TAG_EVAL_OF = "capsweep.eval_of"
RUN_EVAL = "eval"                     # capsweep.role of an eval run


# run-config keys an evaluation may set besides data.*: how it measures, not what was trained
EVAL_KEYS = ("train.eval_batch", "train.device", "train.threads", "train.dead_tau", "model.recon_weight")
ALLOWED_TEXT = "data.*, " + ", ".join(EVAL_KEYS)


def refused_override(overrides: list[str]) -> Optional[str]:
    """The one-line refusal of the first override eval cannot honour (module docstring), or None."""
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key.startswith("data.") or key in EVAL_KEYS:
            continue
        if key == SEED_KEY:
            why = ("the seed chose the validation split and the probe batch of the logged model; another seed "
                   "mixes its training images into them")
        elif key.startswith("model."):
            why = "eval measures the logged model as it was trained; this would change its architecture"
        else:
            why = "it only acts while training, and eval does not train"
        return f"{key}: not an eval override: {why} (allowed: {ALLOWED_TEXT}; train a new model with capsweep train)"
    return None


def eval_config(config: dict, overrides: list[str]) -> runcfg.RunConfig:
    """The model's config with the overrides on top, validated (ConfigError names a bad key/value)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return runcfg.load(path, overrides)


def measure(net, cfg: runcfg.RunConfig) -> dict[str, float]:
    """The figures of module docstring for network `net` on the data of `cfg`."""
    import torch

    from capsmodels import probes, train, transforms
    from capsmodels.datasets import load_raw
    from capsmodels.splits import make_splits
    device = train.resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    raw = load_raw(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.sign_samples)
    splits = make_splits(raw, cfg.data, cfg.train.seed)
    net = net.to(device).eval()
    _check_fits(net, splits, device)
    recon_w = cfg.model.recon_weight if cfg.model.decoder else 0.0
    out: dict[str, float] = {}
    out["val_loss"], out["val_acc"] = train.evaluate(net, splits.val, device, recon_w)
    out["test_loss"], out["test_acc"] = train.evaluate(net, splits.test, device, recon_w)
    if cfg.data.test_transform != "none":
        x, y = splits.test.tensors
        warped = torch.utils.data.TensorDataset(transforms.transform_test(x, cfg.data), y)
        _, out["test_acc_transformed"] = train.evaluate(net, warped, device, recon_w)
    if all(math.isfinite(out[k]) for k in ("val_loss", "test_loss")):
        x_eval, y_eval = (v.to(device) for v in train.fixed_batch(splits.val, cfg.train.eval_batch, cfg.train.seed))
        out.update(probes.evaluation_probes(net, x_eval, y_eval, cfg.train.dead_tau, recon_w))
    return out


def _check_fits(net, splits, device) -> None:
    """A dataset override whose images or classes the network cannot take: one line, not a traceback."""
    import torch
    x = splits.test.tensors[0][:1].to(device)
    try:
        with torch.no_grad():
            k = net(x).scores.shape[-1]
    except RuntimeError:
        raise runcfg.ConfigError(f"data.name: {splits.name!r} gives inputs of shape {tuple(splits.in_shape)}, "
                                 "which this model cannot take; evaluate it on data shaped like its "
                                 "training data") from None
    if k != splits.num_classes:
        raise runcfg.ConfigError(f"data.name: {splits.name!r} has {splits.num_classes} classes and the "
                                 f"model {k}; evaluate it on data with {k} classes")


def log_eval(client, experiment_id: str, source_run_id: Optional[str], model_uri: str,
             cfg: runcfg.RunConfig, metrics: dict, overrides: list[str]) -> str:
    """The figures as a new run tagged as an eval of the source run, with the model as its input."""
    from mlflow.entities import LoggedModelInput

    from capsmodels.contract import TAG_ROLE
    from sweeps.run_writer import log_run
    name = "eval"
    if source_run_id:
        name = f"eval-{client.get_run(source_run_id).info.run_name}"
    tags = {TAG_ROLE: RUN_EVAL, TAG_EVAL_OF: source_run_id or "", "capsweep.model_uri": model_uri,
            "capsweep.eval_overrides": " ".join(overrides)}
    run_id = log_run(client, experiment_id, name, runcfg.flatten(runcfg.to_dict(cfg)), [metrics], tags)
    if model_uri.startswith("models:/") and "/" not in model_uri[len("models:/"):]:
        client.log_inputs(run_id, models=[LoggedModelInput(model_uri[len("models:/"):])])
    client.set_terminated(run_id, "FINISHED")
    return run_id


class EvalError(CapsweepError, ValueError):
    """Bad input to `capsweep eval` (a key, a store, a model that is not there): one line, exit 2."""


def cmd_eval(args) -> int:
    """Body of `capsweep eval` (sweeps/cli.py): 0 done; EvalError (bad input, one line) otherwise."""
    from sweeps import models
    try:
        runcfg.load(None, args.overrides)          # a bad key or value: one line before MLflow work
    except runcfg.ConfigError as e:
        raise EvalError(str(e)) from None
    refused = refused_override(args.overrides)     # the model's own keys: also before MLflow work
    if refused:
        raise EvalError(refused)
    from capsmodels.progress import Status
    from analysis.store import StoreInitError, open_client
    with Status("capsweep eval") as status:     # a status line on a terminal: this takes seconds; erased on leaving
        status("opening the store")
        try:
            client = open_client(args.tracking_uri)     # checked: a server that does not answer is one line
        except StoreInitError as e:
            raise EvalError(str(e)) from None
        if client is None:
            raise EvalError(f"--tracking-uri: no MLflow store at {args.tracking_uri}")
        try:
            status(f"loading the model {args.model}")
            model_uri, source = models.resolve(client, args.model)
            net, config = models.load(args.tracking_uri, model_uri, trust=getattr(args, "trust", False))
            cfg = eval_config(config, args.overrides)
            status(f"measuring it on {cfg.data.name}")
            metrics = measure(net.net, cfg)
        except (models.ModelNotFound, models.UnsafeModel, runcfg.ConfigError) as e:
            raise EvalError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - data errors (DataError) are bad input too
            from capsmodels.store import DataError
            if isinstance(e, DataError):
                raise EvalError(str(e)) from None
            raise
    print(f"capsweep eval: {model_uri}" + (f" (run {source})" if source else "") + f" on {cfg.data.name}"
          + (f", test_transform {cfg.data.test_transform}" if cfg.data.test_transform != "none" else ""))
    for k in sorted(metrics):
        print(f"  {k:28s} {metrics[k]:.6g}")
    if args.log:
        from sweeps.run_writer import get_or_create_experiment
        exp_id = client.get_run(source).info.experiment_id if source else \
            get_or_create_experiment(client, args.experiment)
        run_id = log_eval(client, exp_id, source, model_uri, cfg, metrics, args.overrides)
        print(f"  logged as run {run_id}")
    return 0
