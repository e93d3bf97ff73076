"""Training-time augmentation, applied by the training loop (`capsmodels.train`) to each batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_augment(x: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sabour et al.'s augmentation: shift each image by its own random (dy, dx) in [-m, m]^2,
    filling with zeros. x: (N, C, H, W) -> (N, C, H, W). One gather per axis, no loop over images."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    m = int(max_shift)
    dev = generator.device if generator is not None else torch.device("cpu")
    shifts = torch.randint(-m, m + 1, (2, n), generator=generator, device=dev).to(x.device)  # (2, N)
    padded = F.pad(x, (m, m, m, m))                                            # (N, C, H+2m, W+2m)
    # out[n, :, i, j] = padded[n, :, i + m - dy, j + m - dx] = x[n, :, i - dy, j - dx]
    rows = (m - shifts[0])[:, None] + torch.arange(h, device=x.device)        # (N, H)
    cols = (m - shifts[1])[:, None] + torch.arange(w, device=x.device)        # (N, W)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * m))  # (N, C, H, W+2m)
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))            # (N, C, H, W)
