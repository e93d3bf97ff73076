"""capsweep analysis: MLflow runs of a sweep -> pandas -> verdict and report.

Answers one question with evidence: does any CapsNet configuration escape vanishing gradients and
capsule starvation? (yes / no / undecided, with the instrument checked on cnn controls; the rules:
docs/PROBES.md, "The verdict".) Modules, one job each:
  load     read one sweep back from MLflow into a tidy table (+ per-epoch histories, batched)
  stats    t bounds, Welch non-inferiority, rank trends, Holm (numpy/scipy only, pure functions)
  verdict  per-configuration probes, the three-way checks, controls, trends -> a JSON-able dict
  plots    matplotlib figures (Agg) for the report
  report   report.html (self-contained), report.md, verdict.json; artifacts on the parent run
  store    the one way to a tracking store, shared with sweeps: which store a command means, the SQLite
           file, creating it under its lock, checking it answers, every page of a search, scoped settings
  mlflowio direct reads of a SQL store's tables, for the report at scale
  inspect  `capsweep ls / status / compare / export`, and what `confirm` and `dashboard` read
  cli      `capsweep report ...` / `python -m analysis ...`, and the read-only commands `capsweep` dispatches

Depends on mlflow, pandas, numpy, scipy and matplotlib, and of capsmodels only on its dependency-free
contract, catalogue and progress line (the names sweeps write, the datasets' class counts): never torch
or ray, so a laptop can analyse a cluster's sweep without the training stack; and never on sweeps (the
writer builds on the reader, not the other way round).
"""
