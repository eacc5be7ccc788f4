"""LLM runtime comparison on CPU: fp32 vs int8 dynamic quantisation (torch.ao) of the default reasoner LLM.

Times candidate scoring (the 7 HAM10000 candidates as continuations of ``Diagnosis: ``) and a 40-token
summary on prompts rendered by the agent for real cases, and reports how often the top-scored candidate
agrees between the two. Not used by the default configuration (the shipped stacker does not fuse the LLM).

    OMP_NUM_THREADS=1 python scripts/bench_llm_int8.py [--images DIR] [-n 8]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=None)
    ap.add_argument("-n", type=int, default=8)
    args = ap.parse_args()

    import torch

    from agent.agent import Agent
    from agent.bench import bench_cases
    from agent.nodes.reason import candidates_for, classifier_display, second_expert_display
    from agent.prompts import DIAGNOSIS_PREFIX, RATIONALE_FIELD, conversation, render_user

    agent = Agent()
    cases = bench_cases(args.images, args.n)
    convs = []
    for c in cases:
        final = agent.run(c.image, c.question, c.metadata or None)
        if final.modality.rejected or final.modality.label not in ("dermoscopy", "clinical"):
            continue
        cands, names = candidates_for(final, agent.config)
        convs.append((conversation(render_user(final, cands, names, classifier_display(final, agent.runtime, cands), None,
                                                second_expert=second_expert_display(final, agent.runtime, cands))), [names[x] for x in cands]))
    llm = agent.runtime.llm
    llm._load()
    fp32 = llm._model
    int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)

    def run(model):
        llm._model = model
        score_t, gen_t, tops = [], [], []
        for conv, names in convs:
            t0 = time.perf_counter()
            s = llm.score_continuations(conv, DIAGNOSIS_PREFIX, names)
            score_t.append(time.perf_counter() - t0)
            tops.append(names[int(s.argmax())])
            t0 = time.perf_counter()
            llm.chat([conv], max_new_tokens=40, temperature=0.0, assistant_prefix=f"{DIAGNOSIS_PREFIX}{tops[-1]}{RATIONALE_FIELD}", stop=["\n"])
            gen_t.append(time.perf_counter() - t0)
        return score_t, gen_t, tops

    run(fp32)  # warm-up
    res = {name: run(m) for name, m in (("fp32", fp32), ("int8-dynamic", int8))}
    llm._model = fp32
    print(f"{len(convs)} prompts, torch threads {torch.get_num_threads()}")
    print(f"{'runtime':14s} {'scoring s/case':>15s} {'summary s/case':>15s}")
    for name, (st, gt, _) in res.items():
        print(f"{name:14s} {statistics.median(st):15.3f} {statistics.median(gt):15.3f}")
    agree = sum(a == b for a, b in zip(res["fp32"][2], res["int8-dynamic"][2]))
    print(f"top-scored candidate agrees on {agree}/{len(convs)} prompts")


if __name__ == "__main__":
    main()
