"""PNG plots of an evaluation (matplotlib, Agg backend; imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix (truth rows, prediction columns) with counts in the cells."""
    import numpy as np

    plt = _plt()
    cm = np.asarray(matrix, float)
    keep_rows = [i for i in range(len(labels)) if cm[i].sum() > 0] if len(labels) > 20 else list(range(cm.shape[0]))
    cm = cm[keep_rows]  # with many labels, show only the truth classes present
    rows = [labels[i] for i in keep_rows]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.5, 0.35 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, max(4.0, 0.35 * len(rows) + 2)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 8 else 45, ha="right" if len(labels) <= 8 else "center", fontsize=7 if len(labels) > 20 else 9)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 20 else 9)
    if len(labels) <= 20:
        for i in range(len(rows)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the truth row")
    return _save(fig, path)


def reliability_diagram(bins: Sequence[dict[str, Any]], path: Path, ece: float | None = None, title: str = "Reliability") -> Path:
    """Accuracy vs mean confidence per confidence bin (bar width = bin), with the diagonal and bin counts."""
    plt = _plt()
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for b in bins:
        if b["n"]:
            ax.bar(b["lo"], b["accuracy"], width=b["hi"] - b["lo"], align="edge", color="tab:blue", edgecolor="black", alpha=0.8)
            ax.plot([b["confidence"]], [b["accuracy"]], "o", color="tab:red", ms=3)
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title + (f" (ECE {ece:.3f})" if ece is not None else ""))
    axh.bar([b["lo"] for b in bins], [b["n"] for b in bins], width=[b["hi"] - b["lo"] for b in bins], align="edge", color="grey")
    axh.set_xlabel("confidence of the top label")
    axh.set_ylabel("cases")
    axh.set_xlim(0, 1)
    return _save(fig, path)


def risk_coverage(curves: dict[str, tuple[Sequence[float], Sequence[float], float]], path: Path, title: str = "Risk-coverage") -> Path:
    """Selective risk vs coverage, one line per score (``name: (coverage, risk, aurc)``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (cov, risk, aurc) in curves.items():
        ax.plot(cov, risk, label=f"{name} (AURC {aurc:.3f})")
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error rate on covered cases)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grouped_bars(groups: dict[str, dict[str, dict[str, Any]]], metrics: Sequence[str], path: Path, title: str, ylabel: str = "value") -> Path:
    """Bars of ``groups[group][metric] = {"value", "ci95"}`` (error bars = CI), one colour per metric;
    used for fairness (groups = sex/age bands) and per-criterion morphology scores."""
    import numpy as np

    plt = _plt()
    names = list(groups)
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) * max(1, len(metrics)) * 0.5 + 2), 4))
    x = np.arange(len(names))
    for k, m in enumerate(metrics):
        vals = [groups[g].get(m, {}).get("value") for g in names]
        v = np.array([np.nan if a is None else a for a in vals], float)
        cis = [groups[g].get(m, {}).get("ci95") for g in names]
        err = np.array([[vv - c[0], c[1] - vv] if c and not np.isnan(vv) else [0, 0] for vv, c in zip(v, cis)]).T
        ax.bar(x + k * width - 0.4 + width / 2, np.nan_to_num(v), width, yerr=err, capsize=2, label=m)
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(3, len(metrics)))
    return _save(fig, path)


def fairness_bars(fair_group: dict[str, Any], metrics: Sequence[str], path: Path, title: str) -> Path:
    """Per-group headline metrics of one grouping (``evals.fairness.fairness(...)[name]``), with n in the tick labels."""
    groups = {f"{g}\n(n={d['n']})": d["metrics"] for g, d in fair_group["groups"].items()}
    return grouped_bars(groups, metrics, path, title)
