"""`parts`: a generated dataset whose parse tree is known (docs/PROBES.md, "tree_recovery").

Each 28x28 grey image shows one *whole* (the class) made of three *parts* drawn from a shared
vocabulary of PART_TYPES sprites; `WHOLES[w]` says which part type sits in which slot of a 2x2
layout, and every part type is used by several wholes (the class is the arrangement, not one part).
Each image gets a small affine jitter of the whole (rotation, scale, translation) and of each part
(translation): a part is recognisable wherever it lands, but its position alone does not fix it.

Besides the images, the generator returns the truth a routing probe compares with: a per-pixel
*role map*, -1 for background and r in 0..ROLES-1 where role r of the image's whole is drawn, so
`part_type[y, r]` (= `WHOLES[y][r][1]`) is the part type of the pixel and (image, r) its part
instance. Slots are far enough apart (12 px between centres, sprites 7 px, jitter <= 3 px) that parts
never overlap, so every drawn pixel belongs to exactly one part.

Vectorised: one `grid_sample` over the batch per role (3 calls, capsmodels.transforms.warp), no loop over images.
Deterministic: everything comes from one numpy Generator seeded with `seed`.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from capsmodels.transforms import warp

SIZE = 28                        # images are 1 x SIZE x SIZE
SPRITE = 7                       # part sprites are SPRITE x SPRITE
ROLES = 3                        # parts per whole
TRAIN_IMAGES = 12000             # the generated "official" training split (make_splits draws from it)
TEST_IMAGES = 2000               # the generated test split
ROTATION_DEG = 10.0              # jitter of the whole: rotation in [-10, 10] degrees,
SCALE = (0.9, 1.1)               # scale in [0.9, 1.1],
SHIFT = 2.0                      # translation in [-2, 2] px per axis,
PART_SHIFT = 1.0                 # and each part's own translation in [-1, 1] px per axis

# slot centres (x, y) in continuous pixel coordinates (pixel p spans [p, p + 1)): a 2x2 layout
SLOTS = ((7.5, 7.5), (20.5, 7.5), (7.5, 20.5), (20.5, 20.5))      # TL, TR, BL, BR: sprites on pixels


def _sprites() -> dict:
    """The part vocabulary: name -> SPRITE x SPRITE float32 template in [0, 1]."""
    n = SPRITE
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    sq = np.zeros((n, n))
    sq[[0, -1], :] = 1
    sq[:, [0, -1]] = 1
    shapes = {
        "hbar": (abs(yy - c) <= 1) * 1.0,
        "vbar": (abs(xx - c) <= 1) * 1.0,
        "backslash": (abs(xx - yy) <= 1) * 1.0,
        "slash": (abs(xx + yy - (n - 1)) <= 1) * 1.0,
        "box": sq,
        "disc": (((xx - c) ** 2 + (yy - c) ** 2) <= (c + 0.3) ** 2) * 1.0,
    }
    return {k: v.astype(np.float32) for k, v in shapes.items()}


TEMPLATES = _sprites()
PART_TYPES: tuple[str, ...] = tuple(TEMPLATES)
_T = {name: k for k, name in enumerate(PART_TYPES)}

# whole -> ((slot, part type), ...) for roles 0, 1, 2; each part type is used by several wholes
WHOLES: tuple = tuple(tuple((s, _T[p]) for s, p in whole) for whole in (
    ((0, "hbar"), (1, "vbar"), (2, "box")),
    ((0, "hbar"), (1, "slash"), (3, "disc")),
    ((0, "vbar"), (2, "hbar"), (3, "box")),
    ((1, "box"), (2, "slash"), (3, "hbar")),
    ((0, "disc"), (1, "hbar"), (2, "vbar")),
    ((0, "backslash"), (2, "disc"), (3, "slash")),
    ((1, "disc"), (2, "backslash"), (3, "vbar")),
    ((0, "box"), (1, "backslash"), (3, "hbar")),
    ((0, "slash"), (1, "vbar"), (2, "disc")),
    ((0, "vbar"), (1, "box"), (3, "backslash")),
))
NUM_WHOLES = len(WHOLES)


def part_type_table() -> np.ndarray:
    """int64 (NUM_WHOLES, ROLES): the part type of role r of whole w (the part -> whole hierarchy)."""
    return np.array([[p for _, p in whole] for whole in WHOLES], dtype=np.int64)


def _slot_table() -> np.ndarray:
    return np.array([[s for s, _ in whole] for whole in WHOLES], dtype=np.int64)


def generate(n: int, seed: int, jitter: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images of balanced, shuffled wholes: (x uint8 (n, SIZE, SIZE, 1), y int64 (n,),
    roles int8 (n, SIZE, SIZE): -1 background, else the role of the whole drawn there).

    Role r of image b is sprite `part_type[y_b, r]` centred at the jittered slot, under the whole's
    rotation and scale. A pixel's role is the role whose sprite is brightest there, wherever the
    quantised image is > 0 (parts never overlap, so this is the only one drawn there).
    jitter=False: no rotation, scale 1, no translation (the sprites land exactly on the slots).
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % NUM_WHOLES).astype(np.int64)
    amp = 1.0 if jitter else 0.0
    theta = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, n)) * amp
    scale = 1.0 + (rng.uniform(*SCALE, n) - 1.0) * amp
    shift = rng.uniform(-SHIFT, SHIFT, (n, 2)) * amp
    part_shift = rng.uniform(-PART_SHIFT, PART_SHIFT, (n, ROLES, 2)) * amp

    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)    # (n, 2, 2) on (x, y)
    A = rot * scale[:, None, None]                                                  # sprite -> image
    A_inv = np.linalg.inv(A)                                                        # (n, 2, 2)
    mid = np.full(2, SIZE / 2)
    slots = np.asarray(SLOTS)[_slot_table()[y]]                                     # (n, ROLES, 2)
    # part centre: the jittered slot, moved with the whole about the image centre, then shifted
    centre = np.einsum("nab,nrb->nra", A, slots + part_shift - mid) + mid + shift[:, None, :]
    templates = torch.from_numpy(np.stack([TEMPLATES[p] for p in PART_TYPES]))   # (P, S, S)
    ptype = torch.from_numpy(part_type_table()[y])                                  # (n, ROLES)
    layers = []
    for r in range(ROLES):
        # image normalised coords u -> sprite normalised coords v (align_corners=False):
        # v = (SIZE/SPRITE) A^-1 u + (2/SPRITE) A^-1 (SIZE/2 - c)
        lin = (SIZE / SPRITE) * A_inv
        off = (2.0 / SPRITE) * np.einsum("nab,nb->na", A_inv, mid - centre[:, r])
        grid_theta = torch.from_numpy(np.concatenate([lin, off[:, :, None]], -1)).float()   # (n, 2, 3)
        sprite = templates[ptype[:, r]].unsqueeze(1)                                         # (n, 1, S, S)
        layers.append(warp(sprite, grid_theta, (SIZE, SIZE))[:, 0])                          # (n, H, W)
    stack = torch.stack(layers, 1)                                                  # (n, ROLES, H, W)
    best, role = stack.max(1)
    x = torch.round(best.clamp(0, 1) * 255).to(torch.uint8)
    roles = torch.where(x > 0, role, torch.full_like(role, -1)).to(torch.int8)
    return x.unsqueeze(-1).numpy(), y, roles.numpy()


@functools.lru_cache(maxsize=2)
def load(seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test, roles_train, roles_test): TRAIN_IMAGES and TEST_IMAGES images
    from two independent streams of `seed` (the test split does not change with the training size).

    Generated once per process (seconds on a loaded CPU) and kept; the arrays are read-only."""
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    x, y, r = generate(TRAIN_IMAGES, int(train_seed.generate_state(1)[0]))
    xt, yt, rt = generate(TEST_IMAGES, int(test_seed.generate_state(1)[0]))
    out = (x, y, xt, yt, r, rt)
    for arr in out:
        arr.setflags(write=False)
    return out


def capsule_roles(roles: torch.Tensor, field: int, stride: int, channels: int) -> torch.Tensor:
    """Per primary capsule, the role covering most of its receptive field: (B, H, W) role map ->
    (B, channels * h * w) long, -1 where no part pixel falls in the field.

    Primary capsule n = k*h*w + y*w + x (capsmodels.layers.PrimaryCaps) sees the `field` x `field`
    pixels from (y*stride, x*stride) (stride-1 stem convs then the primary conv); every channel k at
    one position shares the label. Ties go to the lower role.
    """
    onehot = F.one_hot((roles.long() + 1).clamp_min(0), ROLES + 1).permute(0, 3, 1, 2).double()
    counts = F.avg_pool2d(onehot[:, 1:], field, stride)                  # (B, ROLES, h, w) part share
    share, role = counts.max(1)
    label = torch.where(share > 0, role, torch.full_like(role, -1)).flatten(1)    # (B, h*w)
    return label.repeat(1, channels)


def receptive_field(model_cfg) -> tuple[int, int]:
    """(field, stride) of a primary capsule for a ModelConfig: stride-1 stem convs, then the primary conv."""
    n = len(model_cfg.conv_channels)
    return n * (model_cfg.conv_kernel - 1) + model_cfg.primary_kernel, model_cfg.primary_stride

