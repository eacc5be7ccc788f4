"""Linear-probe fitting on frozen image features (the SkinVL protocol; the benchmark task is
:mod:`evals.protocols.linear_probe`).

Standardised features → multinomial logistic regression (lbfgs). The inverse regularisation
strength C is chosen from a log grid by stratified k-fold cross-validation on the training set,
maximising macro one-vs-rest ROC-AUC; the chosen C is refitted on the whole training set and
evaluated once on the test set.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_CS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _model(C: float, max_iter: int, class_weight: str | None) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight))


def _proba(model: Any, X: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """(N, len(labels)) probabilities; classes missing from the fit's training data get 0."""
    out = np.zeros((len(X), len(labels)))
    col = {c: j for j, c in enumerate(labels)}
    p = model.predict_proba(X)
    for k, c in enumerate(model.classes_):
        out[:, col[c]] = p[:, k]
    return out


def linear_probe(
    X_train: np.ndarray,
    y_train: Sequence[str],
    X_test: np.ndarray,
    y_test: Sequence[str],
    Cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 2000,
    class_weight: str | None = None,
) -> dict[str, Any]:
    """Select C by ``folds``-fold stratified CV (macro OvR ROC-AUC), refit on all of the training
    set, evaluate on the test set.

    Returns ``best_C``, ``cv`` (one row per C: mean/std CV AUC), ``labels`` (the training classes,
    the column order of ``proba``), ``test`` (accuracy, balanced_accuracy, macro_f1, macro_auc) and
    the test predictions ``y_pred``/``proba`` for bootstrapping. Ties in CV AUC go to the smaller C.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    from evals.metrics import accuracy, balanced_accuracy, macro_f1, macro_roc_auc

    X_train, X_test = np.asarray(X_train, np.float64), np.asarray(X_test, np.float64)
    y_train, y_test = np.asarray(y_train).astype(str), np.asarray(y_test).astype(str)
    labels = sorted(set(y_train))
    if len(labels) < 2:
        raise ValueError(f"the training set has {len(labels)} class(es); a probe needs at least 2")
    # A class rarer than `folds` cannot appear in every fold: use fewer folds rather than fail.
    min_count = min(int((y_train == c).sum()) for c in labels)
    k = max(2, min(folds, min_count))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    splits = list(splitter.split(X_train, y_train))
    n_unconverged = 0
    cv = []
    for C in Cs:
        aucs = []
        for tr, va in splits:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model = _model(C, max_iter, class_weight).fit(X_train[tr], y_train[tr])
            n_unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            aucs.append(macro_roc_auc(y_train[va], _proba(model, X_train[va], labels), labels))
        cv.append({"C": float(C), "auc_mean": float(np.nanmean(aucs)), "auc_std": float(np.nanstd(aucs))})
    best = max(cv, key=lambda r: (r["auc_mean"], -r["C"]))
    model = _model(best["C"], max_iter, class_weight).fit(X_train, y_train)
    proba = _proba(model, X_test, labels)
    y_pred = np.asarray(labels)[proba.argmax(axis=1)]
    return {
        "best_C": best["C"],
        "folds": k,
        "cv": cv,
        "labels": labels,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "unconverged_fits": n_unconverged,
        "test": {
            "accuracy": accuracy(y_test, y_pred),
            "balanced_accuracy": balanced_accuracy(y_test, y_pred),
            "macro_f1": macro_f1(y_test, y_pred, sorted(set(y_test))),
            "macro_auc": macro_roc_auc(y_test, proba, labels),
        },
        "y_pred": y_pred,
        "proba": proba,
    }
