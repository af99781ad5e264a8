"""Write disback_cli/builtin/digits.npz from scikit-learn's copy of the UCI handwritten digits.

Needs scikit-learn (only for this script): `pip install scikit-learn`, then
    python scripts/make_digits_data.py disback_cli/builtin/digits.npz

Source: scikit-learn `sklearn.datasets.load_digits` (BSD-3-Clause), which ships the test part of
the UCI "Optical Recognition of Handwritten Digits" data set (Alpaydin & Kaynak, 1998; CC BY 4.0):
1797 8x8 images, 10 classes, pixel values 0..16. We rescale to 0..255 (round(v * 255 / 16)) and
fix a train / held-out split (1000 / 797) with a seeded permutation.
"""

import sys

import numpy as np
from sklearn.datasets import load_digits

SPLIT_SEED, TRAIN = 0, 1000


def main(out: str) -> None:
    digits = load_digits()
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    np.savez_compressed(
        out,
        images=images,
        labels=labels,
        train=np.sort(order[:TRAIN]),
        heldout=np.sort(order[TRAIN:]),
    )
    print(f"wrote {out}: {len(images)} images, {TRAIN} train / {len(images) - TRAIN} held out")


if __name__ == "__main__":
    main(sys.argv[1])
