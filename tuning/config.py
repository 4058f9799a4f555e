"""Configuration dataclasses, one per concern, with defaults that work on a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

SOFT_LABELS = ("empirical", "bt", "hard")
GAIN_SOURCES = ("mean", "bt")


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
class TrainSettings:
    """Optimisation and data settings every tuning method shares."""

    epochs: int = 3
    lr: float = 5e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    groups_per_step: int = 4
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    # the per-epoch guard: after each epoch sample guard_prompts held-out prompts (k=2) from the
    # policy; stop at the last epoch whose KL per token to π_ref is within kl_budget and whose
    # broken share is at most 5%, and keep that epoch's adapter (guard_prompts=0: off)
    kl_budget: float = 0.5
    guard_prompts: int = 8
    guard_max_new_tokens: int = 48
    # the promotion gate at the end of the run: held-out prompts sampled (k=2) to judge it
    gate_prompts: int = 16
    # tune --from: adapt beta from the parent's measured KL per token against this target
    # (the Ziegler rule, once per round); None: half the KL budget
    kl_target: float | None = None
    adapt_beta: bool = True

    def to_dict(self) -> dict:
        """A plain dict of every setting, for storing with the model version."""
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict):
        """The config a stored dict describes; keys that are not settings are ignored."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in stored.items() if k in names}
        if isinstance(values.get("lora"), dict):
            values["lora"] = LoraSettings(**values["lora"])
        return cls(**values)


@dataclass
class DPOConfig(TrainSettings):
    """A DPO run: loss, optimisation and data settings."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    listwise: bool = False  # Plackett–Luce over the whole ranking
    # pair targets: empirical (share of annotators preferring), bt (fitted Bradley–Terry
    # probabilities) or hard (1 for each pair the consensus orders)
    soft_labels: str = "empirical"
    early_stop: int = 0  # patience in epochs on held-out preference accuracy (0: off)

    def __post_init__(self) -> None:
        if isinstance(self.soft_labels, bool):  # stored before the choice existed
            self.soft_labels = "empirical" if self.soft_labels else "hard"
        if self.soft_labels not in SOFT_LABELS:
            raise ValueError(
                f"unknown soft_labels {self.soft_labels!r}; use one of {', '.join(SOFT_LABELS)}"
            )


@dataclass
class GRPOConfig(TrainSettings):
    """A GRPO run on ranked groups: gains, advantages, clipping, KL and optimisation settings."""

    gains: str = "linear"  # linear | dcg | explicit "1,0.6,0.3,0"
    scale_rewards: str = "group"  # group | batch | none
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.04
    target_kl: float | None = None  # nats per token; adapts beta when set
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo
    ppo_epochs: int = 1
    entropy_coef: float = 0.0
    # per-candidate gains: mean (the annotators' schedule gains, averaged) or bt (mean fitted
    # Bradley–Terry probability of beating the group's other candidates; ignores `gains`)
    gain_source: str = "mean"

    def __post_init__(self) -> None:
        if self.gain_source not in GAIN_SOURCES:
            raise ValueError(
                f"unknown gain_source {self.gain_source!r}; use one of {', '.join(GAIN_SOURCES)}"
            )
