"""Ways to combine the modality head, the second expert's modality head and (where the predictions have it) the
modality probe, scored by the whole-source held-out protocol without fitting on what they score: each fold's
combination is chosen on the other folds' held-out predictions (nested), from `dermgraph train modality-heldout`'s
`predictions.npz`.

Combiners: the head and the expert's mean with weight 0.5 (the previous default; nothing fitted), the weighted
arithmetic mean and the weighted geometric mean of those two (weight chosen on the other folds), a logistic
regression over both heads' log-probabilities; with the probe, the agent's combination as configured (a third each
in a geometric mean by default; nothing fitted) and the geometric mean with the probe's and the expert's shares
chosen on the other folds.

    python scripts/modality_combiners.py runs/modality_heldout/predictions.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

WEIGHTS = np.round(np.linspace(0, 1, 21), 2)


def arithmetic(h: np.ndarray, e: np.ndarray, w: float) -> np.ndarray:
    return (1 - w) * h + w * e


def geometric(h: np.ndarray, e: np.ndarray, w: float) -> np.ndarray:
    return np.exp((1 - w) * np.log(h + 1e-9) + w * np.log(e + 1e-9))


def accuracy(p: np.ndarray, y: np.ndarray, rows: np.ndarray) -> float:
    return float((p[rows].argmax(1) == y[rows]).mean())


def nested_weight(h, e, y, fold, headline, rule: Callable) -> tuple[np.ndarray, dict[int, float]]:
    """Each fold's rows combined with the weight that is most accurate on the other folds' headline rows."""
    out, chosen = np.zeros_like(h), {}
    for k in np.unique(fold):
        other = (fold != k) & headline
        w = max(WEIGHTS, key=lambda w: (accuracy(rule(h, e, w), y, other), -abs(w - 0.5)))  # ties: the weight nearest the mean
        out[fold == k], chosen[int(k)] = rule(h, e, w)[fold == k], float(w)
    return out, chosen


SHARES = [(round(float(a), 2), round(float(b), 2)) for a in np.arange(0, 1.001, 0.1) for b in np.arange(0, 1.001, 0.1) if a + b <= 1 + 1e-9]


def nested_shares(h, e, pr, y, fold, headline, rule: str = "geometric") -> tuple[np.ndarray, dict[int, tuple[float, float]]]:
    """Each fold's rows combined (:func:`agent.nodes.modality.combine_opinions`) with the (probe, expert) shares most
    accurate on the other folds' headline rows (ties: the shares nearest a third each)."""
    from agent.nodes.modality import combine_opinions

    out, chosen = np.zeros_like(h), {}
    cache = {s: combine_opinions(h, [(pr, s[0]), (e, s[1])], rule) for s in SHARES}
    for k in np.unique(fold):
        other = (fold != k) & headline
        s = max(SHARES, key=lambda s: (accuracy(cache[s], y, other), -abs(s[0] - 1 / 3) - abs(s[1] - 1 / 3)))
        out[fold == k], chosen[int(k)] = cache[s][fold == k], s
    return out, chosen


def nested_logistic(h, e, y, fold, headline, c: float = 0.1) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    x = np.log(np.clip(np.hstack([h, e]), 1e-6, 1))
    out = np.zeros_like(h)
    for k in np.unique(fold):
        other = (fold != k) & headline
        clf = LogisticRegression(C=c, max_iter=2000).fit(x[other], y[other])
        held = fold == k
        p = np.zeros((int(held.sum()), h.shape[1]))
        p[:, clf.classes_] = clf.predict_proba(x[held])  # a class absent from the other folds keeps probability 0
        out[held] = p
    return out


def run(path: Path) -> dict:
    z = np.load(path, allow_pickle=True)
    if "fold" not in z.files:
        raise SystemExit(f"{path} has no fold ids: rerun `dermgraph train modality-heldout` (it reuses the fold models it finds)")
    classes = sorted(set(z["y"].tolist()))
    y = np.array([classes.index(v) for v in z["y"]])
    h, e, fold, headline, tags = z["head"], z["expert"], z["fold"], z["headline"].astype(bool), z["tags"]
    results = {"head and expert, mean, weight 0.5 (the previous default)": (arithmetic(h, e, 0.5), None)}
    results["weighted mean, weight nested"] = nested_weight(h, e, y, fold, headline, arithmetic)
    results["weighted geometric mean, weight nested"] = nested_weight(h, e, y, fold, headline, geometric)
    results["logistic regression on both log-probabilities, nested"] = (nested_logistic(h, e, y, fold, headline), None)
    if "probe" in z.files:
        from agent.config import AgentConfig
        from agent.nodes.modality import combine_opinions

        m, pr = AgentConfig().modality, z["probe"]
        results[f"the agent: {m.combine} mean, probe {m.imagenet_weight:.2f}, expert {m.second_expert_weight:.2f}"] = (
            combine_opinions(h, [(pr, m.imagenet_weight), (e, m.second_expert_weight)], m.combine), None)
        results["head, probe and expert, geometric mean, shares nested"] = nested_shares(h, e, pr, y, fold, headline)
    out = {}
    for name, (p, chosen) in results.items():
        out[name] = {"all": round(accuracy(p, y, headline), 4), **{str(t): round(accuracy(p, y, headline & (tags == t)), 4) for t in sorted(set(tags[headline].tolist()))}}
        if chosen:
            out[name]["weights_per_fold"] = chosen
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", type=Path, nargs="?", default=Path("runs/modality_heldout/predictions.npz"))
    a = ap.parse_args(argv)
    res = run(a.predictions)
    kinds = [k for k in next(iter(res.values())) if k not in ("all", "weights_per_fold")]
    print("| combiner | all | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    for name, r in res.items():
        print(f"| {name} | {r['all']:.4f} | " + " | ".join(f"{r[k]:.4f}" for k in kinds) + " |" + (f" weights {r['weights_per_fold']}" if "weights_per_fold" in r else ""))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
