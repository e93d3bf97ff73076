"""`capsweep train --save`: one MLflow run, opened before training and logged live, as a sweep's trial.

Why open it first: a store that cannot be written (a server that does not answer, a read-only
folder, a missing database driver) must cost one line before the training, not the training itself.
Why live: the run shows in the MLflow UI while it trains, each epoch as it ends, like a sweep's trials.
An epoch whose write fails (the server went away mid-training) is kept and sent with the next one;
at the end what is still unsent, the model and the run's end are written, or the command says in one
line what the run lacks. Each write is bounded (one retry, store_timeout_s()), so nothing hangs.
"""
from __future__ import annotations

import time

import torch

from capsmodels.errors import EXIT_FAILED, CapsweepError
from analysis.store import StoreInitError, mlflow_http_env, open_client, store_timeout_s
from sweeps.models import RUN_TRAIN, TAG_DEVICE_NAME, log_model


class TrainRunError(CapsweepError, RuntimeError):
    """The run could not be opened (bad input: exit 2) or finished (exit 1, given where it is raised). One line."""


class TrainRun:
    def __init__(self, tracking_uri: str, client, experiment_id: str, run_id: str):
        self.uri, self.client, self.experiment_id, self.run_id = tracking_uri, client, experiment_id, run_id
        self.pending: list[dict] = []        # epochs not yet in MLflow (a write failed)

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, cfg, splits, device: torch.device) -> "TrainRun":
        """Check the store and create the run with its params, tags and datasets. TrainRunError."""
        from mlflow.exceptions import MlflowException

        from capsmodels.contract import redact
        from capsmodels import config as runcfg
        from capsmodels.contract import TAG_COMMIT, TAG_ROLE, TAG_STATUS, RUNNING
        from sweeps.provenance import dataset_inputs, git_commit
        from sweeps.run_writer import DEVICE_PARAM, get_or_create_experiment, log_run, run_name
        from sweeps.sysmetrics import describe_device
        try:
            with mlflow_http_env(max_retries=1, timeout_s=store_timeout_s(), override=False):
                client = open_client(tracking_uri, create=True)      # checked: one line if it does not answer
                experiment_id = get_or_create_experiment(client, experiment)
                params = runcfg.flatten(runcfg.to_dict(cfg))
                params[DEVICE_PARAM], device_name = describe_device(device)
                tags = {TAG_ROLE: RUN_TRAIN, TAG_STATUS: RUNNING, TAG_DEVICE_NAME: device_name}
                if git_commit():
                    tags[TAG_COMMIT] = git_commit()
                data = {"train": splits.train.tensors, "val": splits.val.tensors, "test": splits.test.tensors}
                run_id = log_run(client, experiment_id, f"train-{run_name(params, ())}", params, [], tags,
                                 dataset_inputs(cfg.data.name, data))
        except StoreInitError as e:
            raise TrainRunError(str(e)) from None
        except (MlflowException, OSError) as e:
            raise TrainRunError(f"--tracking-uri: cannot write the MLflow store at {redact(tracking_uri)} "
                                f"({redact(' '.join(str(e).split())[:200])})") from None
        return cls(tracking_uri, client, experiment_id, run_id)

    def epoch(self, metrics: dict) -> None:
        """Log one epoch now (with any the store missed before); a failure keeps them for the next try."""
        self.pending.append(dict(metrics))
        try:
            self._flush()
        except Exception:  # noqa: BLE001 - training goes on; finish() says what could not be written
            pass

    def _flush(self) -> None:
        from mlflow.entities import Metric

        from capsmodels.contract import EPOCH_METRIC
        from sweeps.run_writer import MAX_BATCH, numeric_metrics
        with mlflow_http_env(max_retries=1, timeout_s=store_timeout_s(), override=False):
            while self.pending:
                m = self.pending[0]
                step, ts = int(m.get("epoch", 0)), int(time.time() * 1000)
                items = [Metric(k, v, ts, step) for k, v in numeric_metrics(m).items()]
                items.append(Metric(EPOCH_METRIC, float(step), ts, step))
                for i in range(0, len(items), MAX_BATCH):
                    self.client.log_batch(self.run_id, metrics=items[i:i + MAX_BATCH])
                self.pending.pop(0)

    def interrupt(self) -> None:
        """Ctrl-C: the run says so instead of staying RUNNING (best effort)."""
        from capsmodels.contract import INTERRUPTED, TAG_STATUS
        try:
            with mlflow_http_env(max_retries=0, timeout_s=5, override=False):
                self.client.set_tag(self.run_id, TAG_STATUS, INTERRUPTED)
                self.client.set_terminated(self.run_id, "KILLED")
        except Exception:  # noqa: BLE001 - the interrupt is what the user sees
            pass

    def finish(self, net: torch.nn.Module, config: dict, in_shape, final: dict) -> str:
        """The epochs still unsent, the model, how it ended (status, stop reason and the best epoch's test
        correctness, as a sweep's trial run: run_writer.end_tags), the run's end. Returns the model id."""
        from mlflow.entities import RunTag

        from capsmodels.contract import redact
        from capsmodels.contract import TAG_STATUS
        from sweeps.run_writer import end_tags
        status = str(final.get("status", ""))
        try:
            self._flush()
            with mlflow_http_env(max_retries=1, timeout_s=store_timeout_s(), override=False):
                model_id = log_model(self.client, self.uri, self.experiment_id, self.run_id, net, config, in_shape, {})
                tags = {TAG_STATUS: status, **end_tags(status, final)}
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                self.client.set_terminated(self.run_id, "FINISHED")
            return model_id
        except Exception as e:  # noqa: BLE001 - the store went away during training: one line
            lacks = f"{len(self.pending)} epoch(s), " if self.pending else ""
            raise TrainRunError(f"MLflow at {redact(self.uri)} failed at the end of training "
                                f"({redact(' '.join(str(e).split())[:160])}); run {self.run_id} lacks "
                                f"{lacks}the model and its end", exit_code=EXIT_FAILED) from None
