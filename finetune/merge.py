"""`finetune merge HOME` (or `ADAPTER --out DIR`): base + LoRA folded into one full model.

For engines that serve plain weights (vLLM, llama.cpp converters, TGI). The folder also gets
the tokenizer files, the persona's memory (memory.jsonl and its index, when the adapter has them) and a
manifest marked `merged`, so `finetune chat DIR` and the bot load it like an adapter.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .atomic_output import atomic_directory
from .model_loading import DTYPE_CHOICES, ModelLoadError, load_persona_model
from .person_memory import INDEX_FILE, MEMORY_FILE
from .persona_home import refuse_source_package
from .tokenization import TOKENIZER_FILES, tokenizer_folder


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


def licence_files(folder: Path) -> list[Path]:
    """The base folder's licence and notice files (LICENSE, NOTICE.md, Gemma's GEMMA_TERMS.html, ...)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(word in p.name.upper() for word in ("LICENSE", "LICENCE", "NOTICE", "TERMS")))
