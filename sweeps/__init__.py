"""sweeps: Ray Tune + Optuna sweeps over CapsNet configs, specified in OmegaConf, logged to MLflow."""
