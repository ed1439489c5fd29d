"""Safe model loading: no remote code, no pickle by default, clear errors for wrong paths."""

import json
import shutil

import pytest
import torch

from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.models import ModelLoadError, ModelSpec, embedded_gguf_path, load_model
from gradsentry_dagster.resources import GradSentryModelResource
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from tests.conftest import make_tiny_llama

REMOTE_CODE = '''
import pathlib
pathlib.Path(__file__).with_name("remote_code_ran").write_text("yes")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def add_remote_code(folder, model_type):
    (folder / "modeling_evil.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))


def test_defaults_are_safe():
    spec = ModelSpec()
    resource = GradSentryModelResource()
    assert spec.trust_remote_code is False
    assert spec.allow_pickle is False
    assert resource.trust_remote_code is False
    assert resource.allow_pickle is False


def test_remote_code_not_run_for_known_type(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    add_remote_code(folder, "llama")
    loaded = load_model(ModelSpec(model=str(folder), device="cpu"))
    assert not (folder / "remote_code_ran").exists()
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_remote_code_type_rejected(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    add_remote_code(folder, "evil_llama")
    with pytest.raises(ModelLoadError, match="trust_remote_code is off"):
        load_model(ModelSpec(model=str(folder), device="cpu"))
    assert not (folder / "remote_code_ran").exists()


@pytest.fixture
def pickled_model_dir(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "pickled")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_rejected_by_default(pickled_model_dir):
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(model=str(pickled_model_dir), device="cpu"))
    assert "pytorch_model.bin" in str(error.value)
    assert "allow_pickle=True" in str(error.value)


def test_pickle_weights_load_when_allowed(pickled_model_dir, tiny_model):
    loaded = load_model(ModelSpec(model=str(pickled_model_dir), device="cpu", allow_pickle=True))
    assert torch.equal(loaded.model.lm_head.weight, tiny_model.lm_head.weight)


@pytest.mark.parametrize("path", ["/nonexistent/model", "models/missing/folder", "./missing"])
def test_missing_model_folder(path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(ModelSpec(model=path, device="cpu"))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="contains no weight files"):
        load_model(ModelSpec(model=str(tmp_path), device="cpu"))


def save_adapter(model, folder):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(folder)
    return folder


def test_missing_adapter(tiny_model_dir, tmp_path):
    spec = ModelSpec(model=str(tiny_model_dir), device="cpu", adapter=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="adapter folder not found"):
        load_model(spec)
    (tmp_path / "empty").mkdir()
    spec = ModelSpec(model=str(tiny_model_dir), device="cpu", adapter=str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="has no adapter_config.json"):
        load_model(spec)


def test_adapter_loads_on_its_base(tiny_model_dir, tokenizer, tmp_path):
    adapter = save_adapter(make_tiny_llama(len(tokenizer)), tmp_path / "adapter")
    loaded = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu", adapter=str(adapter)))
    assert type(loaded.model).__name__ == "PeftModel"


def test_adapter_for_other_base_rejected(tiny_model_dir, tokenizer, tmp_path):
    other = make_tiny_llama(len(tokenizer), hidden_size=32)
    adapter = save_adapter(other, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "other-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    spec = ModelSpec(model=str(tiny_model_dir), device="cpu", adapter=str(adapter))
    with pytest.raises(ModelLoadError) as error:
        load_model(spec)
    message = str(error.value)
    assert "input size 32" in message
    assert "has 64" in message
    assert "'other-base'" in message


def test_pickle_adapter_rejected(tiny_model_dir, tokenizer, tmp_path):
    adapter = save_adapter(make_tiny_llama(len(tokenizer)), tmp_path / "adapter")
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(state, adapter / "adapter_model.bin")
    spec = ModelSpec(model=str(tiny_model_dir), device="cpu", adapter=str(adapter))
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        load_model(spec)


@pytest.fixture
def no_chat_template_dir(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_format_without_template(no_chat_template_dir):
    resource = GradSentryModelResource(model=str(no_chat_template_dir), device="cpu", prompt_format="chat")
    with pytest.raises(ModelLoadError, match="has no chat template"):
        resource.load()

    loaded = load_model(ModelSpec(model=str(no_chat_template_dir), device="cpu"))
    frame = records_to_frame([(0, {"question": "Who?", "answer": "me"}, None)], FieldMapping())
    with pytest.raises(ValueError, match="use prompt_format='qa'"):
        score_frame(loaded.model, loaded.tokenizer, frame, ScoringSettings(prompt_format="chat"))


@pytest.mark.slow
def test_gguf_folder_and_file_load(tmp_path):
    gguf = embedded_gguf_path()
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / gguf.name).symlink_to(gguf)
    from_folder = load_model(ModelSpec(model=str(folder), device="cpu"))
    from_file = load_model(ModelSpec(model=str(folder / gguf.name), device="cpu"))
    assert from_folder.fingerprint == from_file.fingerprint
    assert from_folder.model.config.vocab_size == 49152
    assert from_folder.tokenizer.eos_token_id is not None
