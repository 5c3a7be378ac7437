"""common/models.py: alias resolution, GGUF conversion cache, clear errors, tiny models, LoRA."""

import tempfile
from pathlib import Path

import pytest
import torch

from common.models import ModelPathError, load_model, load_tokenizer, resolve_model_path, tiny_model
from common.run import pick_dtype


def test_alias_converts_gguf_once_then_loads_the_cache(monkeypatch):
    folder = resolve_model_path("smollm2-135m")  # converts on the first call of the session, then cached
    assert (Path(folder) / "model.safetensors").exists() and (Path(folder) / "tokenizer.json").exists()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of loading the cached folder")

    monkeypatch.setattr(tempfile, "mkdtemp", no_conversion)
    assert resolve_model_path("smollm2-135m") == folder
    model = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert not getattr(model, "is_quantized", False) and "quantization_config" not in model.config.to_dict()
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    # the real instruct model answers in text, not garbage: its top next token decodes to something printable
    assert tokenizer.decode(logits.argmax()).strip() != ""


def test_small_alias_is_built_once_with_smollm2s_tokenizer(monkeypatch, tmp_path):
    import common.models as models

    real = Path(resolve_model_path("smollm2-135m"))  # the GGUF conversion stays in the real cache
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf: real)
    monkeypatch.setenv("CLEANPOST_CACHE", str(tmp_path))  # a fresh cache for the small model: built here, then reused
    folder = resolve_model_path("smollm2-small")
    assert Path(folder).parent == tmp_path / "tiny"
    model = load_model("smollm2-small")
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (256, 4, 49152)
    assert load_tokenizer("smollm2-small").get_vocab() == load_tokenizer("smollm2-135m").get_vocab()
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert resolve_model_path("smollm2-small") == folder
    again = tiny_model("smollm2-135m", **models.TINY_ALIASES["smollm2-small"])  # seed 0, as built
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("bad", ["no-such-alias", "./missing/folder", "/tmp", "a/b/c", "x.gguf"])
def test_bad_model_paths_list_what_is_accepted(bad):
    with pytest.raises(ModelPathError, match="accepted: an alias \\(smollm2-135m, smollm2-tiny, smollm2-small\\)"):
        resolve_model_path(bad)


def test_tiny_model_family_and_lora(tmp_path):
    model = tiny_model("smollm2-135m", seed=0)
    again = tiny_model("smollm2-135m", seed=0)
    assert model.config.vocab_size == 49152 and model.config.hidden_size == 64
    assert torch.equal(model.model.embed_tokens.weight, again.model.embed_tokens.weight)  # seeded
    model.save_pretrained(tmp_path)
    load_tokenizer("smollm2-135m").save_pretrained(tmp_path)
    lora = load_model(str(tmp_path), lora_r=4)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)


def test_dtype_names():
    assert pick_dtype("float32", "cpu") == torch.float32
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("fp8", "cpu")
