"""A draft-only output head over the tokens a chat model actually says (frequency-ranked vocabulary).

Why: in a 10-layer student the 49k x 576 lm_head is half of the weights read per token, yet
~96% of what the teacher says falls in its 8k most frequent tokens. A draft model only has to
guess the teacher's next token cheaply; the teacher verifies every guess with its full head, so
a smaller draft head never changes the output, it only loses the rare drafts outside the set.
(The same idea as FR-Spec, Zhao et al. 2025.) The runtime scatters the kept logits back into a
full-vocabulary row filled with -inf, so everything downstream sees the usual shape.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import MissingDependencyError, ModelFormatError
from . import corpus

logger = logging.getLogger(__name__)

HEAD_TOKENS_FILE = "head_tokens.npy"
TEACHER_REPLIES = "teacher_replies.jsonl"  # written by `edgellm distill` into the student's folder
HELDOUT_REPLIES = "teacher_replies_heldout.jsonl"


def rank_tokens(token_lists: Iterable[Sequence[int]], size: int, vocab_size: int,
                always: Iterable[int] = ()) -> np.ndarray:
    """`always`, then the most frequent ids (ties: smaller id first), then unseen ids from 0 up,
    until there are `size` (at most vocab_size); sorted ascending."""
    counts = collections.Counter()
    for ids in token_lists:
        counts.update(ids)
    ranked = [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    keep = dict.fromkeys(int(t) for t in always)
    for token in itertools.chain(ranked, range(vocab_size)):
        if len(keep) >= min(size, vocab_size):
            break
        keep.setdefault(int(token))
    return np.array(sorted(keep), dtype=np.int64)


def _replies(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [json.loads(line)["turns"][-1] for line in path.read_text().splitlines() if line.strip()]


def chat_texts(source_folder: Path | None) -> tuple[list[str], list[str]]:
    """(texts to count, held-out texts to measure coverage on).

    Counted: the training split of the offline dialogue corpus, plus the teacher's own replies when
    the source is a folder from `edgellm distill`. Held out: the teacher's replies to held-out
    prompts when present (what a draft must predict), else the held-out dialogues.
    """
    try:
        split = corpus.load_split()
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "chitchat_dataset", "data", "--draft-head") from exc
    train = [turn for d in split.train for turn in d.turns]
    heldout = [turn for d in split.heldout for turn in d.turns]
    if source_folder is not None:
        train += _replies(source_folder / TEACHER_REPLIES)
        heldout = _replies(source_folder / HELDOUT_REPLIES) or heldout
    return train, heldout


def coverage(token_ids: np.ndarray, token_lists: Iterable[Sequence[int]]) -> float:
    kept = set(token_ids.tolist())
    flat = [t for ids in token_lists for t in ids]
    return sum(t in kept for t in flat) / max(1, len(flat))


def restrict_lm_head(model: onnx.ModelProto, token_ids: np.ndarray) -> None:
    """Make the graph's lm_head produce logits for token_ids only, in that order (int8 or fp32 graphs).

    The embedding keeps reading the full table (the int8 graph ties it to the original lm_head
    bytes), so the restricted head is a new, smaller initializer.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    head = next((n for n in graph.node if n.output and n.output[0] == "lm_head/out0"), None)
    if head is None:
        raise ModelFormatError("the graph has no lm_head node, so it was not built by edgellm.convert.graph. "
                               "Fix: restrict the head of graphs that `edgellm convert` exported.")
    ids = np.asarray(token_ids, dtype=np.int64)
    if head.op_type == "MatMulNBits":  # weight (V, K/block, block) uint8, scales (V, K/block)
        weight, scales = (numpy_helper.to_array(inits[name]) for name in head.input[1:3])
        new = [numpy_helper.from_array(np.ascontiguousarray(weight[ids]), "draft_head_Q8"),
               numpy_helper.from_array(np.ascontiguousarray(scales[ids]), "draft_head_scales")]
        head.input[1], head.input[2] = new[0].name, new[1].name
        for attr in head.attribute:
            if attr.name == "N":
                attr.i = len(ids)
    elif head.op_type == "MatMul":  # weight (K, V)
        weight = numpy_helper.to_array(inits[head.input[1]])
        new = [numpy_helper.from_array(np.ascontiguousarray(weight[:, ids]), "draft_head")]
        head.input[1] = new[0].name
    else:
        raise ModelFormatError(f"the lm_head is a {head.op_type} node; --draft-head knows MatMul (fp32) and "
                               "MatMulNBits (int8) heads. Fix: convert with --precision int8 or fp32.")
    graph.initializer.extend(new)
    used = {name for n in graph.node for name in n.input}
    for name in set(inits) - used:
        graph.initializer.remove(inits[name])
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[-1].dim_value = len(ids)
    logger.info("lm_head restricted to %d tokens", len(ids))
