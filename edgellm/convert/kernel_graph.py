"""The kernel twin of an int8 or int4 CPU graph: `model.kernels.onnx`, model.onnx with edgellm's own MatMul.

Every MatMulNBits node that edgellm's kernel library (edgellm.kernels: op `ai.edgellm.MatMulQ8`)
covers — bits 8, block_size 32, no zero points / g_idx / bias, K a multiple of 32 — becomes a
MatMulQ8 node with the same inputs, outputs and name (attributes K, N, bits, block_size); any
other node stays as it is. Then each decoder layer's tail from o_proj to the next norm is folded
into one `ai.edgellm.Q8Mlp` node where it has the exact pattern, each GroupQueryAttention
becomes `ai.edgellm.CachedAttention`, and each layer's qkv MatMulQ8, CachedAttention and Q8Mlp
become one `ai.edgellm.Q8Layer` node (edgellm/convert/fuse_layers.py). The twin's weights keep
pointing at model.onnx.data (not copied); only the block scales are stored again, as fp16, inside
the twin (edgellm/convert/half_scales.py): the folder grows by one graph file (~8.5 MB for
SmolLM2-135M), and a decode step reads 143 MB instead of 151.

The runtime runs the twin instead of model.onnx on the CPU when the library is there
(edgellm/runtime/kernel_choice.py). When the library is there at convert time, the twin is
checked before it is kept (`check`): its logits against model.onnx's on the gate's held-out
text and chat replies, and the int8 graph's own limits (perplexity ratio and greedy agreement
against fp32, KV consistency). The result is the manifest's `validation.kernel_graph`; a twin
that fails is not written (unless the gate is off), and the folder runs model.onnx as before.

An int4 folder's twin (written by convert only: it needs the fp32 weights) runs its 4-bit matrices as
GGUF's Q4_1 blocks, a float minimum per block (edgellm/convert/q4_blocks.py, bits=4 on MatMulQ8): the
matrices model.onnx holds at 4 bits, and the 8-bit ones whose source weights are exactly such blocks
(a Q4_1 GGUF's), so a Q4_1 source runs its own weights. Those blocks live in the twin's own data file,
model.kernels.onnx.data (~5 bits a weight); the lm_head stays model.onnx's int8.

`python -m edgellm.convert.kernel_graph DIR` adds the twin to an existing int8 CPU folder (checked
against the folder's model.onnx there: no fp32 export is at hand). It changes edgellm.json, so the
folder's fingerprint changes, and `edgellm bench --save` figures saved before are set aside.
"""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import InvalidParameterError, ModelFormatError, ValidationError
from ..manifest import Manifest, read_manifest, resolve_file, sha256_file, verify_checksums
from ..runtime import kernel_choice, measure
from ..runtime.session import DecoderSession
from ..validation import KernelCheck, KernelThresholds, Thresholds, kernel_failures
from .fuse_layers import ATTENTION, LAYER, fuse_decoder_layers, fuse_layer_nodes, replace_attention
from .half_scales import halve_scales
from .q4_blocks import Q4Blocks

logger = logging.getLogger(__name__)

KERNEL_MODEL = "model.kernels.onnx"
KERNEL_WEIGHTS = "model.kernels.onnx.data"  # an int4 twin's 4-bit blocks
ROLE = "kernel_model"  # its role in the manifest's files
WEIGHTS_ROLE = "kernel_weights"
DOMAIN, OP_TYPE = "ai.edgellm", "MatMulQ8"
BITS, BLOCK_SIZE = 8, 32
# An int4 twin's lm_head (8-bit) reads its activations at ~15 bits (MatMulQ8 activation_bits=16): with the layers'
# weights exact, the head's int8 activations were most of what was left of the error (SmolLM2-135M, held-out text:
# fp32 43.314, int8 activations on the head alone 43.379, emulated in the fp32 graph).
FINE_ACTIVATION_BITS = 16
SPEED_ROUNDS = 3  # decode probes per graph, alternating, for the recorded side-by-side speed


def convertible(node: onnx.NodeProto) -> bool:
    """A MatMulNBits node the MatMulQ8 kernel computes exactly as onnxruntime's contract says."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    extra_inputs = [name for name in node.input[3:] if name]  # zero_points, g_idx, bias
    return (attrs.get("bits") == BITS and attrs.get("block_size") == BLOCK_SIZE and not extra_inputs
            and isinstance(attrs.get("K"), int) and attrs["K"] % BLOCK_SIZE == 0 and isinstance(attrs.get("N"), int))


def source_name(node: onnx.NodeProto) -> str:
    """The MatMul a MatMulNBits node was made from ("layers.0/qkv_proj" for "layers.0/qkv_proj_Q4")."""
    base, _, suffix = node.name.rpartition("_")
    return base if base and suffix in ("Q4", "Q8") else node.name


def four_bit_matrices(reference: onnx.ModelProto, bits: dict[str, int]) -> dict[str, Q4Blocks]:
    """The matrices an int4 twin reads as 4-bit blocks: those model.onnx holds at 4 bits, and its 8-bit ones whose
    source weights are exactly 4-bit blocks (all of a Q4_1 GGUF's layers), so they lose nothing either. Not the
    lm_head: its int8 bytes are the embedding table too. reference: the fp32 graph, weights loaded; bits:
    quantize.bits_by_layer(model.onnx)."""
    from .q4_blocks import from_weights

    weights = {t.name: t for t in reference.graph.initializer}
    out = {}
    for node in reference.graph.node:
        if node.op_type != "MatMul" or node.name not in bits or node.name == "lm_head" or node.input[1] not in weights:
            continue
        blocks = from_weights(onnx.numpy_helper.to_array(weights[node.input[1]]).T)
        if bits[node.name] == 4 or blocks.exact == 1.0:
            out[node.name] = blocks
    return out


def _four_bit_node(graph: onnx.GraphProto, node: onnx.NodeProto, blocks: Q4Blocks) -> None:
    """Turn a MatMulNBits node into MatMulQ8 bits=4 reading `blocks` (added as initializers)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (attrs.get("N"), attrs.get("K")) != blocks.shape:
        raise ModelFormatError(f"node {node.name!r} is N={attrs.get('N')}, K={attrs.get('K')}, but its 4-bit blocks "
                               f"are {blocks.shape}. Fix: re-run `edgellm convert`.")
    base = source_name(node)
    graph.initializer.extend([onnx.numpy_helper.from_array(blocks.nibbles, f"{base}.q4"),
                              onnx.numpy_helper.from_array(blocks.dm, f"{base}.q4_dm")])
    node.input[1], node.input[2] = f"{base}.q4", f"{base}.q4_dm"
    del node.input[3:]
    node.op_type, node.domain = OP_TYPE, DOMAIN
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("K", int(attrs["K"])), helper.make_attribute("N", int(attrs["N"])),
                           helper.make_attribute("bits", 4), helper.make_attribute("block_size", BLOCK_SIZE)])


def build_kernel_graph(model: onnx.ModelProto, fuse: bool = True, folder: Path | None = None,
                       rewrite: bool = True,
                       four_bit: dict[str, Q4Blocks] | None = None) -> tuple[onnx.ModelProto, int, int, int]:
    """(the twin, MatMulNBits nodes turned into MatMulQ8, MatMulNBits nodes left as they were, layer tails folded
    into Q8Mlp nodes; 0 with fuse=False).

    rewrite (the default; False only to compare node for node): attention becomes ai.edgellm.CachedAttention,
    every edgellm op reads fp16 copies of its block scales, embedded in the twin (read from `folder`'s data file),
    and (with fuse) each layer's three edgellm nodes become one ai.edgellm.Q8Layer.
    four_bit: source MatMul name (see source_name) -> its 4-bit blocks: those nodes read them instead (bits=4).
    `model` is read, not changed; load it with load_external_data=False so the twin keeps its references."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    converted = left = 0
    four_bit = four_bit or {}
    for node in twin.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        if source_name(node) in four_bit:
            _four_bit_node(twin.graph, node, four_bit[source_name(node)])
            converted += 1
            continue
        if not convertible(node):
            left += 1
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        node.op_type, node.domain = OP_TYPE, DOMAIN
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(name, int(attrs[name])) for name in ("K", "N", "bits",
                                                                                          "block_size"))
        if four_bit:  # an int4 twin's 8-bit matrices (the lm_head) read ~15-bit activations, as its 4-bit ones do
            node.attribute.append(helper.make_attribute("activation_bits", FINE_ACTIVATION_BITS))
        converted += 1
    if converted == 0:
        raise ModelFormatError(f"the graph has no 8-bit MatMulNBits node with block_size {BLOCK_SIZE} (found "
                               f"{left} others): there is nothing for edgellm's kernels to run. Fix: convert with "
                               "--precision int8 --target cpu.")
    if not any(o.domain == DOMAIN for o in twin.opset_import):
        twin.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if four_bit:  # the 4-bit nodes' MatMulNBits weights and zero points are no longer read
        used = {name for node in twin.graph.node for name in node.input}
        kept = [t for t in twin.graph.initializer if t.name in used]
        del twin.graph.initializer[:]
        twin.graph.initializer.extend(kept)
    fused = fuse_decoder_layers(twin.graph) if fuse else 0
    if rewrite:
        replace_attention(twin.graph)
        halve_scales(twin, Path(folder) if folder is not None else Path("."))
        fuse_layer_nodes(twin.graph)  # last: it takes the three nodes' inputs as they are, fp16 scales included
    return twin, converted, left, fused


@dataclass(frozen=True)
class KernelGraph:
    """The twin written into a folder: its file, what it converted, and its size (the folder's growth)."""

    file: str
    nodes: int
    left: int
    fused_layers: int
    bytes: int
    attention: int = 0
    layers: int = 0
    four_bit: int = 0                  # MatMulQ8 nodes reading 4-bit blocks (an int4 twin)
    four_bit_exact: float | None = None  # fraction of those blocks equal to the source weights bit for bit

    def describe(self) -> dict:
        """The manifest's quantization.kernel_graph."""
        if self.four_bit:
            return {**self._describe(), "four_bit_nodes": self.four_bit, "four_bit_exact": self.four_bit_exact,
                    "four_bit_file": KERNEL_WEIGHTS,
                    "four_bit_scheme": "blocks of 32 with fp16 d and minimum (GGUF's Q4_1 layout), recovered bit for "
                                       "bit from a Q4_1 source, else rounded to nearest",
                    "weights": f"{KERNEL_WEIGHTS} (the 4-bit blocks); the other matrices from model.onnx.data, "
                               "shared with model.onnx; the block scales as fp16 copies inside this graph"}
        return self._describe()

    def _describe(self) -> dict:
        return {"file": self.file, "op": f"{DOMAIN}.{OP_TYPE}", "nodes": self.nodes, "matmulnbits_left": self.left,
                "fused_layers": self.fused_layers, "fused_op": f"{DOMAIN}.Q8Mlp", "bytes": self.bytes,
                "attention_nodes": self.attention, "attention_op": f"{DOMAIN}.{ATTENTION}",
                "layer_nodes": self.layers, "layer_op": f"{DOMAIN}.{LAYER}",
                "weights": "model.onnx.data, shared with model.onnx (not copied); the block scales as fp16 "
                           "copies inside this graph"}


def _atomic_write(path: Path, chunks) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _move_four_bit_out(twin: onnx.ModelProto, folder: Path) -> None:
    """The 4-bit blocks (initializers *.q4, *.q4_dm) into FOLDER/model.kernels.onnx.data, 64-byte aligned."""
    chunks, offset = [], 0
    for tensor in twin.graph.initializer:
        if not tensor.name.endswith((".q4", ".q4_dm")):
            continue
        data = tensor.raw_data
        pad = -offset % 64
        chunks.append(b"\0" * pad)
        offset += pad
        chunks.append(data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", KERNEL_WEIGHTS), ("offset", str(offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        offset += len(data)
    _atomic_write(folder / KERNEL_WEIGHTS, chunks)


def write(folder: Path, model_file: str = "model.onnx", fuse: bool = True, name: str = KERNEL_MODEL,
          four_bit: dict[str, Q4Blocks] | None = None) -> KernelGraph:
    """Write FOLDER/name (model.kernels.onnx) from FOLDER/model_file, with `four_bit` (see build_kernel_graph)
    also FOLDER/model.kernels.onnx.data; each file atomic (temp file + rename)."""
    folder = Path(folder)
    source = onnx.load(str(folder / model_file), load_external_data=False)
    for tensor in source.graph.initializer:  # the twin must read the same data file from the same folder
        location = {e.key: e.value for e in tensor.external_data}.get("location")
        if tensor.data_location == onnx.TensorProto.EXTERNAL and (location is None or os.path.dirname(location)):
            raise ModelFormatError(f"{folder / model_file}: initializer {tensor.name!r} keeps its data at "
                                   f"{location!r}, not in a file beside the graph. Fix: re-run `edgellm convert`.")
    twin, converted, left, fused = build_kernel_graph(source, fuse, folder, four_bit=four_bit)
    layers = sum(n.op_type == LAYER for n in twin.graph.node)
    attention = layers + sum(n.op_type == ATTENTION for n in twin.graph.node)  # a Q8Layer runs its attention
    if four_bit:
        _move_four_bit_out(twin, folder)
    path = folder / name
    _atomic_write(path, [twin.SerializeToString()])
    logger.info("wrote %s: %d MatMulNBits as %s.%s (%d left as they were), %d layer tails as Q8Mlp, %d attention "
                "nodes as %s, %d layers as %s", path, converted, DOMAIN, OP_TYPE, left, fused, attention, ATTENTION,
                layers, LAYER)
    exact = None
    if four_bit:
        blocks = sum(b.nibbles.shape[0] * b.nibbles.shape[1] for b in four_bit.values())
        exact = round(sum(b.exact * b.nibbles.shape[0] * b.nibbles.shape[1] for b in four_bit.values()) / blocks, 6)
    size = path.stat().st_size + ((folder / KERNEL_WEIGHTS).stat().st_size if four_bit else 0)
    return KernelGraph(KERNEL_MODEL, converted, left, fused, size, attention, layers, len(four_bit or {}), exact)


def check(standard: DecoderSession, twin: DecoderSession, tokens: list[int], window: int, chats: list[list[int]],
          eos_ids: set[int], consistency_tokens: int, speed_prompt: list[int], reference: str,
          reference_score: measure.Perplexity, thresholds: Thresholds, precision: str = "int8",
          limits: KernelThresholds | None = None) -> KernelCheck:
    """Measure the twin against model.onnx (`standard`, both without a prefill graph) and the reference.

    Logits are compared teacher-forced on the held-out text's first window and on model.onnx's greedy replies
    to the gate's chat prompts (32 tokens each); perplexity and greedy agreement over all held-out `tokens` against
    `reference_score` (fp32's inside convert, else model.onnx's); KV consistency on the first
    `consistency_tokens`; decode speed of both alternately (recorded, not judged). kept is set by the caller."""
    limits = limits or KernelThresholds()
    sequences = _compared_sequences(standard, tokens, window, chats, eos_ids)
    diff, same, positions = _compare_logits(standard, twin, sequences)
    score = measure.perplexity(twin, tokens, window)
    choice = twin.choice
    result = KernelCheck(
        graph=KERNEL_MODEL, library=Path(choice.library or "?").name, isa=choice.isa, positions=positions,
        max_abs_logit_diff=round(diff, 5), argmax_match=round(same / positions, 5),
        kv_consistency=measure.kv_consistency(twin, tokens[:consistency_tokens]), reference=reference,
        perplexity_ratio=round(score.perplexity / reference_score.perplexity, 5),
        greedy_agreement=round(float((score.argmax == reference_score.argmax).mean()), 5),
        decode_ms_per_token=_decode_speeds(standard, twin, speed_prompt),
        passed=False, kept=False, failures=(), thresholds=limits)
    failures = kernel_failures(result, thresholds, precision)
    return replace(result, passed=not failures, failures=tuple(failures))


def check_restricted_head(result: KernelCheck, standard: DecoderSession, twin: DecoderSession, tokens: list[int],
                          window: int, chats: list[list[int]], eos_ids: set[int], speed_prompt: list[int],
                          thresholds: Thresholds) -> KernelCheck:
    """`result` (a --draft-head folder's twin checked with the whole lm_head, inside convert) extended to the twin
    rebuilt once the head was restricted: its logits against the restricted model.onnx's on the same kind of
    sequences, over the head's columns (the rest are -inf in both), and the decode speeds of the graphs that ship.

    Why two steps: perplexity, agreement and KV consistency need every token's logit, which a restricted head no
    longer has; the layers they judge are the same in both twins."""
    diff, same, positions = _compare_logits(standard, twin, _compared_sequences(standard, tokens, window, chats,
                                                                                eos_ids))
    matched = result.argmax_match * result.positions + same
    extended = replace(result, positions=result.positions + positions,
                       max_abs_logit_diff=round(max(result.max_abs_logit_diff, diff), 5),
                       argmax_match=round(matched / (result.positions + positions), 5),
                       decode_ms_per_token=_decode_speeds(standard, twin, speed_prompt))
    failures = kernel_failures(extended, thresholds, "int8")
    return replace(extended, passed=not failures, failures=tuple(failures))


def _compared_sequences(standard: DecoderSession, tokens: list[int], window: int, chats: list[list[int]],
                        eos_ids: set[int]) -> list[tuple[list[int], int]]:
    """(tokens, where the compared positions start): the held-out text's first window, then model.onnx's greedy
    reply (32 tokens) to each chat prompt."""
    sequences = [(list(tokens[:window + 1]), 1)]
    for ids in chats:
        reply = measure.greedy(standard, ids, 32, eos_ids).tokens
        sequences.append((ids + reply, len(ids)))
    return sequences


def _compare_logits(standard: DecoderSession, twin: DecoderSession,
                    sequences: list[tuple[list[int], int]]) -> tuple[float, int, int]:
    """(max |logit difference|, positions with the same argmax, positions), teacher-forced. Only entries finite in
    model.onnx's logits count (a --draft-head session fills the tokens outside its head with -inf); the difference is
    inf where the twin's are not finite at the same entries."""
    diff, same, positions = 0.0, 0, 0
    for seq, start in sequences:
        keep = len(seq) - start
        logits = []
        for session in (standard, twin):
            session.truncate(0)
            logits.append(session.forward(seq[:-1], keep=keep).copy())
            session.truncate(0)
        finite = np.isfinite(logits[0])
        if np.array_equal(finite, np.isfinite(logits[1])):
            diff = max(diff, float(np.abs(logits[0][finite] - logits[1][finite]).max()))
        else:  # a twin with NaN or inf where model.onnx has a number (or a head of other columns) fails the limit
            diff = float("inf")
        same += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        positions += keep
    return diff, same, positions


def _decode_speeds(standard: DecoderSession, twin: DecoderSession, prompt: list[int]) -> dict[str, float]:
    """Decode ms/token of both graphs, SPEED_ROUNDS probes each, alternating; medians."""
    speed: dict[str, list[float]] = {"model.onnx": [], KERNEL_MODEL: []}
    for _ in range(SPEED_ROUNDS):
        for name, session in (("model.onnx", standard), (KERNEL_MODEL, twin)):
            speed[name].append(measure.decode_probe(session, prompt).decode_ms_per_token)
    return {k: round(statistics.median(v), 3) for k, v in speed.items()}


def library_reason() -> str | None:
    """None when edgellm's kernel library can run the twin here (it can be checked), else why not."""
    choice = kernel_choice.choose(Path("model.onnx"), Path(KERNEL_MODEL), "CPUExecutionProvider", None)
    return None if choice.kernels else choice.reason


def twin_session(folder: Path, manifest: Manifest, capacity: int, threads: int | None,
                 head_tokens: np.ndarray | None = None,
                 name: str = KERNEL_MODEL) -> tuple[DecoderSession, DecoderSession]:
    """(model.onnx, model.kernels.onnx — or the twin called `name`) sessions of a folder, neither with a prefill
    graph."""
    common = dict(io=manifest.io, dims=manifest.dims, capacity=capacity, threads=threads, head_tokens=head_tokens,
                  graph=manifest.graph)
    standard = DecoderSession(Path(folder) / manifest.files["model"], kernels=False, **common)
    twin = DecoderSession(Path(folder) / manifest.files["model"], kernel_path=Path(folder) / name, kernels=True,
                          **common)
    return standard, twin


def applies(manifest: Manifest) -> str | None:
    """None when a folder can have a kernel twin, else why it cannot."""
    if manifest.precision != "int8" or manifest.graph.target != "cpu":
        return (f"the folder is {manifest.precision} for target {manifest.graph.target}; the kernel graph is added "
                "to int8 CPU folders (an int4 folder gets its own from `edgellm convert`: it needs the fp32 weights)")
    if manifest.graph.batch_invariant:
        return "the folder was converted --batch-invariant, which edgellm's kernels do not promise to keep"
    if manifest.graph.head_tokens:
        return ("the folder is a --draft-head model, whose twin is checked with the whole lm_head before it is "
                "restricted: re-run `edgellm convert --draft-head N`, which writes it")
    return None


def _check_folder(folder: Path, manifest: Manifest, name: str, threads: int | None) -> KernelCheck | None:
    """The twin `name` of a folder checked against its model.onnx with the gate's recorded sizes and limits;
    None when the kernel library cannot run here."""
    from tokenizers import Tokenizer

    from ..runtime.chat import ChatTemplate
    from . import validate

    if library_reason() is not None:
        return None
    report = manifest.validation
    sizes = report.gate.settings if report is not None and report.gate is not None else {}
    settings = validate.ValidationSettings(**{k: sizes[k] for k in ("heldout_tokens", "window", "consistency_tokens")
                                              if k in sizes})
    thresholds = report.gate.thresholds if report is not None and report.gate is not None else Thresholds()
    tokenizer = Tokenizer.from_file(str(resolve_file(folder, manifest, "tokenizer")))
    text = (Path(validate.__file__).resolve().parent.parent / "data" / "heldout_en.txt").read_text()
    tokens = tokenizer.encode(text, add_special_tokens=False).ids[:settings.heldout_tokens + 1]
    chats = []
    if "chat_template" in manifest.files:
        template = ChatTemplate(resolve_file(folder, manifest, "chat_template").read_text(),
                                manifest.special_tokens.get("template_vars", {}))
        chats = [tokenizer.encode(template.render([{"role": "user", "content": q}]), add_special_tokens=False).ids
                 for q in validate.CHAT_PROMPTS]
    capacity = max(settings.window, settings.consistency_tokens, 64) + 64
    standard, twin = twin_session(folder, manifest, capacity, threads, name=name)
    return check(standard, twin, tokens, settings.window, chats, set(manifest.generation.eos_token_ids),
                 settings.consistency_tokens, (chats or [tokens[:16]])[0], "int8",
                 measure.perplexity(standard, tokens, settings.window), thresholds)


def add_to_folder(folder: str | Path, gate: bool = True, threads: int | None = None, fuse: bool = True) -> Manifest:
    """Add (or rebuild) the kernel twin of an existing int8 CPU folder and record it in its manifest.

    The folder's files are verified first (the twin is derived from model.onnx). With the kernel library here,
    the twin is checked against model.onnx (logits, agreement, KV consistency); if it fails and `gate`, it is
    removed and ValidationError raised, leaving the folder as it was."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    why_not = applies(manifest)
    if why_not:
        raise InvalidParameterError(f"{folder} cannot have a kernel graph: {why_not}. Fix: convert an int8 CPU "
                                    "folder (`edgellm convert SOURCE -o DIR`, the default precision and target).")
    verify_checksums(folder, manifest)
    # Built and checked under a temporary name, renamed over any earlier twin only once it passed.
    candidate = f".{KERNEL_MODEL}.candidate-{os.getpid()}"
    try:
        graph = write(folder, manifest.files["model"], fuse, name=candidate)
        check_result = _check_folder(folder, manifest, candidate, threads)
        if check_result is not None and not check_result.passed and gate:
            raise ValidationError(f"the kernel graph failed its check: {'; '.join(check_result.failures)}. The folder "
                                  "is unchanged. Fix: rebuild the kernel library from this edgellm's sources "
                                  "(python -m edgellm.kernels build), or pass --no-gate to add the graph anyway.",
                                  check_result.to_dict())
        os.replace(folder / candidate, folder / KERNEL_MODEL)
    finally:
        (folder / candidate).unlink(missing_ok=True)
    graph = replace(graph, file=KERNEL_MODEL)
    report = manifest.validation
    if check_result is not None:
        check_result = replace(check_result, kept=True)
    else:
        logger.warning("kernel graph written but not checked: %s", library_reason())
    manifest.files[ROLE] = KERNEL_MODEL
    manifest.checksums[KERNEL_MODEL] = sha256_file(folder / KERNEL_MODEL)
    manifest.quantization["kernel_graph"] = {**graph.describe(), "checked": check_result is not None}
    if report is not None:  # an earlier twin's check no longer describes this one
        manifest.validation = replace(report, kernel_graph=check_result)
    manifest.write(folder)
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from ..errors import EdgeLLMError

    parser = argparse.ArgumentParser(prog="python -m edgellm.convert.kernel_graph",
                                     description="Add the kernel graph (model.kernels.onnx) to an int8 CPU model "
                                                 "folder; the weights are shared, not copied.")
    parser.add_argument("folder", help="a model folder written by `edgellm convert` (int8, target cpu)")
    parser.add_argument("--no-gate", action="store_true", help="keep the graph even if it fails its check")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the check")
    parser.add_argument("--no-fuse", action="store_true", help="MatMulQ8 nodes only: leave the layer tails unfolded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        manifest = add_to_folder(args.folder, gate=not args.no_gate, threads=args.threads, fuse=not args.no_fuse)
    except EdgeLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = manifest.quantization["kernel_graph"]
    checked = manifest.validation.kernel_graph if manifest.validation is not None else None
    line = (f"wrote {Path(args.folder) / KERNEL_MODEL}: {info['nodes']} MatMulNBits as {info['op']}, "
            f"{info['fused_layers']} layer tails as {info['fused_op']}, {info['bytes'] / 1e3:.0f} KB")
    if checked is None:
        line += "; not checked (no kernel library here)"
    else:
        line += (f"; logits vs model.onnx max diff {checked.max_abs_logit_diff:.3g} (limit "
                 f"{checked.thresholds.max_abs_logit_diff}), argmax match {checked.argmax_match:.3f}")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
