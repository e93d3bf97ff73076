"""Transformed test sets (capsmodels.transforms): identity, exact 90-degree rotations and integer shifts
against torch's own rot90 and a sliced copy, determinism, the config's one-line errors, and the fit path
reporting test_acc_transformed."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capsmodels import transforms
from capsmodels.config import ConfigError, DataConfig, from_dict
from capsmodels.datasets import load_raw
from capsmodels.train import fit


def images(n=3, c=2, h=10, w=10, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_identity_parameters_give_the_same_image():
    x = images(h=9, w=12)
    out = transforms.affine(x, 0.0, 0.0, 1.0, np.zeros(2))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_a_quarter_turn_is_rot90_and_a_half_turn_rot90_twice():
    x = images()
    torch.testing.assert_close(transforms.affine(x, 90.0, 0.0, 1.0, np.zeros(2)),
                               torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(transforms.affine(x, -90.0, 0.0, 1.0, np.zeros(2)),
                               torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(transforms.affine(x, 180.0, 0.0, 1.0, np.zeros(2)),
                               torch.rot90(x, 2, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_a_whole_pixel_translation_shifts_the_image_and_fills_zeros():
    x = images(h=8, w=11)
    out = transforms.affine(x, 0.0, 0.0, 1.0, np.array([2.0, -3.0]))     # 2 px right, 3 px up
    want = torch.zeros_like(x)
    want[:, :, :-3, 2:] = x[:, :, 3:, :-2]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_shear_and_scale_against_affine_grid():
    """A non-trivial map against torch's own affine_grid + grid_sample on the same theta, and the
    forward matrix against a hand-built rotate(scale(shear))."""
    x = images(n=2, h=12, w=12)
    A = transforms.affine_matrices(np.array([30.0, -10.0]), np.array([0.2, -0.1]), np.array([1.1, 0.8]))
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    np.testing.assert_allclose(A[0], np.array([[c, s], [-s, c]]) @ np.array([[1, 0.2], [0, 1]]) * 1.1)
    theta = transforms.affine_theta(A, np.array([[1.5, 0.0], [-2.0, 1.0]]), (12, 12)).float()
    ref = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    torch.testing.assert_close(transforms.warp(x, theta), ref, atol=1e-5, rtol=0)


def test_test_transform_is_deterministic_per_image_and_stays_in_range():
    cfg = DataConfig(test_transform="affine")
    x = images(n=6, c=1, h=28, w=28)
    a, b = transforms.transform_test(x, cfg), transforms.transform_test(x, cfg)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # image i's map depends on its index only: the first 3 of 6 are warped as a batch of 3 would be
    torch.testing.assert_close(transforms.transform_test(x[:3], cfg), a[:3])
    assert transforms.transform_test(x, DataConfig()) is x                     # none: untouched
    rot, shear, scale, shift = transforms.draw_affine(1000, cfg)
    assert np.abs(rot).max() <= 20 and np.abs(shear).max() <= 0.1 and np.abs(shift).max() <= 3
    assert scale.min() >= 0.8 and scale.max() <= 1.2 and np.abs(rot).max() > 19


@pytest.mark.parametrize("data, field", [
    ({"test_transform": "elastic"}, "data.test_transform"),
    ({"affine_rotation": -1}, "data.affine_rotation"),
    ({"affine_scale_min": 1.3}, "data.affine_scale_min"),
    ({"affine_translate": -2}, "data.affine_translate"),
])
def test_bad_transform_settings_are_one_line_errors(data, field):
    with pytest.raises(ConfigError) as e:
        from_dict({"data": data})
    assert field in str(e.value) and "\n" not in str(e.value)


def test_fit_reports_test_acc_transformed_beside_test_acc():
    cfg = {"model": {"preset": "tiny", "conv_channels": [8], "conv_kernel": 3, "primary_channels": 4,
                     "primary_dim": 4, "primary_kernel": 3, "primary_stride": 2, "out_dim": 6},
           "data": {"name": "digits", "train_size": 200, "val_size": 60, "test_size": 100},
           "train": {"epochs": 1, "batch_size": 32, "eval_batch": 40, "threads": 1, "seed": 7,
                     "max_steps_per_epoch": 3}}
    raw = load_raw("digits")
    plain = fit(cfg, data=raw)
    assert "test_acc_transformed" not in plain
    cfg["data"]["test_transform"] = "affine"
    m = fit(cfg, data=raw)
    assert 0 <= m["test_acc_transformed"] <= 1
    assert m["test_acc"] == plain["test_acc"]                # the same run: only the extra evaluation
    # identity ranges: the transformed test split is the test split itself
    cfg["data"].update(affine_rotation=0, affine_shear=0, affine_scale_min=1, affine_scale_max=1,
                       affine_translate=0)
    same = fit(cfg, data=raw)
    assert same["test_acc_transformed"] == same["test_acc"]
