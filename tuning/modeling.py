"""Loading the base model, its tokenizer and LoRA adapters; chat formatting."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from store.errors import PrefloopError
from tuning.config import DTYPES
from tuning.models_cache import resolve_model

if TYPE_CHECKING:
    from store.db import Workspace

hf_logging.disable_progress_bar()


# whether the web app serves the running job's workspace (None: no workspace named yet)
_SERVED: bool | None = None


def limit_threads(ws: Workspace | None = None) -> None:
    """Torch threads for a job: $PREFLOOP_THREADS when set; else every core, but one left for
    the web server while it serves the job's workspace (or while the workspace is unknown),
    shared out among the processes `accelerate launch` started on this machine."""
    global _SERVED
    if ws is not None:
        from store.owner import serving

        _SERVED = serving(ws)
    wanted = os.environ.get("PREFLOOP_THREADS")
    cores = os.cpu_count() or 2
    if wanted:
        torch.set_num_threads(int(wanted))
        return
    free = cores if _SERVED is False else cores - 1
    torch.set_num_threads(max(1, free // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


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


def resolve_dtype(name: str | torch.dtype = "auto") -> torch.dtype:
    """The torch dtype a --dtype name means; auto: bfloat16 on a CUDA GPU that supports it,
    else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise PrefloopError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return dtypes[name]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def decoding_dtype(name: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype a sampling job loads its weights in: as resolve_dtype, except that auto is also
    bfloat16 on a CPU with native bf16 units, where decoding runs ~1.6x faster and the next-token
    distribution stays within ~0.002 nats/token of float32's (README "Precision and memory").
    Training and scoring keep resolve_dtype's float32 on a CPU."""
    if name == "auto" and device().type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return resolve_dtype(name)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as its --dtype name (torch.bfloat16 -> "bfloat16")."""
    return str(dtype).removeprefix("torch.")


def check_load_in_4bit() -> None:
    """Refuse 4-bit loading where bitsandbytes cannot run, before anything loads."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PrefloopError(
            "--load-in-4bit needs bitsandbytes and a CUDA GPU: on a machine with an NVIDIA GPU "
            "run `pip install bitsandbytes`; here, drop --load-in-4bit (or use --dtype bfloat16)"
        )
    if not torch.cuda.is_available():
        raise PrefloopError(
            "--load-in-4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels) and this machine has "
            "none; drop --load-in-4bit (or use --dtype bfloat16)"
        )


def check_precision(dtype: str, load_in_4bit: bool = False) -> None:
    """Refuse an unknown dtype, or 4-bit loading where it cannot run, before a job starts."""
    resolve_dtype(dtype)
    if load_in_4bit:
        check_load_in_4bit()


def _quantization(dtype: torch.dtype):
    """The QLoRA quantization: NF4 with double quantization, computing in bfloat16 (float16 on a
    GPU without bfloat16, or when asked for)."""
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype in (torch.bfloat16, torch.float16) else resolve_dtype("auto")
    if compute == torch.float32:
        compute = torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_base(
    base: str, dtype: str | torch.dtype = "auto", load_in_4bit: bool = False
) -> torch.nn.Module:
    """The base causal LM in eval mode on the job's device, its weights in dtype (or 4-bit)."""
    if load_in_4bit:
        check_load_in_4bit()
    torch_dtype = resolve_dtype(dtype)
    path = resolve_model(base)
    kwargs: dict = {"dtype": torch_dtype}
    if load_in_4bit:  # bitsandbytes places the quantized weights itself
        kwargs["quantization_config"] = _quantization(torch_dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise PrefloopError(f"cannot load base model {base!r} ({path}): {exc}") from exc
    if not load_in_4bit:
        model = model.to(device())
    return model.eval()


def prepare_for_training(
    model: torch.nn.Module, *, load_in_4bit: bool = False, gradient_checkpointing: bool = False
) -> torch.nn.Module:
    """The base model made ready for an adapter to train on it (before the adapter is added):
    4-bit models through peft's k-bit preparation, gradient checkpointing when asked."""
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad
    return model


def upcast_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Trainable parameters (LoRA weights, heads) in float32, so their updates and the
    optimizer state keep full precision over a low-precision base."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def load_version(
    base: str,
    adapter_dir: Path | None,
    trainable: bool = False,
    *,
    dtype: str | torch.dtype = "auto",
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """The base model with a model version's adapter applied (None: the base model); with
    trainable, made ready to train (see prepare_for_training) and its adapter in float32."""
    if adapter_dir is not None and not Path(adapter_dir).exists():
        raise PrefloopError(f"adapter folder {adapter_dir} is missing from the workspace")
    model = load_base(base, dtype, load_in_4bit)
    if trainable:
        model = prepare_for_training(
            model, load_in_4bit=load_in_4bit, gradient_checkpointing=gradient_checkpointing
        )
    if adapter_dir is None:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    return upcast_trainable(model) if trainable else model


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
