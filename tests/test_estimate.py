"""capsmodels/estimate.py: a trial's parameters, memory and FLOPs in closed form, before building.

The parameter count must equal the built model's exactly (every preset, CapsNet and CNN, depth 0-3,
routing families with their own parameters, bias, inputs of three shapes); the memory estimate is
checked against a hand computation of its documented formula and against the peak resident memory
a real training step reaches on CPU (in a fresh process, within a stated factor); `capsweep train`
refuses an absurd depth with one line before anything is built.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from capsmodels import config as cfgmod
from capsmodels import estimate, networks
from capsmodels.catalogue import IN_SHAPES, NUM_CLASSES
from capsmodels.config import ConfigError


def _cfg(**sections) -> cfgmod.RunConfig:
    return cfgmod.from_dict(sections)


CASES = [(p, d, r, b, data) for p, d, (r, b), data in itertools.product(
    ("tiny", "small", "cnn", "sabour"), (0, 1, 2, 3), (("dynamic", False), ("em", True)),
    ("mnist5k", "smallnorb"))]


@pytest.mark.parametrize("preset,depth,routing,bias,data", CASES)
def test_parameter_estimate_equals_the_built_model(preset, depth, routing, bias, data):
    """EM adds its own beta_u, beta_a per layer; bias adds J x D; smallnorb is 2 x 32 x 32, 5 classes."""
    cfg = _cfg(model={"preset": preset, "depth": depth, "routing": routing, "bias": bias},
               data={"name": data})
    with torch.device("meta"):        # the real module structure, no memory
        model = networks.build(cfg, IN_SHAPES[data], NUM_CLASSES[data])
    assert estimate.estimate(cfg).params == networks.count_parameters(model)


def test_parameter_estimate_with_a_given_cnn_width_and_two_stem_convs():
    cfg = _cfg(model={"preset": "cnn", "cnn_width": 37, "conv_channels": [8, 12], "conv_kernel": 5})
    model = networks.build(cfg, (1, 28, 28), 10)
    assert estimate.estimate(cfg).params == networks.count_parameters(model)


def test_sabour_is_the_papers_count():
    assert estimate.estimate(_cfg(model={"preset": "sabour"}, data={"name": "mnist"})).params == 8_215_568


def test_memory_estimate_matches_a_hand_computation():
    """`tiny` at depth 1 on 28x28 mnist5k, batch 64, eval batch 256, 3 routing iterations, worked by
    hand from the formula in the module's docstring."""
    cfg = _cfg(model={"preset": "tiny", "depth": 1}, train={"batch_size": 64, "eval_batch": 256})
    params = (1 * 9 * 16 + 16            # stem conv 3x3, 1 -> 16
              + 16 * 16 * 32 + 32        # primary conv 4x4, 16 -> 8 x 4
              + 288 * 8 * 4 * 4          # W of 288 x 4D primaries -> 8 x 4D hidden
              + 8 * 10 * 8 * 4           # W of 8 x 4D -> 10 x 8D classes
              + 80 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784)          # decoder
    acts = (3 * 16 * 26 * 26             # stem output 26x26
            + 3 * 32 * 6 * 6             # primary conv output 6x6
            + 3 * 288 * 8 * 4 + 288 * 8 * 3 + 3 * 8 * 4      # u_hat, couplings x 3 iterations, outputs
            + 3 * 8 * 10 * 8 + 8 * 10 * 3 + 3 * 10 * 8
            + 2 * (512 + 1024 + 784))
    e = estimate.estimate(cfg)
    assert (e.params, e.act_elems) == (params, acts) == (1_418_192, 77_600)
    assert e.train_bytes == 16 * params + 4 * 64 * acts
    assert e.probe_bytes == 24 * params + 8 * 256 * acts
    assert e.peak_bytes == max(e.train_bytes, e.probe_bytes)


def test_forward_flops_match_a_hand_computation():
    """`tiny` at depth 0 with 1 routing iteration on 28x28: 2 FLOPs per multiply-add."""
    cfg = _cfg(model={"preset": "tiny", "iterations": 1})
    flops = (2 * 1 * 9 * 16 * 26 * 26             # stem conv
             + 2 * 16 * 16 * 32 * 6 * 6            # primary conv
             + 2 * 288 * 10 * 8 * 4                # u_hat
             + 4 * 288 * 10 * 8 * 1                # one routing pass
             + 2 * (80 * 512 + 512 * 1024 + 1024 * 784))   # decoder
    assert estimate.estimate(cfg).flops_per_image == flops == 3_797_120


MEASURE = textwrap.dedent("""
    import json, resource, sys, torch
    from capsmodels import config as C, estimate, networks
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = C.from_dict(json.loads(sys.argv[1]))
    shape = estimate.input_shape(cfg)
    x = torch.rand(cfg.train.batch_size, *shape)
    y = torch.randint(0, 10, (cfg.train.batch_size,))
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    model = networks.build(cfg, shape, 10)
    opt = torch.optim.Adam(model.parameters())
    out = model(x, y)
    loss = out.scores.sum() + (out.recon.sum() if out.recon is not None else 0)
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"measured": peak - before, "estimate": estimate.estimate(cfg).train_bytes}))
""")


@pytest.mark.parametrize("sections,low,high", [
    ({"model": {"preset": "small", "depth": 2}, "train": {"batch_size": 256}}, 0.5, 2.0),
    ({"model": {"preset": "cnn", "depth": 2}, "train": {"batch_size": 256}}, 0.5, 3.5),
], ids=["capsnet", "cnn"])
def test_memory_estimate_is_within_a_stated_factor_of_the_measured_peak(sections, low, high):
    """One training step (forward, backward, Adam) in a fresh process: the growth of its peak
    resident memory over the process before the model was built, against `train_bytes`. Stated
    factors: 0.5-2x for CapsNets (measured 1.25x), 0.5-3.5x for the CNN (measured 2.3x)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(sections)], capture_output=True,
                         text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = got["measured"] / got["estimate"]
    print(f"{sections['model']}: measured {got['measured'] / 1e6:.0f} MB, estimate "
          f"{got['estimate'] / 1e6:.0f} MB, ratio {ratio:.2f}")
    assert low < ratio < high


def test_absurd_sizes_answer_at_once_and_name_the_field():
    huge = _cfg(model={"depth": 10**9})
    e = estimate.estimate(huge)                 # closed form: no billion-layer loop
    assert e.params > 10**13
    with pytest.raises(ConfigError, match=r"^model\.depth: 1000000000 gives an estimated .* parameters; "
                                          r"the bound is 1e\+09 parameters"):
        estimate.check(huge)
    with pytest.raises(ConfigError, match=r"^model\.num_caps: 3000 .* training memory .* the bound is 1 GB"):
        estimate.check(_cfg(model={"depth": 1, "num_caps": 3000}), memory_bound=10**9)
    small = _cfg(model={"preset": "tiny"})
    assert estimate.check(small, memory_bound=10**9).params == estimate.estimate(small).params


def test_kernels_that_do_not_fit_are_the_networks_own_one_line_error():
    with pytest.raises(ConfigError, match="model.conv_kernel"):
        estimate.estimate(_cfg(model={"conv_kernel": 9}, data={"name": "digits"}))


@pytest.mark.parametrize("value", ["1e9", "100000"])
def test_capsweep_train_refuses_a_huge_depth_before_building(value, capsys):
    from sweeps import cli
    assert cli.main(["train", f"model.depth={value}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"capsweep: error: model.depth: {int(float(value))} gives an estimated ")
    assert "the bound is" in err[0]
