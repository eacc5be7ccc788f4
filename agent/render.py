"""Notebook rendering of a Diagnosis: thumbnail, verdict, one card per step, evidence, graph diagram."""

from __future__ import annotations

import html
import json
import re

_DATA_URI = re.compile(r"data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+={0,2}")


def _card(title: str, body: str, colour: str = "#f6f6fb") -> str:
    return (f'<div style="background:{colour};border-radius:6px;padding:6px 10px;margin:4px 0">'
            f"<b>{html.escape(title)}</b><div style='font-size:0.9em'>{body}</div></div>")


def diagnosis_html(d) -> str:
    from agent.graph import mermaid

    verdict_colour = "#e6f4ea" if d.verdict == "accept" else "#fdecea"
    head = f"<h3 style='margin:4px 0'>{html.escape(d.verdict.upper())}: {html.escape(d.label_name or '—')} (p={d.confidence:.2f})</h3>"
    reasons = "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in d.reasons) + "</ul>"
    # A Diagnosis loaded from a record may carry any string here: only a base64 image data URI is rendered.
    ok = isinstance(d.thumbnail, str) and _DATA_URI.fullmatch(d.thumbnail) is not None
    thumb = f'<img src="{html.escape(d.thumbnail, quote=True)}" style="max-width:192px;border-radius:4px;float:right;margin-left:10px"/>' if ok else ""
    in_set = set(d.prediction_set)
    diff = "".join(
        f"<tr><td>{html.escape(x.name)}{' ◆' if x.label in in_set else ''}</td><td><div style='background:#7b6cf6;height:10px;width:{int(200 * x.probability)}px'></div></td>"
        f"<td>{x.probability:.3f}</td></tr>" for x in d.differential
    )
    steps = "".join(
        _card(f"{t.step}. {t.node} · {t.duration_s:.2f}s · {t.model_id or ''}",
              "<pre style='white-space:pre-wrap;max-height:180px;overflow:auto'>" + html.escape(json.dumps(t.outputs, indent=1, default=str)[:3000]) + "</pre>"
              + ("<i>" + html.escape("; ".join(t.notes)) + "</i>" if t.notes else ""))
        for t in d.trace
    )
    set_note = (f"<div style='font-size:0.85em'>◆ {round((1 - d.prediction_set_alpha) * 100)}% prediction set "
                f"(split-conformal; {html.escape(d.prediction_set_calibration or '')})</div>") if d.prediction_set and d.prediction_set_alpha else ""
    reasoning = "<ol>" + "".join(
        f"<li><b>{html.escape(st.kind)}</b>: {html.escape(st.text)} <span style='color:#777'>{html.escape(', '.join(st.evidence))}</span></li>"
        for st in d.reasoning_steps
    ) + "</ol>"
    if d.summary_check is not None and d.summary_check.passed:
        reasoning += "<div><b>Summary</b> (LLM, claim-checked): " + html.escape(d.summary_check.text) + "</div>"
    if d.summary_check is not None and not d.summary_check.passed:
        reasoning += "<i>LLM summary withheld (failed the claim check): " + html.escape("; ".join(d.summary_check.failures)) + "</i>"
    evidence = "".join(
        f"<li><code>{html.escape(e.id)}</code>{' ★' if e.id in d.cited else ''} ({e.kind}, {e.score:.2f}) {html.escape(e.title)}: {html.escape(e.text[:200])}</li>"
        for e in d.evidence
    )
    warnings = _card("Input warnings", "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in d.input_warnings) + "</ul>", "#fff4e5") if d.input_warnings else ""
    return (
        f"<div style='font-family:sans-serif;max-width:900px'>{thumb}"
        + warnings
        + _card("Verdict", head + reasons, verdict_colour)
        + _card("Findings", html.escape(d.description or "—"))
        + _card("Differential (decided label first, then by probability)", f"<table>{diff}</table>{set_note}")
        + (_card("Reasoning steps", reasoning) if d.reasoning_steps else _card("Rationale", html.escape(d.rationale or "—")))
        + _card("Evidence (★ cited)", f"<ul>{evidence}</ul>")
        + "<details><summary>Trace</summary>" + steps + "</details>"
        + "<details><summary>Graph</summary><pre>" + html.escape(mermaid()) + "</pre></details></div>"
    )
