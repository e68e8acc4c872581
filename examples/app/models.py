"""The demo's models: two XGBoost classifiers and a small PyTorch CNN.

- iris and diabetes: XGBoost classifiers trained on first use from
  scikit-learn's bundled data sets, saved as XGBoost JSON model files,
  loaded by :func:`load_iris` and :func:`load_diabetes` in each worker.
  Scoring adds ``FEATURE_WORK`` rounds of pure-Python feature engineering
  (about 15 ms here), as real services do, so the model is "hungry"
  (CPU-bound) in Python as well as in XGBoost.
- image: a small CNN (PyTorch, CPU), initialised deterministically on first
  use, saved with ``torch.save`` and loaded with ``torch.load`` in each
  worker; it classifies an uploaded PNG or JPEG (decoded with Pillow in the
  worker, so the API process never spends CPU on pixels; it reads only the
  header, to refuse images of more than ``MAX_PIXELS`` before any decoding).

Environment (for experiments and the tests): ``MLPOOL_DEMO_MODEL_DIR`` (where
the model files are), ``MLPOOL_DEMO_FEATURE_WORK`` (rounds per request).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xgboost

MODEL_DIR = Path(os.environ.get("MLPOOL_DEMO_MODEL_DIR") or Path(__file__).resolve().parent.parent / "models")
IRIS_PATH = MODEL_DIR / "iris_xgb.json"
DIABETES_PATH = MODEL_DIR / "diabetes_xgb.json"
CNN_PATH = MODEL_DIR / "tiny_cnn.pt"
FEATURE_WORK = int(os.environ.get("MLPOOL_DEMO_FEATURE_WORK", 150_000))  # rounds of feature engineering per request
IMAGE_SIZE = 64
MAX_PIXELS = 4096 * 4096  # 48 MiB decoded as RGB; a 13,000 x 13,000 PNG of 164 KB would be 480 MiB


class InvalidImage(ValueError):
    """The upload is not a PNG or JPEG we can decode, or has too many pixels.
    The message is meant for the client; the cause (Pillow's error) is for the log."""

IRIS_EXAMPLE = [6.2, 2.2, 4.5, 1.5]


def train_if_missing(with_cnn: bool = False) -> None:
    """Fit and save the models unless their files exist (a second or two)."""
    from sklearn.datasets import load_diabetes as diabetes_data
    from sklearn.datasets import load_iris as iris_data

    MODEL_DIR.mkdir(exist_ok=True)
    if not IRIS_PATH.exists():
        x, y = iris_data(return_X_y=True)
        model = xgboost.XGBClassifier(n_estimators=50, max_depth=3, n_jobs=1, random_state=0)
        model.fit(x, y)
        model.save_model(IRIS_PATH)
    if not DIABETES_PATH.exists():
        x, y = diabetes_data(return_X_y=True)
        above_median = (y > np.median(y)).astype(int)  # progression above the median: class 1
        model = xgboost.XGBClassifier(n_estimators=100, max_depth=4, n_jobs=1, random_state=0)
        model.fit(x, above_median)
        model.save_model(DIABETES_PATH)
    if with_cnn and not CNN_PATH.exists():
        import torch

        torch.manual_seed(0)
        torch.save(_tiny_cnn().state_dict(), CNN_PATH)


def diabetes_example() -> list[float]:
    from sklearn.datasets import load_diabetes as diabetes_data

    return [float(v) for v in diabetes_data().data[0]]


def load_iris(path: str = str(IRIS_PATH)) -> xgboost.XGBClassifier:
    model = xgboost.XGBClassifier(n_jobs=1)
    model.load_model(path)
    return model


def load_diabetes(path: str = str(DIABETES_PATH)) -> xgboost.XGBClassifier:
    model = xgboost.XGBClassifier(n_jobs=1)
    model.load_model(path)
    return model


def engineer_features(features: list[float], rounds: int = FEATURE_WORK) -> np.ndarray:
    """Pure-Python work standing in for real feature engineering."""
    acc = 0.0
    for i in range(rounds):
        acc += features[i % len(features)] * 1e-9
    return np.asarray([features], dtype=np.float32) + acc * 0.0


def score_iris(model: xgboost.XGBClassifier, features: list[float]) -> int:
    return int(model.predict(engineer_features(features))[0])


def score_diabetes(model: xgboost.XGBClassifier, features: list[float]) -> int:
    return int(model.predict(engineer_features(features))[0])


def predict_rows(model: xgboost.XGBClassifier, rows: list[list[float]]) -> Iterator[dict]:
    """Per-row predictions of a batch, each yielded as soon as it is made
    (``pool.stream``): the client sees the first row at once, and a client
    that leaves stops the work at the next row."""
    for i, row in enumerate(rows):
        yield {"row": i, "class": score_diabetes(model, row)}


def _tiny_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def load_cnn(path: str = str(CNN_PATH)):
    import torch

    model = _tiny_cnn()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def image_size(image: bytes) -> tuple[int, int]:
    """Width and height from the image's header, without decoding its pixels.

    Raises :class:`InvalidImage` for anything but a PNG or JPEG, and for an
    image of more than ``MAX_PIXELS`` pixels (a decompression bomb is small
    on the wire and huge once decoded).
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as picture:  # parses the header only
            kind, (width, height) = picture.format, picture.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImage("not a PNG or JPEG image") from exc
    if kind not in ("PNG", "JPEG"):
        raise InvalidImage("send a PNG or a JPEG")
    if width * height > MAX_PIXELS:
        raise InvalidImage(f"images are limited to {MAX_PIXELS} pixels, this one has {width} x {height}")
    return width, height


def score_image(model, image: bytes) -> dict:
    """Decode a PNG or JPEG and classify it: the class and its probability.

    Raises :class:`InvalidImage` for an image that is too large or cannot be decoded.
    """
    import torch
    from PIL import Image

    image_size(image)  # the worker checks too: it is the one that decodes
    try:
        with Image.open(io.BytesIO(image)) as picture:
            pixels = picture.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImage("the image could not be decoded") from exc
    tensor = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        probabilities = torch.softmax(model(tensor), dim=1)[0]
    best = int(probabilities.argmax())
    return {"class": best, "probability": round(float(probabilities[best]), 4)}
