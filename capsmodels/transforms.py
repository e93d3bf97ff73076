"""Transformed test sets (`data.test_transform`, docs/PROBES.md "test_acc_transformed").

The capsule promise is robustness to viewpoint; `test_acc_transformed` asks it of every run. With
`data.test_transform: affine`, test image i (in the test split's order) is warped by its own random
affine map, drawn from a generator seeded with TRANSFORM_SEED (independent of the run seed: every run
of a sweep sees the same transformed images), affNIST-style:

  rotation  U(-data.affine_rotation, +data.affine_rotation) degrees (default 20; positive = counter-
            clockwise as displayed),
  shear     U(-data.affine_shear, +data.affine_shear) (default 0.1: x' = x + shear * y),
  scale     U(data.affine_scale_min, data.affine_scale_max) (default 0.8 .. 1.2, isotropic),
  translate U(-data.affine_translate, +data.affine_translate) pixels per axis (default 3),

about the image centre, bilinear, zeros outside. Vectorised: one grid and one `grid_sample` per chunk
of images (the grid is built by broadcasting, not `affine_grid`, which is several times slower on
the CPU), no loop over images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from capsmodels.config import TEST_TRANSFORMS as TRANSFORMS

TRANSFORM_SEED = 0          # the random maps of the test split: the same for every run
CHUNK = 4096                # images warped at once (bounds the grid's memory)


def warp(x: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear warp, zeros outside: x (N, C, h, w), theta (N, 2, 3) mapping *output* normalised
    coordinates (u, v, 1) (align_corners=False: pixel centres at (2p + 1)/size - 1) to input ones.
    Returns (N, C, H, W), (H, W) = out_hw or (h, w). Same result as affine_grid + grid_sample."""
    N = x.shape[0]
    H, W = out_hw or x.shape[-2:]
    theta = theta.to(x.dtype)
    u = ((2 * torch.arange(W, dtype=x.dtype) + 1) / W - 1).view(1, 1, W)
    v = ((2 * torch.arange(H, dtype=x.dtype) + 1) / H - 1).view(1, H, 1)
    t = theta.view(N, 2, 3, 1, 1)
    gx = t[:, 0, 0] * u + t[:, 0, 1] * v + t[:, 0, 2]          # (N, H, W)
    gy = t[:, 1, 0] * u + t[:, 1, 1] * v + t[:, 1, 2]
    return F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def affine_matrices(rotation_deg: np.ndarray, shear: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, 2, 2) forward maps on pixel offsets (x right, y down) from the centre: rotate(scale(shear)).

    A positive rotation turns the image counter-clockwise as displayed (y points down), as
    torch.rot90(k=1, dims=(-2, -1)) does for 90 degrees."""
    r = np.deg2rad(rotation_deg)
    c, s = np.cos(r), np.sin(r)
    rot = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)               # (N, 2, 2)
    sh = np.zeros_like(rot)
    sh[:, 0, 0] = sh[:, 1, 1] = 1.0
    sh[:, 0, 1] = shear
    return rot @ sh * np.asarray(scale)[:, None, None]


def affine_theta(A: np.ndarray, translate: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """grid_sample's theta (N, 2, 3) for the forward map out = A (in - centre) + centre + translate
    (pixels): its inverse in normalised coordinates, D^-1 A^-1 D u - D^-1 A^-1 t, D = diag(W/2, H/2)."""
    H, W = hw
    D = np.diag([W / 2.0, H / 2.0])
    D_inv = np.diag([2.0 / W, 2.0 / H])
    A_inv = np.linalg.inv(A)                                                          # (N, 2, 2)
    lin = D_inv @ A_inv @ D
    off = -np.einsum("ab,nbc,nc->na", D_inv, A_inv, np.asarray(translate, dtype=np.float64))
    return torch.from_numpy(np.concatenate([lin, off[:, :, None]], -1))


def affine(x: torch.Tensor, rotation_deg, shear, scale, translate) -> torch.Tensor:
    """Warp x (N, C, H, W) by per-image parameters (arrays of N; translate (N, 2) pixels (dx, dy))."""
    n = x.shape[0]
    full = [np.broadcast_to(np.asarray(p, dtype=np.float64), shape) for p, shape in
            ((rotation_deg, (n,)), (shear, (n,)), (scale, (n,)), (translate, (n, 2)))]
    theta = affine_theta(affine_matrices(*full[:3]), full[3], tuple(x.shape[-2:]))
    return torch.cat([warp(x[i:i + CHUNK], theta[i:i + CHUNK]) for i in range(0, n, CHUNK)]) \
        if n else x.clone()


def draw_affine(n: int, cfg, seed: int = TRANSFORM_SEED) -> tuple[np.ndarray, ...]:
    """Per-image (rotation, shear, scale, translate (n, 2)) drawn from the ranges of DataConfig `cfg`.

    One row of 5 uniforms per image, so image i's map depends on its index alone (not on n)."""
    u = np.random.default_rng(seed).random((n, 5))
    rot = cfg.affine_rotation * (2 * u[:, 0] - 1)
    shear = cfg.affine_shear * (2 * u[:, 1] - 1)
    scale = cfg.affine_scale_min + (cfg.affine_scale_max - cfg.affine_scale_min) * u[:, 2]
    shift = cfg.affine_translate * (2 * u[:, 3:5] - 1)
    return rot, shear, scale, shift


def transform_test(x: torch.Tensor, cfg) -> torch.Tensor:
    """The test images x (N, C, H, W) as `data.test_transform` of DataConfig `cfg` says: unchanged for
    `none`, each image warped by its own seeded random affine map for `affine` (module docstring)."""
    if cfg.test_transform == "none":
        return x
    if cfg.test_transform == "affine":
        return affine(x, *draw_affine(x.shape[0], cfg)).clamp_(0.0, 1.0)
    raise ValueError(f"data.test_transform: {cfg.test_transform!r} is not allowed; choose one of "
                     f"{', '.join(TRANSFORMS)}")

