"""Capsule building blocks: PrimaryCaps and a fully connected CapsuleLayer (squash: capsmodels.functional).

Shapes: B batch, I / J capsules in the lower / upper layer, d_in / d_out their pose sizes.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

import capsmodels.routing  # noqa: F401 - registers the built-in routing families (capsmodels.registry)
from capsmodels.config import INITS
from capsmodels.functional import safe_norm, squash, squash_gain, squash_length
from capsmodels.registry import RouteOptions, Routed, RoutingFamily, get_routing


class PrimaryOut(NamedTuple):
    pose: torch.Tensor                 # (B, N, dim) the primaries' poses
    s_norm: torch.Tensor               # (B, N) the conv output's length per capsule (before squash/norm)
    act: torch.Tensor                  # (B, N) activations: ||pose|| (squash, layernorm) or sigmoid(BN(conv))


class PrimaryCaps(nn.Module):
    """A convolution whose output channels are cut into capsules of `dim` channels.

    Capsule (k, y, x) is the `dim` channels k*dim .. k*dim+dim-1 at ONE spatial position (y, x), for
    capsule channel k: conv output (B, K*dim, H, W) -> (B, K, dim, H, W) -> (B, K, H, W, dim)
    -> (B, K*H*W, dim), so capsule index n = k*H*W + y*W + x.

    `norm` (model.primary_norm) says how the conv output s becomes a pose:
      squash     squash(s) with `squash_kind` (Sabour et al.); activation ||v||.
      layernorm  LayerNorm over each capsule's dim entries with a learned gain and offset, conv without
                 bias (Tsai et al.'s code: src/capsule_model.py:45-55,138); activation ||v||, about
                 sqrt(dim) at the start: a length, not a probability (the attention family ignores it).
      batchnorm  BatchNorm2d over the K*dim conv channels, and a second conv of K channels whose
                 BatchNorm2d'd output through a sigmoid is each capsule's activation, both convs without
                 bias (Hahn et al.'s code: models/convnet.py:79-82,137-138).
    """

    def __init__(self, in_channels: int, caps_channels: int, dim: int, kernel: int, stride: int,
                 squash_kind: str = "sabour", norm: str = "squash"):
        super().__init__()
        self.caps_channels, self.dim, self.squash_kind, self.norm = caps_channels, dim, squash_kind, norm
        self.conv = nn.Conv2d(in_channels, caps_channels * dim, kernel, stride, bias=norm == "squash")
        if norm == "layernorm":
            self.ln = nn.LayerNorm(dim)
        elif norm == "batchnorm":
            self.bn = nn.BatchNorm2d(caps_channels * dim)
            self.conv_a = nn.Conv2d(in_channels, caps_channels, kernel, stride, bias=False)
            self.bn_a = nn.BatchNorm2d(caps_channels)
        elif norm != "squash":
            raise ValueError(f"primary_norm {norm!r} is not allowed; choose one of squash, layernorm, batchnorm")

    def _capsules(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        """(B, K*dim, H, W) -> (B, K*H*W, dim) in the capsule order of the class docstring."""
        B, _, H, W = s.shape
        s = s.view(B, self.caps_channels, dim, H, W).permute(0, 1, 3, 4, 2)
        return s.reshape(B, self.caps_channels * H * W, dim)

    def forward(self, x: torch.Tensor) -> PrimaryOut:
        """x (B, C, H, W) -> PrimaryOut(pose (B, N, dim), ||s|| (B, N) of the conv output, act (B, N))."""
        s = self.conv(x)                                                    # (B, K*dim, H, W)
        s_caps = self._capsules(s, self.dim)                                # (B, N, dim)
        if self.norm == "squash":
            v = squash(s_caps, kind=self.squash_kind)
            return PrimaryOut(v, safe_norm(s_caps), safe_norm(v))
        if self.norm == "layernorm":
            v = self.ln(s_caps)
            return PrimaryOut(v, safe_norm(s_caps), safe_norm(v))
        v = self._capsules(self.bn(s), self.dim)
        a = torch.sigmoid(self._capsules(self.bn_a(self.conv_a(x)), 1)).squeeze(-1)
        return PrimaryOut(v, safe_norm(s_caps), a)

    def normalised(self) -> bool:
        """Whether the poses are normalised (their scale is not the conv's): `init: data` leaves the
        conv alone then."""
        return self.norm != "squash"


class CapsOut(NamedTuple):
    pose: torch.Tensor                 # (B, J, d_out): v (dynamic/uniform) or mu (+ bias) (EM)
    act: torch.Tensor                  # (B, J): ||v_j|| or the EM activation
    coupling: torch.Tensor             # (B, I, J): final couplings / EM assignments
    gain: Optional[torch.Tensor]       # (B, J): ||s|| / (1 + ||s||^2), None for EM, self, attention
    s_norm: torch.Tensor               # (B, J): pre-squash length ||s_j|| (EM, self: ||pose_j||;
                                       # attention: the pre-LayerNorm ||s_j||)


def fan_std(n_in: int, n_out: int, d_out: int, squash_kind: str = "sabour") -> float:
    """Weight std that gives parents ||s|| of about 1 IF every input capsule has length
    rho = squash_length(1) (0.5 for sabour): an assumption, not a measurement.

    Derivation. With W_ij entries i.i.d. N(0, sigma^2), E||W_ij u_i||^2 = d_out sigma^2 ||u_i||^2. At
    initialisation the couplings are about uniform, c_ij = 1/J, and s_j = (1/J) sum_i W_ij u_i is a sum of
    I independent zero-mean vectors, so E||s_j||^2 = I d_out sigma^2 rho^2 / J^2, with rho^2 the mean
    squared input length. Setting it to 1 gives sigma = J / (rho sqrt(I d_out)).
    rho = squash_length(1) is the fixed point of a chain of such layers: a layer at ||s|| = 1 outputs
    length squash_length(1), which gives the next layer ||s|| = 1 again. What breaks it: the primary
    capsules (PyTorch's default conv init, not touched by `fan`) come out much shorter than rho, and
    sabour's squash maps a short length x to about x^2, so every layer starts below the fixed point and
    lengths fall layer after layer. docs/PROBES.md ("Initialisation") measures it; `init: data`
    (capsmodels.init) measures the lengths instead of assuming them.
    (Public code uses sigma = 0.01: for Sabour's class layer, I=1152, J=10, d_out=16, that is
    ||s|| ~ 0.14 rho; this rule gives sigma ~ 0.15.)
    """
    rho = squash_length(1.0, squash_kind)
    return n_out / (rho * math.sqrt(n_in * d_out))


MAZZIA_TRUNC = 0.87962566103423978   # std of N(0, 1) truncated at +-2: Keras' he_normal divides by it


def init_weights(W: torch.Tensor, init: str, std: float) -> None:
    """Draw W (I, J, d_out, d_in) in place by the rule `init` (model.init); `std` is the std of the
    capsweep rules (std, data: init_std; fan: the fan_std scale). The authors' rules, as their code draws
    its W for a fully connected capsule layer (citations: the families' `PUBLISHED` entries):
      tsai     N(0, J / (d_in I))                      attention (layers.py:107-109)
      mazzia   Keras he_normal: N(0, s'^2) truncated at +-2 s', s' = sqrt(2 / (d_in J I)) / 0.8796, so its
               std is sqrt(2 / (d_in J I)); Keras' fan_in of the (J, I, d_in, d_out) kernel is d_in J I
                                                       Efficient-CapsNet (utils/layers.py:158,168)
      hahn     U(-b, b), b = sqrt(6 / (J d_out d_in)): torch's kaiming_uniform_ (a = 0) on a (I, J d_out,
               d_in) tensor, whose fan_in torch takes as J d_out d_in  self-routing (modules.py:232-233)
    """
    I, J, d_out, d_in = W.shape
    with torch.no_grad():
        if init == "tsai":
            W.normal_(0.0, math.sqrt(J / (d_in * I)))
        elif init == "mazzia":
            s = math.sqrt(2.0 / (d_in * J * I)) / MAZZIA_TRUNC
            nn.init.trunc_normal_(W, 0.0, s, -2 * s, 2 * s)
        elif init == "hahn":
            b = math.sqrt(6.0 / (J * d_out * d_in))
            W.uniform_(-b, b)
        else:
            W.copy_(torch.randn(W.shape) * std)


class CapsuleLayer(nn.Module):
    """Fully connected capsule layer: predictions u_hat_ij = W_ij u_i, then routing to J parents.

    W (I, J, d_out, d_in). `init`: "std" draws N(0, init_std) (public code); "fan" draws
    N(0, (init_scale * fan_std)^2) (see `fan_std`); "data" draws like "std" and is then rescaled on a
    training batch by `capsmodels.init.data_init`. bias (J, d_out) is added to s before the squash
    (Peer et al. 2019); for EM it is added to the output pose. `routing` names a family of
    `capsmodels.registry`, which may add its own parameters (EM: beta_u, beta_a (J,); attention:
    ln_weight, ln_bias (d_out,); self: w_route (I, J, d_out), b_route (I, J); efficient: priors (I, J)).

    bias_init: the bias starts at this constant (default 0.1), as in Peer et al.'s code
    (github.com/peerdavid/gamma-capsule-network, capsule/gamma_capsule_layer.py:
    `tf.constant_initializer(0.1)`) and in Sabour et al.'s official code
    (github.com/Sarasra/models, research/capsules/models/layers/variables.py, `bias_variable`:
    `tf.constant_initializer(0.1)`). A zero bias gives a collapsed layer nothing to start from.
    """

    def __init__(self, n_in: int, d_in: int, n_out: int, d_out: int, routing: str = "dynamic",
                 iterations: int = 3, bias: bool = False, squash_kind: str = "sabour",
                 detach_inner: bool = False, init: str = "std", init_std: float = 0.01,
                 init_scale: float = 1.0, bias_init: float = 0.1):
        super().__init__()
        family = get_routing(routing)                       # ValueError naming the allowed families
        if init not in INITS:
            raise ValueError(f"init {init!r} is not allowed; choose one of {', '.join(INITS)}")
        self.n_in, self.d_in, self.n_out, self.d_out = n_in, d_in, n_out, d_out
        self.routing, self.iterations, self.squash_kind = routing, iterations, squash_kind
        self.detach_inner = detach_inner
        std = init_scale * fan_std(n_in, n_out, d_out, squash_kind) if init == "fan" else init_std
        if init in ("std", "fan", "data"):      # drawn as before the authors' rules existed: same numbers
            self.W = nn.Parameter(torch.randn(n_in, n_out, d_out, d_in) * std)
        else:
            self.W = nn.Parameter(torch.empty(n_in, n_out, d_out, d_in))
            init_weights(self.W, init, std)
        self.bias = nn.Parameter(torch.full((n_out, d_out), float(bias_init))) if bias else None
        own = dict(family.params(n_out, d_out) if family.params else {})
        own.update(family.child_params(n_in, n_out, d_out) if family.child_params else {})
        for name, param in own.items():
            self.register_parameter(name, param)            # the family's own (EM: beta_u, beta_a)

    @property
    def family(self) -> RoutingFamily:
        """The registered routing family (looked up by name, so a layer pickles without it)."""
        return get_routing(self.routing)

    @property
    def options(self) -> RouteOptions:
        return RouteOptions(self.iterations, self.detach_inner, self.squash_kind)

    @property
    def routes(self) -> bool:
        """Whether the couplings can depend on the input: not for a non-adaptive family (uniform) or
        an iterative one with 1 iteration (then c = 1/J, or EM's uniform first assignment); a
        one-pass family (self, efficient) routes at any `iterations`. The routing probes are n/a
        otherwise."""
        family = self.family
        return family.adaptive and (self.iterations > 1 or not family.iterative)

    def predict(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, I, d_in) -> u_hat (B, I, J, d_out), laid out (B, J, I, d_out) in memory for routing.

        One batched GEMM over i, (B x d_in) @ (d_in x J*d_out) each, not B*I*J tiny (d_out x d_in)
        products (einsum runs it as one bmm). Its (I, B, J, d_out) result is copied once into the
        (B, J, I, d_out) layout: there every routing pass is a batched vector-matrix product over
        contiguous (I, d_out) blocks; reading the GEMM's layout directly made those passes ~5x slower.
        """
        uT = torch.einsum("ijek,bik->bjie", self.W, u).contiguous()
        return uT.permute(0, 2, 1, 3)

    def route(self, u_hat: torch.Tensor, a_in: torch.Tensor, iterations: Optional[int] = None) -> CapsOut:
        """The layer's routing family on predictions u_hat (B, I, J, d_out); a_in (B, I) child
        activations (used by EM). iterations: instead of the layer's own (the routing null of a layer
        routed concurrently, whose couplings come from fewer passes).

        Separate from `forward` so the routing null (capsmodels.probes.routing_null) re-routes
        predictions shuffled across inputs with exactly the layer's own routing.
        """
        family = self.family
        opts = self.options if iterations is None else replace(self.options, iterations=iterations)
        return _caps_out(family.route(u_hat, a_in, self, opts), family.squashes)

    def step(self, u: torch.Tensor, a_in: torch.Tensor, prev: Optional[torch.Tensor]) -> CapsOut:
        """ONE routing pass on input poses u (B, I, d_in) against this layer's own output poses of the
        previous pass `prev` (B, J, d_out) (None: the first pass): the concurrent schedule's unit
        (capsmodels.networks.CapsNet). Only for a family with a `step` (attention)."""
        family = self.family
        if family.step is None:
            raise ValueError(f"routing {self.routing!r} cannot route one pass at a time (concurrent schedule)")
        return _caps_out(family.step(self.predict(u), a_in, self, self.options, prev), family.squashes)

    def forward(self, u: torch.Tensor, a_in: Optional[torch.Tensor] = None) -> CapsOut:
        """u (B, I, d_in) input poses; a_in (B, I) input activations (EM only; default ||u||)."""
        family = self.family
        if family.shortcut is not None:                     # uniform: one matmul, no u_hat at all
            return _caps_out(family.shortcut(u, self, self.options))
        return self.route(self.predict(u), safe_norm(u) if a_in is None else a_in)


def _caps_out(r: Routed, squashes: bool = True) -> CapsOut:
    """A family's result with the lengths the probes read: ||s|| and the squash gain, or for a family
    without a squash (s None: EM, self) ||pose|| and no gain; a family whose s is not squashed
    (attention: LayerNorm) gives ||s|| and no gain."""
    if r.s is None:
        return CapsOut(r.pose, r.act, r.coupling, None, safe_norm(r.pose))
    s_norm = safe_norm(r.s)
    return CapsOut(r.pose, r.act, r.coupling, squash_gain(s_norm) if squashes else None, s_norm)
