"""A trial's size before anything is built: parameters, training memory and FLOPs in closed form.

Why: `capsweep train model.depth=1e9` used to hang building a billion-layer network, and a sweep
could ask for 100,000 hidden layers and only fail on the cluster. Everything here is arithmetic on
the config and the dataset's input shape (capsmodels.catalogue), so it answers in microseconds for
any value; `check` turns an estimate over a bound into one ConfigError line naming the field.

Parameters (exact; tests/capsmodels/test_estimate.py compares with `count_parameters` of the built model):
  stem conv l: c_in k^2 c_out + c_out; primary conv: c k_p^2 P d0 + P d0 (N0 = P ph pw capsules);
  capsule layer (I, d_in) -> (J, D): W I J D d_in, + J D with `model.bias`, + the routing family's
  own (EM: 2 J); decoder: K D 512 + 512 + 512 1024 + 1024 + 1024 CHW + CHW.
  CNN control: stem + primary conv + dense layers (the depth-0 width matched as
  `networks.matched_cnn_width`) + head.

Memory of one training step (float32, 4 bytes): parameters, their gradients and Adam's two moments
(16 bytes per parameter), plus the activations autograd keeps for a batch of `train.batch_size`: per
example, each stem conv output (x3: the output, its gradient, the convolution's backward workspace),
the primary conv output (x3: conv output, its capsule layout, the squashed poses), and per capsule
layer u_hat (I J D, x3: the saved predictions, their gradient and its copy into the GEMM's layout in
the backward), the couplings of every routing iteration (I J x iterations), for EM routing 2.5 u_hat
per iteration after the first, and the outputs (J D x 3); dense layers' units (x2).
tests/capsmodels/test_estimate.py counts what a real training step keeps (16 bytes per parameter plus every
tensor autograd saves for the backward) and finds this estimate 0.63-0.85x of it for dynamic,
attention, self and efficient routing and the CNN, and for EM routing, whose M-step keeps about 2.5
more u_hat-sized tensors per iteration after the first (a term of its own below), 0.9-1.0x.
benchmarks/memory_estimate.py prints the CPU resident peak and the CUDA allocator's peak beside it
(the resident peak depends on the CPU's convolution algorithms). On an H100
(benchmarks/results/memory_estimate_cuda_b{64,256}.json, measured before the EM term) the CUDA peak
of a training step was 0.8-1.5x the estimate at batch 256 (EM: 2.5x; 1.27x against the estimate with
the EM term, 1.36x at batch 64) and up to 3.6x for the small CNN at batch 64, where cuDNN's fixed
workspace of about 100 MB dominates: `budget.max_memory_gb` should keep that much headroom.

The probe pass (docs/PROBES.md) runs a float64 copy of the model (8 bytes per parameter) on
`train.eval_batch` examples with the same activations in float64; the peak is the larger of the two
phases. This is an estimate of the dominant terms (allocator slack and torch's own workspace are not
in it).

FLOPs per image, forward: 2 multiply-adds per weight use (convs, u_hat, dense), routing 4 I J D
per iteration; a training step is taken as 3x forward (forward, backward for inputs and weights).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional

from capsmodels.catalogue import IN_SHAPES, NUM_CLASSES
from capsmodels.config import ConfigError, RunConfig

DECODER_HIDDEN = (512, 1024)      # capsmodels.networks.DECODER_HIDDEN (not imported: it pulls in torch)
MAX_PARAMS = 10**9                # the stated bound of `capsweep train` (sabour: 8.2 million)
ADAM_BYTES_PER_PARAM = 16         # float32 weight, gradient, Adam's exp_avg and exp_avg_sq
PROBE_BYTES_PER_PARAM = 8         # the float64 copy the probe pass evaluates


@dataclass(frozen=True)
class Estimate:
    """One trial's size. Bytes are of one process (the trial's device)."""
    params: int
    act_elems: int                # activation elements kept per example in a training step
    train_bytes: int              # 16 P + 4 B act_elems
    probe_bytes: int              # 16 P + 8 P + 8 E act_elems (the training state stays resident)
    flops_per_image: int          # forward

    @property
    def peak_bytes(self) -> int:
        return max(self.train_bytes, self.probe_bytes)


def input_shape(cfg: RunConfig) -> tuple[int, int, int]:
    return tuple(IN_SHAPES[cfg.data.name])


def _family_params(routing: str, n_in: int, n_out: int, d_out: int) -> int:
    """The routing family's own learned parameters per layer (per parent, and per child where the
    family has them), counted on the meta device: no memory, whatever the sizes."""
    from capsmodels.routing import get_routing
    family = get_routing(routing)
    per_parent, per_child = family.params, getattr(family, "child_params", None)
    if per_parent is None and per_child is None:
        return 0
    import torch
    with torch.device("meta"):
        own = dict(per_parent(n_out, d_out) if per_parent else {})
        own.update(per_child(n_in, n_out, d_out) if per_child else {})
        return sum(p.numel() for p in own.values())


def _sizes(cfg: RunConfig, in_shape) -> dict:
    """Per-example shapes and counts shared by the three estimates."""
    from capsmodels.networks import check_fits
    m = cfg.model
    C, H, W = in_shape
    check_fits(cfg, in_shape)                        # kernels that leave no positions: its own one line
    stem_params = stem_acts = stem_flops = 0
    c, h, w = C, H, W
    for ch in m.conv_channels:
        ch = int(ch)
        h, w = h - (m.conv_kernel - 1), w - (m.conv_kernel - 1)
        stem_params += c * m.conv_kernel ** 2 * ch + ch
        stem_acts += 3 * ch * h * w
        stem_flops += 2 * c * m.conv_kernel ** 2 * ch * h * w
        c = ch
    ph = (h - m.primary_kernel) // m.primary_stride + 1
    pw = (w - m.primary_kernel) // m.primary_stride + 1
    pd = m.primary_channels * m.primary_dim
    conv_params = c * m.primary_kernel ** 2 * pd + pd
    conv_flops = 2 * c * m.primary_kernel ** 2 * pd * ph * pw
    return dict(stem_params=stem_params, stem_acts=stem_acts, stem_flops=stem_flops, c=c,
                ph=ph, pw=pw, feats=pd * ph * pw, conv_params=conv_params, conv_flops=conv_flops)


def _caps_layer(cfg: RunConfig, n_in: int, d_in: int, n_out: int, d_out: int) -> tuple[int, int, int]:
    """(params, activation elements per example, forward flops per example) of one capsule layer."""
    m = cfg.model
    params = n_in * n_out * d_out * d_in + (n_out * d_out if m.bias else 0) + \
        _family_params(m.routing, n_in, n_out, d_out)
    u_hat = n_in * n_out * d_out
    acts = 3 * u_hat + n_in * n_out * m.iterations + 3 * n_out * d_out
    if m.routing == "em":     # each further EM iteration keeps ~2.5 u_hat-sized tensors (measured 2.3-2.5)
        acts += 5 * u_hat * (m.iterations - 1) // 2
    flops = 2 * u_hat * d_in + 4 * u_hat * m.iterations
    return params, acts, flops


def _dense(n_in: int, n_out: int) -> tuple[int, int, int]:
    return n_in * n_out + n_out, 2 * n_out, 2 * n_in * n_out


def _total(parts) -> tuple[int, int, int]:
    parts = list(parts)
    return tuple(sum(p[i] for p in parts) for i in range(3))


def _capsnet(cfg: RunConfig, s: dict, K: int, chw: int, decoder: bool) -> tuple[int, int, int]:
    m = cfg.model
    n0 = m.primary_channels * s["ph"] * s["pw"]
    parts = [(s["stem_params"] + s["conv_params"], s["stem_acts"] + 3 * s["feats"],
              s["stem_flops"] + s["conv_flops"])]
    if m.depth > 0:
        first = _caps_layer(cfg, n0, m.primary_dim, m.num_caps, m.caps_dim)
        hidden = _caps_layer(cfg, m.num_caps, m.caps_dim, m.num_caps, m.caps_dim)
        last = _caps_layer(cfg, m.num_caps, m.caps_dim, K, m.out_dim)
        parts += [first, tuple((m.depth - 1) * v for v in hidden), last]
    else:
        parts.append(_caps_layer(cfg, n0, m.primary_dim, K, m.out_dim))
    if decoder:
        h1, h2 = DECODER_HIDDEN
        parts += [_dense(K * m.out_dim, h1), _dense(h1, h2), _dense(h2, chw)]
    return _total(parts)


def _cnn(cfg: RunConfig, s: dict, K: int) -> tuple[int, int, int]:
    m = cfg.model
    if m.depth > 0:
        widths = [m.num_caps * m.caps_dim] * m.depth
    else:
        width = m.cnn_width
        if width <= 0:      # networks.matched_cnn_width: the depth-0 CapsNet encoder's capsule params
            target = _capsnet(replace(cfg, model=replace(m, arch="capsnet", depth=0)), s, K, 0, False)[0] \
                - s["stem_params"] - s["conv_params"]
            width = max(1, round((target - K) / (s["feats"] + 1 + K)))
        widths = [width]
    parts = [(s["stem_params"] + s["conv_params"], s["stem_acts"] + 2 * s["feats"],
              s["stem_flops"] + s["conv_flops"]), _dense(s["feats"], widths[0])]
    if len(widths) > 1:
        parts.append(tuple((len(widths) - 1) * v for v in _dense(widths[1], widths[1])))
    parts.append(_dense(widths[-1], K))
    return _total(parts)


def estimate(cfg: RunConfig, in_shape: Optional[tuple] = None,
             num_classes: Optional[int] = None) -> Estimate:
    """The size of `cfg`'s network on inputs `in_shape` (default: its dataset's, from the catalogue)
    with `num_classes` classes. Raises ConfigError when the kernels do not fit the input."""
    in_shape = tuple(int(v) for v in (in_shape or input_shape(cfg)))
    K = int(num_classes or NUM_CLASSES[cfg.data.name])
    s = _sizes(cfg, in_shape)
    chw = in_shape[0] * in_shape[1] * in_shape[2]
    if cfg.model.arch == "cnn":
        params, acts, flops = _cnn(cfg, s, K)
    else:
        params, acts, flops = _capsnet(cfg, s, K, chw, cfg.model.decoder)
    t = cfg.train
    train_bytes = ADAM_BYTES_PER_PARAM * params + 4 * t.batch_size * acts
    probe_bytes = (ADAM_BYTES_PER_PARAM + PROBE_BYTES_PER_PARAM) * params + 8 * t.eval_batch * acts
    return Estimate(params=params, act_elems=acts, train_bytes=train_bytes, probe_bytes=probe_bytes,
                    flops_per_image=flops)


# ---------------------------------------------------------------------------------------------------
# Bounds

# Fields that size a network, in the order a refusal blames them (the first whose preset value would
# shrink the estimate most is named).
SIZE_FIELDS = ("model.depth", "model.num_caps", "model.caps_dim", "model.out_dim", "model.primary_channels",
               "model.primary_dim", "model.conv_channels", "model.iterations", "model.cnn_width",
               "train.batch_size", "train.eval_batch")


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def human_count(n: float) -> str:
    return f"{n:,.0f}" if n < 1e7 else f"{n:.3g}"


def device_memory(device: str = "auto") -> tuple[int, str]:
    """(bytes, what) of the memory `capsweep train` on `device` trains in: the first CUDA GPU's when
    CUDA is used, else this machine's physical memory."""
    import torch
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), "the GPU's memory"
    return physical_memory(), "this machine's memory"


def physical_memory() -> int:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def culprit(cfg: RunConfig) -> str:
    """The size field that, set back to its preset/schema default, shrinks the peak memory most: the
    one a refusal names."""
    from capsmodels import config as cfgmod
    default = cfgmod.from_dict({"model": {"preset": cfg.model.preset, "arch": cfg.model.arch}})
    here = estimate(cfg).peak_bytes
    best, best_gain = "model.depth", -1.0
    for name in SIZE_FIELDS:
        sec, key = name.split(".")
        value = getattr(getattr(default, sec), key)
        if getattr(getattr(cfg, sec), key) == value:
            continue
        trial = replace(cfg, **{sec: replace(getattr(cfg, sec), **{key: value})})
        try:
            gain = here - estimate(trial).peak_bytes
        except ConfigError:
            continue
        if gain > best_gain:
            best, best_gain = name, gain
    return best


def field_value(cfg: RunConfig, name: str):
    sec, key = name.split(".")
    return getattr(getattr(cfg, sec), key)


def over_bound(est: Estimate, memory_bound: int, bound_what: str = "",
               max_params: int = MAX_PARAMS) -> Optional[str]:
    """What of `est` is over the bounds, as the tail of a one-line message, or None."""
    if est.params > max_params:
        return (f"gives an estimated {human_count(est.params)} parameters; the bound is "
                f"{human_count(max_params)} parameters")
    if est.peak_bytes > memory_bound:
        return (f"gives an estimated {human_bytes(est.peak_bytes)} of training memory "
                f"({human_count(est.params)} parameters); the bound is {human_bytes(memory_bound)}"
                + (f" ({bound_what})" if bound_what else ""))
    return None


def check(cfg: RunConfig, memory_bound: Optional[int] = None, bound_what: str = "",
          max_params: int = MAX_PARAMS) -> Estimate:
    """The estimate of `cfg`, or ConfigError (one line: field, estimate, bound) when its parameters
    exceed `max_params` or its peak training memory exceeds `memory_bound` (None: the device
    `cfg.train.device` trains on). The field named is `culprit`'s."""
    est = estimate(cfg)
    if memory_bound is None:
        memory_bound, bound_what = device_memory(cfg.train.device)
    problem = over_bound(est, memory_bound, bound_what, max_params)
    if problem:
        name = culprit(cfg)
        raise ConfigError(f"{name}: {field_value(cfg, name)!r} {problem}; use a smaller value")
    return est


def train_seconds_per_epoch(cfg: RunConfig, est: Estimate, train_images: int, eval_images: int,
                            flops_per_s: float, fixed_s: float = 1.0) -> float:
    """Estimated seconds of one epoch: training images x 3 forward FLOPs plus the evaluation images x
    1 forward, at `flops_per_s`, plus `fixed_s` for the probes and the report."""
    steps = math.ceil(train_images / cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    images = steps * cfg.train.batch_size
    return (3 * images + eval_images) * est.flops_per_image / flops_per_s + fixed_s
