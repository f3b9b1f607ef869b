"""How close is a greedy answer to a tie? First-token logits and the greedy reply, per engine.

    python scripts/answer_margins.py --model .cache/models/smollm2-135m-instruct \
        --model .cache/models/smollm2-135m-instruct-fp32 [--gguf PATH.gguf ...] ["question" ...] \
        [--out benchmarks/answer_margins.json]

For each edgellm model folder (and, when llama-cpp-python is importable, each GGUF file) it prints
the top-3 first tokens of the chat reply with their logits, the margin between the first two, and
the greedy reply. Used to show that "What is the capital of France?" is a near-tie in the source
model itself (fp32 "The" 25.33 vs "L" 25.24), so any 8-bit rounding, ours or llama.cpp's, can tip it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import edgellm
from edgellm.record import Recorder, Table
from edgellm.runtime import measure

DEFAULT_QUESTIONS = ["What is the capital of France?"]


def edgellm_answer(folder: str, question: str, max_new_tokens: int) -> dict:
    llm = edgellm.load(folder, threads=2)
    ids = llm.encode([{"role": "user", "content": question}])
    eos = llm.manifest.generation.eos_token_ids
    run = measure.greedy(llm.session, ids, max_new_tokens, eos, record=True)
    llm.reset()
    reply = llm.tokenizer.decode([t for t in run.tokens if t not in eos])
    return _describe(f"edgellm {llm.manifest.precision} ({folder})", run.logits[0], reply, llm.tokenizer.decode)


def llama_cpp_answer(gguf: str, question: str, max_new_tokens: int, ids: list[int], decode) -> dict:
    import llama_cpp

    model = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    model.eval(ids)
    logits = np.array(model.scores[model.n_tokens - 1])
    reply: list[int] = []
    for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == model.token_eos() or len(reply) >= max_new_tokens:
            break
        reply.append(token)
    return _describe(f"llama.cpp ({gguf})", logits, decode(reply), decode)


def _describe(engine: str, logits: np.ndarray, reply: str, decode) -> dict:
    top = np.argsort(-logits)[:3]
    return {"engine": engine, "top3": [[decode([int(t)]), round(float(logits[t]), 3)] for t in top],
            "margin": round(float(measure.top2_margin(logits)), 3), "reply": reply}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("questions", nargs="*", default=DEFAULT_QUESTIONS)
    ap.add_argument("--model", action="append", required=True, help="edgellm model folder (repeatable)")
    ap.add_argument("--gguf", action="append", default=[], help="GGUF file run through llama-cpp-python (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--out", type=Path, help="also write a results file (edgellm.record) with the table")
    args = ap.parse_args()
    rec = Recorder("answer_margins", parameters=vars(args))

    reference = edgellm.load(args.model[0], threads=2)  # its tokenizer renders the chat for llama.cpp too
    rows = []
    for question in args.questions:
        for folder in args.model:
            rows.append({"question": question, **edgellm_answer(folder, question, args.max_new_tokens)})
        ids = reference.encode([{"role": "user", "content": question}])
        for gguf in args.gguf:
            rows.append({"question": question, **llama_cpp_answer(gguf, question, args.max_new_tokens, ids,
                                                                   reference.tokenizer.decode)})
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    if args.out:
        table = Table(["question", "engine", "1st", "2nd", "margin", "greedy reply"],
                      [[r["question"], r["engine"], f'"{r["top3"][0][0]}" {r["top3"][0][1]:.3f}',
                        f'"{r["top3"][1][0]}" {r["top3"][1][1]:.3f}', f'{r["margin"]:+.3f}',
                        r["reply"].replace("\n", " ")] for r in rows])
        print(f"wrote {rec.write(args.out, samples=rows, table=table)}")


if __name__ == "__main__":
    main()
