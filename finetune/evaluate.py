"""`finetune eval HOME` (or `[ADAPTER] --data DATASET --out REPORT`): does the clone talk like the person?

    eval.jsonl (held-out conversations) ─► replies per system: base and tuned (eval_models.py), any
        --system NAME=FILE (eval_inputs.py) ─► scores against the real replies (scoring.py: style,
        chrF, stock phrases, verbatim repeats of training text) + loss ─► REPORT/report.json,
        report.html (report_html.py), replies/NAME.jsonl

The loss alone says how surprised a model is by the person's words, not whether its own replies
sound like them: a model can lower the loss and still answer everyone with the same stock phrase.
So the report scores what the model actually says, in the situations the person was in, against
what the person actually said there, feature by feature (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .atomic_output import atomic_directory, check_writable
from .blind_pairs import choose_blind_pairs
from .dataset_files import DatasetError, read_samples
from .eval_inputs import EvalError, check_names, choose_samples, parse_system_arg, read_system_replies
from .manifest import bunshin_version
from .model_loading import DTYPE_CHOICES, QUANTIZE_CHOICES, ModelLoadError
from .person_memory import MEMORY_FILE, PersonMemory, PersonMemoryError
from .probes import ProbeError, read_probes
from .profile import ProfileError, read_profile
from .progress import WatchedProgress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", nargs="?", type=Path, metavar="HOME|ADAPTER",
                   help="a persona home (personas/NAME: its adapter/, dataset/ and report/), or a folder written by "
                   "`finetune train`: scores its base and tuned model (optional with --system)")
    p.add_argument("--data", type=Path, default=None, metavar="DATASET",
                   help="folder written by `finetune prepare` (default: the persona home's dataset/)")
    p.add_argument("--out", type=Path, default=None, metavar="REPORT",
                   help="folder to write report.json and report.html in (default: the persona home's report/)")
    p.add_argument("--system", action="append", default=[], metavar="NAME=REPLIES.jsonl",
                   help='more replies to score: one {"id": SAMPLE_ID, "reply": TEXT} per line (repeatable)')
    p.add_argument("--samples", type=int, default=256, help="held-out samples to score, picked with --seed (0: all)")
    p.add_argument("--seed", type=int, default=0, help="picks the samples, seeds generation and the blind test")
    p.add_argument("--verbatim-chars", type=int, default=20,
                   help="a reply sharing this many characters with a training message repeats it (default 20)")
    p.add_argument("--batch", type=int, default=32, help="chats generated at once (slot engine rows)")
    p.add_argument("--base", default=None, help="load the base model from here instead of the manifest's id (same model)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--systems", default=None, metavar="A,B",
                   help="model systems to run: base, tuned, prompt-only, hybrid (default: all four where the dataset "
                   "has the persona's memory, else base and tuned)")
    p.add_argument("--memory-notes", type=int, default=None, metavar="K",
                   help="notes recalled into a memory system's prompt (default: the adapter's, else 3)")
    p.add_argument("--probes", type=Path, default=None, metavar="PROBES.jsonl",
                   help="fact probes: does each system know what the person said (right / stale / wrong / abstained)")
    p.add_argument("--profile", type=Path, default=None, metavar="PROFILE.txt",
                   help="the persona's profile, at the top of the memory systems' prompts (as [memory] profile in the bot)")
    p.add_argument("--force", action="store_true", help="replace an existing REPORT folder")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        return _evaluate(args)
    except (EvalError, DatasetError, ModelLoadError, FileExistsError, ProbeError, PersonMemoryError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    check_writable(args.out, replace=args.force)  # before minutes of generation, not after
    if args.samples < 0:
        raise EvalError("--samples must be >= 0")
    if args.verbatim_chars < 5:
        raise EvalError("--verbatim-chars must be at least 5")
    systems_given = [parse_system_arg(s) for s in args.system]
    check_names(systems_given, with_adapter=args.adapter is not None)
    if args.adapter is None and not systems_given:
        raise EvalError("nothing to score: give an ADAPTER, one or more --system NAME=FILE, or both")
    every_sample = read_samples(args.data / "eval.jsonl", need_id=True)
    if not every_sample:
        raise EvalError(f"{args.data / 'eval.jsonl'} holds no samples (prepare puts the latest conversations there)")
    samples = choose_samples(every_sample, args.samples, args.seed)
    ids = [s["id"] for s in samples]
    known = {s["id"] for s in every_sample}
    replies: dict[str, list[str]] = {}
    for system in systems_given:
        by_id = read_system_replies(system, known, ids)
        replies[system.name] = [by_id[i] for i in ids]
    train_samples = read_samples(args.data / "train.jsonl") if (args.data / "train.jsonl").is_file() else []

    probes = read_probes(args.probes) if args.probes is not None else None  # a bad file fails before any model loads
    profile = read_profile(args.profile) if args.profile is not None else ()
    if probes is not None and args.adapter is None:
        raise EvalError("--probes needs an ADAPTER: probes are answered by the model systems")
    memory = PersonMemory.load(args.data) if (args.data / MEMORY_FILE).is_file() else None
    specs = _chosen_systems(args.systems, memory is not None, args.adapter is not None)

    losses: dict[str, float | None] = {}
    timing: dict[str, float] = {}
    adapter_info = generation = None
    probe_report = None
    if args.adapter is not None:
        from .eval_models import model_systems
        from .generation import GenerationSettings
        from .model_loading import load_persona_model

        loading = time.monotonic()
        loaded = load_persona_model(args.adapter, base=args.base, quantize=args.quantize, device=args.device, dtype=args.dtype)
        timing["load_s"] = round(time.monotonic() - loading, 2)
        manifest = loaded.manifest
        persona = samples[0]["persona"]
        if persona != manifest.persona:
            raise EvalError(f"{args.data} is {persona}'s data but {args.adapter} was trained as {manifest.persona}")
        settings = GenerationSettings.from_manifest(manifest.generation)
        k = args.memory_notes if args.memory_notes is not None else int(manifest.memory.get("notes") or DEFAULT_NOTES)
        run = dict(persona=manifest.persona, template=manifest.template, settings=settings,
                   speakers=list(manifest.speakers), max_length=manifest.max_length, seed=args.seed, slots=args.batch)
        with _Progress(len(samples), enabled=not args.no_progress) as progress:
            made = model_systems(loaded, specs, contexts=[s["context"] for s in samples], progress=progress.advance,
                                 loss_samples=samples, notes_for=held_out_notes(memory, samples, k, args.seed),
                                 profile=profile, **run)
        for name, system in made.items():
            replies[name] = system.replies
            losses[name] = system.loss
            timing[f"{name}_s"] = round(system.seconds, 2)  # its loss, warm-up and generation
        if probes is not None:
            probing = time.monotonic()
            contexts = [[{"speaker": t.speaker, "text": t.text} for t in p.turns] for p in probes]
            answered = model_systems(loaded, specs, contexts=contexts, notes_for=_probe_notes(memory, probes, k, args.seed),
                                     profile=profile, **run)
            probe_report = probe_results(probes, {n: s.replies for n, s in answered.items()}, args.probes)
            timing["probes_s"] = round(time.monotonic() - probing, 2)
        adapter_info = {"path": str(args.adapter), "base_model": manifest.base_model, "merged": manifest.merged,
                        "memory": manifest.memory}
        generation = vars(settings).copy()
        # Model systems first in the report, in the order base, tuned, prompt-only, hybrid.
        replies = {**{n: replies[n] for n in made}, **{n: r for n, r in replies.items() if n not in made}}

    scoring = time.monotonic()
    report = build_report(samples, replies, losses, train_samples, seed=args.seed, verbatim_chars=args.verbatim_chars)
    timing["score_s"] = round(time.monotonic() - scoring, 2)
    report["dataset"] = _dataset_info(args.data, samples, len(every_sample))
    report["adapter"] = adapter_info
    report["generation"] = generation
    report["probes"] = probe_report
    report["memory"] = {"notes": len(memory), "profile_lines": len(profile)} if memory is not None else None
    report["timing"] = {**timing, "total_s": round(time.monotonic() - started, 2)}
    write_report(args.out, report, replies, ids, replace=args.force)
    print(summary_lines(report, args.out))
    return 0


DEFAULT_NOTES = 3


def _chosen_systems(given: str | None, has_memory: bool, has_adapter: bool) -> list:
    from .eval_models import SYSTEMS

    if given is None:
        names = ["base", "tuned", "prompt-only", "hybrid"] if has_memory else ["base", "tuned"]
    else:
        names = list(dict.fromkeys(n.strip() for n in given.split(",") if n.strip()))
        unknown = [n for n in names if n not in SYSTEMS]
        if unknown or not names:
            raise EvalError(f"--systems {given!r}: choose from {', '.join(SYSTEMS)}")
        if not has_adapter:
            raise EvalError("--systems needs an ADAPTER: they are the model's ways of answering")
    specs = [SYSTEMS[n] for n in names]
    if not has_memory and any(s.memory for s in specs):
        raise EvalError("prompt-only and hybrid answer with the persona's memory, and the dataset has none "
                        f"({MEMORY_FILE} is made by `python -m finetune prepare`: re-run it)")
    return specs


def held_out_notes(memory: PersonMemory | None, samples: list[dict], k: int, seed: int):
    """notes_for a held-out sample: recalled from before its conversation began (never its own, never later),
    and for prompt-only a few of the persona's earlier messages as examples of how they write."""
    if memory is None:
        return None
    from .person_memory import example_notes, sample_notes

    def notes_for(spec, i: int) -> list:
        sample = samples[i]
        found = sample_notes(memory, sample, k)
        if spec.examples:
            found = example_notes(memory, sample, spec.examples, seed, besides=found) + found
        return sorted(found, key=lambda n: n.date)

    return notes_for


def _probe_notes(memory: PersonMemory | None, probes: list, k: int, seed: int):
    """notes_for a probe: asked now, so the whole memory may answer it."""
    if memory is None:
        return None
    from .person_memory import reply_notes

    def notes_for(spec, i: int) -> list:
        return reply_notes(memory, probes[i].turns, k, examples=spec.examples, seed=seed, key=probes[i].id)

    return notes_for


def probe_results(probes: list, replies: dict[str, list[str]], path: Path) -> dict:
    """report.json's "probes": each system's summary (probes.summarize) and every probe's reply and outcome."""
    from .probes import score_reply, summarize

    outcomes = {name: [score_reply(p, r) for p, r in zip(probes, texts, strict=True)] for name, texts in replies.items()}
    return {
        "file": str(path),
        "systems": {name: summarize(probes, found) for name, found in outcomes.items()},
        "items": [
            {"id": p.id, "turns": [{"speaker": t.speaker, "text": t.text} for t in p.turns], "right": list(p.right),
             "stale": list(p.stale), "never_stated": p.never_stated,
             "replies": {name: {"reply": replies[name][i], "outcome": outcomes[name][i]} for name in replies}}
            for i, p in enumerate(probes)
        ],
    }


def build_report(samples: list[dict], replies: dict[str, list[str]], losses: dict[str, float | None],
                 train_samples: list[dict], *, seed: int, verbatim_chars: int = 20) -> dict:
    """report.json's content (docs/evaluation.md) for `replies` per system on `samples`."""
    from .eval_models import perplexity
    from .scoring import score_systems
    from .verbatim import TrainIndex

    index = TrainIndex.from_samples(train_samples, verbatim_chars) if train_samples else None
    real = [s["target"] for s in samples]
    ids = [s.get("id") or f"sample-{i}" for i, s in enumerate(samples)]
    scored = score_systems(real, replies, [s["context"] for s in samples], ids, index, verbatim_chars)
    for name, loss in losses.items():
        scored["systems"][name]["loss"] = loss
        scored["systems"][name]["perplexity"] = perplexity(loss)
    blind, selection = choose_blind_pairs(samples, replies, seed)
    examples = [{"id": ids[i], "context": s["context"], "real": s["target"],
                 "replies": {name: replies[name][i] for name in replies}} for i, s in enumerate(samples)]
    return {
        "samples": len(samples),
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bunshin_version": bunshin_version(),
        "verbatim_chars": verbatim_chars,
        **scored,
        "examples": examples,
        "blind": blind,
        "blind_selection": selection,
    }


def write_report(out: Path, report: dict, replies: dict[str, list[str]], ids: list[str], *, replace: bool) -> None:
    """report.json, report.html and replies/NAME.jsonl, all or nothing."""
    from .report_html import render_report

    page = render_report(report)
    with atomic_directory(out, replace=replace) as staging:
        (staging / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (staging / "report.html").write_text(page, encoding="utf-8")
        folder = staging / "replies"
        folder.mkdir()
        for name, texts in replies.items():
            lines = (json.dumps({"id": i, "reply": t}, ensure_ascii=False) for i, t in zip(ids, texts, strict=True))
            (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def short_summary(report: dict) -> dict:
    """What `train` keeps in the adapter manifest: the headline figures per system (rounded by score_systems)."""
    keep = ("style_distance", "chrf", "stock_rate")
    return {
        "samples": report["samples"],
        "seed": report["seed"],
        "systems": {name: {k: s.get(k) for k in keep} | {"verbatim_rate": s["verbatim"]["rate"]}
                    for name, s in report["systems"].items()},
    }


def summary_lines(report: dict, out: Path | None = None) -> str:
    """A small table of the headline figures, for the terminal."""
    header = f"{'system':<12} {'style dist.':>11} {'chrF':>6} {'loss':>7} {'perplexity':>10} {'stock':>6} {'verbatim':>8}"
    rows = [header]
    for name, s in report["systems"].items():
        loss = s.get("loss")
        ppl = s.get("perplexity")
        rows.append(
            f"{name:<12} {s['style_distance']:>11.3f} {s['chrf']:>6.1f} "
            f"{(f'{loss:.3f}' if loss is not None else '-'):>7} {(f'{ppl:.1f}' if ppl is not None else '-'):>10} "
            f"{s['stock_rate']:>6.0%} {s['verbatim']['rate']:>8.0%}"
        )
    where = f"{out}: " if out is not None else ""
    lead = (f"{where}{report['samples']} held-out replies of {report['dataset']['persona']} scored "
            f"(style distance: lower is closer; chrF: higher is closer)" if "dataset" in report
            else f"{where}{report['samples']} held-out replies scored")
    return "\n".join([lead, *rows])


def _dataset_info(folder: Path, samples: list[dict], total: int) -> dict:
    stats_path = folder / "stats.json"
    fingerprint = ""
    if stats_path.is_file():
        try:
            fingerprint = json.loads(stats_path.read_text(encoding="utf-8")).get("fingerprint", "")
        except (OSError, json.JSONDecodeError):
            fingerprint = ""
    return {"path": str(folder), "persona": samples[0]["persona"], "fingerprint": fingerprint, "eval_samples": total}


class _Progress(WatchedProgress):
    """A rich progress bar per model system while replies are generated, when a person is watching."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.tasks: dict[str, int] = {}
        if self.watching(enabled):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("generating {task.fields[name]:>5}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True))

    def advance(self, name: str, count: int) -> None:
        if self.bar is None:
            return
        if name not in self.tasks:
            self.tasks[name] = self.bar.add_task(name, total=self.total, name=name)
        self.bar.advance(self.tasks[name], count)
