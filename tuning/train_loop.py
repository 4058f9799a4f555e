"""The one training loop every tuning method runs on.

A method supplies its training groups and a batch → (loss, metrics) function; an online method
supplies prompts instead and a rollout step that turns a batch of them into groups (sample from
the current policy, score, advantages), which the loop then trains on in minibatches. The loop
does the rest: optimizer and schedule, accelerate, sharding, the progress bar, metric reduction and
logging, per-epoch checks (the fluency guard and held-out scores), keeping the right epoch, and
saving the adapter. Read it top to bottom.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from tuning.config import TrainSettings
from tuning.guard import Guard, GuardReport

StepCallback = Callable[[int, dict[str, float]], None]
# (model, the groups of this process's share of a batch) -> (loss, metrics)
LossFn = Callable[[torch.nn.Module, list], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# online methods: (policy, this process's share of a batch of prompts, rollout step) ->
# (the groups to train on, the rollout's metrics)
RolloutFn = Callable[[torch.nn.Module, list, int], tuple[list, dict[str, float]]]


@dataclass
class Method:
    """What a tuning method brings to the loop."""

    name: str
    groups: list
    loss: LossFn
    passes_per_batch: int = 1  # GRPO's ppo_epochs: optimizer steps on the same batch
    # per-batch metrics computed outside the loss (e.g. GRPO's advantages), from the groups
    batch_metrics: Callable[[list], dict[str, float]] | None = None
    # after an optimizer step: returns extra metrics to log (e.g. an adapted β)
    after_step: Callable[[dict[str, float]], dict[str, float]] | None = None
    # a held-out score measured after each epoch (higher is better); keeps the best epoch
    epoch_score: Callable[[torch.nn.Module], float] | None = None
    score_name: str = "eval/score"
    patience: int = 0  # epochs without a better score before stopping (0: never stop early)
    postfix: tuple[str, ...] = ("loss",)
    # final metrics of the kept adapter (e.g. DPO's metrics over every pair)
    final_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None
    # online methods: `groups` are prompts, a batch holds `batch_size` of them, and `rollout`
    # turns a batch into groups to train on in minibatches of cfg.groups_per_step; metrics are
    # then logged once per rollout step (the minibatches' mean), `after_step` runs once per step
    rollout: RolloutFn | None = None
    batch_size: int | None = None
    # values the method changes as it trains (e.g. an adapted β): saved in checkpoints
    state: dict = field(default_factory=dict)


@dataclass
class Checkpointing:
    """Where an online run saves its state every `every` rollout steps (0: never), and the
    state it resumes from (a loaded checkpoint) or None."""

    path: Path
    every: int = 1
    resume: dict | None = None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint `train` saved."""
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class TrainResult:
    """How the run ended."""

    metrics: dict[str, float]
    epochs_run: int
    kept_epoch: int  # 0: the starting adapter was kept
    stopped_by: str | None  # "guard" (KL budget or broken answers), "patience" or None
    guard: list[dict] = field(default_factory=list)  # per-epoch guard reports
    gate: GuardReport | None = None  # the guard measured on the kept adapter, gate_prompts
    last_step: dict[str, float] = field(default_factory=dict)  # the last step's metrics
    # attempts abandoned because their first epoch already broke the guard's budget, each
    # restarted from the starting adapter at half the rate: {"lr", "epochs_run", "guard"}
    backoffs: list[dict] = field(default_factory=list)
    lr: float | None = None  # the peak learning rate of the attempt that was kept


# what training changes: LoRA weights, a reward model's scalar head, PPO's value head
TRAINED_KEYS = ("lora_", "reward_head.", "value_head.")


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if any(key in k for key in TRAINED_KEYS)
    }


def train(
    model,
    method: Method,
    cfg: TrainSettings,
    out_dir: Path,
    *,
    accelerator: Accelerator,
    guard: Guard | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
    checkpoint: Checkpointing | None = None,
) -> TrainResult:
    """Train `model`'s LoRA adapter with `method`; save the kept adapter to out_dir. An online
    method checkpoints every `checkpoint.every` steps and resumes from `checkpoint.resume`."""
    main = accelerator.is_main_process

    def log(step: int, metrics: dict[str, float]) -> None:
        if on_step is not None and main:
            on_step(step, metrics)

    # -- optimizer and schedule: AdamW on the LoRA weights, linear warm-up then constant -----
    groups = method.groups
    online = method.rollout is not None
    batch_size = method.batch_size or cfg.groups_per_step
    steps_per_epoch = math.ceil(len(groups) / batch_size)
    minibatches = math.ceil(batch_size / cfg.groups_per_step) if online else 1
    total = steps_per_epoch * cfg.epochs * method.passes_per_batch * minibatches
    params, optimizer, scheduler = make_optimizer(model, cfg, total)
    raw_optimizer, raw_scheduler = optimizer, scheduler  # what a checkpoint saves and restores

    # -- accelerate: device placement and, under `accelerate launch`, DDP ---------------------
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    rank, world = accelerator.process_index, accelerator.num_processes
    unwrapped = accelerator.unwrap_model(model)
    dev = accelerator.device

    # -- what to keep: the starting adapter until an epoch passes the checks ------------------
    checking = guard is not None or method.epoch_score is not None
    kept_state = _lora_state(unwrapped) if guard is not None else None
    kept_epoch, best_score, since_best = 0, -math.inf, 0
    reports: list[dict] = []
    measured: dict[int, GuardReport] = {}  # epoch -> the guard's report, to reuse for the gate
    stopped_by = None
    backoffs: list[dict] = []  # attempts the guard abandoned before any epoch was kept

    step, batches, epochs_run, logged = 0, 0, 0, {}
    order_rng = random.Random(cfg.seed)
    first_epoch, first_s, order = 0, 0, []

    def save_checkpoint(epoch: int, s: int) -> None:
        """Everything the run needs to go on after step s of epoch: written whole or not at all."""
        state = {
            "epoch": epoch, "s": s, "step": step, "batches": batches, "order": order,
            "order_rng": order_rng.getstate(), "python_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(), "adapter": _lora_state(unwrapped),
            "optimizer": raw_optimizer.state_dict(), "scheduler": raw_scheduler.state_dict(),
            "method_state": dict(method.state), "logged": logged, "kept_epoch": kept_epoch,
            "kept_state": kept_state, "best_score": best_score, "since_best": since_best,
            "reports": reports, "backoffs": backoffs,
        }  # fmt: skip
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = checkpoint.path.with_name(checkpoint.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint.path)

    resume = checkpoint.resume if checkpoint is not None else None
    if resume is not None:
        # -- resume: the adapter, optimizer, schedule, counters and RNGs of the checkpoint ---
        unwrapped.load_state_dict(resume["adapter"], strict=False)
        raw_optimizer.load_state_dict(resume["optimizer"])
        raw_scheduler.load_state_dict(resume["scheduler"])
        method.state.update(resume["method_state"])
        step, batches, logged = resume["step"], resume["batches"], resume["logged"]
        first_epoch, first_s, order = resume["epoch"], resume["s"] + 1, resume["order"]
        order_rng.setstate(_rng_tuple(resume["order_rng"]))
        random.setstate(_rng_tuple(resume["python_rng"]))
        torch.set_rng_state(resume["torch_rng"])
        if "cuda_rng" in resume and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        kept_epoch, kept_state = resume["kept_epoch"], resume["kept_state"]
        best_score, since_best = resume["best_score"], resume["since_best"]
        reports, backoffs = resume["reports"], resume.get("backoffs", [])
        epochs_run = first_epoch

    bar_total = steps_per_epoch * cfg.epochs if online else total
    bar = tqdm(total=bar_total, desc=method.name, unit="step", disable=not (show_progress and main))
    bar.update(batches if online else step)
    epoch, mid_epoch = first_epoch, resume is not None
    while epoch < cfg.epochs:
        # -- one epoch: shuffled batches of groups, each process trains its share ------------
        if not mid_epoch:
            order = list(range(len(groups)))
            order_rng.shuffle(order)
        for s in range(first_s if mid_epoch else 0, steps_per_epoch):
            ids = order[s * batch_size : (s + 1) * batch_size]
            chunk = [groups[i] for i in ids[rank::world]] or [groups[ids[0]]]
            batches += 1
            if online:
                # -- rollout: sample from the current policy, score, advantages ----------------
                chunk, extra = method.rollout(unwrapped, chunk, batches)
                train_started = time.perf_counter()
            else:
                extra = method.batch_metrics(chunk) if method.batch_metrics else {}
            minis = [
                chunk[i : i + cfg.groups_per_step]
                for i in range(0, len(chunk), cfg.groups_per_step)
            ]
            seen: list[dict[str, float]] = []
            for _ in range(method.passes_per_batch):
                for mini in minis:
                    # -- forward, backward, clip, step --------------------------------------
                    model.train()
                    loss, metrics = method.loss(model, mini)
                    accelerator.backward(loss)
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    # -- metrics: mean over processes, then logged by the main process ------
                    logged = {
                        "loss": loss.detach(),
                        **metrics,
                        "grad_norm": torch.as_tensor(grad_norm),
                    }
                    logged = {
                        k: float(accelerator.reduce(v.to(dev).float(), "mean"))
                        for k, v in logged.items()
                    }
                    logged.update(extra)
                    logged["learning_rate"] = scheduler.get_last_lr()[0]
                    logged["epoch"] = epoch + (s + 1) / steps_per_epoch
                    if online:
                        seen.append(logged)
                        continue
                    if method.after_step is not None:
                        logged.update(method.after_step(logged))
                    bar.update(1)
                    bar.set_postfix({k: f"{logged[k]:.4f}" for k in method.postfix if k in logged})
                    log(step, logged)
            if online:
                # -- an online step's metrics: the minibatches' mean, logged once -------------
                logged = {k: sum(m[k] for m in seen) / len(seen) for k in seen[-1]}
                logged["time/train_s"] = time.perf_counter() - train_started
                if method.after_step is not None:
                    logged.update(method.after_step(logged))
                bar.update(1)
                bar.set_postfix({k: f"{logged[k]:.4f}" for k in method.postfix if k in logged})
                log(batches, logged)
                # -- checkpoint: the state to resume from after a crash or kill --------------
                every = checkpoint.every if checkpoint is not None else 0
                if main and every > 0 and batches % every == 0:
                    save_checkpoint(epoch, s)
        mid_epoch = False
        epochs_run = epoch = epoch + 1
        if not checking:
            kept_epoch = epochs_run
            continue

        # -- the fluency guard: stop at the last epoch within the KL budget ------------------
        if guard is not None and cfg.guard_prompts > 0:
            report = guard.measure(unwrapped, cfg.guard_prompts)
            measured[epochs_run] = report
            reports.append({"epoch": epochs_run, **report.to_dict()})
            log(batches if online else step, {**report.metrics("guard"), "epoch": epochs_run})
            if not report.within and kept_epoch == 0 and len(backoffs) < cfg.lr_backoffs:
                # -- back off: nothing kept yet, so start again from the starting adapter at a
                # lower rate (a continued adapter moves far faster than a fresh one) ----------
                lr = raw_scheduler.base_lrs[0]
                next_lr = lr * cfg.backoff_factor
                backoffs.append(
                    {"lr": lr, "next_lr": next_lr, "epochs_run": epochs_run, "guard": reports}
                )
                unwrapped.load_state_dict(kept_state, strict=False)
                restart_schedule(raw_optimizer, raw_scheduler, next_lr)
                reports, epoch, epochs_run = [], 0, 0
                measured.clear()
                bar.reset(total=bar_total)
                continue
            if not report.within:
                stopped_by = "guard"
                break

        # -- held-out score: keep the best epoch, stop after `patience` without a better one -
        score = method.epoch_score(unwrapped) if method.epoch_score else None
        if score is not None:
            log(batches if online else step, {method.score_name: score, "epoch": epochs_run})
        if score is None or score > best_score:
            best_score = score if score is not None else best_score
            kept_epoch, since_best = epochs_run, 0
            if kept_epoch < cfg.epochs:
                kept_state = _lora_state(unwrapped)
        else:
            since_best += 1
            if method.patience and since_best >= method.patience:
                stopped_by = "patience"
                break
    bar.close()

    # -- keep the chosen epoch's adapter ------------------------------------------------------
    if kept_epoch != epochs_run and kept_state is not None:
        unwrapped.load_state_dict(kept_state, strict=False)
    final = method.final_metrics(unwrapped) if method.final_metrics else {}
    if best_score > -math.inf:
        final[method.score_name] = best_score
    gate = None
    if guard is not None:  # the kept epoch's guard report when it sampled every gate prompt
        gate = measured.get(kept_epoch)
        if gate is None or gate.answers < len(guard.prompts) * guard.samples:
            gate = guard.measure(unwrapped)

    # -- save: the main process writes the adapter --------------------------------------------
    accelerator.wait_for_everyone()
    if main:
        unwrapped.save_pretrained(str(out_dir))
    return TrainResult(
        final, epochs_run, kept_epoch, stopped_by, reports, gate, logged, backoffs,
        lr=raw_scheduler.base_lrs[0],
    )  # fmt: skip


def _rng_tuple(state) -> tuple:
    """Python's random state as `random.setstate` takes it (a checkpoint stores lists)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def make_optimizer(model, cfg: TrainSettings, total_steps: int):
    """AdamW over the trainable (LoRA) parameters with linear warm-up, then a constant rate."""
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return params, optimizer, scheduler


def restart_schedule(optimizer: torch.optim.Optimizer, scheduler, lr: float) -> None:
    """Start `optimizer` afresh at peak rate `lr`: no moments, the warm-up from its first step."""
    optimizer.state.clear()
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    scheduler.last_epoch = 0
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(0)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def loading(cfg: TrainSettings) -> dict:
    """The keyword arguments of load_version that a run's precision and memory settings ask
    for (dtype, 4-bit, gradient checkpointing)."""
    return {
        "dtype": cfg.dtype,
        "load_in_4bit": cfg.load_in_4bit,
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }


def lora_config(cfg: TrainSettings):
    """peft's LoraConfig of cfg.lora's shape."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.peft_target_modules(),
        task_type="CAUSAL_LM",
    )


def new_adapter(base: str, cfg: TrainSettings, load: Callable | None = None):
    """The base model (in cfg's dtype, ready to train) with a fresh float32 LoRA adapter of
    cfg.lora's shape."""
    from peft import get_peft_model

    from tuning.modeling import load_version, upcast_trainable

    load = load or load_version
    model = get_peft_model(load(base, None, True, **loading(cfg)), lora_config(cfg))
    return upcast_trainable(model)


def policy_model(
    base: str, cfg: TrainSettings, init_adapter: Path | None, load: Callable | None = None
):
    """The policy to train: a fresh adapter, or a version's adapter to continue."""
    from tuning.modeling import load_version

    load = load or load_version
    if init_adapter is not None:
        return load(base, init_adapter, trainable=True, **loading(cfg))
    return new_adapter(base, cfg, load)


def setup(cfg: TrainSettings) -> Accelerator:
    """Threads, seeds and the accelerator of a run."""
    from tuning.modeling import limit_threads

    limit_threads()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return Accelerator(cpu=not torch.cuda.is_available())


def make_guard(
    model, tokenizer, guard_prompts: list[list[int]] | None, cfg: TrainSettings
) -> Guard | None:
    """The run's fluency guard over held-out prompts; None when off or there are none."""
    if not guard_prompts or (cfg.guard_prompts <= 0 and cfg.gate_prompts <= 0):
        return None
    n = max(cfg.guard_prompts, cfg.gate_prompts)
    return Guard(
        model,
        tokenizer,
        guard_prompts[:n],
        kl_budget=cfg.kl_budget,
        max_new_tokens=cfg.guard_max_new_tokens,
        max_length=cfg.max_length,
        samples=cfg.guard_samples,
        seed=cfg.seed,
    )
