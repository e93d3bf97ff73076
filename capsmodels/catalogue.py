"""The datasets capsweep knows, by name: the one home of their facts (names, class labels, counts, shapes).

Standard library only (no numpy, torch, ray or mlflow), so the config schema (`capsmodels.config`),
the sweep/analysis contract (`capsmodels.contract`) and `analysis` can all read the same table
without pulling in the training stack. Where the files come from is `capsmodels.store`; how they are
split for a run is `capsmodels.splits`.

`IN_SHAPES` is the (C, H, W) a network sees after decoding (`RawData.in_shape`): smallNORB's 96x96
stereo pairs become 2 x 32 x 32 (3x3 area mean, one channel per camera), the `sign` task fills a
1 x SIGN_SIZE x SIGN_SIZE image; `parts` is generated in code (capsmodels.parts: ten wholes of three
parts each, 28x28, with its true part -> whole labels per pixel).
"""
from __future__ import annotations

SIGN_SIZE = 8            # sign task: each scalar fills a 1 x SIGN_SIZE x SIGN_SIZE image

_DIGITS = tuple(str(i) for i in range(10))

# name -> class labels, in label-index order. The order of the keys is the order users are shown.
CLASSES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": _DIGITS,
    "mnist5k": _DIGITS,
    "digits": _DIGITS,
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "svhn": _DIGITS,
    "smallnorb": ("animal", "human", "airplane", "truck", "car"),
    "sign": ("negative", "positive"),
    # generated wholes made of shared parts, with a known parse tree (capsmodels.parts)
    "parts": tuple(f"whole{i}" for i in range(10)),
}

DATASETS: tuple[str, ...] = tuple(CLASSES)
NUM_CLASSES: dict[str, int] = {name: len(labels) for name, labels in CLASSES.items()}

# (C, H, W) of the decoded inputs.
IN_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "mnist5k": (1, 28, 28), "digits": (1, 8, 8),
    "cifar10": (3, 32, 32), "svhn": (3, 32, 32), "smallnorb": (2, 32, 32),
    "sign": (1, SIGN_SIZE, SIGN_SIZE), "parts": (1, 28, 28),
}

# (training split, test split) images of each dataset; `parts` is generated in code at these sizes
# (capsmodels.parts.TRAIN_IMAGES, TEST_IMAGES: tests/capsmodels/test_parts.py checks they agree), `sign` is sized by
# its config (data.sign_samples) and so is not here.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "fashion_mnist": (60000, 10000), "mnist": (60000, 10000), "mnist5k": (4000, 1000),
    "digits": (1437, 360), "cifar10": (50000, 10000), "svhn": (73257, 26032), "smallnorb": (24300, 24300),
    "parts": (12000, 2000),
}
