"""Score images with the peer sklesion 0.2.2 (Keras Xception); runs in the peer's own venv, not dermlens's.

    work/peer-venv/bin/python benchmarks/_sklesion_worker.py LIST.txt OUT.npz [--batch 16] [--check 3]

LIST.txt holds one image path a line. Writes OUT.npz with `probs` [N, 7] in the peer's class order, `classes`
(that order, from the package's `i_cl_map`) and `seconds` (model time). Preprocessing is the package's own
(`SkinLesionClassifier.preprocess`: JPEG decode, bilinear resize to its image shape) batched; metadata is
withheld the package's way (sex and location "unknown", age missing). --check N compares the first N images
with the package's own one-image `predict_P` and stops if they differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklesion.model import SkinLesionClassifier  # noqa: E402

NO_METADATA = {"age": None, "sex": "unknown", "location": "unknown"}


def no_metadata_vector(props: dict) -> np.ndarray:
    """The package's metadata vector for an unknown sex, unknown location and missing age."""
    oh = props["oh_map"]
    age = props["age_mean"] / props["age_max"]
    return np.array(oh["sex"]["unknown"] + oh["loc"]["unknown"] + [age, 1.0], np.float32)


def load_image(path: tf.Tensor, shape: tuple[int, int]) -> tf.Tensor:
    """The package's image preprocessing: JPEG decode (3 channels), bilinear resize, float 0..255."""
    return tf.image.resize(tf.image.decode_jpeg(tf.io.read_file(path), channels=3), shape)


def score(clf: SkinLesionClassifier, paths: list[str], batch: int) -> np.ndarray:
    """Probabilities [N, 7] for the images, metadata withheld."""
    shape = tuple(int(s) for s in clf.model_props["img_shape"])
    meta = no_metadata_vector(clf.model_props)
    images = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: load_image(p, shape))
    metas = tf.data.Dataset.from_tensor_slices(np.tile(meta, (len(paths), 1)))
    data = tf.data.Dataset.zip(((images, metas),)).batch(batch).prefetch(1)
    return np.asarray(clf.model.predict(data, verbose=0), np.float64)


def check(clf: SkinLesionClassifier, paths: list[str], probs: np.ndarray) -> None:
    """Stop if the batched path differs from the package's own predict_P on these images."""
    for path, p in zip(paths, probs, strict=False):
        with open(path, "rb") as f:
            ref = clf.predict_P({"image": f.read(), "meta": dict(NO_METADATA)})[0]
        if not np.allclose(ref, p, atol=1e-4):
            sys.exit(f"batched scores differ from predict_P on {path}: {ref} vs {p}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--check", type=int, default=3)
    args = ap.parse_args()
    paths = [line.strip() for line in Path(args.paths).read_text().splitlines() if line.strip()]
    clf = SkinLesionClassifier()
    start = time.perf_counter()
    probs = score(clf, paths, args.batch)
    seconds = time.perf_counter() - start
    check(clf, paths[: args.check], probs)
    classes = [clf.model_props["i_cl_map"][i] for i in range(probs.shape[1])]
    np.savez(args.out, probs=probs, classes=np.array(classes), seconds=seconds)


if __name__ == "__main__":
    main()
