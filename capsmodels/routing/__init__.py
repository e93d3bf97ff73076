"""Routing algorithms between two fully connected capsule layers, one module per family.

Shapes (B batch, I = n_in children, J = n_out parents, D pose size):
  predictions u_hat (B, I, J, D): child i's vote for parent j
  couplings   c     (B, I, J): how much of child i goes to parent j (sums to 1 over J)
  parent pose v     (B, J, D)

This package is where the routing families are assembled: importing it registers the built-in
families in `capsmodels.registry` (the lowest layer, which knows no model; the order is the order users
see): `dynamic` (Sabour et al. 2017; fast hand-written autograd beside its readable
reference), `em` (Hinton et al. 2018), `uniform` (no routing), `attention` (Tsai et al. 2020, inverted
dot-product attention with LayerNorm), `self` (Hahn et al. 2019, self-routing), `efficient` (Mazzia et
al. 2021, Efficient-CapsNet's self-attention routing). A new family is a new module that calls
`register_routing`, imported here (or by the user before the config is validated). `routing_names` and
`get_routing` here are the registry's, asked after the built-ins are in.
"""
from __future__ import annotations

from capsmodels.routing.dynamic import dynamic_routing, dynamic_routing_full, dynamic_routing_reference
from capsmodels.routing.em import em_lambda_schedule, em_routing
from capsmodels.routing.uniform import uniform_routing, uniform_routing_full
from capsmodels.routing.attention import attention_activation, attention_routing
from capsmodels.routing.selfrouting import self_routing
from capsmodels.routing.efficient import efficient_routing
from capsmodels.registry import get_routing, routing_names

__all__ = ["dynamic_routing", "dynamic_routing_full", "dynamic_routing_reference", "em_lambda_schedule",
           "em_routing", "uniform_routing", "uniform_routing_full", "attention_activation", "attention_routing",
           "self_routing", "efficient_routing", "get_routing", "routing_names"]
