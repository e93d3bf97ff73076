"""The generated `parts` dataset (capsmodels.parts): deterministic, each whole drawn with exactly its parts,
a role map that covers exactly the drawn pixels, split sizes that follow data.train_size, and a task a
logistic regression learns well above chance."""
import numpy as np
import torch
import torch.nn.functional as F

from capsmodels import catalogue, parts
from capsmodels.config import DataConfig
from capsmodels.datasets import load_raw
from capsmodels.splits import make_splits


def test_generation_is_deterministic_from_the_seed():
    a, b, c = parts.generate(64, 5), parts.generate(64, 5), parts.generate(64, 6)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    x, y, roles = a
    assert x.shape == (64, 28, 28, 1) and x.dtype == np.uint8
    assert roles.shape == (64, 28, 28) and roles.dtype == np.int8
    assert np.bincount(y, minlength=10).tolist() == [7] * 4 + [6] * 6       # balanced: n % 10 per class


def test_without_jitter_each_whole_is_exactly_its_parts_on_its_slots():
    """No jitter: the 7x7 pixels of each slot are the part's template (or empty), the role map names it."""
    x, y, roles = parts.generate(40, 1, jitter=False)
    templates = {k: np.round(parts.TEMPLATES[name] * 255).astype(np.uint8)
                 for k, name in enumerate(parts.PART_TYPES)}
    for b in range(40):
        layout = {slot: (r, k) for r, (slot, k) in enumerate(parts.WHOLES[y[b]])}
        rest = x[b, :, :, 0].copy()
        for slot, (cx, cy) in enumerate(parts.SLOTS):
            x0, y0 = int(cx - 3.5), int(cy - 3.5)
            crop = x[b, y0:y0 + 7, x0:x0 + 7, 0]
            if slot in layout:
                r, k = layout[slot]
                assert np.array_equal(crop, templates[k]), (b, slot)
                assert np.array_equal(roles[b, y0:y0 + 7, x0:x0 + 7], np.where(templates[k] > 0, r, -1))
            else:
                assert not crop.any()
            rest[y0:y0 + 7, x0:x0 + 7] = 0
        assert not rest.any()                                  # nothing drawn outside the slots


def test_with_jitter_every_role_is_drawn_near_its_slot_and_the_map_covers_the_drawing():
    x, y, roles = parts.generate(500, 2)
    assert np.array_equal(x[..., 0] > 0, roles >= 0)         # labelled exactly where something is drawn
    assert set(np.unique(roles)) == {-1, 0, 1, 2}
    yy, xx = np.mgrid[0:28, 0:28] + 0.5
    slots = np.asarray(parts.SLOTS)
    for r in range(parts.ROLES):
        mask = roles == r
        count = mask.sum((1, 2))
        assert count.min() > 0                               # every whole shows all three of its parts
        area = np.array([(parts.TEMPLATES[parts.PART_TYPES[k]] > 0).sum()
                         for k in parts.part_type_table()[y, r]])
        # bilinear sampling spreads a sprite over more pixels but keeps its ink: mass ~ area x scale^2
        mass = (x[..., 0] * mask).sum((1, 2)) / 255.0
        assert np.all((mass > 0.75 * area) & (mass < 1.3 * area)), (mass / area).min()
        centroid = np.stack([(mask * xx).sum((1, 2)), (mask * yy).sum((1, 2))], -1) / count[:, None]
        want = slots[[parts.WHOLES[w][r][0] for w in y]]
        # rotation 10 deg about the centre moves a slot by <= 1.7 px, scale by <= 1.3 px, shifts by 3 px
        assert np.abs(centroid - want).max() < 6.0


def test_every_part_type_is_shared_and_wholes_differ():
    table = parts.part_type_table()
    assert table.shape == (catalogue.NUM_CLASSES["parts"], parts.ROLES)
    uses = np.bincount(table.ravel(), minlength=len(parts.PART_TYPES))
    assert uses.min() >= 3                                     # several wholes share each part
    layouts = {tuple(sorted(w)) for w in parts.WHOLES}
    assert len(layouts) == len(parts.WHOLES)


def test_splits_follow_data_train_size_and_carry_the_roles():
    raw = load_raw("parts")
    assert raw.in_shape == catalogue.IN_SHAPES["parts"]
    assert raw.num_classes == catalogue.NUM_CLASSES["parts"] == len(raw.classes)
    assert len(raw.y_train) == parts.TRAIN_IMAGES and len(raw.y_test) == parts.TEST_IMAGES
    s = make_splits(raw, DataConfig(name="parts", train_size=500, val_size=100, test_size=200), seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (500, 100, 200)
    assert np.bincount(s.train.tensors[1].numpy(), minlength=10).tolist() == [50] * 10
    for split in ("train", "val", "test"):
        x = getattr(s, split).tensors[0]
        assert s.roles[split].shape == x.shape[:1] + x.shape[2:]
        assert torch.equal(x[:, 0] > 0, s.roles[split] >= 0)       # the maps follow their images
    frac = make_splits(raw, DataConfig(name="parts", train_size=0.25, val_size=0.1), seed=0)
    assert len(frac.train) == round(0.25 * parts.TRAIN_IMAGES)
    assert make_splits(load_raw("digits"), DataConfig(name="digits"), seed=0).roles is None


def test_a_logistic_regression_learns_it_well_above_chance():
    """A real task: softmax regression on 4x4 max-pooled pixels, 2,000 training images, 300 full-batch
    Adam steps, tested on 1,000 other images (chance 0.1)."""
    torch.manual_seed(0)
    x, y, _ = parts.generate(3000, 9)
    feats = F.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, 4).flatten(1)   # (N, 49)
    y = torch.from_numpy(y)
    lin = torch.nn.Linear(feats.shape[1], 10)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(lin(feats[:2000]), y[:2000]).backward()
        opt.step()
    acc = float((lin(feats[2000:]).argmax(1) == y[2000:]).float().mean())
    print(f"logistic regression test accuracy {acc:.3f}")
    assert acc > 0.6


def test_the_catalogue_knows_the_generated_split_sizes():
    """analysis reads split sizes from the stdlib catalogue (no numpy import of capsmodels.parts)."""
    from capsmodels import parts
    from capsmodels.catalogue import SPLIT_SIZES
    assert SPLIT_SIZES["parts"] == (parts.TRAIN_IMAGES, parts.TEST_IMAGES)
