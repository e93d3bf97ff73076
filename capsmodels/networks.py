"""Networks of the sweep: the CapsNet family (depth 0 = Sabour et al. 2017) and a plain CNN baseline.

CapsNet: stem conv(s) (ReLU) -> PrimaryCaps -> `depth` hidden CapsuleLayers (num_caps x caps_dim)
-> class capsules (num_classes x out_dim) -> optional masked decoder 512-1024-C*H*W (sigmoid).
Remedies (`CapsNet.pass_on`): `model.residual` adds skips between hidden layers, `model.pose_norm`
layer-normalises every pose handed to a next capsule layer.
Every forward returns a `NetOutput` whose `layers` carry what the probes need (activations, couplings,
squash gains) as graph-attached tensors; capsule layer l = 0 is the primaries, depth+1 the classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsmodels.config import ConfigError, ModelConfig, resolve_start
from capsmodels.functional import safe_norm, squash_gain
from capsmodels.layers import CapsuleLayer, PrimaryCaps

DECODER_HIDDEN = (512, 1024)


@dataclass
class LayerTrace:
    """What the probes read of one capsule layer (docs/PROBES.md). Tensors stay on the graph: `pose`
    is the very tensor the next layer (or the loss) consumes, so autograd.grad(loss, pose) is dL/dv."""
    act: torch.Tensor                       # (B, n) a_j(x) = ||v_j|| (EM, self, attention: the family's
                                            # activation, docs/PROBES.md; CNN class: score)
    coupling: Optional[torch.Tensor]        # (B, n_in, n) final couplings; None for l = 0 and the CNN
    gain: Optional[torch.Tensor]            # (B, n) ||s|| / (1 + ||s||^2); None for EM, self and
                                            # attention layers and the CNN
    pose: Optional[torch.Tensor] = None     # (B, n, d) the pose v_j(x) the layer hands on (after the
                                            # remedies' skip and LayerNorm, CapsNet.pass_on)
    s_norm: Optional[torch.Tensor] = None   # (B, n) pre-squash length ||s_j(x)|| (EM: ||pose||); CNN None
    routes: bool = False                    # couplings can depend on x (routing probes apply)
    passes: Optional[list] = None           # concurrent schedule: the pose handed on at every pass (the
                                            # probes' act_grad sums dL/d over them); None: `pose` alone
    iterations: Optional[int] = None        # concurrent schedule: the passes behind `coupling` (its null
                                            # re-routes that many); None: the layer's own iterations


@dataclass
class NetOutput:
    scores: torch.Tensor                    # (B, K) in [0, 1]: class capsule lengths (EM: activations)
    recon: Optional[torch.Tensor] = None    # (B, C*H*W) or None
    layers: list = field(default_factory=list)   # LayerTrace per capsule layer, l = 0 .. depth+1


# ----------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------

def _model_cfg(cfg) -> ModelConfig:
    return cfg.model if hasattr(cfg, "model") else cfg


def feature_sizes(cfg: ModelConfig, in_shape) -> tuple:
    """(H, W) after the stem convs (stride 1, no padding) and after the primary conv; may be <= 0."""
    _, H, W = in_shape
    n = len(cfg.conv_channels)
    h, w = H - n * (cfg.conv_kernel - 1), W - n * (cfg.conv_kernel - 1)
    ph = (h - cfg.primary_kernel) // cfg.primary_stride + 1 if h >= cfg.primary_kernel else 0
    pw = (w - cfg.primary_kernel) // cfg.primary_stride + 1 if w >= cfg.primary_kernel else 0
    return (h, w), (ph, pw)


def check_fits(cfg, in_shape) -> None:
    """Raise ConfigError (one line) when the stem or primary kernels leave no spatial positions.

    cfg is a RunConfig (the message then names the dataset) or a ModelConfig; in_shape = (C, H, W).
    """
    m = _model_cfg(cfg)
    data = getattr(getattr(cfg, "data", None), "name", None)
    src = f" of data {data!r}" if data else ""
    _, H, W = in_shape
    n = len(m.conv_channels)
    (h, w), _ = feature_sizes(m, in_shape)
    if h < 1 or w < 1:
        most = (min(H, W) - 1) // n + 1
        raise ConfigError(f"model.conv_kernel: {m.conv_kernel} does not fit the {H}x{W} input{src} with "
                          f"{n} stem conv layer(s); use conv_kernel <= {most} or fewer conv_channels")
    if m.primary_kernel > min(h, w):
        raise ConfigError(f"model.primary_kernel: {m.primary_kernel} does not fit the {h}x{w} feature map"
                          f"{src} ({H}x{W} input); use primary_kernel <= {min(h, w)} or a smaller "
                          f"conv_kernel")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _stem(in_channels: int, cfg: ModelConfig) -> tuple:
    layers, c = [], in_channels
    for ch in cfg.conv_channels:
        layers += [nn.Conv2d(c, int(ch), cfg.conv_kernel), nn.ReLU(inplace=True)]
        c = int(ch)
    return nn.Sequential(*layers), c


# ----------------------------------------------------------------------------------------------------
# CapsNet
# ----------------------------------------------------------------------------------------------------

class CapsNet(nn.Module):
    def __init__(self, cfg: ModelConfig, in_shape, num_classes: int):
        super().__init__()
        C, H, W = in_shape
        self.num_classes = num_classes
        self.stem, c = _stem(C, cfg)
        self.primary = PrimaryCaps(c, cfg.primary_channels, cfg.primary_dim, cfg.primary_kernel,
                                   cfg.primary_stride, cfg.squash, cfg.primary_norm)
        _, (ph, pw) = feature_sizes(cfg, in_shape)
        sizes = [(cfg.primary_channels * ph * pw, cfg.primary_dim)]
        sizes += [(cfg.num_caps, cfg.caps_dim)] * cfg.depth + [(num_classes, cfg.out_dim)]
        self.caps = nn.ModuleList(
            CapsuleLayer(n_in, d_in, n_out, d_out, routing=cfg.routing, iterations=cfg.iterations,
                         bias=cfg.bias, squash_kind=cfg.squash, detach_inner=cfg.detach_inner,
                         init=cfg.init, init_std=cfg.init_std, init_scale=cfg.init_scale,
                         bias_init=cfg.bias_init)
            for (n_in, d_in), (n_out, d_out) in zip(sizes[:-1], sizes[1:]))
        self.depth, self.pose_norm, self.schedule = cfg.depth, cfg.pose_norm, cfg.schedule
        self.residual_dist = cfg.residual_dist if cfg.residual else 0
        self.decoder = None
        if cfg.decoder:
            h1, h2 = DECODER_HIDDEN
            self.decoder = nn.Sequential(
                nn.Linear(num_classes * cfg.out_dim, h1), nn.ReLU(inplace=True),
                nn.Linear(h1, h2), nn.ReLU(inplace=True), nn.Linear(h2, C * H * W), nn.Sigmoid())

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> NetOutput:
        prim = self.primary(self.stem(x))                       # pose (B, N0, d0), ||s||, act (B, N0)
        routed = [prim.pose]                                    # each layer's own output pose
        u = self.pass_on(0, routed)
        gain = squash_gain(prim.s_norm) if self.primary.norm == "squash" else None
        layers = [LayerTrace(prim.act, None, gain, u, prim.s_norm)]
        if self.schedule == "concurrent":
            layers += self._route_concurrent(prim.pose, u, prim.act)
        else:
            a = prim.act
            for l, layer in enumerate(self.caps, start=1):
                out = layer(u, a)                               # EM and self use a; the others ignore it
                routed.append(out.pose)
                u, a = self.pass_on(l, routed), out.act
                layers.append(LayerTrace(out.act, out.coupling, out.gain, u, out.s_norm, layer.routes))
        u, a = layers[-1].pose, layers[-1].act
        recon = None
        if self.decoder is not None:                            # mask all but the true (else best) class
            idx = y if y is not None else a.detach().argmax(1)
            mask = F.one_hot(idx, self.num_classes).to(u.dtype)  # (B, K)
            recon = self.decoder((u * mask.unsqueeze(-1)).flatten(1))
        return NetOutput(scores=a, recon=recon, layers=layers)

    def _route_concurrent(self, u0: torch.Tensor, handed0: torch.Tensor, a0: torch.Tensor) -> list:
        """The capsule layers routed CONCURRENTLY (Tsai et al.'s default; their src/capsule_model.py:
        141-158): pass 1 runs every layer once in order with uniform couplings; in each pass r = 2..R
        every layer l re-routes the input the layer below handed on in pass r - 1 against its own output
        of pass r - 1, so all layers move one pass at a time (sequential: layer l finishes its R passes
        before layer l + 1 starts). u0 / handed0 / a0: the primaries' pose, what they hand on, their
        activation. Returns a LayerTrace per capsule layer l = 1..L: layer l's pass t(l) =
        max(1, R - (L - l)), the one the class layer's last pass reads through the layers between
        (the outputs of hidden layers' later passes feed no later pass); `passes` holds the pose it
        handed on at every pass, so act_grad counts each path the loss reaches it by."""
        R, L = self.caps[0].iterations, len(self.caps)
        history = []                            # per pass: (outs, handed poses l = 0..L, acts l = 0..L)
        outs, handed, acts = [], [handed0], [a0]
        routed = [u0]
        for l, layer in enumerate(self.caps, start=1):               # pass 1: in order, c = 1/J
            outs.append(layer.step(handed[l - 1], acts[l - 1], None))
            routed.append(outs[-1].pose)
            handed.append(self.pass_on(l, routed))
            acts.append(outs[-1].act)
        history.append((outs, handed, acts))
        for _ in range(1, R):
            outs = [layer.step(handed[l - 1], acts[l - 1], outs[l - 1].pose)
                    for l, layer in enumerate(self.caps, start=1)]
            routed = [u0] + [o.pose for o in outs]
            handed = [handed0] + [self.pass_on(l, routed) for l in range(1, L + 1)]
            acts = [a0] + [o.act for o in outs]
            history.append((outs, handed, acts))
        traces = []
        for l, layer in enumerate(self.caps, start=1):
            t = max(1, R - (L - l))
            outs, handed, _ = history[t - 1]
            out = outs[l - 1]
            traces.append(LayerTrace(out.act, out.coupling, out.gain, handed[l], out.s_norm,
                                     layer.routes and t > 1, [h[1][l] for h in history], t))
        return traces

    def pass_on(self, l: int, routed: list) -> torch.Tensor:
        """The pose (B, n_l, d_l) capsule layer l hands to layer l+1, given routed[k] (B, n_k, d_k) the
        output poses of layers k = 0..l (l0: the squashed primaries).

        residual (Gugglberger, Peer, Rodriguez-Sanchez 2021; github.com/moejoe95/res-capsnet,
        capsule/capsule_network.py): a hidden layer l whose layer l - residual_dist is hidden too (the
        same shape) adds that layer's own output pose, before its skip (their `capsule_outputs`), with
        no squash after the sum (theirs is commented out). pose_norm: then LayerNorm over each capsule's
        d_l entries, no gain or offset. The class layer (l = depth + 1) is never changed: its poses'
        lengths are the scores. Activations are not changed either (a_j stays the layer's own).
        Without remedies this returns routed[l] itself.
        """
        pose = routed[l]
        if l > self.depth:
            return pose
        dist = self.residual_dist
        if dist and l - dist >= 1:
            pose = pose + routed[l - dist]
        if self.pose_norm:
            pose = F.layer_norm(pose, pose.shape[-1:])
        return pose

    def layer_weights(self) -> list:
        """W_l per capsule layer: l = 0 the PrimaryCaps conv weight, l >= 1 the transformations W."""
        return [self.primary.conv.weight] + [layer.W for layer in self.caps]


# ----------------------------------------------------------------------------------------------------
# CNN baseline
# ----------------------------------------------------------------------------------------------------

class CNN(nn.Module):
    """The control: stem convs -> the primary conv as a plain conv (ReLU) -> dense layers -> K scores.

    depth 0: one dense layer of `width` units (ReLU; PyTorch's default init), the baseline matched in
    size to the CapsNet encoder. depth d > 0: d dense layers of num_caps * caps_dim units (ReLU,
    Kaiming-normal weights, zero bias: He et al. 2015's rule keeps activation and gradient scales
    through ReLU layers), so a deep network that trains is there to compare with (docs/PROBES.md,
    "CNN control"). scores = sigmoid(logits): in [0, 1] like capsule lengths, so the same margin loss
    trains it. No decoder.

    Traces for the probes: l0 = the primary conv's output cut into "capsules" of primary_dim channels
    at one position (as PrimaryCaps), l1..ld = each hidden layer cut into capsules of caps_dim
    consecutive units, l{d+1} = the class layer, one 1-d "capsule" per class whose act is its score.
    The depth-0 width layer is not a capsule layer and is not traced.
    """

    def __init__(self, cfg: ModelConfig, in_shape, num_classes: int, width: int):
        super().__init__()
        C, _, _ = in_shape
        self.stem, c = _stem(C, cfg)
        _, (ph, pw) = feature_sizes(cfg, in_shape)
        self.primary_channels, self.primary_dim, self.caps_dim = cfg.primary_channels, cfg.primary_dim, cfg.caps_dim
        self.primary = nn.Conv2d(c, cfg.primary_channels * cfg.primary_dim, cfg.primary_kernel,
                                 cfg.primary_stride)
        widths = [width] if cfg.depth == 0 else [cfg.num_caps * cfg.caps_dim] * cfg.depth
        n_in = [cfg.primary_channels * cfg.primary_dim * ph * pw] + widths[:-1]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(n_in, widths))
        self.head = nn.Linear(widths[-1], num_classes)
        self.traced_hidden = cfg.depth > 0
        if self.traced_hidden:
            for lin in self.hidden:
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> NetOutput:
        h = F.relu(self.primary(self.stem(x)))                          # (B, K*d0, H, W)
        B, _, H, W = h.shape
        K, d0 = self.primary_channels, self.primary_dim
        u = h.view(B, K, d0, H, W).permute(0, 1, 3, 4, 2).reshape(B, K * H * W, d0)   # (B, N0, d0)
        layers = [LayerTrace(safe_norm(u), None, None, u)]
        z = u.view(B, K, H, W, d0).permute(0, 1, 4, 2, 3).reshape(B, -1)   # h.flatten(1), from u
        for lin in self.hidden:
            z = F.relu(lin(z))
            if self.traced_hidden:
                u = z.view(B, -1, self.caps_dim)                         # (B, num_caps, caps_dim)
                layers.append(LayerTrace(safe_norm(u), None, None, u))
                z = u.reshape(B, -1)
        pose = torch.sigmoid(self.head(z)).unsqueeze(-1)                # (B, K, 1)
        scores = pose.squeeze(-1)
        layers.append(LayerTrace(scores, None, None, pose))
        return NetOutput(scores=scores, recon=None, layers=layers)

    def layer_weights(self) -> list:
        """W_l per traced layer: l0 the primary conv, l1..ld the hidden layers, l{d+1} the head."""
        hidden = [lin.weight for lin in self.hidden] if self.traced_hidden else []
        return [self.primary.weight] + hidden + [self.head.weight]


def matched_cnn_width(cfg: ModelConfig, in_shape, num_classes: int) -> int:
    """Dense width giving the CNN about the parameters of the CapsNet encoder of the same config
    (everything but the decoder, which does not classify). Counted on the meta device: no memory."""
    C, _, _ = in_shape
    with torch.device("meta"):
        caps = CapsNet(replace(cfg, decoder=False), in_shape, num_classes)
        stem, c = _stem(C, cfg)
        conv = nn.Conv2d(c, cfg.primary_channels * cfg.primary_dim, cfg.primary_kernel, cfg.primary_stride)
    target = count_parameters(caps) - count_parameters(stem) - count_parameters(conv)
    _, (ph, pw) = feature_sizes(cfg, in_shape)
    feats = cfg.primary_channels * cfg.primary_dim * ph * pw
    # dense params: feats*w + w + w*K + K = target
    return max(1, round((target - num_classes) / (feats + 1 + num_classes)))


def build(cfg, in_shape, num_classes: int) -> nn.Module:
    """The network of `cfg` (a ModelConfig, or a RunConfig: a misfit's message then names the dataset)
    for inputs (C, H, W) and `num_classes` classes. Raises ConfigError when the kernels do not fit the
    input (see `check_fits`)."""
    in_shape = tuple(int(v) for v in in_shape)
    check_fits(cfg, in_shape)
    cfg = resolve_start(_model_cfg(cfg))       # family_defaults: published (a validated config has it already)
    if cfg.arch == "cnn":
        width = 0 if cfg.depth > 0 else (  # the width only sizes the depth-0 baseline's dense layer
            cfg.cnn_width if cfg.cnn_width > 0 else matched_cnn_width(cfg, in_shape, num_classes))
        return CNN(cfg, in_shape, num_classes, width)
    if cfg.arch != "capsnet":
        raise ConfigError(f"model.arch: {cfg.arch!r} is not allowed; choose one of capsnet, cnn")
    return CapsNet(cfg, in_shape, num_classes)
