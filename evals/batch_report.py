"""Score a ``dermgraph batch`` results file: the agent's final label vs the classifier alone and the
retrieved cases alone, abstention, accuracy on accepted cases and at fixed coverage, throughput.
A quick look at one file; ``dermgraph eval BENCHMARK --import-batch FILE`` gives the full protocol
(CIs, LLM alone, calibration, fairness, report and plots) from the same records.

    python -m evals.batch_report results.jsonl [--positive mel] [--json]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from evals.metrics import accuracy, accuracy_at_coverage, bootstrap_ci, diagnosis_metrics, risk_coverage
from evals.protocols.diagnosis import system_predictions

app = typer.Typer(add_completion=False)


def summarise(records: list[dict], positive: str = "mel") -> dict:
    """Metrics over records that have a truth label and a diagnosis; errors are counted, not scored."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("truth")]
    errors = [r for r in records if r.get("status") != "ok"]
    y = np.array([r["truth"] for r in ok])
    final = np.array([r["diagnosis"]["label"] or "none" for r in ok])
    preds = [system_predictions(r["diagnosis"]) for r in ok]
    clf = [p["classifier"][0] or "none" for p in preds]
    knn = [p["knn"][0] or "none" for p in preds]
    accepted = np.array([r["diagnosis"]["verdict"] == "accept" for r in ok])
    conf = np.array([r["diagnosis"]["confidence"] for r in ok])
    correct = final == y
    _, _, aurc = risk_coverage(conf, correct)
    durations = [sum(t["duration_s"] for t in r["diagnosis"]["trace"]) for r in ok]
    out = {
        "n_records": len(records),
        "n_errors": len(errors),
        "agent": diagnosis_metrics(y, final, positive),
        "classifier_alone": diagnosis_metrics(y, np.array(clf), positive),
        "knn_alone": diagnosis_metrics(y, np.array(knn), positive),
        "agent_accuracy_ci95": [round(v, 4) for v in bootstrap_ci(accuracy, y, final, n=500)],
        "abstention_rate": round(float(1 - accepted.mean()), 4),
        "accuracy_on_accepted": round(float(correct[accepted].mean()), 4) if accepted.any() else None,
        "accuracy_at_80pct_coverage": round(accuracy_at_coverage(conf, correct, 0.8), 4),
        "aurc": round(aurc, 4),
        "llm_fallback_rate": round(float(np.mean([r["diagnosis"]["reasoner_source"] == "fallback" for r in ok])), 4),
        "mean_graph_seconds_per_case": round(float(np.mean(durations)), 3) if durations else None,
    }
    return out


@app.command()
def main(results: list[Path] = typer.Argument(...), positive: str = "mel", as_json: bool = typer.Option(False, "--json")):
    """Print metrics for one or more results files (pooled)."""
    records = [json.loads(line) for p in results for line in p.read_text().splitlines() if line.strip()]
    s = summarise(records, positive)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    typer.echo(f"cases {s['n_records']} (errors {s['n_errors']})")
    typer.echo(f"{'':18s} {'acc':>6s} {'bal_acc':>8s} {'macroF1':>8s} {positive + '_sens':>9s} {positive + '_spec':>9s}")
    for k in ("classifier_alone", "knn_alone", "agent"):
        m = s[k]
        typer.echo(f"{k:18s} {m['accuracy']:6.3f} {m['balanced_accuracy']:8.3f} {m['macro_f1']:8.3f} {m[positive + '_sensitivity']:9.3f} {m[positive + '_specificity']:9.3f}")
    typer.echo(f"agent accuracy 95% CI {s['agent_accuracy_ci95']}; abstention {s['abstention_rate']:.3f}; accuracy on accepted {s['accuracy_on_accepted']}; "
               f"accuracy at 80% coverage {s['accuracy_at_80pct_coverage']}; AURC {s['aurc']}; LLM fallback rate {s['llm_fallback_rate']}")


if __name__ == "__main__":
    app()
