"""Distill a smaller Llama student from a teacher: structured pruning, then knowledge distillation.

    student = teacher with fewer layers (and optionally a narrower MLP), weights copied key by key
    loss    = T² · KL(teacher_T || student_T) + α · CE(student, data)      per next-token position

Data: offline dialogue corpora (corpus.py) in the teacher's chat template, plus sequence-level KD:
the teacher's own greedy replies to training prompts (what a speculative-decoding draft must predict).
Training runs through accelerate (CPU, one GPU, or `accelerate launch` for several), with a cosine
LR schedule, gradient clipping, fixed seeds, periodic checkpoints and resume. The result is a plain
Hugging Face folder that `edgellm convert` exports, quantizes and validates like any other model.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError, ModelFormatError, OutputExistsError
from . import corpus
from .output import check_writable
from .prune import LAYER_METHODS, PrunePlan, init_student, make_plan

logger = logging.getLogger(__name__)

PLAN_FILE = "distill_plan.json"
REPLIES_FILE = "teacher_replies.jsonl"
EVAL_REPLIES_FILE = "teacher_replies_heldout.jsonl"
REPORT_FILE = "distill_report.json"
CHECKPOINT_DIR = "checkpoint"
# Settings that may change between a run and its --resume; anything else must match.
_RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoint")


@dataclass(frozen=True)
class DistillConfig:
    keep_layers: int | tuple[int, ...] | None = 10  # a count (chosen by layer_method), layer ids, or None: all
    layer_method: str = "loss"                   # uniform | block_influence | loss
    intermediate_size: int | None = None         # narrower MLP by neuron importance; None keeps the teacher's
    steps: int = 200
    batch_size: int = 4
    block_size: int = 256
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0
    alpha_ce: float = 0.1
    train_embeddings: bool = False               # tied embeddings/head stay the teacher's: less compute, no drift
    seqkd_prompts: int = 256                     # teacher replies to this many training prompts (0: none)
    seqkd_max_new_tokens: int = 48
    seqkd_fraction: float = 0.5                  # share of training blocks drawn from the teacher replies
    eval_reply_prompts: int = 32                 # held-out prompts whose teacher replies measure draft agreement
    sources: tuple[str, ...] = corpus.SOURCES
    calib_tokens: int = 2048                     # for layer / neuron importance
    eval_tokens: int = 8192                      # held-out tokens for perplexity and agreement
    checkpoint_every: int = 50
    keep_checkpoint: bool = False
    mixed_precision: str | None = None           # None: bf16 on CUDA, fp32 on CPU
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if self.layer_method not in LAYER_METHODS:
            problems.append(f"layer_method {self.layer_method!r} is not one of {', '.join(LAYER_METHODS)}")
        for name in ("steps", "batch_size", "block_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            problems.append(f"lr and temperature must be > 0, got {self.lr}, {self.temperature}")
        if not 0.0 <= self.seqkd_fraction < 1.0:
            problems.append(f"seqkd_fraction must be in [0, 1), got {self.seqkd_fraction}")
        if self.alpha_ce < 0:
            problems.append(f"alpha_ce must be >= 0, got {self.alpha_ce}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            problems.append(f"mixed_precision {self.mixed_precision!r} is not one of no, bf16, fp16")
        if problems:
            raise InvalidParameterError("invalid distillation settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        data = asdict(self)
        if isinstance(self.keep_layers, tuple):
            data["keep_layers"] = list(self.keep_layers)
        data["sources"] = list(self.sources)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DistillConfig":
        data = {k: data[k] for k in (f.name for f in fields(cls)) if k in data}
        if isinstance(data.get("keep_layers"), list):
            data["keep_layers"] = tuple(data["keep_layers"])
        if "sources" in data:
            data["sources"] = tuple(data["sources"])
        return cls(**data)


@dataclass(frozen=True)
class HeldoutScore:
    """One model on the held-out blocks; kl/agreement are against the teacher (0 / 1 for the teacher)."""

    tokens: int
    cross_entropy: float
    perplexity: float
    kl: float
    agreement: float  # fraction of positions where student argmax == teacher argmax


@dataclass
class DistillReport:
    teacher_layers: int
    plan: dict
    teacher_params: int
    student_params: int
    steps: int
    tokens_seen: int
    wall_s: float                 # training loop only (summed over resumed runs)
    prep_s: float                 # this run: corpus, teacher replies, pruning plan, first evaluation
    device: str
    threads: int
    hardware: str
    teacher: HeldoutScore | None = None
    student_init: HeldoutScore | None = None
    student: HeldoutScore | None = None
    # On the teacher's own greedy replies to held-out prompts: agreement ~ a draft's per-token acceptance.
    student_init_on_replies: HeldoutScore | None = None
    student_on_replies: HeldoutScore | None = None
    teacher_replies: int = 0
    train_blocks: int = 0
    final_loss: float = float("nan")
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- data


def format_dialogue(tokenizer, dialogue: corpus.Dialogue) -> list[int]:
    """Token ids of a dialogue in the teacher's chat template; a lone user turn ends with the assistant cue."""
    lone = len(dialogue.turns) == 1
    text = tokenizer.apply_chat_template(dialogue.messages(), tokenize=False, add_generation_prompt=lone)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack(docs: list[list[int]], block_size: int, separator: int | None) -> torch.Tensor:
    """Concatenate documents (with a separator) and cut into (N, block_size) blocks; the remainder is dropped."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        if separator is not None and (not ids or ids[-1] != separator):
            stream.append(separator)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


@torch.no_grad()
def teacher_replies(teacher: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 16, progress: bool = True) -> list[corpus.Dialogue]:
    """The teacher's greedy reply to each prompt (sequence-level KD data)."""
    from tqdm.auto import tqdm

    device = next(teacher.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="teacher replies", disable=not progress):
            chunk = prompts[start:start + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = teacher.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for prompt, ids in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
                reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
                if reply:
                    out.append(corpus.Dialogue(f"teacher/{prompt}", "teacher", (prompt, reply)))
    finally:
        tokenizer.padding_side = side
    return out


# ----------------------------------------------------------------------------- loss and evaluation


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
            temperature: float, alpha_ce: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kd, ce). logits (B, T, V), ids (B, T). KD on every position, CE on next tokens."""
    t = temperature
    s_log = F.log_softmax(student_logits.float() / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kd = (t_log.exp() * (t_log - s_log)).sum(-1).mean() * (t * t)
    logits = student_logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return kd + alpha_ce * ce, kd, ce


@torch.no_grad()
def heldout_scores(teacher: nn.Module, students: list[nn.Module], blocks: torch.Tensor,
                   batch_size: int = 4) -> list[HeldoutScore]:
    """Score the teacher and each student on the held-out blocks (N, T): [teacher, *students]."""
    device = next(teacher.parameters()).device
    n_models = 1 + len(students)
    ce, kl, agree = np.zeros(n_models), np.zeros(n_models), np.zeros(n_models)
    count = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size].to(device)
        t_logits = teacher(ids, use_cache=False).logits.float()
        t_log = F.log_softmax(t_logits, dim=-1)
        t_top = t_log.argmax(-1)
        targets = ids[:, 1:].reshape(-1)
        for m, model in enumerate([None, *students]):
            log = t_log if model is None else F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
            ce[m] += F.nll_loss(log[:, :-1].reshape(-1, log.shape[-1]), targets, reduction="sum").item()
            kl[m] += (t_log.exp() * (t_log - log)).sum(-1).sum().item()
            agree[m] += (log.argmax(-1) == t_top).sum().item()
        count += ids.numel()
    next_count = count - len(blocks) if count else 0
    return [HeldoutScore(tokens=count, cross_entropy=float(ce[m] / next_count),
                         perplexity=math.exp(ce[m] / next_count), kl=float(kl[m] / count),
                         agreement=float(agree[m] / count)) for m in range(n_models)]


# ----------------------------------------------------------------------------- the run


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class _Mixture(torch.utils.data.Dataset):
    """Training blocks in a fixed, seeded order: each item comes from part k with probability weights[k];
    within a part, epoch e is a permutation seeded by (seed, k, e)."""

    def __init__(self, parts: list[torch.Tensor], weights: list[float], length: int, seed: int) -> None:
        self.parts = parts
        g = torch.Generator().manual_seed(seed)
        which = torch.multinomial(torch.tensor(weights, dtype=torch.float), length, replacement=True, generator=g)
        orders = []
        for k, part in enumerate(parts):
            needed = int((which == k).sum())
            epochs = -(-needed // len(part)) if needed else 0
            perms = [torch.randperm(len(part), generator=torch.Generator().manual_seed(seed * 1000 + k * 100 + e))
                     for e in range(epochs)]
            orders.append(iter(torch.cat(perms).tolist() if perms else []))
        self.items = [(k, next(orders[k])) for k in which.tolist()]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        k, row = self.items[i]
        return self.parts[k][row]


@dataclass
class _Data:
    corpus_blocks: torch.Tensor     # (N, T) dialogue corpus
    reply_blocks: torch.Tensor      # (M, T) teacher replies to training prompts (M may be 0)
    heldout: torch.Tensor           # (H, T) held-out dialogues
    heldout_replies: torch.Tensor   # (R, T) teacher replies to held-out prompts (R may be 0)
    plan: PrunePlan
    n_replies: int


def _cached_replies(path: Path, teacher, tokenizer, prompts: list[str], max_new_tokens: int,
                    progress: bool) -> list[corpus.Dialogue]:
    if path.is_file():
        return [corpus.Dialogue(d["key"], d["source"], tuple(d["turns"]))
                for d in map(json.loads, path.read_text().splitlines())]
    replies = teacher_replies(teacher, tokenizer, prompts, max_new_tokens, progress=progress) if prompts else []
    path.write_text("".join(json.dumps(asdict(d)) + "\n" for d in replies))
    return replies


def _check_resume(out_dir: Path, config: DistillConfig) -> dict:
    meta_path = out_dir / CHECKPOINT_DIR / "meta.json"
    if not meta_path.is_file():
        raise InvalidParameterError(f"--resume: no checkpoint at {meta_path}. Fix: run without --resume.")
    meta = json.loads(meta_path.read_text())
    saved = DistillConfig.from_dict(meta["config"]).to_dict()
    now = config.to_dict()
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}"
            for k in now if k not in _RESUMABLE and saved[k] != now[k]]
    if diff:
        raise InvalidParameterError("--resume with different settings: " + "; ".join(diff)
                                    + ". Fix: use the checkpoint's settings, or start a new output folder.")
    if meta["step"] > config.steps:
        raise InvalidParameterError(f"--resume: the checkpoint is at step {meta['step']}, beyond steps={config.steps}.")
    return meta


def _prepare_data(teacher, tokenizer, config: DistillConfig, out_dir: Path, device: torch.device,
                  progress: bool, source: nn.Module) -> _Data:
    """Blocks, the pruning plan and the teacher replies; plan and replies are cached in out_dir for --resume."""
    split = corpus.load_split(config.sources)
    replies = _cached_replies(out_dir / REPLIES_FILE, teacher, tokenizer,
                              corpus.prompts(split.train, config.seqkd_prompts) if config.seqkd_prompts else [],
                              config.seqkd_max_new_tokens, progress)
    eval_replies = _cached_replies(out_dir / EVAL_REPLIES_FILE, teacher, tokenizer,
                                   corpus.prompts(split.heldout, config.eval_reply_prompts)
                                   if config.eval_reply_prompts else [], config.seqkd_max_new_tokens, progress)
    sep, size = tokenizer.eos_token_id, config.block_size
    docs = list(split.train)
    random.Random(config.seed).shuffle(docs)
    corpus_blocks = pack([format_dialogue(tokenizer, d) for d in docs], size, sep)
    reply_blocks = pack([format_dialogue(tokenizer, d) for d in replies], size, sep)
    heldout_docs = [d for d in split.heldout if len(d.turns) >= 2]  # dialogues with replies: real text
    heldout = pack([format_dialogue(tokenizer, d) for d in heldout_docs], size, sep)
    heldout = heldout[: max(1, config.eval_tokens // size)]
    heldout_replies = pack([format_dialogue(tokenizer, d) for d in eval_replies], size, sep)
    if len(corpus_blocks) == 0 or len(heldout) == 0:
        raise InvalidParameterError(f"the corpus gives {len(corpus_blocks)} training and {len(heldout)} held-out "
                                    f"blocks of {size} tokens. Fix: add sources or lower block_size.")

    plan_path = out_dir / PLAN_FILE
    if plan_path.is_file():
        plan = PrunePlan.from_dict(json.loads(plan_path.read_text()))
    else:
        calib = corpus_blocks[: max(1, config.calib_tokens // size)].to(device)
        started = time.perf_counter()
        plan = make_plan(source, list(calib.split(2)), config.keep_layers, config.layer_method,
                         config.intermediate_size)
        logger.info("pruning plan (%s, %.0fs): layers %s", config.layer_method, time.perf_counter() - started,
                    list(plan.layers))
        plan_path.write_text(json.dumps(plan.to_dict()))
    return _Data(corpus_blocks, reply_blocks, heldout, heldout_replies, plan, len(replies))


def distill(teacher: nn.Module, tokenizer, config: DistillConfig, out_dir: str | Path, resume: bool = False,
            device: str = "auto", force: bool = False, progress: bool = True,
            init_from: nn.Module | None = None) -> DistillReport:
    """Prune the teacher into a student, distill it, save it as a Hugging Face folder in out_dir.

    teacher: a transformers Llama causal LM (float32); tokenizer: its fast tokenizer with a chat template.
    init_from: prune this model instead of the teacher (an earlier student: prune → distill → prune again,
    the iterative recipe of Minitron); the teacher still provides every target.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config.validate()
    run_started = time.perf_counter()
    out_dir = Path(out_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("--device cuda, but torch sees no CUDA GPU. Fix: --device cpu, or install a "
                                    "CUDA build of torch.")
    meta = _check_resume(out_dir, config) if resume else None
    # Teacher replies copied from an earlier run of the same teacher are a cache, not a previous result.
    seeded = (REPLIES_FILE, EVAL_REPLIES_FILE)
    if not resume and out_dir.exists() and any(p.name not in seeded for p in out_dir.iterdir()) and not force:
        raise OutputExistsError(f"{out_dir} exists and is not empty. Fix: pass --resume to continue the run "
                                "there, --force to start over, or another output folder.")
    precision = config.mixed_precision or ("bf16" if device == "cuda" else "no")
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision,
                              gradient_accumulation_steps=config.grad_accum)
    if accelerator.is_main_process:  # under `accelerate launch`, only rank 0 touches the folder
        if not resume and force and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    _seed_everything(config.seed)
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)

    with accelerator.main_process_first():  # rank 0 writes the plan and replies, the others read them
        source = teacher if init_from is None else init_from.to(accelerator.device).eval().requires_grad_(False)
        data = _prepare_data(teacher, tokenizer, config, out_dir, accelerator.device,
                             progress and accelerator.is_main_process, source)
    plan = data.plan

    _seed_everything(config.seed)
    student = init_student(source, plan)
    if not config.train_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    report = DistillReport(
        teacher_layers=teacher.config.num_hidden_layers, plan=plan.to_dict(), teacher_params=_count(teacher),
        student_params=_count(student), steps=config.steps, tokens_seen=0, wall_s=0.0, prep_s=0.0, device=device,
        threads=torch.get_num_threads(), hardware=_hardware(accelerator.device), teacher_replies=data.n_replies,
        train_blocks=len(data.corpus_blocks) + len(data.reply_blocks), config=config.to_dict())
    if meta is None:
        with accelerator.autocast():
            report.teacher, report.student_init = heldout_scores(teacher, [student.to(accelerator.device)],
                                                                 data.heldout)
            if len(data.heldout_replies):
                report.student_init_on_replies = heldout_scores(teacher, [student], data.heldout_replies)[1]
        logger.info("held-out before training: teacher ppl %.2f, pruned student ppl %.2f, agreement %.3f",
                    report.teacher.perplexity, report.student_init.perplexity, report.student_init.agreement)
    else:
        report.teacher = HeldoutScore(**meta["teacher"])
        report.student_init = HeldoutScore(**meta["student_init"])
        if meta.get("student_init_on_replies"):
            report.student_init_on_replies = HeldoutScore(**meta["student_init_on_replies"])

    world = accelerator.num_processes
    per_step = config.batch_size * config.grad_accum * world
    parts, weights = [data.corpus_blocks], [1.0]
    if len(data.reply_blocks) and config.seqkd_fraction > 0:
        parts, weights = parts + [data.reply_blocks], [1.0 - config.seqkd_fraction, config.seqkd_fraction]
    loader = torch.utils.data.DataLoader(_Mixture(parts, weights, config.steps * per_step, config.seed),
                                         batch_size=config.batch_size, shuffle=False)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    # Stepped by hand once per optimizer step: a prepared scheduler steps once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    accelerator.register_for_checkpointing(scheduler)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)

    report.prep_s = round(time.perf_counter() - run_started, 1)
    step, tokens, elapsed = 0, 0, 0.0
    if meta is not None:
        accelerator.load_state(str(out_dir / CHECKPOINT_DIR))
        step, tokens, elapsed = meta["step"], meta["tokens_seen"], meta["wall_s"]
        report.loss_history = [tuple(x) for x in meta["loss_history"]]
        loader = accelerator.skip_first_batches(loader, step * config.grad_accum)
        logger.info("resumed at step %d (%d tokens seen)", step, tokens)

    def save_checkpoint() -> None:
        accelerator.save_state(str(out_dir / CHECKPOINT_DIR))
        if accelerator.is_main_process:
            meta_now = {"step": step, "tokens_seen": tokens, "wall_s": elapsed, "config": config.to_dict(),
                        "loss_history": report.loss_history, "teacher": asdict(report.teacher),
                        "student_init": asdict(report.student_init),
                        "student_init_on_replies": (asdict(report.student_init_on_replies)
                                                    if report.student_init_on_replies else None)}
            (out_dir / CHECKPOINT_DIR / "meta.json").write_text(json.dumps(meta_now))

    student.train()
    bar = tqdm(total=config.steps, initial=step, desc="distill", disable=not (progress and accelerator.is_main_process))
    started, tokens_at_start, micro, window = time.perf_counter(), tokens, 0, []
    for ids in loader:
        if step >= config.steps:
            break
        with accelerator.accumulate(student):
            with torch.no_grad(), accelerator.autocast():
                t_logits = teacher(ids, use_cache=False).logits
            with accelerator.autocast():
                s_logits = student(ids, use_cache=False).logits
            loss, kd, ce = kd_loss(s_logits, t_logits, ids, config.temperature, config.alpha_ce)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        tokens += ids.numel() * world
        window.append(loss.item())
        micro += 1
        if micro % config.grad_accum:
            continue
        step += 1
        mean_loss = sum(window) / len(window)
        window.clear()
        report.loss_history.append((step, round(mean_loss, 4)))
        now = time.perf_counter()
        bar.set_postfix(loss=f"{mean_loss:.3f}", kd=f"{kd.item():.3f}", ce=f"{ce.item():.2f}",
                        tok_s=f"{(tokens - tokens_at_start) / (now - started):.0f}")
        bar.update(1)
        if step % config.checkpoint_every == 0 and step < config.steps:
            elapsed_now = elapsed + (now - started)
            elapsed, started, tokens_at_start = elapsed_now, now, tokens
            save_checkpoint()
    bar.close()
    elapsed += time.perf_counter() - started
    if config.keep_checkpoint:
        save_checkpoint()  # lets a later --resume with more steps continue from here

    student = accelerator.unwrap_model(student).eval()
    with accelerator.autocast():
        report.student = heldout_scores(teacher, [student], data.heldout)[1]
        if len(data.heldout_replies):
            report.student_on_replies = heldout_scores(teacher, [student], data.heldout_replies)[1]
    report.tokens_seen, report.wall_s, report.steps = tokens, round(elapsed, 1), step
    report.final_loss = report.loss_history[-1][1] if report.loss_history else float("nan")
    if accelerator.is_main_process:
        save_student(student, teacher, tokenizer, out_dir)
        (out_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        if not config.keep_checkpoint:
            shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    logger.info("distilled %d tokens in %.0fs: held-out ppl teacher %.2f, student %.2f (pruned %.2f)",
                tokens, elapsed, report.teacher.perplexity, report.student.perplexity, report.student_init.perplexity)
    return report


def save_student(student: nn.Module, teacher: nn.Module, tokenizer, out_dir: Path) -> None:
    """A Hugging Face folder: config + safetensors + the teacher's tokenizer, chat template and generation config."""
    import copy

    student = student.to("cpu").float()
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_teacher(source: str):
    """(teacher model, fast tokenizer) for a known name, GGUF file or HF folder, via the converter's sources."""
    from transformers import AutoTokenizer

    from .sources import load_source, resolve_source

    resolved = resolve_source(source)
    loaded = load_source(resolved)
    if resolved.kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path.parent), gguf_file=resolved.path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    # A GGUF-loaded teacher carries a quantization config; the student gets a clean one (prune.student_config).
    teacher = loaded.model
    return teacher, tokenizer


def run_distill(teacher_source: str, out_dir: str | Path, layers: int | tuple[int, ...] | None = 10,
                layer_method: str = "loss", intermediate_size: int | None = None, steps: int = 200,
                batch_size: int = 4, block_size: int = 256, lr: float = 2e-4, seqkd_prompts: int = 256,
                resume: bool = False, force: bool = False, device: str = "auto", threads: int | None = None,
                seed: int = 0, progress: bool = True, init_from: str | None = None) -> DistillReport:
    """CLI entry: `edgellm distill TEACHER -o STUDENT_DIR [--layers N|i,j,..] [--steps N] [--resume] [--device D]`."""
    if threads is not None:
        torch.set_num_threads(threads)
    config = DistillConfig(keep_layers=layers, layer_method=layer_method, intermediate_size=intermediate_size,
                           steps=steps, batch_size=batch_size, block_size=block_size, lr=lr,
                           seqkd_prompts=seqkd_prompts, seed=seed)
    config.validate()  # fail before the slow teacher load
    check_writable(Path(out_dir).expanduser().absolute())
    if resume:
        _check_resume(Path(out_dir), config)
    teacher, tokenizer = load_teacher(teacher_source)
    source = None
    if init_from is not None:
        from transformers import AutoModelForCausalLM

        try:
            source = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32).eval()
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"--init-from {init_from} cannot be loaded as a Hugging Face model ({exc}). "
                                   "Fix: pass the folder an earlier `edgellm distill` wrote.") from exc
        mismatch = (source.config.vocab_size, source.config.hidden_size) != (teacher.config.vocab_size,
                                                                          teacher.config.hidden_size)
        if mismatch:
            raise InvalidParameterError(
                f"--init-from {init_from}: vocab/hidden size {source.config.vocab_size}/{source.config.hidden_size} "
                f"differ from the teacher's {teacher.config.vocab_size}/{teacher.config.hidden_size}. "
                "Fix: start from a student distilled from this teacher.")
    return distill(teacher, tokenizer, config, out_dir, resume=resume, device=device, force=force, progress=progress,
                   init_from=source)
