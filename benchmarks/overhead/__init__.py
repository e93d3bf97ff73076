"""The parts of benchmarks/sweep_overhead.py, one job each.

trials     what every trial runs: the config, its calibration to a target length, the sweep spec
children   what runs in each measured child process (plain loop, process pool, instrumented sweep)
sampler    CPU seconds of a process tree and the load average, sampled from /proc
launcher   starts each child as a user would, in order, and collects its figures
collect    per-trial figures after a sweep: Ray's result.json and the MLflow client
state_save what one epoch's state save costs, through the trainable's public path
report     turns the measurements into the printed tables and the summary
"""
