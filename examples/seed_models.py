"""The seed's two models: XGBoost classifiers for iris and diabetes.

Trained on first use from scikit-learn's bundled data sets and saved as
XGBoost JSON model files; loaded by :func:`load_iris` and
:func:`load_diabetes` in each worker. Scoring adds a few milliseconds of
pure-Python feature engineering, as real services do, so the model is
"hungry" the way the seed's ``HungryIris`` was (without its one-second loop).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xgboost

MODEL_DIR = Path(__file__).parent / "models"
IRIS_PATH = MODEL_DIR / "iris_xgb.json"
DIABETES_PATH = MODEL_DIR / "diabetes_xgb.json"

IRIS_EXAMPLE = [6.2, 2.2, 4.5, 1.5]


def train_if_missing() -> None:
    """Fit and save both models unless their files exist (a second or two)."""
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


def engineer_features(features: list[float], rounds: int = 50_000) -> np.ndarray:
    """Pure-Python work standing in for real feature engineering (~5 ms)."""
    acc = 0.0
    for i in range(rounds):
        acc += features[i % len(features)] * 1e-9
    return np.asarray([features], dtype=np.float32) + acc * 0.0


def score_iris(model: xgboost.XGBClassifier, features: list[float]) -> int:
    return int(model.predict(engineer_features(features))[0])


def score_diabetes(model: xgboost.XGBClassifier, features: list[float]) -> int:
    return int(model.predict(engineer_features(features))[0])
