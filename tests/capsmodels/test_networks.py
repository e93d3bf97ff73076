"""Network assembly: Sabour's parameter count, shapes for every depth and routing, fit checks, CNN."""
import dataclasses
import math

import pytest
import torch

from capsmodels import probes
from capsmodels.config import ConfigError, DataConfig, ModelConfig, RunConfig, from_dict
from capsmodels.networks import CNN, CapsNet, NetOutput, build, check_fits, count_parameters
from capsmodels.presets import PRESETS

MNIST = (1, 28, 28)


def model_cfg(preset, **kw):
    return from_dict({"model": {"preset": preset, **kw}}).model


def test_sabour_parameter_count():
    # conv1 9*9*1*256+256 = 20,992; primary 9*9*256*256+256 = 5,308,672; W 1152*10*16*8 = 1,474,560;
    # decoder 160*512+512 + 512*1024+1024 + 1024*784+784 = 1,411,344  -> 8,215,568 (Sabour et al. 2017)
    net = build(model_cfg("sabour"), MNIST, 10)
    assert count_parameters(net) == 20992 + 5308672 + 1474560 + 82432 + 525312 + 803600 == 8215568
    assert [tuple(w.shape) for w in net.layer_weights()] == [(256, 256, 9, 9), (1152, 10, 16, 8)]


def test_presets_are_model_config_fields_and_build():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {"sabour", "small", "tiny", "cnn"} <= set(PRESETS)
    assert ModelConfig().preset == "small"
    for name, preset in PRESETS.items():
        assert set(preset) <= fields, name
        net = build(model_cfg(name), MNIST, 10)
        out = net(torch.rand(2, *MNIST))
        assert out.scores.shape == (2, 10)
    tiny = build(model_cfg("tiny"), MNIST, 10)
    assert tiny(torch.rand(1, *MNIST)).layers[0].act.shape[1] <= 400     # a few hundred primaries
    build(model_cfg("tiny"), (1, 8, 8), 10)                               # fits sklearn digits


@pytest.mark.parametrize("routing", ["dynamic", "em", "uniform"])
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_shapes_every_depth_and_routing(routing, depth):
    torch.manual_seed(depth)
    cfg = model_cfg("tiny", routing=routing, depth=depth, bias=True, init="fan")
    net = build(cfg, MNIST, 10)
    x, y = torch.rand(3, *MNIST), torch.tensor([1, 2, 3])
    out = net(x, y)
    assert isinstance(out, NetOutput)
    assert out.scores.shape == (3, 10) and ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.recon.shape == (3, 784) and ((out.recon >= 0) & (out.recon <= 1)).all()
    assert len(out.layers) == depth + 2 == len(net.layer_weights())
    n = [8 * 6 * 6] + [cfg.num_caps] * depth + [10]
    d = [cfg.primary_dim] + [cfg.caps_dim] * depth + [cfg.out_dim]
    for l, tr in enumerate(out.layers):
        assert tr.act.shape == (3, n[l]) and tr.pose.shape == (3, n[l], d[l]) and tr.s_norm.shape == (3, n[l])
        assert tr.routes == (l > 0 and routing != "uniform")
        if routing != "em" or l == 0:
            torch.testing.assert_close(tr.act, tr.pose.norm(dim=-1))      # a_j = ||v_j||
        if l == 0:
            assert tr.coupling is None and tr.gain.shape == (3, n[0])
        else:
            assert tr.coupling.shape == (3, n[l - 1], n[l])
            torch.testing.assert_close(tr.coupling.sum(-1), torch.ones(3, n[l - 1]))
            assert (tr.gain is None) == (routing == "em")
    torch.testing.assert_close(out.scores, out.layers[-1].act)
    assert out.layers[-1].act.requires_grad                          # traces stay on the graph
    (out.scores.sum() + out.recon.sum()).backward()
    for l, w in enumerate(net.layer_weights()):
        assert w.grad is not None and torch.isfinite(w.grad).all(), l
    W = net.layer_weights()
    assert W[1].shape == (n[0], n[1], cfg.caps_dim if depth else cfg.out_dim, cfg.primary_dim)


def test_decoder_is_masked_by_label_else_argmax():
    torch.manual_seed(0)
    net = build(model_cfg("tiny", init="fan"), MNIST, 10)
    seen = []
    net.decoder[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    x = torch.rand(2, *MNIST)
    y = torch.tensor([4, 7])
    out = net(x, y)
    dec_in = seen[-1].view(2, 10, 8)
    class_pose = out.layers[-1].act  # lengths of the class capsules
    for b in range(2):
        for k in range(10):
            if k == y[b]:
                torch.testing.assert_close(dec_in[b, k].norm(), class_pose[b, k])
            else:
                assert dec_in[b, k].abs().sum() == 0
    out = net(x)
    pred = out.scores.argmax(1)
    for b in range(2):
        assert seen[-1].view(2, 10, 8)[b].abs().sum(-1).nonzero().flatten().tolist() == [pred[b].item()]


def test_check_fits_errors_name_the_field():
    run = RunConfig(model=model_cfg("tiny", conv_kernel=5, primary_kernel=9), data=DataConfig(name="digits"))
    with pytest.raises(ConfigError) as e:
        check_fits(run, (1, 8, 8))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.primary_kernel: 9 does not fit the 4x4 feature map of data 'digits' (8x8 input)")
    with pytest.raises(ConfigError, match=r"^model.conv_kernel: 9 does not fit the 8x8 input"):
        check_fits(model_cfg("sabour"), (1, 8, 8))
    with pytest.raises(ConfigError, match=r"^model.conv_kernel: 5 .* 2 stem conv"):
        check_fits(model_cfg("tiny", conv_channels=[4, 4], conv_kernel=5), (1, 8, 8))
    with pytest.raises(ConfigError, match="model.primary_kernel"):
        build(model_cfg("sabour", primary_kernel=21), MNIST, 10)        # 20x20 map after conv1
    check_fits(model_cfg("sabour", primary_kernel=20), MNIST)           # exactly fits: 1x1 map
    net = build(model_cfg("sabour", primary_kernel=20, decoder=False), MNIST, 10)
    assert net(torch.rand(1, *MNIST)).layers[0].act.shape == (1, 32)


def test_cnn_baseline_matches_capsnet_encoder_size():
    cnn = build(model_cfg("cnn"), MNIST, 10)
    assert isinstance(cnn, CNN)
    caps = build(model_cfg("small", decoder=False), MNIST, 10)
    assert isinstance(caps, CapsNet)
    assert abs(count_parameters(cnn) / count_parameters(caps) - 1) < 0.01
    out = cnn(torch.randn(4, *MNIST), torch.arange(4))
    assert out.recon is None
    assert ((out.scores > 0) & (out.scores < 1)).all()
    # depth 0: l0 the primary conv cut into capsules, l1 the class scores; the width layer untraced
    assert [tuple(tr.pose.shape) for tr in out.layers] == [(4, 16 * 6 * 6, 8), (4, 10, 1)]
    torch.testing.assert_close(out.layers[-1].act, out.scores)
    assert [w.dim() for w in cnn.layer_weights()] == [4, 2]               # primary conv, class head
    wide = build(model_cfg("cnn", cnn_width=7), MNIST, 10)
    assert wide.hidden[0].weight.shape[0] == 7 and len(wide.hidden) == 1


def test_cnn_primary_capsules_are_grouped_like_primarycaps():
    """l0 capsule n = k*H*W + y*W + x holds conv channels k*D..k*D+D-1 at (y, x) after the ReLU."""
    torch.manual_seed(0)
    cnn = build(model_cfg("tiny", arch="cnn"), MNIST, 10)
    x = torch.rand(2, *MNIST)
    h = torch.relu(cnn.primary(cnn.stem(x))).detach()                     # (2, K*D, 6, 6)
    pose = cnn(x).layers[0].pose.detach()
    K, D, H, W = 8, 4, 6, 6
    assert pose.shape == (2, K * H * W, D)
    for k, y, xx in [(0, 0, 0), (3, 2, 5), (7, K - 3, 1)]:
        torch.testing.assert_close(pose[:, k * H * W + y * W + xx], h[:, k * D:(k + 1) * D, y, xx])


@pytest.mark.parametrize("depth", [1, 3])
def test_cnn_control_at_depth(depth):
    torch.manual_seed(1)
    cfg = model_cfg("tiny", arch="cnn", depth=depth)
    cnn = build(cfg, MNIST, 10)
    units = cfg.num_caps * cfg.caps_dim                                   # 8 x 4 = 32
    feats = 8 * 4 * 6 * 6
    conv = (1 * 9 + 1) * 16 + (16 * 16 + 1) * 32                          # stem 3x3x1->16, primary 4x4x16->32
    dense = (feats + 1) * units + (depth - 1) * (units + 1) * units + (units + 1) * 10
    assert count_parameters(cnn) == conv + dense
    out = cnn(torch.rand(5, *MNIST))
    shapes = [(5, 288, 4)] + [(5, cfg.num_caps, cfg.caps_dim)] * depth + [(5, 10, 1)]
    assert [tuple(tr.pose.shape) for tr in out.layers] == shapes
    assert len(cnn.layer_weights()) == depth + 2
    for tr in out.layers:
        assert tr.coupling is None and tr.gain is None and not tr.routes
    for tr in out.layers[:-1]:
        torch.testing.assert_close(tr.act, tr.pose.norm(dim=-1))
    # Kaiming-normal hidden layers: std sqrt(2 / fan_in), zero bias
    for lin in cnn.hidden:
        assert abs(lin.weight.std().item() / math.sqrt(2 / lin.in_features) - 1) < 0.05
        assert torch.equal(lin.bias.detach(), torch.zeros(units))


def test_cnn_control_keeps_its_gradient_at_depth_6_where_a_std_capsnet_loses_it():
    """act_grad/l1 / act_grad/l{L} at initialisation (the probe `grad_ratio`)."""
    torch.manual_seed(2)
    x, y = torch.rand(32, *MNIST), torch.arange(32) % 10
    ratios = {}
    for arch in ("cnn", "capsnet"):
        torch.manual_seed(3)
        net = build(model_cfg("tiny", arch=arch, depth=6, init="std"), MNIST, 10)
        ratios[arch] = probes.evaluation_probes(net, x, y, tau=0.01, recon_weight=0.0005).get("grad_ratio", 0.0)
    assert 0.02 < ratios["cnn"] < 50, ratios
    assert ratios["capsnet"] < 1e-30, ratios


def test_em_and_detach_options_reach_layers():
    net = build(model_cfg("tiny", depth=1, routing="em", iterations=2, detach_inner=True), MNIST, 10)
    assert all(layer.routing == "em" and layer.iterations == 2 and layer.detach_inner for layer in net.caps)
    assert hasattr(net.caps[0], "beta_u") and hasattr(net.caps[1], "beta_a")


@pytest.fixture
def toy_family():
    """A routing family defined here and registered with one call, nothing else edited: couplings
    c_ij = softmax_j(theta)_j from a learned (J,) vector theta (input-independent), v_j = squash(s_j)."""
    from capsmodels.functional import safe_norm, squash
    from capsmodels.registry import Routed, register_routing, unregister_routing

    def params(n_out, d_out):
        return {"theta": torch.nn.Parameter(torch.zeros(n_out))}

    @register_routing("toy", adaptive=False, params=params, doc="learned fixed couplings (test)")
    def toy(u_hat, a_in, layer, opts):
        B, I, J, _ = u_hat.shape
        c = torch.softmax(layer.theta, 0).expand(B, I, J)
        s = torch.einsum("bij,bijd->bjd", c, u_hat)
        if layer.bias is not None:
            s = s + layer.bias
        v = squash(s, kind=opts.squash)
        return Routed(v, safe_norm(v), c, s)

    yield "toy"
    unregister_routing("toy")


def test_a_registered_family_is_a_valid_routing_and_builds(toy_family):
    cfg = model_cfg("tiny", routing=toy_family, depth=1, bias=True, init="fan")
    torch.manual_seed(5)
    net = build(cfg, MNIST, 10)
    torch.manual_seed(5)
    uniform = build(dataclasses.replace(cfg, routing="uniform"), MNIST, 10)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("theta")}
    assert set(net.state_dict()) - set(state) == {"caps.0.theta", "caps.1.theta"}
    uniform.load_state_dict(state)                      # the same draws: theta is not random
    x = torch.rand(3, *MNIST, dtype=torch.float64)
    out, ref = net.double()(x), uniform.double()(x)     # theta = 0: c = 1/J, uniform routing's s
    torch.testing.assert_close(out.scores, ref.scores)
    assert not any(tr.routes for tr in out.layers)      # not adaptive: the routing probes are n/a
    out.scores.sum().backward()
    assert net.caps[1].theta.grad is not None and net.caps[1].theta.grad.abs().sum() > 0


def test_an_unregistered_family_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="model.routing: 'toy' is not allowed; choose one of dynamic, em, uniform"):
        model_cfg("tiny", routing="toy")


def test_config_import_stays_below_the_models():
    """Importing the schema imports no torch; validating a routing name loads the built-in families."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; from capsmodels import config; before = 'torch' in sys.modules; "
            "config.from_dict({'model': {'routing': 'em'}}); print(before, config.ROUTINGS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "False ('dynamic', 'em', 'uniform', 'attention', 'self', 'efficient')"


def test_config_load_layers_defaults_preset_file_and_overrides(tmp_path):
    from capsmodels.config import load
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: sabour\n  depth: 1\n  num_caps: ${model.depth}\n"
                    "train:\n  epochs: 5\n")
    cfg = load(path, ["model.depth=2", "model.conv_channels=[32, 64]", "data.name=digits"])
    assert (cfg.model.depth, cfg.model.conv_channels, cfg.train.epochs) == (2, [32, 64], 5)
    assert cfg.model.primary_channels == PRESETS["sabour"]["primary_channels"] == 32   # the preset
    assert cfg.model.num_caps == 1                  # interpolated in the file, before the overrides
    assert cfg.data.name == "digits" and cfg.train.lr == RunConfig().train.lr       # a default
    assert load(None, ["model.preset=tiny"]).model == model_cfg("tiny")
    assert load() == from_dict({})


@pytest.mark.parametrize("text, overrides, needle", [
    (None, [], "is not a file"),
    ("model: [unclosed\n", [], "cannot be read as YAML"),
    ("- a list\n", [], "must be a mapping"),
    ("model: {}\n", ["model.depth=[1"], "override:"),
    ("model: {}\n", ["model.depth=-1"], "model.depth: -1 is not allowed"),
])
def test_config_load_errors_are_one_line(tmp_path, text, overrides, needle):
    from capsmodels.config import load
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# another valid value of each key a cnn does not read (capsmodels/contract.py CNN_UNUSED_KEYS)
OTHER_VALUE = {"routing": "em", "iterations": 1, "detach_inner": True, "bias": True, "squash": "exp",
               "init": "fan", "init_std": 0.05, "init_scale": 2.0, "init_target": 0.5, "bias_init": 0.3,
               "decoder": False, "recon_weight": 0.1, "out_dim": 6, "residual": True, "residual_dist": 1,
               "pose_norm": True}


@pytest.mark.parametrize("key", sorted(OTHER_VALUE))
def test_the_keys_a_cnn_does_not_read_leave_it_as_it_was(key):
    """What reports leave out of a cnn control's label (CNN_UNUSED_KEYS) changes nothing in a cnn: the
    same seed builds the same weights and the same outputs; a key the cnn reads (num_caps) does change it."""
    from capsmodels.contract import CNN_UNUSED_KEYS
    assert sorted(k.split(".", 1)[1] for k in CNN_UNUSED_KEYS) == sorted(OTHER_VALUE)
    x = torch.rand(3, *MNIST, generator=torch.Generator().manual_seed(0))

    def built(**kw):
        torch.manual_seed(7)
        net = build(model_cfg("tiny", arch="cnn", depth=2, **kw), MNIST, 10).eval()
        with torch.no_grad():
            return net.state_dict(), net(x).scores
    (w0, s0), (w1, s1) = built(), built(**{key: OTHER_VALUE[key]})
    base = model_cfg("tiny", arch="cnn", depth=2)
    assert getattr(base, key) != OTHER_VALUE[key]          # the value does differ from the built one
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert torch.equal(s0, s1)
    _, s2 = built(num_caps=6)
    assert s2.shape == s0.shape and not torch.equal(s2, s0)
