"""`model.family_defaults: published | uniform` and `model.schedule: concurrent | sequential`.

Under `published` each routing family starts as its authors' code does (capsmodels.registry,
`RoutingFamily.published`): its W init measured on the built network's weights against the authors'
rule, its primary normalisation against an independent functional reference, its schedule. The two
schedules of attention routing are checked on a 2-layer stack against a NumPy loop of each, written
from the authors' CapsModel.forward, and the probes' act_grad under the concurrent schedule against
the gradient of one perturbation added to every pass. `uniform` leaves the config as it is.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capsmodels import config as runcfg
from capsmodels import networks, probes
from capsmodels.routing import get_routing, routing_names
from capsmodels.train import fit
from tests.helpers.training import RAW, cfg, stable

MNIST_LIKE = (1, 28, 28)
AUTHORS = {"attention": {"init": "tsai", "primary_norm": "layernorm", "schedule": "concurrent"},
           "self": {"init": "hahn", "primary_norm": "batchnorm"},
           "efficient": {"init": "mazzia", "squash": "exp"}}


def model_cfg(routing: str, defaults: str = "published", **over) -> runcfg.ModelConfig:
    m = {"preset": "tiny", "routing": routing, "depth": 1, "family_defaults": defaults, "decoder": False}
    m.update(over)
    return runcfg.from_dict({"model": m}).model


def build(m: runcfg.ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return networks.build(m, MNIST_LIKE, 10)


# ---- what published sets, and what it leaves ------------------------------------------------------
@pytest.mark.parametrize("routing", routing_names())
def test_published_sets_the_registry_start_and_uniform_changes_nothing(routing):
    uniform = model_cfg(routing, "uniform")
    assert uniform == runcfg.from_dict({"model": {"preset": "tiny", "routing": routing, "depth": 1,
                                                  "decoder": False}}).model     # the default is uniform
    published = model_cfg(routing)
    start = get_routing(routing).published
    expect = AUTHORS.get(routing, {})
    assert (start.values() if start else {}) == expect
    changed = {f: getattr(published, f) for f in ("init", "squash", "primary_norm", "schedule")
               if getattr(published, f) != getattr(uniform, f)}
    assert changed == {k: v for k, v in expect.items() if getattr(uniform, k) != v}
    if start:      # every field it sets cites the authors' file and lines
        cited = dict(start.sources)
        assert set(cited) == set(expect)
        assert all(re.search(r"@[0-9a-f]{7} \S+\.py:\d+", text) for text in cited.values())


def test_published_overrides_the_configs_own_choice_and_leaves_the_cnn_alone():
    m = model_cfg("attention", init="data", primary_norm="squash", schedule="sequential")
    assert (m.init, m.primary_norm, m.schedule) == ("tsai", "layernorm", "concurrent")
    cnn = model_cfg("attention", arch="cnn")
    assert (cnn.init, cnn.primary_norm, cnn.schedule) == ("std", "squash", "sequential")
    assert runcfg.resolve_start(m) == m                        # idempotent


@pytest.mark.parametrize("model, says", [
    ({"family_defaults": "authors"}, "model.family_defaults: 'authors' is not allowed"),
    ({"primary_norm": "groupnorm"}, "model.primary_norm: 'groupnorm' is not allowed"),
    ({"schedule": "concurrent"}, "model.schedule: 'concurrent' is not allowed with model.routing 'dynamic'"),
    ({"routing": "attention", "schedule": "concurrent", "init": "data"}, "model.init: data is not allowed"),
    ({"routing": "attention", "schedule": "concurrent", "detach_inner": True}, "model.detach_inner: true"),
    ({"init": "he"}, "model.init: 'he' is not allowed")])
def test_bad_start_settings_are_refused_in_one_line(model, says):
    with pytest.raises(runcfg.ConfigError, match=re.escape(says)) as e:
        runcfg.from_dict({"model": model})
    assert "\n" not in str(e.value)


# ---- the authors' W init, measured on the weights ---------------------------------------------------
def weight_tolerance(n: int, kurtosis_excess: float) -> float:
    """5 standard errors of a sample std of n draws (relative): sqrt((2 + excess kurtosis) / (4 n))."""
    return 5 * math.sqrt((2 + kurtosis_excess) / (4 * n))


@pytest.mark.parametrize("routing", ["attention", "self", "efficient"])
def test_published_w_has_the_authors_std_and_range(routing):
    net = build(model_cfg(routing, depth=2))
    for layer in net.caps:
        W = layer.W.detach().double()
        I, J, d_out, d_in = W.shape
        if routing == "attention":      # N(0, J / (d_in I)): their sqrt(out_n / (in_d * in_n)) * randn
            std, excess, bound = math.sqrt(J / (d_in * I)), 0.0, None
        elif routing == "efficient":    # Keras he_normal on a (J, I, d_in, d_out) kernel: fan_in d_in J I
            std = math.sqrt(2 / (d_in * J * I))
            # N(0, 1) truncated at +-2: variance 0.7737, fourth moment 1.6218 -> excess kurtosis
            excess, bound = 1.6218 / 0.7737 ** 2 - 3, 2 * std / 0.87962566103423978
        else:                           # kaiming_uniform_ on (I, J d_out, d_in): b = sqrt(6 / (J d_out d_in))
            bound = math.sqrt(6 / (J * d_out * d_in))
            std, excess = bound / math.sqrt(3), -1.2
        assert float(W.std()) == pytest.approx(std, rel=weight_tolerance(W.numel(), excess)), (routing, W.shape)
        assert abs(float(W.mean())) < 5 * std / math.sqrt(W.numel())
        if bound is not None:
            assert float(W.abs().max()) <= bound
            assert float(W.abs().max()) > 0.9 * bound          # the range is used, not a narrower one


def test_uniform_draws_w_as_before():
    """`std` draws randn * init_std from the seed: the same numbers with family_defaults uniform."""
    net = build(model_cfg("attention", "uniform"))
    torch.manual_seed(0)
    ref = networks.CapsNet(runcfg.ModelConfig(**{**runcfg.to_dict(runcfg.RunConfig())["model"],
                                                **{k: getattr(model_cfg("attention", "uniform"), k)
                                                   for k in ("preset", "routing", "depth", "decoder", "conv_channels",
                                                             "conv_kernel", "primary_channels", "primary_dim",
                                                             "primary_kernel", "primary_stride", "num_caps",
                                                             "caps_dim", "out_dim")}}), MNIST_LIKE, 10)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


# ---- the authors' primaries ---------------------------------------------------------------------------
def primaries_input(net, n: int = 6):
    x = torch.rand(n, *MNIST_LIKE, generator=torch.Generator().manual_seed(3))
    return x, net.stem(x)


def as_capsules(t: torch.Tensor, K: int, d: int) -> torch.Tensor:
    """(B, K*d, H, W) -> (B, K*H*W, d), capsule n = k*H*W + y*W + x."""
    B, _, H, W = t.shape
    return t.view(B, K, d, H, W).permute(0, 1, 3, 4, 2).reshape(B, K * H * W, d)


def test_attention_primaries_are_layer_normalised_not_squashed():
    net = build(model_cfg("attention")).eval()
    p = net.primary
    assert p.conv.bias is None and isinstance(p.ln, torch.nn.LayerNorm) and p.ln.elementwise_affine
    _, h = primaries_input(net)
    with torch.no_grad():
        out = p(h)
        s = as_capsules(F.conv2d(h, p.conv.weight, stride=p.conv.stride), p.caps_channels, p.dim)
    mean, var = s.mean(-1, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out.pose, (s - mean) / torch.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.act, out.pose.norm(dim=-1))


def test_self_routing_primaries_are_batch_normalised_with_sigmoid_activations():
    net = build(model_cfg("self")).eval()            # eval: BatchNorm uses its running stats (0, 1)
    p = net.primary
    assert p.conv.bias is None and p.conv_a.bias is None
    _, h = primaries_input(net)
    with torch.no_grad():
        out = p(h)
        scale = 1 / math.sqrt(1 + 1e-5)
        pose = as_capsules(F.conv2d(h, p.conv.weight, stride=p.conv.stride) * scale, p.caps_channels, p.dim)
        act = torch.sigmoid(as_capsules(F.conv2d(h, p.conv_a.weight, stride=p.conv.stride) * scale,
                                        p.caps_channels, 1)).squeeze(-1)
    torch.testing.assert_close(out.pose, pose, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.act, act, rtol=1e-5, atol=1e-6)
    # training mode: the batch's own statistics, each pose channel at mean 0 and variance 1
    p.train()
    with torch.no_grad():
        pose = p(h).pose
    per_channel = pose.view(len(h), p.caps_channels, -1, p.dim).permute(1, 3, 0, 2).reshape(p.caps_channels * p.dim, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(p.caps_channels * p.dim), atol=1e-5, rtol=0)


def test_efficient_primaries_and_layers_use_the_authors_exp_squash():
    net = build(model_cfg("efficient")).eval()
    assert net.primary.squash_kind == "exp" and all(layer.squash_kind == "exp" for layer in net.caps)
    _, h = primaries_input(net)
    with torch.no_grad():
        out = net.primary(h)
    torch.testing.assert_close(out.act, 1 - torch.exp(-out.s_norm), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("routing", ["dynamic", "em", "uniform"])
def test_a_family_without_an_authors_start_is_built_as_under_uniform(routing):
    a, b = build(model_cfg(routing)), build(model_cfg(routing, "uniform"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- the two schedules of attention routing against NumPy --------------------------------------------
def np_step(u, v_prev, g, b):
    """One pass of inverted dot-product attention for a batch: u (B, I, J, D), v_prev (B, J, D) or None."""
    B, I, J, D = u.shape
    if v_prev is None:
        c = np.full((B, I, J), 1.0 / J)
    else:
        logits = np.einsum("bijd,bjd->bij", u, v_prev) / math.sqrt(D)
        e = np.exp(logits - logits.max(2, keepdims=True))
        c = e / e.sum(2, keepdims=True)
    s = np.einsum("bij,bijd->bjd", c, u)
    m, var = s.mean(-1, keepdims=True), s.var(-1, keepdims=True)
    return (s - m) / np.sqrt(var + 1e-5) * g + b


def np_votes(W, u):
    return np.einsum("ijek,bik->bije", W, u)          # W (I, J, d_out, d_in), u (B, I, d_in)


def np_sequential(layers, u0, R):
    """Each layer routes R passes before the next starts (their --sequential_routing)."""
    u = u0
    for W, g, b in layers:
        v = None
        for _ in range(R):
            v = np_step(np_votes(W, u), v, g, b)
        u = v
    return u


def np_concurrent(layers, u0, R):
    """Their default (src/capsule_model.py:141-158): pass 1 in order with uniform couplings, then in
    each pass every layer re-routes the previous pass's input against its own previous output."""
    values = [u0]
    for W, g, b in layers:
        values.append(np_step(np_votes(W, values[-1]), None, g, b))
    for _ in range(R - 1):
        values = [u0] + [np_step(np_votes(W, values[i]), values[i + 1], g, b)
                         for i, (W, g, b) in enumerate(layers)]
    return values[-1]


def two_layer_stack(schedule: str, R: int):
    """Published attention at depth 1 (a hidden and the class layer) in float64, its primaries' poses on
    six images, and the layers' (W, LayerNorm gain, offset) as NumPy."""
    m = model_cfg("attention", iterations=R, schedule=schedule)
    net = build(runcfg.ModelConfig(**{**runcfg.to_dict(runcfg.RunConfig(model=m))["model"],
                                      "family_defaults": "uniform", "schedule": schedule})).double().eval()
    x = torch.rand(6, *MNIST_LIKE, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        u0 = net.primary(net.stem(x)).pose.numpy()
        gen = torch.Generator().manual_seed(4)
        for layer in net.caps:                  # LayerNorm gains and offsets off their start of 1 and 0
            layer.ln_weight.copy_(1 + 0.3 * torch.randn(layer.d_out, generator=gen, dtype=torch.float64))
            layer.ln_bias.copy_(0.3 * torch.randn(layer.d_out, generator=gen, dtype=torch.float64))
        out = net(x)
    layers = [(l.W.detach().numpy(), l.ln_weight.detach().numpy(), l.ln_bias.detach().numpy()) for l in net.caps]
    return net, out, u0, layers


@pytest.mark.parametrize("R", [1, 2, 3])
def test_concurrent_and_sequential_attention_match_their_numpy_loops(R):
    seq_net, seq, u0, layers = two_layer_stack("sequential", R)
    con_net, con, u0c, layers_c = two_layer_stack("concurrent", R)
    assert np.array_equal(u0, u0c) and all(np.array_equal(a[0], b[0]) for a, b in zip(layers, layers_c))
    np.testing.assert_allclose(seq.layers[-1].pose.detach().numpy(), np_sequential(layers, u0, R),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(con.layers[-1].pose.detach().numpy(), np_concurrent(layers_c, u0, R),
                               rtol=1e-10, atol=1e-12)
    diff = float(np.linalg.norm(con.layers[-1].pose.detach().numpy() - seq.layers[-1].pose.detach().numpy())
                 / np.linalg.norm(seq.layers[-1].pose.detach().numpy()))
    if R == 1:
        assert diff == 0.0                            # one pass: both are a plain forward, c = 1/J
    else:
        assert diff > 0.05, diff                      # the class layer reads a hidden layer one pass behind
    # the hidden layer's trace is its pass t(1) = max(1, R - 1): what the class layer's last pass read
    t = con.layers[1].iterations
    assert t == max(1, R - 1) and con.layers[1].routes == (t > 1)
    hidden = u0
    W, g, b = layers_c[0]
    v = None
    for _ in range(t):           # the hidden layer's input never changes: its t passes are sequential ones
        v = np_step(np_votes(W, hidden), v, g, b)
    np.testing.assert_allclose(con.layers[1].pose.detach().numpy(), v, rtol=1e-10, atol=1e-12)


def test_concurrent_act_grad_sums_every_pass_the_schedule_hands_on():
    """act_grad/l{l} under the concurrent schedule against the schedule run again here, by hand, with
    dL/dv summed over the pose each layer hands on at each of its 3 passes: the gradient of one
    perturbation added to all of them (autograd sums the uses of a tensor)."""
    from capsmodels import losses
    m = model_cfg("attention", depth=2, iterations=3)
    net = build(m)
    x = torch.rand(8, *MNIST_LIKE, generator=torch.Generator().manual_seed(5))
    y = torch.arange(8) % 10
    got = probes.evaluation_probes(net, x, y, tau=0.01)
    ref = net.double().eval()
    x = x.double()
    u0 = ref.primary(ref.stem(x)).pose
    passes = [[u0]] + [[] for _ in ref.caps]
    outs = []
    for l, layer in enumerate(ref.caps, start=1):
        outs.append(layer.step(outs[-1].pose if outs else u0, None, None))
        passes[l].append(outs[-1].pose)
    for _ in range(2):
        outs = [layer.step(outs[l - 2].pose if l > 1 else u0, None, outs[l - 1].pose)
                for l, layer in enumerate(ref.caps, start=1)]
        for l, o in enumerate(outs, start=1):
            passes[l].append(o.pose)
    loss, _ = losses.total_loss(networks.NetOutput(scores=outs[-1].act), x, y, 0.0)
    flat = [p for ps in passes for p in ps]
    grads = iter(torch.autograd.grad(loss * 8, flat, allow_unused=True))
    for l, ps in enumerate(passes):
        total = sum(g if g is not None else torch.zeros_like(p) for p, g in zip(ps, (next(grads) for _ in ps)))
        want = float(torch.linalg.vector_norm(total, dim=-1).mean())
        assert got[f"act_grad/l{l}"] == pytest.approx(want, rel=1e-9), l
        assert want > 0


# ---- training under published ------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["attention", "self"])
def test_published_families_train_probe_and_resume_exactly(routing):
    c = cfg(routing=routing, family_defaults="published", depth=2, init="std")
    c["train"].update(epochs=2, max_steps_per_epoch=3)
    reports, states = [], []
    fit(c, lambda m: reports.append(stable(m)), data=RAW, checkpoint=states.append)
    assert [m["status"] for m in reports] == ["running", "finished"]
    last = reports[-1]
    assert all(math.isfinite(last[f"act_grad/l{l}"]) and last[f"act_grad/l{l}"] > 0 for l in range(4))
    assert "tree_score/l3" in last
    resumed = []
    fit(c, lambda m: resumed.append(stable(m)), data=RAW, state=states[0])   # BatchNorm's running stats too
    assert resumed == reports[1:]
