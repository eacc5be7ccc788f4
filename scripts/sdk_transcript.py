"""Drive one case through a running ``langgraph dev`` server with ``langgraph_sdk`` and print the transcript:
create thread, run, interrupt payload, resume with a corrected finding, sign off, final verdict.

    DERMGRAPH_CONFIG=review.yaml langgraph dev --no-browser --port 2024 &     # review.yaml: {review: {when: always}}
    python scripts/sdk_transcript.py --url http://127.0.0.1:2024 --image examples/lesion.jpg --set blue_whitish_veil=absent
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:2024")
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--set", dest="edits", action="append", default=[], help="criterion=value for the first review.")
    ap.add_argument("--reviewer", default="dr-demo")
    args = ap.parse_args()

    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=args.url)
    cfg = {"configurable": {"review": {"when": "always", "where": "verify"}}}
    thread = client.threads.create()
    tid = thread["thread_id"]
    print(f">>> client.threads.create()  -> thread_id {tid}")
    image = "data:image/jpeg;base64," + base64.b64encode(args.image.read_bytes()).decode()
    client.runs.wait(tid, "dermgraph", input={"image": image, "question": "Is this melanoma?"}, config=cfg)
    print(">>> client.runs.wait(thread, 'dermgraph', input={image: <data URL>, question}, config=cfg)")
    state = client.threads.get_state(tid)
    req = state["interrupts"][0]["value"]
    print(f">>> client.threads.get_state(thread)  -> next {state['next']}; interrupt payload:")
    brief = {k: req[k] for k in ("case_id", "stage", "modality", "verdict", "reasons", "cited")}
    brief["findings"] = {f["criterion"]: [f["value"], f["confidence"]] for f in req["findings"]}
    brief["differential"] = [[d["label"], round(d["probability"], 3)] for d in req["differential"][:4]]
    print(json.dumps(brief, indent=1))
    edits = dict(e.split("=", 1) for e in args.edits)
    resume = {"reviewer": args.reviewer, "findings": edits, "note": "corrected on review"}
    client.runs.wait(tid, "dermgraph", command={"resume": resume}, config=cfg)
    state = client.threads.get_state(tid)
    v = state["values"]
    print(f">>> client.runs.wait(thread, 'dermgraph', command={{'resume': {json.dumps(resume)}}}, config=cfg)")
    print(f"    -> next {state['next']}; verifier: {v['verification']['decision']} {v['reasoning']['differential'][0]['label'] if v.get('reasoning') else None} "
          f"p={v['verification']['confidence']:.2f}; reasons {v['verification']['reasons']}")
    if state["next"] == ["review"]:
        sign = {"reviewer": args.reviewer, "diagnosis": v["reasoning"]["differential"][0]["label"] if v.get("reasoning") else None}
        client.runs.wait(tid, "dermgraph", command={"resume": sign}, config=cfg)
        print(f">>> client.runs.wait(thread, 'dermgraph', command={{'resume': {json.dumps(sign)}}}, config=cfg)")
    final = client.threads.get_state(tid)
    v = final["values"]
    print(f">>> final: next {final['next']}; verdict {v['verification']['decision']}; top {v['reasoning']['differential'][0] if v.get('reasoning') else None}")
    print("    trace:", " -> ".join(t["node"] for t in v["trace"]))
    for r in v["review"]["records"]:
        print(f"    review: {r['reviewer']} at {r['at']} {r['action']} changes {[(c['criterion'], c['model'], c['reviewer']) for c in r['changes']]}")


if __name__ == "__main__":
    main()
