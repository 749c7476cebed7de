"""Loading models: one module for `finetune train`, `finetune chat`, `finetune merge` and the bot.

- base model: a hub id (from the local cache when offline) or a local folder;
- dtype for the device: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on the CPU;
- `quantize`: "8bit" / "4bit" through bitsandbytes (CUDA only), with k-bit preparation for training;
- LoRA target modules found per architecture, overridable;
- an adapter folder: the peft files plus bunshin's manifest, refused on a different base model
  and refused when its weights hold NaN or inf (a diverged run's; nonfinite.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_NAME, AdapterManifest, ManifestError
from .nonfinite import nonfinite_tensors, read_weights, refusal
from .tokenization import ChatTokenizer, load_tokenizer

# The base `finetune train` and the bot use when neither a flag nor config.toml's [model] base names one:
# trained on Japanese, and LoRA training on it fits a 24 GB GPU.
DEFAULT_BASE = "rinna/japanese-gpt-neox-3.6b"
QUANTIZE_CHOICES = ("none", "8bit", "4bit")
# --dtype of every command that loads a model, and [model] dtype: "auto" is pick_dtype's choice for the device.
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")

# Attention (and for Llama-likes, MLP) projections by architecture. Attention alone is the
# classic LoRA recipe and what rinna tutorials use; more modules cost memory for little gain on chat style.
LORA_TARGETS = {
    "gpt_neox": ["query_key_value"],
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    # Llama / Mistral / Qwen / Gemma / Phi-3-style projections
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
_GENERIC_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "c_attn", "Wqkv", "qkv_proj")


class ModelLoadError(Exception):
    """The model, adapter or device cannot be used as asked; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (or peft PeftModel)
    tokenizer: ChatTokenizer
    base: str  # the base model id or path as given
    revision: str | None  # the commit the weights came from, where known
    device: str
    dtype: Any
    manifest: AdapterManifest | None = None


def quiet_libraries() -> None:
    """Keep the terminal for bunshin's own output: library notices that need no action go.

    bitsandbytes warns on every CPU import that an optional kernel download is unavailable (we never
    download); transformers' weight-loading bars only make sense on a terminal.
    """
    import logging
    import sys
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"--device {requested}: no CUDA GPU is visible to PyTorch (torch {torch.__version__})")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None):
    """bf16 where supported, fp16 on older GPUs, fp32 on the CPU (CPU half precision is slow and lossy)."""
    import torch

    if requested and requested != "auto":
        try:
            return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {requested!r}; choose {', '.join(DTYPE_CHOICES)}") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def quantization_config(quantize: str, compute_dtype):
    if quantize == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - transformers always has it
        raise ModelLoadError(f"--quantize {quantize} needs transformers' BitsAndBytesConfig: {exc}") from None
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise ModelLoadError(f"unknown --quantize {quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}")


def load_base_model(
    base: str,
    *,
    revision: str | None = None,
    quantize: str = "none",
    device: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = "sdpa",
) -> LoadedModel:
    """The base model and its tokenizer, on the device, in the dtype the device suits."""
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    if quantize != "none":
        if not device.startswith("cuda"):
            raise ModelLoadError(
                f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); on {device} use --quantize none"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(f"--quantize {quantize} needs bitsandbytes: pip install -e '.[quantize]' "
                                 f"(or pip install bitsandbytes) ({exc})") from None
    try:
        tokenizer = load_tokenizer(base, revision)
    except Exception as exc:
        raise ModelLoadError(_cannot_load(base, exc)) from exc
    # Never run Python shipped inside a model folder: transformers would otherwise ask on stdin,
    # and a "y" piped into `finetune chat` would answer it.
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision, "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    q = quantization_config(quantize, torch_dtype)
    if q is not None:
        kwargs["quantization_config"] = q
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except ValueError as exc:
        if not (attn_implementation and ("attn_implementation" in str(exc) or "sdpa" in str(exc).lower())):
            raise ModelLoadError(_cannot_load(base, exc)) from exc
        kwargs.pop("attn_implementation")  # an architecture without SDPA support: its default attention
        try:
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        except Exception as retry_exc:
            raise ModelLoadError(_cannot_load(base, retry_exc)) from retry_exc
    except Exception as exc:
        raise ModelLoadError(_cannot_load(base, exc)) from exc
    if q is None:
        model.to(device)
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tokenizer, base, revision or commit, device, torch_dtype)


def _cannot_load(base: str, exc: Exception) -> str:
    local = Path(base).expanduser()
    if local.exists():
        return f"cannot load the model in {local}: {type(exc).__name__}: {exc}"
    return (
        f"cannot load model {base!r}: {type(exc).__name__}: {exc}. If this machine is offline, the model must be in the "
        "Hugging Face cache already (or pass a local folder); `python -m finetune tiny-model DIR` builds an offline test model"
    )


def lora_target_modules(model, override: list[str] | None = None) -> list[str]:
    """The modules LoRA adapts: `override` (--lora-targets), else this project's choice for the architecture
    (LORA_TARGETS), else its attention projections found by their usual names, else peft's own choice for it.
    So any architecture transformers and peft can run gets targets; one whose layers have none of those names is
    an error listing the names it has."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    model_type = getattr(model.config, "model_type", "")
    if override:
        missing = [m for m in override if m not in names]
        if missing:
            raise ModelLoadError(f"--lora-targets {', '.join(missing)}: no such module in {model_type}")
        return list(override)
    if model_type in LORA_TARGETS:
        return LORA_TARGETS[model_type]
    found = sorted(names & set(_GENERIC_TARGET_NAMES))
    if found:
        return found
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    known = PEFT_TARGETS.get(model_type)
    if isinstance(known, list) and known and set(known) <= names:  # (peft writes a few as regular expressions)
        return list(known)
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
    raise ModelLoadError(
        f"no known LoRA target modules in a {model_type!r} model; pass --lora-targets with its attention "
        f"projection names (its linear layers are named: {', '.join(linear[:20]) or 'none'})"
    )


def read_adapter_manifest(adapter_dir: Path) -> AdapterManifest:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter {adapter_dir}: no such folder")
    try:
        return AdapterManifest.read(adapter_dir / MANIFEST_NAME)
    except ManifestError as exc:
        raise ModelLoadError(f"adapter {adapter_dir}: {exc}") from None


def load_persona_model(
    adapter_dir: Path,
    *,
    base: str | None = None,
    quantize: str = "none",
    device: str | None = None,
    dtype: str | None = None,
    merge: bool = False,
) -> LoadedModel:
    """The persona model for generation: a LoRA adapter folder on its base model (or a merged folder).
    Named so beside the bot's *platform* adapters (Discord, LINE). `base` overrides where the base is loaded from
    (a local copy), but it must be the same model: the tokenizer fingerprint is checked.
    `merge` folds the LoRA weights into the base weights (one persona served: no LoRA cost per
    token); it needs unquantized weights."""
    adapter_dir = Path(adapter_dir)
    manifest = read_adapter_manifest(adapter_dir)
    if manifest.merged:
        loaded = load_base_model(str(adapter_dir), quantize=quantize, device=device, dtype=dtype)
        # One pass over the weights where they now live (milliseconds on a GPU): a folder merged
        # from a diverged adapter before merge refused those.
        bad = nonfinite_tensors(dict(loaded.model.named_parameters()))
        if bad:
            raise ModelLoadError(f"merged model {refusal(adapter_dir, bad)}")
        loaded.manifest = manifest
        loaded.model.eval()
        return loaded
    for required in ("adapter_config.json",):
        if not (adapter_dir / required).is_file():
            raise ModelLoadError(f"adapter {adapter_dir}: {required} is missing (not a complete peft adapter folder)")
    weights = next((adapter_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter_dir / n).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"adapter {adapter_dir}: adapter_model.safetensors is missing")
    # Before the base model: the adapter is megabytes, the base gigabytes, and a diverged run's
    # adapter would load without complaint and answer with garbage.
    try:
        bad = nonfinite_tensors(read_weights(weights))
    except Exception as exc:
        raise ModelLoadError(f"adapter {adapter_dir} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if bad:
        raise ModelLoadError(f"adapter {refusal(weights, bad)}")
    loaded = load_base_model(base or manifest.base_model, revision=None if base else manifest.base_revision,
                             quantize=quantize, device=device, dtype=dtype)
    check_same_base(manifest, loaded, adapter_dir)
    from peft import PeftModel

    try:
        loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    except Exception as exc:
        raise ModelLoadError(f"adapter {adapter_dir} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if merge:
        if quantize != "none":
            raise ModelLoadError("merging the adapter needs unquantized weights (--quantize none)")
        loaded.model = loaded.model.merge_and_unload()
    loaded.model.eval()
    loaded.manifest = manifest
    return loaded


def check_same_base(manifest: AdapterManifest, loaded: LoadedModel, adapter_dir: Path) -> None:
    """Refuse an adapter trained on another base model: its weights would be noise there."""
    if manifest.tokenizer_fingerprint != loaded.tokenizer.fingerprint:
        raise ModelLoadError(
            f"adapter {adapter_dir} was trained on {manifest.base_model!r} (tokenizer {manifest.tokenizer_fingerprint[:12]}), "
            f"but the base model loaded is {loaded.base!r} (tokenizer {loaded.tokenizer.fingerprint[:12]}): refusing to mix them"
        )
    shape = _shape_of(loaded.model.config)
    if manifest.base_shape and shape != manifest.base_shape:
        raise ModelLoadError(
            f"adapter {adapter_dir} was trained on {manifest.base_model!r} with shape {manifest.base_shape}, "
            f"but {loaded.base!r} has shape {shape}: refusing to mix them"
        )


def _shape_of(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def base_shape(model) -> dict:
    return _shape_of(model.config)
