"""`finetune merge HOME` (or `ADAPTER --out DIR`): base + LoRA folded into one full model.

For engines that serve plain weights (vLLM, llama.cpp converters, TGI). The folder also gets
the tokenizer files, the persona's memory (memory.jsonl and its index, when the adapter has them) and a
manifest marked `merged`, so `finetune chat DIR` and the bot load it like an adapter.

A base whose tokenizer bunshin runs with sentencepiece (rinna's `spiece.model`) also gets a `tokenizer.json`
written from that model (fast_tokenizer.py), with tokenizer_config.json naming the plain fast tokenizer: the
engine loads the folder through transformers, which loads rinna's files otherwise wrong or not at all. The
result is checked against bunshin's tokenizer before the folder appears; a disagreement is printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .atomic_output import atomic_directory
from .fast_tokenizer import ConversionError, disagreements, probe_texts, write_fast_tokenizer
from .model_loading import DTYPE_CHOICES, ModelLoadError, load_persona_model
from .person_memory import INDEX_FILE, MEMORY_FILE
from .persona_home import refuse_source_package
from .tokenization import SENTENCEPIECE_FILES, TOKENIZER_FILES, load_tokenizer, tokenizer_folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=Path, metavar="HOME|ADAPTER",
                   help="a persona home (personas/NAME: merges its adapter/ into its merged/), or an adapter folder")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: the persona home's merged/")
    p.add_argument("--base", default=None, help="load the base model from here instead of the manifest's id (same model)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the merged weights (default: the device's, fp32 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--force", action="store_true")


def run(args: argparse.Namespace) -> int:
    refuse_source_package(args.out)  # before the model loads, not after
    try:
        if args.out.exists() and not args.force:
            raise ModelLoadError(f"{args.out} already exists (pass --force to replace it)")
        loaded = load_persona_model(args.adapter, base=args.base, device=args.device, dtype=args.dtype)
        if loaded.manifest.merged:
            raise ModelLoadError(f"{args.adapter} is already a merged model")
        merged = loaded.model.merge_and_unload()
        manifest = loaded.manifest
        manifest.merged = True
        tokenizer_source = tokenizer_folder(args.base or manifest.base_model, None if args.base else manifest.base_revision)
        with atomic_directory(args.out, replace=args.force) as staging:
            merged.save_pretrained(str(staging), safe_serialization=True)
            for name in TOKENIZER_FILES:
                if name != "config.json" and (tokenizer_source / name).is_file():
                    shutil.copyfile(tokenizer_source / name, staging / name)
            engine_tokenizer(staging, loaded.tokenizer)
            for licence in licence_files(tokenizer_source):  # a model derivative goes on under the base's terms
                shutil.copyfile(licence, staging / licence.name)
            manifest.write(staging / "bunshin.json")
            for name in (MEMORY_FILE, INDEX_FILE):  # the persona's memory: the bot recalls from this folder alone
                if (Path(args.adapter) / name).is_file():
                    shutil.copyfile(Path(args.adapter) / name, staging / name)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: merged {args.adapter} into {manifest.base_model}")
    return 0


def engine_tokenizer(folder: Path, tokenizer) -> None:
    """For a SentencePiece tokenizer (bunshin's `tokenizer`, its files already in `folder`): the tokenizer.json an
    engine loads, checked against bunshin's own tokenizer of the folder; what disagrees is printed, not fatal (bunshin
    sends the engine token ids, so only the engine's reply text and its stop strings would be off)."""
    if tokenizer.backend != "sentencepiece":
        return  # a tokenizer.json already: what bunshin runs too
    model_file = next(folder / name for name in SENTENCEPIECE_FILES if (folder / name).is_file())
    try:
        write_fast_tokenizer(folder, tokenizer, model_file)
    except ConversionError as exc:
        print(f"warning: no tokenizer.json for engines written ({exc}); an engine serving this folder loads its "
              "tokenizer from the base's files", file=sys.stderr)
        return
    found = disagreements(folder, load_tokenizer(str(folder)), probe_texts())
    for problem in found[:5]:
        print(f"warning: the tokenizer.json written for engines disagrees with bunshin's tokenizer: {problem}",
              file=sys.stderr)


def licence_files(folder: Path) -> list[Path]:
    """The base folder's licence and notice files (LICENSE, NOTICE.md, Gemma's GEMMA_TERMS.html, ...)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(word in p.name.upper() for word in ("LICENSE", "LICENCE", "NOTICE", "TERMS")))
