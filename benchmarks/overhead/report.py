"""The printed report: the table of modes, each sweep's wall time taken apart, and the summary.

Pure arithmetic on the measurements dict (`--from-json` prints it again from the saved JSON).
The summary turns each sweep's timeline into per-trial overhead (trial span + gap to the next, less the
loop's fit) and a fixed cost per sweep, which is what extrapolates to other N and trial lengths.
"""
from __future__ import annotations

import statistics


def run_label(kind: str, c: int) -> str:
    return {"loop": "plain loop" if c == 1 else f"plain loop, {c} processes",
            "sweep": f"capsweep run, {c} concurrent",
            "reuse": f"capsweep run, {c} conc., reuse_actors"}[kind]


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.1f}%" if ref else "n/a"


def report(res: dict) -> str:
    n, cal, runs = res["trials"], res["calibration"], res["runs"]
    loop = runs["loop1"]
    fits, fit_cpu = loop["child"]["fits"], loop["child"]["fit_cpu"]
    lines = [f"\ntrials: {n} x {cal['dataset']} tiny, {cal['epochs']} epochs x {cal['train_images']} images, "
             f"threads=1; plain-loop fit per trial {statistics.mean(fits):.1f} s wall "
             f"(min {min(fits):.1f}, max {max(fits):.1f}; target {cal['expected_trial_s']:.0f} s), "
             f"{statistics.mean(fit_cpu):.1f} CPU-s",
             f"machine: {res['cpus']} CPUs; every wall time is as loaded as the machine was (load column)\n"]
    hdr = (f"{'mode':34s} {'trials':>6s} {'wall s':>8s} {'per trial':>9s} {'overhead':>9s} {'trials/h':>8s} "
           f"{'speed-up':>8s} {'CPU s':>7s} {'CPU ovh':>8s} {'load':>5s}")
    lines += [hdr, "-" * len(hdr)]
    order = sorted(runs, key=lambda k: (runs[k]["c"], ("loop", "sweep", "reuse").index(runs[k]["kind"])))
    for key in order:
        r = runs[key]
        kind, c = r["kind"], r["c"]
        ref, one = runs.get(f"loop{c}"), runs.get(f"{kind}1")
        ovh = _pct(r["wall"], ref["wall"]) if ref and kind != "loop" else "-"
        cpu_ovh = _pct(r["cpu"], loop["cpu"]) if kind != "loop" else "-"
        speed = f"{one['wall'] / r['wall']:.2f}x" if one and c > 1 else "-"
        lines.append(f"{run_label(kind, c):34s} {n:6d} {r['wall']:8.1f} {r['wall'] / n:9.1f} {ovh:>9s} "
                     f"{3600 * n / r['wall']:8.0f} {speed:>8s} {r['cpu']:7.1f} {cpu_ovh:>8s} {r['load']:5.1f}")
    lines.append("overhead: wall time against the plain loop with as many processes; CPU s: CPU seconds of the "
                 "whole process tree (sweeps: sampled); CPU ovh: against the 1-process loop's; speed-up: against "
                 "the same mode with one trial at a time")
    if "bracket" in loop:
        b = loop["bracket"]
        lines.append(f"plain loop: mean of the run first ({b['first_wall']:.1f} s, load {b['first_load']:.1f}) and "
                     f"last ({b['last_wall']:.1f} s, load {b['last_load']:.1f}): {_pct(b['last_wall'], b['first_wall'])} "
                     "apart, which is how far the machine's load moved the figures")
    lp = loop["child"]
    loop_fixed = loop["wall"] - sum(fits)
    lines.append(f"\nplain loop outside fit: {loop_fixed:.1f} s (start-up + imports {lp['t_imports'] - loop['t_launch']:.1f} s, "
                 f"data {lp['t_data'] - lp['t_imports']:.1f} s, exit {loop['t_end'] - lp['t_done']:.1f} s)")
    ck = res["state_save"]
    lines.append(f"state save per epoch, measured outside Tune: {ck['mb']:.1f} MB ({ck['params']:,} model values + Adam "
                 f"moments), {ck['save_s'] * 1000:.0f} ms "
                 f"-> {cal['epochs'] * ck['save_s']:.1f} s per trial of {cal['epochs']} epochs")
    for key in order:
        if runs[key]["kind"] != "loop":
            runs[key]["loop_epochs"] = lp.get("epochs")
            lines += sweep_breakdown(runs[key], n, fits, fit_cpu)
    lines += summary(res)
    return "\n".join(lines)


def sweep_timeline(r: dict, loop_fit: float) -> dict:
    """The sweep's wall time as fixed costs + per-trial costs, from the child's timers, the MLflow run
    of each trial (opened when Tune starts the trial, closed when it completes) and Ray's result.json.

    With one trial at a time: wall = outside Tuner.fit + (fit start -> first trial running)
    + N x trial + (N - 1) x gap + (last trial done -> fit end); a trial's own overhead is its MLflow
    span less the plain loop's fit, and the gap is what starting the next trial costs."""
    ch, tm = r["child"], r["child"]["timers"]
    fit_start, fit_end = ch.get("spans", {}).get("tuner_fit", [0.0, 0.0])
    spans = r.get("spans") or []
    t = {"tuner_fit": tm.get("tuner_fit", 0.0), "outside_fit": r["wall"] - tm.get("tuner_fit", 0.0)}
    if spans and fit_start:
        t["fit_to_first_trial"] = spans[0][0] - fit_start
        t["last_trial_to_fit_end"] = fit_end - max(e for _, e in spans)
        t["span"] = statistics.mean(e - s for s, e in spans)
        t["gap"] = statistics.mean(spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)) \
            if len(spans) > 1 else 0.0
        t["per_trial"] = t["span"] + t["gap"] - loop_fit
        t["fixed"] = t["outside_fit"] + t["fit_to_first_trial"] + t["last_trial_to_fit_end"] - t["gap"]
    return t


def epoch_stats(runs: list[list[list[float]]]) -> dict:
    """From per-run lists of [epoch wall, training-loop time]: the training loop per epoch and the
    rest of each epoch (evaluation, probes and, in a sweep, the report + state save), over
    the second epoch on; and how much longer the first epoch is (set-up, and a cold process)."""
    later = [e for run in runs for e in run[1:]]
    if not later:
        return {}
    firsts = [run[0][0] - statistics.mean(e[0] for e in run[1:]) for run in runs if len(run) > 1]
    return {"train": statistics.mean(e[1] for e in later), "rest": statistics.mean(e[0] - e[1] for e in later),
            "first_extra": statistics.mean(firsts)}


def sweep_breakdown(r: dict, n: int, loop_fits: list[float], loop_cpu: list[float]) -> list[str]:
    c = r["c"]
    ch, tm, cnt = r["child"], r["child"]["timers"], r["child"]["counts"]
    startup = ch["t_imports"] - r["t_launch"]
    tuner_fit = tm.get("tuner_fit", 0.0)
    ex = ch.get("exit", {})
    fixed = {"start-up + imports (python, torch, ray, mlflow)": startup,
             "spec load + validation": tm.get("spec", 0.0),
             "checks (preflight)": tm.get("checks", 0.0),
             "dataset load in the driver": tm.get("data", 0.0),
             "MLflow setup (new sqlite store, experiment, parent run)": tm.get("mlflow_setup", 0.0),
             "Ray start (ray.init)": tm.get("ray_start", 0.0),
             "Tune set-up before fit (logger, searcher, Tuner)":
                 tm.get("tune_total", 0.0) - tuner_fit - tm.get("ray_shutdown", 0.0),
             "Ray shutdown": tm.get("ray_shutdown", 0.0)}
    if ex.get("t_atexit_last"):
        fixed["exit: joining non-daemon threads"] = ex["t_atexit_first"] - ch["t_done"]
        fixed["exit: atexit handlers (ray, mlflow, ...)"] = ex["t_atexit_last"] - ex["t_atexit_first"]
        fixed["exit: interpreter teardown"] = r["t_end"] - ex["t_atexit_last"]
    else:
        fixed["process exit"] = r["t_end"] - ch["t_done"]
    fixed["other (CLI output, lock, ...)"] = r["wall"] - tuner_fit - sum(fixed.values())
    out = [f"\n{run_label(r['kind'], c)}: wall {r['wall']:.1f} s = {r['wall'] - tuner_fit:.1f} s outside Tune "
           f"+ Tuner.fit {tuner_fit:.1f} s"]
    out += [f"  outside  {k:56s} {v:6.1f} s" for k, v in fixed.items()]
    if ch.get("untimed"):
        out.append("  not timed (not found under these names): " + ", ".join(ch["untimed"]))
    loop_mean = statistics.mean(loop_fits)
    tl = sweep_timeline(r, loop_mean)
    if "span" in tl:
        out.append(f"  in fit   {'Tuner.fit start -> first trial running (first worker)':56s} {tl['fit_to_first_trial']:6.1f} s")
        out.append(f"  in fit   {'each trial, MLflow run open -> closed (mean)':56s} {tl['span']:6.1f} s"
                   f"   (plain loop fit {loop_mean:.1f} s)")
        if c == 1:
            out.append(f"  in fit   {'between trials: one run closed -> next opened (mean)':56s} {tl['gap']:6.1f} s")
        out.append(f"  in fit   {'last trial done -> Tuner.fit returns':56s} {tl['last_trial_to_fit_end']:6.1f} s")
    trials = r.get("trials", [])
    if trials:
        tr = [t["trainable_s"] for t in trials]
        epochs = statistics.mean(t["epochs"] for t in trials)
        in_trial = statistics.mean(tr) - loop_mean
        workers = len({t["pid"] for t in trials})
        if r["kind"] == "reuse" and workers > 1 and c == 1:
            out.append(f"  WARNING: reuse_actors is on but {workers} worker processes ran the {len(trials)} trials")
        out.append(f"  trials on {workers} worker process(es) for {len(trials)} trials; "
                   f"inside the trainable {statistics.mean(tr):.1f} s per trial: {in_trial:+.1f} s against the loop's "
                   f"fit, {in_trial / max(epochs, 1):+.2f} s per epoch")
        sw = epoch_stats([t["per_epoch"] for t in trials if t.get("per_epoch")])
        lp = epoch_stats(r.get("loop_epochs") or [])
        if sw and lp:
            out[-1] += "; per epoch:"
            out.append(f"    training loop (2nd epoch on) {sw['train']:.2f} s against {lp['train']:.2f} s in the loop "
                       f"({_pct(sw['train'], lp['train'])}: the same compute; a difference is load or process environment)")
            out.append(f"    rest of an epoch (eval, probes; sweep: + report, state save) {sw['rest']:.2f} s against "
                       f"{lp['rest']:.2f} s: {sw['rest'] - lp['rest']:+.2f} s per epoch for report + state save")
            out.append(f"    first epoch longer than the later ones by {sw['first_extra']:.1f} s against "
                       f"{lp['first_extra']:.1f} s in the loop (set-up; a fresh worker process starts cold)")
    cbs = sum(v for k, v in tm.items() if k.startswith("cb:"))
    mlf = {k[len("mlflow:"):]: (v, cnt.get(k, 0)) for k, v in tm.items() if k.startswith("mlflow:")}
    out.append(f"  MLflow logging in the driver: {cbs:.1f} s in the logger's Tune callbacks, logger init "
               f"{tm.get('logger_init', 0.0):.1f} s; writes (s/count): "
               + ", ".join(f"{k} {v:.1f}/{m}" for k, (v, m) in sorted(mlf.items())))
    groups = r.get("cpu_groups") or {}
    if groups:
        out.append("  CPU seconds by process group: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])))
        if trials:
            worker = groups.get("trial workers", 0.0) / n
            out.append(f"  CPU per trial in its worker {worker:.1f} s against the loop's fit "
                       f"{statistics.mean(loop_cpu):.1f} s ({worker - statistics.mean(loop_cpu):+.1f} s: worker "
                       f"start + imports, report + state save)")
    return out


def summary(res: dict) -> list[str]:
    """The headline: per-trial overhead (what a long sweep pays) and fixed cost (once per sweep)."""
    runs, n = res["runs"], res["trials"]
    loop = runs["loop1"]
    fit_mean = statistics.mean(loop["child"]["fits"])
    loop_fixed = loop["wall"] - sum(loop["child"]["fits"])
    out = [f"\nsummary, one trial at a time (per-trial overhead: trial span + gap to the next, less the loop's "
           f"fit; fixed: the rest, less the loop's {loop_fixed:.1f} s outside fit):"]
    for key in ("sweep1", "reuse1"):
        r = runs.get(key)
        if not r:
            continue
        tl = sweep_timeline(r, fit_mean)
        if "per_trial" not in tl:
            continue
        per, fixed = tl["per_trial"], tl["fixed"] - loop_fixed
        out.append(f"  {run_label(r['kind'], 1)}: {per:+.1f} s per trial ({100 * per / fit_mean:+.1f}% of a "
                   f"{fit_mean:.0f} s trial) + {fixed:.1f} s once per sweep; these {n} trials "
                   f"{_pct(r['wall'], loop['wall'])}; 100 such trials about "
                   f"{100 * (per * 100 + fixed) / (fit_mean * 100 + loop_fixed):+.1f}%")
        sw = epoch_stats([t["per_epoch"] for t in r.get("trials", []) if t.get("per_epoch")])
        lp = epoch_stats(loop["child"].get("epochs") or [])
        if sw and lp:
            epochs = statistics.mean(len(t["per_epoch"]) for t in r["trials"])
            slow = epochs * (sw["train"] - lp["train"])
            out.append(f"    of which {slow:+.1f} s is the training loop itself (the same compute) running slower or "
                       f"faster than in the loop; the framework's own share is {per - slow:+.1f} s per trial "
                       f"({100 * (per - slow) / fit_mean:+.1f}%) and 100 trials about "
                       f"{100 * ((per - slow) * 100 + fixed) / (fit_mean * 100 + loop_fixed):+.1f}%")
    return out
