"""Online RL speed and memory: prefloop's online GRPO and PPO beside TRL's GRPOTrainer.

On the default model, with a DPO run as the memory reference for PPO.

Every method runs in its own subprocess (the bench re-invokes itself with `--only METHOD`), so
each one's peak memory is its own: peak RSS (`ru_maxrss`), and on a GPU also
`torch.cuda.max_memory_allocated`. Methods and what they get:

- grpo: `tuning.online.train_online(method="grpo")` on a temp workspace holding N train prompts;
- ppo: `tuning.ppo.train_ppo` on the same workspace (PPO's own defaults for β, ppo_epochs, lr,
  critic; the same K, prompts per step, lengths and LoRA shape as the others);
- trl: TRL's `GRPOTrainer` on the same prompts (chat-formatted; the bench checks its prompt
  token ids are prefloop's), the same reward function, K, max new tokens, temperature 1.0,
  top_p 1.0, LoRA (r=16, α=32, dropout 0, q/k/v/o_proj), lr, β, loss type, ε, prompts per
  rollout and optimizer steps per rollout: per_device_train_batch_size = groups per step × K,
  gradient accumulation 1, steps_per_generation = prompts per step / groups per step. No vLLM,
  no gradient checkpointing (TRL's default is on; prefloop does not use it), float32;
- dpo: `tuning.dpo.train_dpo` for one epoch on N synthetic ranked groups of K candidates
  (bench/dpo_throughput.py's prompts and sentences, completions cut to the rollouts' max new
  tokens), groups per step = prompts per step: the memory reference for PPO.

The reward (`concise_formal` below, fewer words, exclamation marks and contractions) is one
Python function: prefloop loads it as the scorer `module:function`, TRL calls it through
`trl_reward`. No fluency guard, promotion gate, audit or checkpoints in the prefloop runs.

Timing: from the start of each method's work to its end, *excluding* loading the model weights
and tokenizer from disk for every method. prefloop's wall time covers everything else
`train_online` / `train_ppo` / `train_dpo` do (reading the prompts, the LoRA wrap, every rollout
step: generate, score, π_old/π_ref log-probs, advantages, the optimizer steps, and saving the
adapter); TRL's covers `GRPOTrainer(...)` (LoRA wrap, dataset) and `trainer.train()`. No
warm-up run: the first step's one-off costs are part of every method's figures alike. Generate
time: prefloop's `time/generate_s` step metric (its sampling call), TRL's `_generate_single_turn`
(its `model.generate` call), both wall clock.

Per method it prints rollout steps per minute, samples/s (K × prompts × steps / wall), generated
tokens per second of generate time and of wall time, the share of wall time spent generating,
mean completion length and peak memory; then prefloop GRPO samples/s ÷ TRL samples/s (goal ≥ 2)
and PPO peak ÷ DPO peak (goal ≤ 1.3), both measured in this one run.

Run:  .venv/bin/python bench/online_rl.py --prompts 16 --steps 4 --k 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dpo_throughput import PROMPTS, synthetic_rows  # noqa: E402

METHODS = ("grpo", "ppo", "trl", "dpo")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RESULT_PREFIX = "BENCH-RESULT "
CONTRACTION = re.compile(r"\b\w+'(?:s|t|re|ve|ll|d|m)\b", re.IGNORECASE)


def concise_formal(prompt: str, completion: str) -> float:
    """The bench's reward: fewer words, exclamation marks and contractions score higher."""
    words = len(completion.split())
    return -words / 20 - completion.count("!") - 0.5 * len(CONTRACTION.findall(completion))


def _content(message) -> str:
    """A TRL prompt or completion as plain text (the last message's content if chat-formatted)."""
    if isinstance(message, list):
        return str(message[-1]["content"])
    return str(message)


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """`concise_formal` as TRL's GRPOTrainer calls a reward function."""
    return [
        concise_formal(_content(p), _content(c).strip())
        for p, c in zip(prompts, completions, strict=True)
    ]


def bench_prompts(n: int) -> list[str]:
    """N prompts: dpo_throughput's, numbered variants beyond its 16 (as its groups are)."""
    return [
        PROMPTS[i % len(PROMPTS)]
        + (f" (Variant {i // len(PROMPTS) + 1}.)" if i >= len(PROMPTS) else "")
        for i in range(n)
    ]


def _rss_mib() -> float:
    """The process's peak resident set so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lora():
    from tuning.config import LoraSettings

    return LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=list(LORA_TARGETS))


@contextmanager
def loading_excluded() -> Iterator[dict[str, float]]:
    """Time spent loading weights and tokenizers (prefloop's load_base / load_tokenizer)."""
    import tuning.dpo
    import tuning.modeling as modeling

    spent = {"s": 0.0, "base_loads": 0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            spent["base_loads"] += fn.__name__ == "load_base"
            try:
                return fn(*args, **kwargs)
            finally:
                spent["s"] += time.perf_counter() - t0

        return wrapper

    patched = [
        (modeling, "load_base"),
        (modeling, "load_tokenizer"),
        (tuning.dpo, "load_tokenizer"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patched]
    for mod, name, fn in saved:
        setattr(mod, name, timed(fn))
    try:
        yield spent
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _workspace(model_dir: str, n: int, work: Path):
    """A temp workspace whose train split holds the bench's N prompts."""
    from store import db as storedb
    from store import prompts as storeprompts
    from store.records import PromptRecord

    ws = storedb.create(work / "ws", base_model=model_dir)
    with storedb.connect(ws) as con:
        storeprompts.add_prompts(con, [PromptRecord(t) for t in bench_prompts(n)], "train", "bench")
    return ws


def run_online(method: str, model_dir: str, args, work: Path) -> dict:
    """prefloop's online GRPO or PPO; wall time excludes loading weights and tokenizer."""
    from tuning.config import GRPOConfig, PPOConfig

    shared = dict(
        reward=[f"{concise_formal.__module__}:{concise_formal.__name__}"],
        k=args.k,
        prompts_per_step=args.prompts_per_step,
        groups_per_step=args.groups_per_step,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        epochs=args.steps * args.prompts_per_step // args.prompts,
        seed=0,
        lora=_lora(),
        checkpoint_every=0,
    )
    ws = _workspace(model_dir, args.prompts, work)
    steps: list[dict[str, float]] = []
    on_step = lambda _s, m: steps.append(m)  # noqa: E731
    with loading_excluded() as loading:
        t0 = time.perf_counter()
        if method == "ppo":
            from tuning.ppo import train_ppo

            cfg = PPOConfig(**shared)
            train_ppo(ws, model_dir, cfg, work / "out", on_step=on_step, show_progress=False)
        else:
            from tuning.online import train_online

            cfg = GRPOConfig(online=True, lr=args.lr, beta=args.beta, **shared)
            train_online(
                ws, model_dir, "grpo", cfg, work / "out", on_step=on_step, show_progress=False
            )
        _sync()
        total = time.perf_counter() - t0
    samples = args.prompts_per_step * args.k
    return {
        "wall": total - loading["s"],
        "loading": loading["s"],
        "base_loads": loading["base_loads"],
        "steps": len(steps),
        "samples": samples * len(steps),
        "tokens": sum(m["completions/mean_length"] * samples for m in steps),
        "generate": sum(m["time/generate_s"] for m in steps),
        "settings": {
            "lr": cfg.lr,
            "beta": cfg.beta,
            "ppo_epochs": cfg.ppo_epochs,
            **({"loss_type": cfg.loss_type} if method == "grpo" else {}),
        },
    }


def run_dpo(model_dir: str, args, work: Path) -> dict:
    """prefloop's DPO, one epoch over N synthetic groups; the memory reference for PPO."""
    from tuning.config import DPOConfig
    from tuning.dpo import train_dpo
    from tuning.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rows = synthetic_rows(tokenizer, args.prompts, args.k)
    for row in rows:  # completions as long as a rollout's (the end token makes max_new_tokens)
        for i, text in enumerate(row.texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_new_tokens - 1]
            row.texts[i] = tokenizer.decode(ids)
    cfg = DPOConfig(epochs=1, groups_per_step=args.prompts_per_step, seed=0, lora=_lora())
    steps: list[dict[str, float]] = []
    with loading_excluded() as loading:
        t0 = time.perf_counter()
        train_dpo(
            model_dir,
            rows,
            cfg,
            work / "out",
            on_step=lambda _s, m: steps.append(m) if "loss" in m else None,
            show_progress=False,
        )
        _sync()
        total = time.perf_counter() - t0
    return {
        "wall": total - loading["s"],
        "loading": loading["s"],
        "base_loads": loading["base_loads"],
        "steps": len(steps),
        "settings": {"lr": cfg.lr, "beta": cfg.beta, "groups_per_step": cfg.groups_per_step},
    }


def run_trl(model_dir: str, args, work: Path, device: str) -> dict:
    """TRL's GRPOTrainer on the same prompts and reward; wall time excludes loading."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from tuning.config import GRPOConfig as PrefloopGRPO
    from tuning.modeling import load_tokenizer, prompt_ids

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = bench_prompts(args.prompts)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts])
    defaults = PrefloopGRPO()
    minibatches = args.prompts_per_step // args.groups_per_step
    config = GRPOConfig(
        output_dir=str(work / "trl"),
        max_steps=args.steps * minibatches,
        per_device_train_batch_size=args.groups_per_step * args.k,
        gradient_accumulation_steps=1,
        steps_per_generation=minibatches,
        num_generations=args.k,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # prefloop: linear warm-up over 10% of steps, then constant
        weight_decay=defaults.weight_decay,
        max_grad_norm=defaults.max_grad_norm,
        beta=args.beta,
        epsilon=defaults.epsilon,
        loss_type=defaults.loss_type,
        scale_rewards=defaults.scale_rewards,
        num_iterations=defaults.ppo_epochs,
        seed=0,
        bf16=False,
        fp16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
        use_vllm=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    gen = {"s": 0.0, "tokens": 0, "samples": 0, "calls": 0}
    t0 = time.perf_counter()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    generate = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        completion_ids, logprobs = generate(*a, **kw)
        _sync()
        gen["s"] += time.perf_counter() - t
        gen["tokens"] += sum(len(c) for c in completion_ids)
        gen["samples"] += len(completion_ids)
        gen["calls"] += 1
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    trainer.train()
    _sync()
    total = time.perf_counter() - t0
    trl_ids = trainer._tokenize_prompts([row["prompt"] for row in dataset])[0]
    same = [list(a) for a in trl_ids] == [prompt_ids(tokenizer, t, None) for t in texts]
    return {
        "wall": total,
        "steps": gen["calls"],
        "optimizer_steps": trainer.state.global_step,
        "samples": gen["samples"],
        "tokens": gen["tokens"],
        "generate": gen["s"],
        "same_prompt_tokens": same,
    }


def child(args, model_dir: str, device: str) -> int:
    """Run one method in this process and print its figures as one JSON line."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours
    torch.set_num_threads(args.threads)
    if args.only == "trl":
        import datasets  # noqa: F401  (imported before the start RSS, as prefloop's modules are)
        import trl  # noqa: F401
    import tuning.dpo  # noqa: F401
    import tuning.online  # noqa: F401
    import tuning.ppo  # noqa: F401

    start_rss = _rss_mib()
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-online-") as tmp:
        work = Path(tmp)
        if args.only == "trl":
            res = run_trl(model_dir, args, work, device)
        elif args.only == "dpo":
            res = run_dpo(model_dir, args, work)
        else:
            res = run_online(args.only, model_dir, args, work)
    res["peak_rss"] = _rss_mib()
    res["start_rss"] = start_rss
    if torch.cuda.is_available():
        res["gpu_peak"] = torch.cuda.max_memory_allocated() / 2**20
    res["threads"] = torch.get_num_threads()
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return 0


def _fmt(value: float | None, spec: str) -> str:
    """value formatted by spec; a dash as wide when there is none."""
    width = int(re.match(r"\d*", spec).group() or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def table(results: dict[str, dict], args) -> None:
    """The per-method figures, one row each, and the two goal ratios."""
    gpu = any("gpu_peak" in r for r in results.values())
    head = (
        f"{'method':13s} {'steps':>5s} {'steps/min':>9s} {'samples/s':>9s} {'tok/s gen':>9s} "
        f"{'tok/s wall':>10s} {'gen share':>9s} {'mean len':>8s} {'wall s':>7s} "
        f"{'peak RSS MiB':>12s} {'+ MiB':>7s}" + (f" {'GPU MiB':>8s}" if gpu else "")
    )
    print(head)
    print("-" * len(head))
    names = {
        "grpo": "prefloop GRPO",
        "ppo": "prefloop PPO",
        "trl": "TRL GRPO",
        "dpo": "prefloop DPO",
    }
    for method, r in results.items():
        online = "samples" in r
        wall = r["wall"]
        row = (
            f"{names[method]:13s} {r['steps']:5d} {r['steps'] / wall * 60:9.2f} "
            f"{_fmt(r['samples'] / wall if online else None, '9.3f')} "
            f"{_fmt(r['tokens'] / r['generate'] if online else None, '9.1f')} "
            f"{_fmt(r['tokens'] / wall if online else None, '10.1f')} "
            f"{_fmt(r['generate'] / wall if online else None, '9.0%')} "
            f"{_fmt(r['tokens'] / r['samples'] if online else None, '8.1f')} {wall:7.1f} "
            f"{r['peak_rss']:12.0f} {r['peak_rss'] - r['start_rss']:7.0f}"
        )
        if gpu:
            row += f" {_fmt(r.get('gpu_peak'), '8.0f')}"
        print(row)
    print(
        "steps: rollout steps (DPO: optimizer steps); + MiB: peak RSS over the process's RSS "
        "after imports, before loading the model"
    )
    for method, r in results.items():
        notes = []
        if "loading" in r:
            notes.append(
                f"loading excluded {r['loading']:.1f} s (base weights loaded {r['base_loads']}x)"
            )
        if "optimizer_steps" in r:
            notes.append(f"optimizer steps {r['optimizer_steps']}")
        if "same_prompt_tokens" in r:
            notes.append(f"prompt tokens identical to prefloop's: {r['same_prompt_tokens']}")
        if r.get("settings"):
            notes.append(", ".join(f"{k} {v}" for k, v in r["settings"].items()))
        print(f"  {names[method]}: {'; '.join(notes)}")
    print()
    if "grpo" in results and "trl" in results:
        g, t = results["grpo"], results["trl"]
        ratio = (g["samples"] / g["wall"]) / (t["samples"] / t["wall"])
        tok = (g["tokens"] / g["wall"]) / (t["tokens"] / t["wall"])
        print(
            f"prefloop GRPO / TRL GRPO samples/s: {ratio:.2f}x (goal >= 2; by generated tokens "
            f"per wall second: {tok:.2f}x)"
        )
    if "ppo" in results and "dpo" in results:
        p, d = results["ppo"], results["dpo"]
        ratio = p["peak_rss"] / d["peak_rss"]
        over = (p["peak_rss"] - p["start_rss"]) / (d["peak_rss"] - d["start_rss"])
        line = f"prefloop PPO / DPO peak RSS: {ratio:.2f}x (goal <= 1.3; over start: {over:.2f}x)"
        if "gpu_peak" in p and "gpu_peak" in d:
            line += f"; GPU peak allocated {p['gpu_peak'] / d['gpu_peak']:.2f}x"
        print(line)


def parent(args, argv: list[str]) -> int:
    """Run each method in its own subprocess and print the table."""
    results: dict[str, dict] = {}
    for method in args.methods:
        print(f"running {method} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *argv, "--only", method],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            print(proc.stdout, end="")
            print(f"error: the {method} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[method] = json.loads(lines[-1][len(RESULT_PREFIX) :])
        print(f"  {method} done in {time.perf_counter() - t0:.0f} s (process)", flush=True)
    print()
    table(results, args)
    return 0


def main() -> int:
    """Parse the options; run every method (one subprocess each) or, with --only, one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="N train prompts")
    parser.add_argument("--steps", type=int, default=4, help="rollout steps per online method")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--prompts-per-step", type=int, default=None, help="prompts per rollout step (4, at most N)"
    )
    parser.add_argument(
        "--groups-per-step",
        type=int,
        default=None,
        help="prompts per optimizer step (default: all of a rollout step's)",
    )
    parser.add_argument("--lr", type=float, default=None, help="GRPO's (both); default prefloop's")
    parser.add_argument("--beta", type=float, default=None, help="GRPO's β; default prefloop's")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS)}",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every method (default: $PREFLOOP_THREADS, else cores - 1)",
    )
    parser.add_argument("--model", default=None, help="model folder (default: prefloop's default)")
    parser.add_argument("--only", choices=METHODS, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)

    from tuning.config import GRPOConfig

    defaults = GRPOConfig()
    args.lr = defaults.lr if args.lr is None else args.lr
    args.beta = defaults.beta if args.beta is None else args.beta
    args.prompts_per_step = args.prompts_per_step or min(4, args.prompts)
    args.groups_per_step = args.groups_per_step or args.prompts_per_step
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    wrong = [m for m in args.methods if m not in METHODS]
    per_epoch = args.prompts // args.prompts_per_step if args.prompts_per_step else 0
    problems = [
        (wrong, f"unknown method(s) {', '.join(wrong)}; use {', '.join(METHODS)}"),
        (args.k < 2, "--k must be at least 2 (GRPO compares a prompt's samples)"),
        (min(args.prompts, args.steps, args.max_new_tokens) < 1, "sizes must be at least 1"),
        (
            args.prompts_per_step < 1 or args.prompts % args.prompts_per_step,
            "--prompts must be a multiple of --prompts-per-step",
        ),
        (
            args.groups_per_step < 1 or args.prompts_per_step % args.groups_per_step,
            "--prompts-per-step must be a multiple of --groups-per-step",
        ),
        (
            per_epoch and args.steps % per_epoch,
            f"--steps must be a multiple of {per_epoch} (prompts / prompts per step: whole "
            "passes over the prompts)",
        ),
    ]
    for bad, message in problems:
        if bad:
            parser.error(message)

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads is None:
        wanted = os.environ.get("PREFLOOP_THREADS")
        args.threads = int(wanted) if wanted else max(1, (os.cpu_count() or 2) - 1)
    os.environ["PREFLOOP_THREADS"] = str(args.threads)  # prefloop's limit_threads() reads it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from tuning.models_cache import ensure_default_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 1
    model_dir = str(args.model or ensure_default_model())
    if args.only:
        return child(args, model_dir, device)

    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    print(
        f"device: {device}{gpu}, torch threads: {args.threads}, float32, torch {torch.__version__}"
    )
    print(
        f"prompts N={args.prompts}, K={args.k}, max new tokens {args.max_new_tokens}, temperature "
        f"1.0, {args.steps} rollout steps of {args.prompts_per_step} prompts "
        f"({args.prompts_per_step * args.k} samples), {args.groups_per_step} prompts per "
        f"optimizer step; LoRA r=16 alpha=32 q/k/v/o_proj; GRPO lr {args.lr}, beta {args.beta}"
    )
    print("timing excludes loading weights/tokenizer for every method; one subprocess each")
    return parent(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
