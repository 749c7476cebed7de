"""`finetune train HOME` (or `DATA --out ADAPTER`): a LoRA adapter that talks like the persona.

    prepared JSONL ─► prompt renderer (the bot's own) ─► token ids, loss only on the reply + EOS
        ─► packed rows (packing.py) ─► Hugging Face Trainer + peft LoRA ─► adapter + bunshin.json

The Trainer brings the progress bar, periodic eval, checkpoints, resume and multi-GPU
(`accelerate launch -m finetune train ...`). bunshin adds what makes chat data train well:
packing (chat samples are ~66 tokens; padded batches of them waste the GPU), the exact
tokenizer, the manifest, and an honest before/after loss on the held-out conversations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import packed_attention
from .atomic_output import atomic_directory
from .dataset_files import DatasetError, read_samples
from .encoding import encode_all
from .manifest import DEFAULT_GENERATION, AdapterManifest, bunshin_version
from .model_loading import (
    DEFAULT_BASE,
    DTYPE_CHOICES,
    QUANTIZE_CHOICES,
    LoadedModel,
    ModelLoadError,
    base_shape,
    load_base_model,
    lora_target_modules,
    pick_device,
)
from .nonfinite import GRADIENT, LOSS, NonFiniteError, NonFiniteWatch, describe, likely_causes, nonfinite_tensors
from .packing import USEFUL_TOKENS, FlatCollator, PackedCollator, PackedRow, pack_samples
from .person_memory import (
    MEMORY_FILE,
    PersonMemory,
    PersonMemoryError,
    copy_memory,
    drawn_on_notes,
    said_times,
    sample_notes,
)
from .persona_home import make_output_parent, refuse_source_package
from .private_files import create_private_file, make_private_dirs, make_tree_private
from .prompt import TEMPLATES
from .reply_loss import token_weighted_loss

RUN_FILE = "bunshin-run.json"  # in the checkpoint folder: what run the checkpoints belong to


class TrainError(Exception):
    pass


# A large export needs fewer passes: 16,000 samples make ~900 optimizer steps an epoch at 4,096 tokens a step, more
# updates than three epochs of a 3,000-sample export, and three epochs of them took 10.5 minutes on an H100, the
# whole of a user's wait (issue 23: an export of 100,000 messages to a judged clone in under 5 minutes).
DEFAULT_EPOCHS = 3.0
SAMPLE_PASSES = 9000


def default_epochs(train_samples: int) -> float:
    """Epochs when --epochs is not given: DEFAULT_EPOCHS up to SAMPLE_PASSES / DEFAULT_EPOCHS samples, then fewer,
    so that about SAMPLE_PASSES sample passes are trained, and never less than one whole epoch."""
    if train_samples * DEFAULT_EPOCHS <= SAMPLE_PASSES:
        return DEFAULT_EPOCHS
    return round(max(1.0, SAMPLE_PASSES / train_samples), 2)


# Each eval pass reads all of eval.jsonl: on an H100 a 609-sample eval took 4.8 s, and evaluating every 100 of a
# large export's 972 steps spent 48 s of its 235 s. A few points of the curve say whether it is learning.
EVALS_PER_RUN = 4
MIN_EVAL_EVERY = 100


def default_eval_every(total_steps: int) -> int:
    """Steps between evals when --eval-every is not given: about EVALS_PER_RUN in a run, never more often than every
    MIN_EVAL_EVERY steps (a short run is evaluated at its end, by `evaluate`, as well)."""
    return max(MIN_EVAL_EVERY, math.ceil(total_steps / EVALS_PER_RUN))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, metavar="HOME|DATA",
                   help="a persona home (personas/NAME: trains on its dataset/, writes its adapter/), or a folder "
                   "written by `finetune prepare` (train.jsonl, eval.jsonl) with --out")
    p.add_argument("--out", type=Path, default=None, metavar="ADAPTER",
                   help="adapter folder to write (default: the persona home's adapter/)")
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"base model: hub id or local folder (default: --config's [model] base, else {DEFAULT_BASE})")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub base model")
    p.add_argument("--config", type=Path, default=None, help="take [model] base from this TOML file")
    p.add_argument("--template", choices=TEMPLATES, default="transcript", help="prompt template (default: transcript)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none", help="load the base in 8 or 4 bits (CUDA, bitsandbytes)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   metavar="A,B", help="module names to adapt (default: detected per architecture)")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"passes over the training samples (default: {DEFAULT_EPOCHS:g}, fewer for a large dataset: about "
                        f"{SAMPLE_PASSES:,} sample passes in all, at least one epoch)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine schedule after warm-up)")
    p.add_argument("--warmup", type=float, default=0.03, help="share of steps spent warming up (default 0.03)")
    p.add_argument("--max-length", type=int, default=512, help="longest sample in tokens; older context turns are dropped to fit")
    p.add_argument("--pack-length", type=int, default=2048, help="tokens per packed row (capped at the model's context)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per optimizer step (default: 4096 where the GPU has the memory, else 2048, 1024)")
    p.add_argument("--attention", choices=["auto", "varlen", "sdpa"], default="auto",
                   help="varlen: PyTorch's flash kernel over each sample (CUDA); sdpa: masked SDPA over packed rows "
                   "(auto: varlen where available)")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="trade compute for memory (auto: on when quantized)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: fewer kernel launches per step, after minutes of compiling (GPU)")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"evaluate on eval.jsonl every N steps (default: about {EVALS_PER_RUN} times a run, at most "
                   f"every {MIN_EVAL_EVERY} steps; 0: only at the end)")
    p.add_argument("--save-every", type=int, default=100, help="write a checkpoint every N steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--memory-notes", type=int, default=3, metavar="K",
                   help="the persona's memory: notes recalled into each training prompt from before its conversation, "
                   "as the bot recalls them when it replies (default 3; 0: train without memory)")
    p.add_argument("--memory-from-reply", action="store_true",
                   help="recall each training prompt's notes with the reply to learn as well as the conversation "
                   "(still only from before it): the notes then hold what the reply drew on, which teaches the LoRA to "
                   "answer from its memory")
    p.add_argument("--memory-drill", type=int, default=1, metavar="N",
                   help="show each training reply that draws on a note of its prompt N times an epoch (default 1: "
                   "once, like any other). In real chats few replies state a fact the memory holds, so the LoRA "
                   "rarely sees one answered from its notes")
    p.add_argument("--style-eval-samples", type=int, default=64,
                   help="held-out replies the short eval at the end generates and scores (default 64; "
                   "`finetune eval` makes the full report)")
    p.add_argument("--no-style-eval", action="store_true", help="skip the short eval at the end")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of an interrupted run")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep ADAPTER.checkpoints/ (optimizer state included) after a finished run; a failed or "
                   "interrupted run always keeps them for --resume")
    p.add_argument("--force", action="store_true", help="replace an existing adapter folder and its checkpoints")
    p.add_argument("--no-progress", action="store_true")


# Tokens per optimizer step: 4096 is where a 3.6B model on an H100 stops gaining speed (about 60
# chat samples a step, a batch LoRA learns well with); smaller only when memory demands it.
PREFERRED_BATCH_TOKENS = (4096, 2048, 1024, 512)


def auto_batch_tokens(model, device: str, gradient_checkpointing: bool) -> int:
    """The largest preferred step size whose activations fit in 85% of the GPU's memory.

    Per token and layer a LoRA step keeps about 36 bytes per hidden unit for backward (measured on
    rinna-3.6b's shape, bench/results/train_h100.json), far less with checkpointing, plus the logits.
    """
    if not device.startswith("cuda"):
        return 2048
    import torch

    config = model.config
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_layer = 36 * config.hidden_size * (0.15 if gradient_checkpointing else 1.0)
    per_token = per_layer * config.num_hidden_layers + 10 * config.vocab_size
    for tokens in PREFERRED_BATCH_TOKENS:
        if weights + tokens * per_token <= 0.85 * total:
            return tokens
    return PREFERRED_BATCH_TOKENS[-1]


def latest_whole_checkpoint(ckpt: Path) -> Path | None:
    """The newest checkpoint-N saved whole. The Trainer writes into checkpoint-N in place and writes
    trainer_state.json last, so a folder without a readable one is a save cut short by a kill: the
    Trainer would pick it as the latest and fail on it. Such folders are removed."""
    numbered = [(int(p.name.split("-", 1)[1]), p) for p in ckpt.glob("checkpoint-*")
                if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    for _, folder in sorted(numbered, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            return folder
        except (OSError, ValueError):
            shutil.rmtree(folder)
    return None


def checkpoint_dir(out: Path) -> Path:
    # Next to the adapter (in its persona home), not inside it: the adapter folder appears only when complete.
    return out.with_name(out.name + ".checkpoints")


def train_defaults_from_config(path: Path) -> dict:
    """argparse defaults from a config file: its [model] base, the model the bot would serve. The whole file is
    read and validated by finetune/config.py, whose ConfigError names every problem (pydantic is imported only here)."""
    from .config import load_config

    base = load_config(path).model.base
    return {"base": base} if base else {}  # "" means "the adapter's base" to the bot; there is no adapter yet


def _run_identity(args, base: str, dataset_fingerprint: str) -> dict:
    keys = ("template", "quantize", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lr", "max_length",
            "pack_length", "batch_tokens", "seed", "memory_notes", "memory_from_reply", "memory_drill")
    return {"base": base, "dataset": dataset_fingerprint, **{k: getattr(args, k) for k in keys}}


def pin_mixed_precision(precision: str, dtype: str) -> None:
    """Train in the precision --dtype chose, whatever `accelerate launch --mixed_precision` or an
    `accelerate config` put in ACCELERATE_MIXED_PRECISION; say so when they differ.

    Why (issue 12; bench/results/train_precision_h200.json, H200, transformers 5.17, accelerate 1.15,
    peft 0.21): the launcher's only lever is that variable. TrainingArguments starts from it and then
    replaces it with "bf16" / "fp16" whenever its bf16 / fp16 flag is set, which this module sets from
    the loaded dtype on CUDA. So with bf16 weights (every bf16 GPU's default) `--mixed_precision no`
    changed nothing: bf16 autocast, float32 LoRA weights, gradients and AdamW state, no GradScaler,
    exactly as plain `python -m finetune train` (loss 7.90 after 40 steps either way). The reported
    NaN did not reproduce there; the watch in nonfinite.py now stops such a run, whatever its cause.
    Where neither flag is set (float32 weights: --dtype fp32, the CPU) the variable did decide:
    `--mixed_precision fp16` silently ran fp16 autocast with a GradScaler over weights the manifest
    calls float32. Setting the variable here makes every launcher train as plain python does.
    """
    requested = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if requested is not None and requested.lower() != precision:
        how = {"bf16": "under bf16 autocast", "fp16": "under fp16 autocast with a GradScaler"}.get(precision, "with no autocast")
        if int(os.environ.get("LOCAL_RANK", "0")) <= 0:
            print(f"warning: accelerate asks for mixed precision {requested!r} (ACCELERATE_MIXED_PRECISION, from `accelerate "
                  f"launch --mixed_precision` or `accelerate config`); this run trains its {dtype} weights {how}, "
                  "as `python -m finetune train` does: --dtype chooses the precision", file=sys.stderr)
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision


def run(args: argparse.Namespace) -> int:
    try:
        return _run_reporting(args)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, every process waits for the others (rank 0 writes the adapter last), then the process
    group is torn down before exit. A process that left on its own while another still worked sometimes died
    in the interpreter's exit ("terminate called without an active exception", SIGABRT) and failed a run that
    had finished: 3 of 10 CPU runs of tests/test_training.py's torchrun test."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _run_reporting(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    except NonFiniteError as exc:
        # Every process of a multi-GPU run stops with the same error (nonfinite.py): one says it.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except (TrainError, DatasetError, ModelLoadError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _train(args: argparse.Namespace) -> int:
    """One run, as its outline: each job is a function below, in the order they run. Under torchrun every
    process runs each of them up to the evaluation; rank 0 alone goes on to write the adapter."""
    started = time.time()
    phases = PhaseClock()  # where a run's wall time goes, in the manifest: the levers of a user's wait
    plan = phases.timed("plan", plan_run, args)
    setup = phases.timed("load", load_model, args, plan.base)
    data = phases.timed("pack", pack, args, plan, setup)
    model, targets = phases.timed("wrap", wrap_with_lora, args, setup)
    # LoRA's B matrix starts at zero: before the first step the model *is* the base model.
    base_eval_loss = phases.timed("base_eval_loss", token_weighted_loss, model, data.eval_rows,
                                  setup.loaded.tokenizer.pad_id, setup.rows_per_batch)
    trainer, result = phases.timed("fit", fit, args, plan, setup, data, model)
    scores = phases.timed("tuned_eval_loss", evaluate, trainer, model, setup, data, base_eval_loss)
    if not trainer.is_world_process_zero():
        return 0
    style_eval = phases.timed("style_eval", short_style_eval, args, plan, setup, model)
    manifest = build_manifest(args, plan, setup, data, model, targets, trainer, result, scores, style_eval, started)
    manifest.training["phase_seconds"] = phases.seconds
    write_adapter(args, plan, model, manifest)
    print_outcome(args, result, scores, style_eval)
    finish_checkpoints(args, plan)
    return 0


class PhaseClock:
    """Wall seconds of each named phase of a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def timed(self, name: str, job, *args):
        began = time.perf_counter()
        try:
            return job(*args)
        finally:
            self.seconds[name] = round(time.perf_counter() - began, 2)


@dataclass
class RunPlan:
    """What the run trains on and where it writes, checked before a model loads."""

    base: str
    checkpoints: Path  # next to the adapter folder (checkpoint_dir)
    resume_from: Path | None  # the checkpoint --resume continues from
    identity: dict  # the settings RUN_FILE records, so that --resume refuses checkpoints of other settings
    stats_path: Path  # the dataset's stats.json (there may be none)
    fingerprint: str  # the dataset's, from stats.json
    persona: str
    speakers: list[str]  # everyone in the training data, the persona included
    train_samples: list[dict]
    eval_samples: list[dict]
    memory: PersonMemory | None = None  # the dataset's memory, when training with it


def plan_run(args: argparse.Namespace) -> RunPlan:
    """The dataset read and checked (one persona), and the checkpoints of an earlier run dealt with: --resume
    continues them when they are of the same settings, --force removes them, else they stop the run."""
    base = args.base
    out: Path = args.out
    refuse_source_package(out)
    ckpt = checkpoint_dir(out)
    if out.exists() and not args.force:
        raise TrainError(f"{out} already exists (pass --force to replace it)")
    stats_path = args.data / "stats.json"
    dataset_stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    train_samples = read_samples(args.data / "train.jsonl")
    eval_samples = read_samples(args.data / "eval.jsonl") if (args.data / "eval.jsonl").exists() else []
    if not train_samples:
        raise TrainError(f"{args.data}/train.jsonl holds no samples")
    personas = {s["persona"] for s in train_samples}
    if len(personas) != 1:
        raise TrainError(f"{args.data}/train.jsonl mixes personas {sorted(personas)}: one adapter is one person")
    persona = personas.pop()
    fingerprint = dataset_stats.get("fingerprint", "")
    if args.epochs is None:
        args.epochs = default_epochs(len(train_samples))

    # As it reads back from RUN_FILE (lists, not tuples), so the two compare equal.
    identity = json.loads(json.dumps(_run_identity(args, base, fingerprint)))
    resume_from: Path | None = None
    if args.resume:
        if not (ckpt / RUN_FILE).is_file() or not any(ckpt.glob("checkpoint-*")):
            raise TrainError(f"--resume: no checkpoint in {ckpt} to continue from")
        earlier = json.loads((ckpt / RUN_FILE).read_text(encoding="utf-8"))
        if earlier != identity:
            changed = sorted(k for k in identity if earlier.get(k) != identity.get(k))
            raise TrainError(f"--resume: the checkpoints in {ckpt} are from a run with other settings ({', '.join(changed)})")
        resume_from = latest_whole_checkpoint(ckpt)
        if resume_from is None:
            raise TrainError(f"--resume: no checkpoint in {ckpt} was saved whole (the run was killed while saving its first)")
    elif ckpt.exists():
        if not args.force:
            raise TrainError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it or --force to start over")
        shutil.rmtree(ckpt)
    speakers = sorted({c["speaker"] for s in train_samples for c in s["context"]} | {persona})
    return RunPlan(base=base, checkpoints=ckpt, resume_from=resume_from, identity=identity, stats_path=stats_path,
                   fingerprint=fingerprint, persona=persona, speakers=speakers, train_samples=train_samples,
                   eval_samples=eval_samples, memory=_dataset_memory(args))


def _dataset_memory(args: argparse.Namespace) -> PersonMemory | None:
    """The dataset's memory when --memory-notes asks for it. A dataset from before the memory existed trains
    without it (said on stderr); one whose memory is damaged stops the run, naming the command that rebuilds it."""
    if args.memory_notes < 0:
        raise TrainError("--memory-notes must be >= 0")
    if args.memory_drill < 1:
        raise TrainError("--memory-drill must be >= 1 (1: each reply once)")
    if args.memory_notes == 0:
        return None
    if not (args.data / MEMORY_FILE).is_file():
        print(f"note: {args.data} has no {MEMORY_FILE} (prepared by an older bunshin): training without the persona's "
              "memory; re-run prepare to train with it", file=sys.stderr)
        return None
    try:
        return PersonMemory.load(args.data)
    except PersonMemoryError as exc:
        raise TrainError(str(exc)) from None


@dataclass
class ModelSetup:
    """The base model as loaded on this process's device, and the shape of a step that fits it."""

    loaded: LoadedModel
    varlen: bool  # packed rows attend per sample through packed_attention's kernel, else masked SDPA
    attn: str  # the attention implementation the model was loaded with
    gradient_checkpointing: bool
    pack_length: int  # tokens per packed row
    max_length: int  # tokens per sample, at most
    rows_per_batch: int  # rows per optimizer step on each process


def load_model(args: argparse.Namespace, base: str) -> ModelSetup:
    """The base model on this process's GPU (torchrun's LOCAL_RANK) or the one --device names, with the
    attention that keeps packed samples apart, and the step's size chosen for its memory."""
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    device = pick_device(args.device or (f"cuda:{local_rank}" if local_rank >= 0 else None))
    if args.attention == "varlen" and not packed_attention.available(device):
        raise TrainError(f"--attention varlen needs a CUDA GPU and PyTorch >= 2.9 (have {device})")
    varlen = args.attention == "varlen" or (args.attention == "auto" and packed_attention.available(device))
    attn = packed_attention.register() if varlen else "sdpa"
    loaded = load_base_model(base, revision=args.revision, quantize=args.quantize, device=device, dtype=args.dtype,
                             attn_implementation=attn)
    model = loaded.model
    gradient_checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and args.quantize != "none")
    batch_tokens = args.batch_tokens or auto_batch_tokens(model, loaded.device, gradient_checkpointing)
    context_limit = getattr(model.config, "max_position_embeddings", None) or args.pack_length
    # A row holds at most the model's context and one step's tokens; a sample at most one row.
    pack_length = min(args.pack_length, context_limit, batch_tokens)
    max_length = min(args.max_length, pack_length)
    rows_per_batch = max(1, batch_tokens // pack_length)
    return ModelSetup(loaded=loaded, varlen=varlen, attn=attn, gradient_checkpointing=gradient_checkpointing,
                      pack_length=pack_length, max_length=max_length, rows_per_batch=rows_per_batch)


@dataclass
class PackedData:
    """The samples as token ids in packed rows, and the counts the manifest keeps of them."""

    train_rows: list[PackedRow]
    eval_rows: list[PackedRow]
    train_samples: int  # encoded, i.e. short enough
    drilled: int  # of those, shown --memory-drill times an epoch
    eval_samples: int
    skipped_too_long: int
    useful_tokens: int  # per epoch: the train rows' tokens, padding aside


def pack(args: argparse.Namespace, plan: RunPlan, setup: ModelSetup) -> PackedData:
    """Each sample rendered with the bot's prompt and tokenized (loss on the reply alone), then packed into rows."""
    tokenizer = setup.loaded.tokenizer
    recall = memory_recall(plan.memory, args.memory_notes, with_reply=args.memory_from_reply)
    drilling = recall is not None and args.memory_drill > 1
    # With a drill, each sample's notes are recalled once: the drill's choice and the encoding read the same ones.
    train_recall = recalled_once(recall, plan.train_samples) if drilling else recall
    encoded_train, skipped_train = encode_all(tokenizer, plan.train_samples, args.template, setup.max_length,
                                              train_recall)
    train_samples, drilled = len(encoded_train), 0
    if drilling:
        again, _ = encode_all(tokenizer, drill_samples(plan.train_samples, plan.memory, train_recall), args.template,
                              setup.max_length, train_recall)
        encoded_train += again * (args.memory_drill - 1)
        drilled = len(again)
    encoded_eval, skipped_eval = encode_all(tokenizer, plan.eval_samples, args.template, setup.max_length, recall)
    if not encoded_train:
        raise TrainError(f"every training sample is longer than --max-length {setup.max_length} tokens")
    train_rows = pack_samples(encoded_train, setup.pack_length)
    eval_rows = pack_samples(encoded_eval, setup.pack_length)
    return PackedData(train_rows=train_rows, eval_rows=eval_rows, train_samples=train_samples, drilled=drilled,
                      eval_samples=len(encoded_eval), skipped_too_long=skipped_train + skipped_eval,
                      useful_tokens=sum(len(r.input_ids) for r in train_rows))


def recalled_once(recall: Callable[[dict], list], samples: list[dict]) -> Callable[[dict], list]:
    """`recall` of each of `samples`, done now, then looked up (by the sample object)."""
    shown = {id(s): recall(s) for s in samples}
    return lambda sample: shown[id(sample)]


def drill_samples(samples: list[dict], memory: PersonMemory, recall: Callable[[dict], list]) -> list[dict]:
    """The samples whose reply draws on a note their prompt carries (person_memory.drawn_on_notes)."""
    times = said_times(memory)
    return [s for s in samples if drawn_on_notes(s, recall(s), times)]


def memory_recall(memory: PersonMemory | None, k: int, *, with_reply: bool = False) -> Callable[[dict], list] | None:
    """A sample's notes (person_memory.sample_notes) or None without a memory."""
    if memory is None or k <= 0:
        return None
    return lambda sample: sample_notes(memory, sample, k, with_reply=with_reply)


def wrap_with_lora(args: argparse.Namespace, setup: ModelSetup):
    """The base model made ready to train (k-bit preparation, gradient checkpointing) and wrapped in LoRA
    adapters; returns the peft model and the modules adapted."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    set_seed(args.seed)  # before LoRA's A matrices are drawn
    model = setup.loaded.model
    model.config.use_cache = False  # no KV cache in training; a cache would also hide packed rows from the mask
    if args.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.gradient_checkpointing)
    elif setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = lora_target_modules(model, args.lora_targets)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lora), targets


def fit(args: argparse.Namespace, plan: RunPlan, setup: ModelSetup, data: PackedData, model):
    """The Trainer over the packed rows, from the checkpoint --resume found or from the start, in the precision
    the weights were loaded in; returns the trainer and its result. Stops at the first loss or gradient that is
    not finite (nonfinite.py), and refuses weights that are not finite at the end."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    loaded, tokenizer, ckpt = setup.loaded, setup.loaded.tokenizer, plan.checkpoints
    rows_per_batch, pack_length = setup.rows_per_batch, setup.pack_length
    steps_per_epoch = math.ceil(len(data.train_rows) / rows_per_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.epochs)
    eval_every = default_eval_every(total_steps) if args.eval_every is None else args.eval_every
    bf16 = loaded.dtype == torch.bfloat16 and loaded.device.startswith("cuda")
    fp16 = loaded.dtype == torch.float16 and loaded.device.startswith("cuda")
    make_output_parent(ckpt)
    make_private_dirs(ckpt)
    create_private_file(ckpt / RUN_FILE)
    (ckpt / RUN_FILE).write_text(json.dumps(plan.identity, indent=2), encoding="utf-8")
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION")
    dtype_name = str(loaded.dtype).removeprefix("torch.")
    pin_mixed_precision("fp16" if fp16 else "bf16" if bf16 else "no", dtype_name)
    causes = likely_causes(lr=args.lr, dtype=dtype_name, accelerate_precision=launched_with)
    training_args = TrainingArguments(
        output_dir=str(ckpt),
        per_device_train_batch_size=rows_per_batch,
        per_device_eval_batch_size=rows_per_batch,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(args.warmup * total_steps),
        weight_decay=0.0,
        logging_steps=max(1, min(10, total_steps // 20 or 1)),
        eval_strategy="steps" if eval_every > 0 and data.eval_rows else "no",
        eval_steps=eval_every or None,
        save_strategy="steps",
        save_steps=args.save_every,
        save_total_limit=2,
        seed=args.seed,
        data_seed=args.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=loaded.device == "cpu",
        report_to=[],
        disable_tqdm=args.no_progress or not sys.stderr.isatty(),
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_pin_memory=loaded.device.startswith("cuda"),
        gradient_checkpointing=False,  # set up by wrap_with_lora (peft needs it done before wrapping)
        average_tokens_across_devices=True,
        # Its NaN check reads the loss back every step, stalling the GPU queue; and it would hide a
        # diverged run behind averages. nonfinite.py's watch stops such a run instead, at no such cost.
        logging_nan_inf_filter=False,
        torch_compile=args.compile,
    )
    trainer = _packed_trainer_class(Trainer, TrainerCallback)(
        causes=causes,
        model=model,
        args=training_args,
        train_dataset=_RowDataset(data.train_rows),
        eval_dataset=_RowDataset(data.eval_rows) if data.eval_rows else None,
        data_collator=FlatCollator(tokenizer.pad_id, rows_per_batch * pack_length) if setup.varlen
        else PackedCollator(tokenizer.pad_id, pack_length),
    )
    if loaded.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    # The watch has seen every step; this is the last word, one read at the end: weights that are
    # not finite, however they got so, are never written as an adapter.
    bad = nonfinite_tensors({n: p for n, p in model.named_parameters() if p.requires_grad})
    if bad:
        raise NonFiniteError(f"after {result.global_step} steps the LoRA weights hold NaN or inf ({bad[0]}"
                             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); no adapter was written. "
                             f"Likely causes: {'; '.join(causes)}")
    return trainer, result


@dataclass
class Scores:
    """How the run went, measured on every process alike."""

    base_eval_loss: float | None  # per reply token on the held-out rows; None without any
    tuned_eval_loss: float | None
    peak_gpu_memory_gb: float | None  # None off CUDA
    rates: list[float]  # useful tokens per second of each process, rank 0 first, after the first steps
    rates_overall: list[float]  # the same over every step


def evaluate(trainer, model, setup: ModelSetup, data: PackedData, base_eval_loss: float | None) -> Scores:
    """The tuned model's held-out loss (a loss that is not finite stops the run before anything is written),
    the peak GPU memory, and every process's throughput. Every process calls it: the throughput is gathered
    from all of them, before all but rank 0 leave."""
    import torch

    tuned_eval_loss = token_weighted_loss(model, data.eval_rows, setup.loaded.tokenizer.pad_id, setup.rows_per_batch)
    if tuned_eval_loss is not None and not math.isfinite(tuned_eval_loss):
        raise NonFiniteError(f"the tuned model's eval loss is {tuned_eval_loss} though its weights are finite; "
                             f"no adapter was written. Likely causes: {'; '.join(trainer.causes)}")
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if setup.loaded.device.startswith("cuda") else None
    # Collectives: every rank takes part, before all but rank 0 leave.
    rates = trainer.tokens_per_second_by_process()
    rates_overall = trainer.tokens_per_second_by_process(steady=False)
    return Scores(base_eval_loss=base_eval_loss, tuned_eval_loss=tuned_eval_loss, peak_gpu_memory_gb=peak_gb,
                  rates=rates, rates_overall=rates_overall)


def short_style_eval(args: argparse.Namespace, plan: RunPlan, setup: ModelSetup, model) -> dict:
    """The short style eval of the manifest, unless skipped or there is nothing held out ({} then)."""
    if not plan.eval_samples or args.no_style_eval or args.style_eval_samples <= 0:
        return {}
    return _short_style_eval(setup.loaded, model, plan.persona, args, plan.speakers, setup.max_length,
                             plan.train_samples, plan.eval_samples, plan.memory)


def _short_style_eval(loaded, model, persona, args, speakers, max_length, train_samples, eval_samples, memory) -> dict:
    """Base and tuned replies to a few held-out conversations, scored as `finetune eval` scores them; tuned
    answers with the memory when it learned with one, as the bot will serve it."""
    from .eval_inputs import choose_samples
    from .eval_models import base_and_tuned, with_model
    from .evaluate import build_report, held_out_notes, short_summary
    from .generation import GenerationSettings

    chosen = choose_samples(eval_samples, args.style_eval_samples, args.seed)
    notes_for = held_out_notes(memory, chosen, args.memory_notes, args.seed) if memory is not None else None
    # No loss: the summary keeps none, and the manifest has both losses on all of eval.jsonl already.
    made = base_and_tuned(with_model(loaded, model), persona=persona, template=args.template,
                          settings=GenerationSettings.from_manifest(DEFAULT_GENERATION), speakers=speakers,
                          max_length=max_length, samples=chosen, seed=args.seed, with_loss=False, notes_for=notes_for)
    report = build_report(chosen, {n: s.replies for n, s in made.items()}, {}, train_samples, seed=args.seed)
    return short_summary(report)


def build_manifest(args: argparse.Namespace, plan: RunPlan, setup: ModelSetup, data: PackedData, model,
                   targets: list[str], trainer, result, scores: Scores, style_eval: dict, started: float) -> AdapterManifest:
    """bunshin.json: what the bot needs to serve the adapter as trained, and how the run went."""
    loaded, tokenizer = setup.loaded, setup.loaded.tokenizer
    rates, peak_gb = scores.rates, scores.peak_gpu_memory_gb
    return AdapterManifest(
        base_model=plan.base,
        base_revision=loaded.revision,
        base_shape=base_shape(model.get_base_model()),
        tokenizer_fingerprint=tokenizer.fingerprint,
        tokenizer_backend=tokenizer.backend,
        newline=tokenizer.newline,
        template=args.template,
        persona=plan.persona,
        max_length=setup.max_length,
        generation=dict(DEFAULT_GENERATION),
        dataset_fingerprint=plan.fingerprint,
        dataset={
            "path": str(args.data),
            "train_samples": data.train_samples,
            "eval_samples": data.eval_samples,
            "skipped_too_long": data.skipped_too_long,
            "train_rows": len(data.train_rows),
            "useful_tokens_per_epoch": data.useful_tokens,
        },
        eval_loss={"base": scores.base_eval_loss, "tuned": scores.tuned_eval_loss},
        style_eval=style_eval,
        lora={"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": targets},
        training={
            "steps": result.global_step,
            "epochs": args.epochs if args.max_steps <= 0 else None,
            "learning_rate": args.lr,
            "pack_length": setup.pack_length,
            "rows_per_step": setup.rows_per_batch,
            "tokens_per_step": setup.rows_per_batch * setup.pack_length,
            "quantize": args.quantize,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "device": loaded.device,
            "mixed_precision": trainer.accelerator.mixed_precision,  # autocast over the weights' dtype, or "no"
            "gradient_checkpointing": setup.gradient_checkpointing,
            "attention": setup.attn,
            "compiled": args.compile,
            "seed": args.seed,
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
            # The whole run's: all processes summed (each trains on its own share of the rows).
            "world_size": len(rates),
            "useful_tokens_per_second": round(sum(rates), 1),
            "useful_tokens_per_second_overall": round(sum(scores.rates_overall), 1),
            "useful_tokens_per_second_by_process": [round(r, 1) for r in rates],
            "peak_gpu_memory_gb": round(peak_gb, 2) if peak_gb is not None else None,
            "wall_seconds": round(time.time() - started, 1),
        },
        speakers=plan.speakers,
        memory=({"notes": args.memory_notes, "from_reply": args.memory_from_reply, "drill": args.memory_drill,
                 "drilled_samples": data.drilled, "entries": len(plan.memory), "sha256": plan.memory.sha256}
                if plan.memory is not None else {}),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        bunshin_version=bunshin_version(),
    )


def write_adapter(args: argparse.Namespace, plan: RunPlan, model, manifest: AdapterManifest) -> None:
    """The LoRA weights, bunshin.json and the dataset's stats, in a folder that appears whole or not at all."""
    with atomic_directory(args.out, replace=args.force) as staging:
        model.save_pretrained(str(staging))
        manifest.write(staging / "bunshin.json")
        if plan.memory is not None:
            copy_memory(args.data, staging)  # the bot recalls from the adapter folder alone
        if plan.stats_path.is_file():
            shutil.copyfile(plan.stats_path, staging / "dataset_stats.json")


def finish_checkpoints(args: argparse.Namespace, plan: RunPlan) -> None:
    """After a finished run (the adapter written) its checkpoints go: they hold the optimizer state, and a copy
    of the weights, made from the chats, that nothing needs any more. --keep-checkpoints keeps them. A run that
    fails or is interrupted never gets here, so its checkpoints stay for --resume."""
    if args.keep_checkpoints:
        print(f"{plan.checkpoints}: checkpoints kept (--keep-checkpoints)")
    else:
        shutil.rmtree(plan.checkpoints, ignore_errors=True)


def print_outcome(args: argparse.Namespace, result, scores: Scores, style_eval: dict) -> None:
    """The run in a line (two with the style eval), on stdout for whoever launched it."""
    out, rates = args.out, scores.rates
    base_txt = f"{scores.base_eval_loss:.4f}" if scores.base_eval_loss is not None else "n/a"
    tuned_txt = f"{scores.tuned_eval_loss:.4f}" if scores.tuned_eval_loss is not None else "n/a"
    each = f" ({len(rates)} processes: {', '.join(f'{r:,.0f}' for r in rates)})" if len(rates) > 1 else ""
    print(
        f"{out}: {result.global_step} steps, eval loss {base_txt} (base) -> {tuned_txt} (tuned), "
        f"{sum(rates):,.0f} useful tokens/s{each}"
    )
    if style_eval:
        base_s, tuned_s = style_eval["systems"]["base"], style_eval["systems"]["tuned"]
        in_home = Path(out).name == "adapter" and Path(args.data) == Path(out).parent / "dataset"
        full = f"python -m finetune eval {Path(out).parent}" if in_home else f"python -m finetune eval {out} --data {args.data} --out REPORT"
        print(
            f"{out}: on {style_eval['samples']} held-out replies, style distance {base_s['style_distance']:.3f} (base) -> "
            f"{tuned_s['style_distance']:.3f} (tuned), chrF {base_s['chrf']:.1f} -> {tuned_s['chrf']:.1f}; the full report: "
            f"{full}"
        )


class _RowDataset:
    """A list of packed rows as the Trainer's map-style dataset (no need for `datasets` here)."""

    def __init__(self, rows: list[PackedRow]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PackedRow:
        return self.rows[i]


WARMUP_STEPS_UNTIMED = 5  # first steps pay for CUDA/cuBLAS set-up; throughput is measured after them


def _packed_trainer_class(trainer_base, callback_base):
    """The Trainer with two additions: it counts the useful tokens it trains on, per second, and
    it stops at the first loss or gradient that is not a finite number (nonfinite.py)."""

    class PackedTrainer(trainer_base):
        def __init__(self, *a, causes: list[str], **kw):
            super().__init__(*a, **kw)
            self.useful_tokens = 0
            self.marks: list[tuple[float, int]] = []  # (time, useful tokens so far) at the end of each step
            self.watch = NonFiniteWatch(self.args.device)
            self.causes = causes
            # First in line, so the progress bar and log printers see the throughput it adds.
            self.callback_handler.callbacks.insert(0, _Clock(self))
            # Last in line, after the Trainer's own flow callback has decided whether this step logs,
            # saves or evaluates: those are the steps the watch is read at.
            self.add_callback(_StopOnNonFinite(self))
            self.add_callback(_PrivateCheckpoints())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            useful = inputs.pop(USEFUL_TOKENS, None)
            if model.training and useful is not None:
                self.useful_tokens += int(useful)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.watch.see(LOSS, loss, self.state.global_step + 1)
            return loss

        def _get_grad_norm(self, model, grad_norm=None):
            # The norm the Trainer computes anyway for clipping, each step: watching it costs nothing
            # extra. (A private hook of transformers 5; were it renamed, the loss watch would still
            # stop the run, one step later, since NaN gradients make the next loss NaN.) Under fp16's
            # GradScaler an inf gradient is expected now and then: the scaler skips that step.
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            if grad_norm is not None and self.accelerator.scaler is None:
                import torch

                value = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(float(grad_norm))
                self.watch.see(GRADIENT, value, self.state.global_step + 1)
            return grad_norm

        def stop_if_nonfinite(self) -> None:
            found = self.watch.first()
            if found is not None:
                raise NonFiniteError(describe(found, self.state.max_steps, self.causes))

        def tokens_per_second(self, steady: bool = True) -> float:
            """This process's useful tokens per second; `steady` starts after the first steps' one-time
            set-up (only once there are as many steps again to time)."""
            if len(self.marks) < 2:
                return 0.0
            skip = WARMUP_STEPS_UNTIMED if steady and len(self.marks) > 2 * WARMUP_STEPS_UNTIMED else 0
            (t0, n0), (t1, n1) = self.marks[skip], self.marks[-1]
            return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

        def tokens_per_second_by_process(self, steady: bool = True) -> list[float]:
            """Each process's useful tokens per second, rank 0 first; their sum is the whole run's.
            A collective under torchrun / accelerate: every rank must call it at the same point."""
            import torch

            mine = self.tokens_per_second(steady)
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return [mine]
            local = torch.tensor([mine], dtype=torch.float64, device=self.args.device)
            gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, local)
            return [g.item() for g in gathered]

    class _Clock(callback_base):
        """Marks (time, useful tokens) at each step end. Only the marks the figures are taken from
        wait for the GPU: a wait every step would stop the CPU from queueing the next step's
        kernels while the GPU works, and cost more than anything measured."""

        def __init__(self, trainer):
            self.trainer = trainer

        def _mark(self, wait: bool):
            if wait:
                import torch

                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
            self.trainer.marks.append((time.perf_counter(), self.trainer.useful_tokens))

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.marks.clear()
            self._mark(wait=True)

        def on_step_end(self, args, state, control, **kwargs):
            self._mark(wait=len(self.trainer.marks) == WARMUP_STEPS_UNTIMED)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Every rank logs the same steps (the loss is averaged over all of them there), so the
            # gather below meets on each; the figure is the whole run's, not rank 0's share.
            if logs is not None and "loss" in logs:
                rates = self.trainer.tokens_per_second_by_process()
                logs["useful_tokens_per_s"] = round(sum(rates), 1)
                logs["world_size"] = len(rates)
                if len(rates) > 1:
                    logs["useful_tokens_per_s_per_process"] = [round(r, 1) for r in rates]

        def on_train_end(self, args, state, control, **kwargs):
            self._mark(wait=True)

    class _StopOnNonFinite(callback_base):
        """Reads the watch where the Trainer is about to wait for the GPU anyway (it reads the loss
        back to log it, writes a checkpoint, evaluates, or ends), so no step waits for it; and
        before a checkpoint is written, so none holds NaN weights."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
                self.trainer.stop_if_nonfinite()

        def on_train_end(self, args, state, control, **kwargs):
            self.trainer.stop_if_nonfinite()

    class _PrivateCheckpoints(callback_base):
        """Each checkpoint the Trainer (and safetensors, torch.save) just wrote, made readable by its owner only:
        it holds weights and optimizer state learnt from the chats."""

        def on_save(self, args, state, control, **kwargs):
            make_tree_private(Path(args.output_dir))

    return PackedTrainer
