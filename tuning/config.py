"""Configuration dataclasses, one per concern, with defaults that work on a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SamplingConfig:
    """How a round is sampled."""

    k: int = 4
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    prompts_per_batch: int = 8
    split: str = "train"
    limit: int | None = None


@dataclass
class LoraSettings:
    """The LoRA adapter's shape."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class DPOConfig:
    """A DPO run: loss, optimisation and data settings."""

    beta: float = 0.1
    epochs: int = 3
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    groups_per_step: int = 4
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict:
        """A plain dict of every setting, for storing with the model version."""
        return asdict(self)
