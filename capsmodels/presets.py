"""Model presets (timm style): named partial `ModelConfig` dicts.

A preset is applied on top of the dataclass defaults and below the user's file (`config.from_dict`),
so `model.preset: sabour` gives Sabour's network and any key in the file still wins. Plain data with
no imports: the schema (`capsmodels.config`) validates against it without depending on the models.
"""
from __future__ import annotations

PRESETS: dict = {
    # Sabour, Frosst, Hinton 2017, MNIST: 8,215,568 parameters with the decoder on 28x28x1.
    "sabour": dict(conv_channels=[256], conv_kernel=9, primary_channels=32, primary_dim=8,
                   primary_kernel=9, primary_stride=2, depth=0, out_dim=16, routing="dynamic",
                   iterations=3, bias=False, squash="sabour", init="std", init_std=0.01,
                   decoder=True, recon_weight=0.0005),
    # The default: 576 primaries (6x6x16) on 28x28; hidden layers 16x8 when depth > 0.
    "small": dict(conv_channels=[64], conv_kernel=9, primary_channels=16, primary_dim=8,
                  primary_kernel=9, primary_stride=2, num_caps=16, caps_dim=8, out_dim=16),
    # Seconds per epoch: 288 primaries (6x6x8) on 28x28, 8 (1x1x8) on 8x8 `digits`.
    "tiny": dict(conv_channels=[16], conv_kernel=3, primary_channels=8, primary_dim=4,
                 primary_kernel=4, primary_stride=4, num_caps=8, caps_dim=4, out_dim=8),
    # Plain CNN with the stem and primary conv of `small`, dense width matched to small's parameters.
    "cnn": dict(arch="cnn", conv_channels=[64], conv_kernel=9, primary_channels=16, primary_dim=8,
                primary_kernel=9, primary_stride=2, num_caps=16, caps_dim=8, out_dim=16,
                decoder=False, cnn_width=0),
}
