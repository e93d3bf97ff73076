"""What every trial of the benchmark runs, and how it is sized to a target length.

Every trial is the same `tiny`-preset CapsNet (threads=1) on one dataset, differing only in its seed,
so the plain loop and the sweep do exactly the same work.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DATASETS = ("mnist5k", "digits", "fashion_mnist", "mnist")
MIN_TRAIN = 200            # smallest training split the sizing will choose


def base_config(dataset: str, epochs: int, train_size: float) -> dict:
    """The run config of every trial (seed aside): the `tiny` preset as shipped, one torch thread."""
    return {"model": {"preset": "tiny"},
            "data": {"name": dataset, "train_size": train_size},
            "train": {"epochs": epochs, "threads": 1, "device": "cpu"}}


def with_seed(base: dict, seed: int) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["train"]["seed"] = seed
    return cfg


def sweep_spec(name: str, base: dict, seeds: list[int], concurrency: int, folder: Path,
               reuse_actors: bool = False) -> dict:
    """The N trials as a sweep spec: one grid point, one trial per seed.

    references/controls off: the sweep would otherwise add depth-0 references and cnn controls
    (sweeps/extras.py), and the comparison with the loop needs the same N trials on both sides.
    reuse_actors goes through the spec, the way a user sets it (the runner passes it to Tune).
    """
    return {"name": name, "base": base, "space": {}, "search": {"algorithm": "grid"},
            "metric": "val_acc", "mode": "max", "seeds": seeds, "resources": {"cpu": 1},
            "max_concurrent": concurrency, "reuse_actors": reuse_actors,
            "references": False, "controls": False,
            "storage_path": str(folder / "ray_results"),
            "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "capsweep"}}


def calibrate(dataset: str, seconds: float, epochs: int, max_images: int = 1500) -> dict:
    """Size a trial to about `seconds`: time two epochs of `fit` on up to `max_images` images.

    The second (warm) epoch gives the cost model epoch(n) = a + b*n, with b*n the training loop
    (`time_s`, n training images) and a the evaluation + probes that follow it. Then the full split is
    used with as many epochs as fit in `seconds` (at least one); with --epochs E fixed, or when even one
    full epoch is too long, train_size shrinks instead. The result also carries the expected seconds.
    """
    from capsmodels import config as runcfg
    from capsmodels import datasets as datamod
    from capsmodels import train

    probe = runcfg.from_dict(base_config(dataset, 2, 1.0))
    raw = datamod.load_raw(dataset, None, True, probe.data.sign_samples)
    n_full = len(datamod.make_splits(raw, probe.data, 0).train)
    n_cal = min(n_full, max_images)
    cfg = base_config(dataset, 2, float(n_cal) if n_cal < n_full else 1.0)
    stamps: list[tuple[float, dict]] = []
    start = time.perf_counter()
    train.fit(cfg, lambda m: stamps.append((time.perf_counter(), m)), data=raw)
    second = stamps[1][0] - stamps[0][0]
    b = stamps[1][1]["time_s"] / n_cal
    a = max(second - stamps[1][1]["time_s"], 0.0)
    full_epoch = a + b * n_full
    if epochs <= 0:
        epochs = max(1, round(seconds / full_epoch))
    n = int(min(n_full, max(MIN_TRAIN, (seconds / epochs - a) / b)))
    expected = epochs * (a + b * n)
    return {"dataset": dataset, "epochs": epochs, "train_images": n, "full_train_images": n_full,
            "train_size": 1.0 if n >= n_full else float(n), "eval_s_per_epoch": a,
            "train_s_per_image": b, "expected_trial_s": expected, "calibration_s": time.perf_counter() - start,
            "calibration_epochs_s": [stamps[0][0] - start, second]}
