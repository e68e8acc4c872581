"""Real models for the share_models tests: each loader also scores once with
two threads, so the libraries' thread pools exist in the template when it forks."""

from __future__ import annotations

import numpy as np


def load_forest():
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_iris(return_X_y=True)
    model = RandomForestClassifier(n_estimators=20, random_state=0).fit(x, y)
    model.predict(x)
    return model


def load_booster():
    import xgboost
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3, random_state=0).fit(x, y)
    model.predict(x)
    return model


def load_cnn():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).eval()
    with torch.no_grad():
        model(torch.ones(8, 3, 64, 64))
    return model


def predict_rows(model, rows):
    """scikit-learn or XGBoost: class of each row."""
    return [int(c) for c in model.predict(np.asarray(rows, dtype=float))]


def classify_images(model, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(torch.rand(8, 3, 64, 64, generator=generator)).argmax(1).tolist()


def load_booster_own_threads():
    """XGBoost asked for two threads, whatever OMP_NUM_THREADS says."""
    import xgboost
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=2, random_state=0).fit(x, y)
    model.predict(x)
    return model


def load_cnn_and_draw():
    """load_cnn, having drawn from NumPy's and PyTorch's global generators."""
    import torch

    np.random.random()
    torch.rand(1)
    return load_cnn()
