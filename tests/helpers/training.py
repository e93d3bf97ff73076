"""Training inputs shared by the capsmodels tests: the digits data, a tiny config, metrics without the volatile ones, and the patience rule's independent reference."""
from __future__ import annotations

from capsmodels.datasets import load_raw

VOLATILE = ("images_per_s", "peak_mem_mb", "time_s")


RAW = load_raw("digits")


def cfg(**model):
    m = {"preset": "tiny", "conv_channels": [8], "conv_kernel": 3, "primary_channels": 4, "primary_dim": 4,
         "primary_kernel": 3, "primary_stride": 2, "num_caps": 6, "caps_dim": 4, "out_dim": 6, "depth": 1,
         "init": "fan"}
    m.update(model)
    return {"model": m, "data": {"name": "digits", "train_size": 200, "val_size": 60, "test_size": 100,
                                 "augment": True},
            "train": {"epochs": 2, "batch_size": 32, "eval_batch": 40, "threads": 1, "seed": 7}}


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


def reference_stop(val: list[float], patience: int, epochs: int) -> tuple[int, int, str]:
    """(last epoch, best epoch, reason): Keras' EarlyStopping rule written out on its own."""
    best, best_epoch, wait = -1.0, -1, 0
    for e, v in enumerate(val[:epochs]):
        if v > best:
            best, best_epoch, wait = v, e, 0
        else:
            wait += 1
        if patience and wait >= patience:
            return e, best_epoch, "patience"
    return epochs - 1, best_epoch, "epochs"
