"""`finetune chat HOME` (or `ADAPTER`): talk to the tuned model in the terminal.

Type a message and the persona answers; `/reset` forgets the conversation, `/quit` (or Ctrl-D)
ends. Works with piped input too, one message per line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model_loading import DTYPE_CHOICES, QUANTIZE_CHOICES, ModelLoadError, load_persona_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=Path, metavar="HOME|ADAPTER",
                   help="a persona home (personas/NAME: its adapter/, else merged/), or a folder written by "
                   "`finetune train` (or `merge`)")
    p.add_argument("--base", default=None, help="load the base model from here instead of the manifest's id (same model)")
    p.add_argument("--name", default="あなた", help="your speaker name in the conversation (default: あなた)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from .generation import GenerationSettings, fit_context, generate_replies
    from .prompt import ChatTurn

    try:
        loaded = load_persona_model(args.adapter, base=args.base, quantize=args.quantize, device=args.device, dtype=args.dtype)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = loaded.manifest
    settings = GenerationSettings.from_manifest(
        manifest.generation, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    budget = max(16, manifest.max_length - settings.max_new_tokens)
    speakers = [*manifest.speakers, args.name]
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{manifest.persona} ({args.adapter}). /reset forgets, /quit ends.")
    history: list[ChatTurn] = []
    while True:
        try:
            line = input(f"{args.name}> " if interactive else "")
        except EOFError:
            break
        text = line.replace("\\n", "\n").strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            history.clear()
            print("(forgot the conversation)")
            continue
        history.append(ChatTurn(args.name, text))
        prompt = fit_context(loaded.tokenizer, history, manifest.persona, manifest.template, budget)
        [(reply, _)] = generate_replies(loaded.model, loaded.tokenizer, [prompt], settings, speakers, seed=args.seed)
        history.append(ChatTurn(manifest.persona, reply))
        print(f"{manifest.persona}: {reply if reply else '…'}", flush=True)
    return 0
