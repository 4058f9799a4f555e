"""Loading the base model, its tokenizer and LoRA adapters; chat formatting."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from store.errors import PrefloopError
from tuning.models_cache import resolve_model

hf_logging.disable_progress_bar()


def limit_threads() -> None:
    """Leave one core for the web server and other processes."""
    wanted = os.environ.get("PREFLOOP_THREADS")
    n = int(wanted) if wanted else max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)


def device() -> torch.device:
    """The device jobs run on: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(base: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token."""
    path = resolve_model(base)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PrefloopError(
            f"cannot load the tokenizer of base model {base!r} ({path}): {exc}"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(base: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base causal LM in eval mode on the job's device."""
    path = resolve_model(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise PrefloopError(f"cannot load base model {base!r} ({path}): {exc}") from exc
    return model.to(device()).eval()


def load_version(base: str, adapter_dir: Path | None, trainable: bool = False) -> torch.nn.Module:
    """The base model with a model version's adapter applied (None: the base model)."""
    model = load_base(base)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    if not Path(adapter_dir).exists():
        raise PrefloopError(f"adapter folder {adapter_dir} is missing from the workspace")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, messages: list[dict] | None
) -> list[int]:
    """Token ids of the prompt rendered through the chat template, ready for the reply."""
    conversation = messages or [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation) + "\n\nassistant:"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def completion_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, finish_reason: str | None = None
) -> list[int]:
    """Token ids of a completion, ended by the end-of-turn token unless it was cut off."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) if finish_reason == "length" else [*ids, tokenizer.eos_token_id]


def candidate_ids(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    finish_reasons: list[str | None] | None = None,
) -> list[list[int]]:
    """Token ids of every candidate of a group (a cut-off candidate gets no end token)."""
    reasons = finish_reasons or [None] * len(texts)
    return [completion_ids(tokenizer, t, f) for t, f in zip(texts, reasons, strict=True)]
