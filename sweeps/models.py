"""Trained models: the files a trial leaves, how the driver logs them as MLflow models, how they load.

Where they live. A trial writes, on the sweep's storage (sweeps/storage.py: a folder every node sees,
or an object store):

  <storage>/<name>/trial_models/<trial id>/config.yaml   the resolved trial config   (trial start)
                                          /trial.json    device used, its name, input shape, classes,
                                                         the datasets' lineage        (trial start)
                                          /model.pt      the final weights            (training ended)
                                          /final.json    the final metrics            (training ended)
  <storage>/<name>/trial_state/<trial id>.pt             the per-epoch state (sweeps/trainable.py)

and when the trial ends the sweep driver (the one MLflow writer: a `Model` record of
sweeps/write_queue.py) logs the weights as the child run's MLflow model, then deletes model.pt and the
state file (kept with `capsweep run --keep-state`). The weights are the best-validation epoch's
(capsmodels.train keeps them); a trial stopped early by ASHA writes no model.pt, and its model is its
last state's `best_model`. config.yaml, trial.json and final.json
stay (a few KB): final.json tells a trial that Tune restores after a driver crash that it is done.

The MLflow model (MLflow 3 "logged model", `models:/<model id>`, listed on the run's Models tab) is
weights plus config, never a pickle of code: `weights.pt` (torch.save of the network's state_dict, a
plain dict of tensors, read back with `weights_only=True`), `config.yaml` (the resolved trial config)
and `MLmodel` with the `capsweep` flavour (input shape, classes) and the signature (images float32
(N, C, H, W) in [0, 1] -> class scores (N, K)). `load` rebuilds the network with capsmodels' own
builder and loads the weights into it, so nothing read from a store is unpickled and a planted
payload runs nothing (README, "Security"). The model also carries a `python_function` flavour whose
loader is this module: `mlflow.pyfunc.load_model("models:/<id>")` serves scores through the same safe
path. Models logged by capsweep before this format (`mlflow.pytorch`, pickle serialization) are
refused with one line unless the user passes `--trust`. The config's flattened keys are the logged
model's params.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from capsmodels.errors import CapsweepError
from sweeps import storage

MODELS_DIR = "trial_models"
STATE_DIR = "trial_state"         # <storage>/<name>/trial_state/<trial id>.pt: each trial's last epoch
MODEL_NAME = "model"
CONFIG_FILE, INFO_FILE, WEIGHTS_FILE, FINAL_FILE = "config.yaml", "trial.json", "model.pt", "final.json"
FLAVOR = "capsweep"                  # the MLflow model's own flavour: weights + config (see the docstring)
MODEL_WEIGHTS = "weights.pt"         # in the MLflow model's folder, beside MODEL_CONFIG and MLmodel
MODEL_CONFIG = "config.yaml"
MODEL_FORMAT = "state_dict+config/1"
TAG_MODEL_ID = "capsweep.model_id"   # on the run: the logged model's id (`capsweep eval RUN_ID` finds it)
TAG_DEVICE_NAME = "capsweep.device_name"   # on the run: the hardware it trained on (the GPU's name)


class ModelNotFound(CapsweepError, LookupError):
    """No run or logged model answers to what `capsweep eval` was given. One line."""


class UnsafeModel(CapsweepError, ValueError):
    """A logged model that only a full unpickler can load (MLflow's pickle format, or weights that name
    code): refused in one line unless the user passes --trust."""


class ScoresNet(torch.nn.Module):
    """What the MLflow model serves: x (N, C, H, W) -> the network's class scores (N, K). `net` is
    the capsmodels network itself (for the probes)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).scores


# ---- the trial's side -----------------------------------------------------------------------------
def trial_paths(state_dir: str, trial_id: str) -> tuple[str, str]:
    """(state file, model folder) of a trial, from the sweep's trial_state folder."""
    root = state_dir.rstrip("/").rsplit("/", 1)[0] if storage.is_uri(state_dir) else os.path.dirname(state_dir)
    return storage.join(state_dir, f"{trial_id}.pt"), storage.join(root, MODELS_DIR, trial_id)


def write_start(model_dir: str, config_yaml: str, info: dict) -> None:
    storage.write_bytes(storage.join(model_dir, CONFIG_FILE), config_yaml.encode())
    storage.write_bytes(storage.join(model_dir, INFO_FILE), json.dumps(info).encode())


def write_final(model_dir: str, net: torch.nn.Module, metrics: dict) -> None:
    """The weights first, then final.json: final.json means "the model file is whole"."""
    storage.save_torch(storage.join(model_dir, WEIGHTS_FILE),
                       {k: v.detach().cpu() for k, v in net.state_dict().items()})
    storage.write_bytes(storage.join(model_dir, FINAL_FILE), json.dumps(metrics).encode())


def read_json(model_dir: str, name: str) -> Optional[dict]:
    data = storage.read_bytes(storage.join(model_dir, name))
    return json.loads(data) if data else None


# ---- the driver's side ----------------------------------------------------------------------------
def build_net(config: dict, in_shape, num_classes: int, weights: dict) -> torch.nn.Module:
    from capsmodels import config as runcfg
    from capsmodels import networks
    net = networks.build(runcfg.from_dict(config), tuple(in_shape), int(num_classes))
    net.load_state_dict(weights)
    return net.eval()


def log_trial_model(client, tracking_uri: str, experiment_id: str, run_id: str, model_dir: str,
                    state_path: str, tags: dict, trust: bool = False) -> Optional[str]:
    """Log the trial's final model to its run, once; returns the model id (None: nothing to log, the
    trial never got to train). The weights: model.pt, else the last epoch's state, both read with
    weights_only (storage.UnsafeFile for a file that names code, unless `trust`)."""
    done = logged_model(client, experiment_id, run_id)
    if done is not None:
        return done
    text = storage.read_bytes(storage.join(model_dir, CONFIG_FILE))
    info = read_json(model_dir, INFO_FILE)
    weights = storage.load_torch(storage.join(model_dir, WEIGHTS_FILE), trust=trust)
    if weights is None:      # no model.pt (stopped by ASHA, or ended before writing it): the best epoch's
        state = storage.load_torch(state_path, trust=trust)
        weights = (state.get("best_model") or state["model"]) if state else None
    if text is None or info is None or weights is None:
        return None
    import yaml
    config = yaml.safe_load(text)
    net = build_net(config, info["in_shape"], info["num_classes"], weights)
    return log_model(client, tracking_uri, experiment_id, run_id, net, config, info["in_shape"], tags)


def cleanup(model_dir: str, state_path: str) -> None:
    """After the model is in MLflow: the weights and the per-epoch state go (the small files stay)."""
    storage.remove(storage.join(model_dir, WEIGHTS_FILE))
    storage.remove(state_path)


def logged_model(client, experiment_id: str, run_id: str) -> Optional[str]:
    """The id of the run's READY logged model; a half-logged one (a crash mid-upload) is deleted, so
    that the retry leaves exactly one."""
    ready = None
    for m in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if str(m.status) == "READY" and ready is None:
            ready = m.model_id
        elif str(m.status) != "READY":
            client.delete_logged_model(m.model_id)
    return ready


def log_model(client, tracking_uri: str, experiment_id: str, run_id: str, net: torch.nn.Module,
              config: dict, in_shape, tags: dict) -> str:
    """`net` (on the CPU) as the run's MLflow model: its weights, config and signature (module
    docstring); returns its id. Written with the client alone (create, link to the run as its output,
    upload, finalise), so no global tracking URI is touched and nothing is pickled."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import yaml
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, infer_signature
    from mlflow.pyfunc import add_to_model

    from capsmodels import config as runcfg
    served = ScoresNet(net.cpu().eval())
    shape = [int(v) for v in in_shape]
    x = np.zeros((1, *shape), dtype=np.float32)
    with torch.no_grad():
        scores = served(torch.from_numpy(x)).numpy()
    signature = infer_signature(x, scores)
    params = {k: str(v) for k, v in runcfg.flatten(config).items() if v is not None}
    model = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                       params=params, tags=tags)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, MODEL_NAME)
        path.mkdir()
        weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        storage.save_torch(str(path / MODEL_WEIGHTS), weights)
        (path / MODEL_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        (path / "requirements.txt").write_text(f"torch>={torch.__version__.split('+')[0]}\n")
        mlmodel = Model(artifact_path=model.artifact_location, run_id=run_id, model_uuid=model.model_id,
                        model_id=model.model_id, signature=signature)
        mlmodel.add_flavor(FLAVOR, format=MODEL_FORMAT, weights=MODEL_WEIGHTS, config=MODEL_CONFIG,
                           in_shape=shape, num_classes=int(scores.shape[-1]),
                           torch_version=torch.__version__.split("+")[0])
        add_to_model(mlmodel, loader_module=__name__)
        mlmodel.save(str(path / "MLmodel"))
        client.log_model_artifacts(model.model_id, str(path))
    client.finalize_logged_model(model.model_id, "READY")
    client.set_tag(run_id, TAG_MODEL_ID, model.model_id)
    return model.model_id


# ---- one run outside a sweep (capsweep train --save: sweeps/train_run.py; capsweep eval --log) -------------
RUN_TRAIN = "train"                  # capsweep.role of a `capsweep train --save` run


# ---- loading (capsweep eval) ----------------------------------------------------------------------
def resolve(client, ref: str) -> tuple[str, Optional[str]]:
    """(model URI, source run id) of a run id, `runs:/<id>`, `models:/<model id>` or a registered
    `models:/<name>/<version>`. Raises ModelNotFound in one line."""
    from mlflow.exceptions import MlflowException
    if ref.startswith("models:/"):
        rest = ref[len("models:/"):]
        if "/" in rest:                            # a registered model version: MLflow resolves it
            return ref, None
        try:
            return ref, client.get_logged_model(rest).source_run_id
        except MlflowException:
            raise ModelNotFound(f"model: no logged model {rest!r} in this store") from None
    run_id = ref[len("runs:/"):].split("/")[0] if ref.startswith("runs:/") else ref
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelNotFound(f"run: no run {run_id!r} in this store; give a run id or models:/<model id>") from None
    model_id = run.data.tags.get(TAG_MODEL_ID) or logged_model(client, run.info.experiment_id, run_id)
    if not model_id:
        raise ModelNotFound(f"run: run {run_id!r} has no logged model (a trial that never trained, or a "
                            "sweep from before models were logged)")
    return f"models:/{model_id}", run_id


def load(tracking_uri: str, model_uri: str, trust: bool = False) -> tuple[ScoresNet, dict]:
    """(the served module, with `.net` the network; its resolved config) of a logged model
    (`models:/<model id>` or a registered `models:/<name>/<version>`), rebuilt from its weights and
    config (load_dir). The model's folder is found through this store's client (no global tracking
    URI) and downloaded as files: nothing is unpickled on the way."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from analysis.store import scoped_environ
    client = MlflowClient(tracking_uri)
    rest = model_uri[len("models:/"):] if model_uri.startswith("models:/") else model_uri
    try:
        if "/" in rest:
            name, version = rest.split("/", 1)
            location = client.get_model_version_download_uri(name, version)
        else:
            location = client.get_logged_model(rest).artifact_location
    except MlflowException:
        raise ModelNotFound(f"model: no model {model_uri!r} in this store") from None
    with scoped_environ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking_uri)
    return load_dir(local, model_uri, trust)


def load_dir(local: str, name: str = "", trust: bool = False) -> tuple[ScoresNet, dict]:
    """A downloaded MLflow model folder -> (ScoresNet, config). The `capsweep` flavour: capsmodels'
    builder, then the weights (weights_only). MLflow's pickle format (`pytorch` flavour, models of
    earlier capsweep versions): UnsafeModel unless `trust`, then mlflow.pytorch's own loader."""
    from pathlib import Path

    import yaml
    name = name or local
    mlmodel_path = Path(local, "MLmodel")
    if not mlmodel_path.is_file():
        raise ModelNotFound(f"model: {name} is not an MLflow model (no MLmodel file)")
    flavors = (yaml.safe_load(mlmodel_path.read_text()) or {}).get("flavors") or {}
    if FLAVOR in flavors:
        spec = flavors[FLAVOR]
        config = yaml.safe_load(Path(local, str(spec.get("config", MODEL_CONFIG))).read_text())
        try:
            weights = storage.load_torch(str(Path(local, str(spec.get("weights", MODEL_WEIGHTS)))), trust=trust)
        except storage.UnsafeFile as e:
            raise UnsafeModel(f"model: {name}: {str(e).split(': ', 1)[-1]}") from None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise UnsafeModel(f"model: {name}: its weights file is not a dict of tensors")
        net = build_net(config, spec["in_shape"], spec["num_classes"], weights)
        return ScoresNet(net), config
    if "pytorch" in flavors:
        if not trust:
            raise UnsafeModel(f"model: {name} is in MLflow's pickle format (a model logged before capsweep "
                              "logged weights and config), which runs code from the store when loaded; "
                              + storage.TRUST_HINT.replace("delete it, or ", ""))
        import mlflow.pytorch
        served = mlflow.pytorch.load_model(local, map_location="cpu", weights_only=False)
        config = yaml.safe_load(Path(local, "extra_files", CONFIG_FILE).read_text())
        return served, config
    raise ModelNotFound(f"model: {name} is not a capsweep model (flavours: {', '.join(flavors) or 'none'})")


# ---- mlflow.pyfunc (MLmodel names this module as the python_function loader) -------------------------
class _PyfuncScores:
    """`mlflow.pyfunc.load_model(...).predict(images)` -> class scores, as numpy."""

    def __init__(self, served: ScoresNet):
        self.served = served.eval()

    def predict(self, model_input, params=None):
        import numpy as np
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.served(x).numpy()


def _load_pyfunc(path: str, model_config=None) -> _PyfuncScores:
    """MLflow's pyfunc entry point: the same safe path as `capsweep eval` (never trusted)."""
    import os.path
    root = path if os.path.isfile(os.path.join(path, "MLmodel")) else os.path.dirname(path)
    return _PyfuncScores(load_dir(root)[0])
