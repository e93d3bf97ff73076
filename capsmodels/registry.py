"""Routing families by name (timm-style registry): a new family is one module plus one registration.

A family is a routing function with ONE signature,

    route(u_hat, a_in, layer, opts) -> Routed(pose, act, coupling, s)

  u_hat    (B, I, J, D) predictions of the I children for the J parents (`CapsuleLayer.predict`);
  a_in     (B, I) child activations (the primaries' lengths, or the layer below's `act`);
  layer    the `CapsuleLayer` calling it: its parameters (`layer.bias` (J, D) or None, and any the
           family declared with `params`);
  opts     `RouteOptions` (iterations, detach_inner, squash) from the model config;
  returns  pose (B, J, D) the parents' output poses, act (B, J) their activations in [0, 1],
           coupling (B, I, J) the final couplings (summing to 1 over parents), and s (B, J, D) the
           squash input whose length gives the probes' `squash_gain`, or None when the family has no
           squash (then the layer reports ||pose|| as the pre-squash length and no gain);

plus what the layer needs to know about it at construction (see `RoutingFamily`). `CapsuleLayer`,
`config.validate` (allowed `model.routing` values) and the sweeps read this table and nothing else, so
none of them changes when a family is added:

    @register_routing("mine", doc="...")
    def mine(u_hat, a_in, layer, opts): ...

Layering (timm's): this module is the lowest layer of the models and knows no model. Standard library
only, it imports nothing of capsmodels; the schema (`capsmodels.config`) validates through it without
importing torch. The built-in families (`capsmodels.routing.dynamic`, `.em`, `.uniform`, `.attention`,
`.selfrouting`, `.efficient`) register themselves where the package is assembled: importing
`capsmodels.routing` (which `capsmodels.layers` does, and `capsmodels.config` on its first lookup of a
name). A family defined elsewhere (a test, a user's module) is valid once its module has run. The
squash kinds (`SQUASHES`) are named here too, beside the families: the schema checks `model.squash`
against them and `capsmodels.functional` implements them, and neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional


SQUASHES = ("sabour", "exp", "tanh")      # model.squash: the kinds capsmodels.functional.squash computes


class Routed(NamedTuple):
    """What a routing family returns (shapes in the module docstring)."""
    pose: Any                        # (B, J, D) tensor
    act: Any                         # (B, J)
    coupling: Any                    # (B, I, J)
    s: Optional[Any]                 # (B, J, D) squash input, or None (no squash: EM)


@dataclass(frozen=True)
class RouteOptions:
    """The model config's routing fields, as a family reads them."""
    iterations: int = 3              # model.iterations (>= 1)
    detach_inner: bool = False       # model.detach_inner
    squash: str = "sabour"           # model.squash: the kind of `capsmodels.functional.squash`


RouteFn = Callable[[Any, Any, Any, RouteOptions], Routed]
# one routing pass given the layer's own output of the previous pass (None: the first, uniform pass)
StepFn = Callable[[Any, Any, Any, RouteOptions, Optional[Any]], Routed]


@dataclass(frozen=True)
class PublishedStart:
    """A family's authors' own start (`model.family_defaults: published`): the model-config values their
    code starts from, each with the authors' file and line. A field left None keeps the config's value
    (the family's authors do not differ there, or the family has no authors' code to follow).

    init:         model.init: `tsai`, `mazzia`, `hahn` (capsmodels.layers.init_weights)
    squash:       model.squash (of the primaries and the capsule layers that squash)
    primary_norm: model.primary_norm: squash | layernorm | batchnorm (capsmodels.layers.PrimaryCaps)
    schedule:     model.schedule: sequential | concurrent (capsmodels.networks.CapsNet)
    sources:      ((field, "owner/repo@commit path:lines, what it shows"), ...)
    """
    init: Optional[str] = None
    squash: Optional[str] = None
    primary_norm: Optional[str] = None
    schedule: Optional[str] = None
    sources: tuple = ()

    def values(self) -> dict:
        """The model-config fields this start sets: {field: value} for the fields not None."""
        return {k: v for k, v in (("init", self.init), ("squash", self.squash),
                                   ("primary_norm", self.primary_norm), ("schedule", self.schedule))
                if v is not None}


@dataclass(frozen=True)
class RoutingFamily:
    """A registered routing family.

    route:    the routing function (signature above).
    adaptive: whether its couplings can depend on the input. The routing probes are n/a for a layer
              whose family is not adaptive, or that routes with 1 iteration (docs/PROBES.md).
    params:   (n_out, d_out) -> {name: nn.Parameter} extra learned parameters the layer registers
              under these names, in this order (EM's beta_u, beta_a); None: none.
    child_params: (n_in, n_out, d_out) -> {name: nn.Parameter}, the same for parameters that have
              one entry per child (self-routing's routing weights, Efficient-CapsNet's priors).
    squashes: whether `Routed.s` is really squashed into the pose (its length then gives the probes'
              `squash_gain`); False for a family that returns s only as its pre-normalisation length
              (attention: the pose is LayerNorm(s)), so `init: data` can still fit ||s||, with no gain.
    iterative: whether the couplings come from routing iterations that start uniform, so that 1
              iteration means c = 1/J (dynamic, attention, EM). False for a family that computes
              input-dependent couplings in one pass (self, efficient): its routing probes apply at
              any `iterations`, which it ignores.
    shortcut: (u (B, I, d_in), layer, opts) -> Routed computed without materialising u_hat, used by
              the layer's forward when given (uniform: one matmul); `route` stays the definition (and
              what the routing null re-routes), and the tests check the two agree.
    doc:      one line for `capsweep` users (what the family is, whose paper).
    published: the authors' own start (`PublishedStart`), applied by `model.family_defaults:
              published`; None: the family has none of its own (published = the config's values).
    step:     (u_hat, a_in, layer, opts, prev_pose or None) -> Routed: ONE routing pass against the
              layer's own output poses of the previous pass (None: the first pass, uniform couplings).
              A family with a step can route concurrently across layers (`model.schedule:
              concurrent`, capsmodels.networks); `route` with R iterations is R steps in a row.
    """
    name: str
    route: RouteFn
    adaptive: bool = True
    params: Optional[Callable[[int, int], dict]] = None
    shortcut: Optional[Callable[[Any, Any, RouteOptions], Routed]] = None
    doc: str = ""
    child_params: Optional[Callable[[int, int, int], dict]] = None
    iterative: bool = True
    squashes: bool = True
    published: Optional[PublishedStart] = None
    step: Optional[StepFn] = None

    @property
    def schedules(self) -> tuple[str, ...]:
        """The `model.schedule` values this family can route under."""
        return ("sequential", "concurrent") if self.step is not None else ("sequential",)


_FAMILIES: dict[str, RoutingFamily] = {}


def register_routing(name: str, *, adaptive: bool = True, params: Optional[Callable] = None,
                     shortcut: Optional[Callable] = None, doc: str = "",
                     child_params: Optional[Callable] = None,
                     iterative: bool = True, squashes: bool = True,
                     published: Optional[PublishedStart] = None,
                     step: Optional[StepFn] = None) -> Callable[[RouteFn], RouteFn]:
    """Decorator: register `route` under `name`. Registering a name twice is an error (two modules
    claiming one name would make a config mean whichever was imported last)."""
    def deco(route: RouteFn) -> RouteFn:
        if name in _FAMILIES and _FAMILIES[name].route is not route:
            raise ValueError(f"routing family {name!r} is already registered "
                             f"(by {_FAMILIES[name].route.__module__})")
        _FAMILIES[name] = RoutingFamily(name, route, adaptive, params, shortcut, doc, child_params,
                                        iterative, squashes, published, step)
        return route
    return deco


def unregister_routing(name: str) -> None:
    """Remove a family (for tests that register a temporary one)."""
    _FAMILIES.pop(name, None)


def routing_names() -> tuple[str, ...]:
    """The registered `model.routing` values, in registration order (the built-ins first, once
    `capsmodels.routing` is imported: ask `capsmodels.routing.routing_names` for the assembled table)."""
    return tuple(_FAMILIES)


def get_routing(name: str) -> RoutingFamily:
    """The family registered as `name`; ValueError (one line, listing the allowed names) otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"routing {name!r} is not allowed; choose one of {', '.join(_FAMILIES)}")
    return _FAMILIES[name]
