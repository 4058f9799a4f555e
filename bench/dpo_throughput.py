"""DPO throughput: prefloop's group-wise DPO against TRL's pairwise DPOTrainer, side by side.

Both train the same LoRA adapter (r=16, alpha=32, dropout 0, q/k/v/o_proj) on the same
base model, for one epoch over the same preference data, with the same learning rate, beta,
max length and (as far as the two allow) pairs per optimizer step:

- prefloop gets G synthetic groups of K ranked candidates (`tuning.dpo.train_dpo`,
  groups_per_step groups per step);
- TRL gets the same groups expanded to all C(K,2) ordered pairs per group, as pre-rendered
  `prompt` / `chosen` / `rejected` strings (the prompt is the chat-templated text prefloop
  tokenises, so both see exactly the same tokens; the bench checks this).

Timing: from the start of each method's work to its end, *excluding* loading the model weights
and tokenizer from disk for both. prefloop's wall time covers tokenising the groups, wrapping
the model with a new LoRA adapter, its reference log-prob pass, the training steps, its final
evaluation pass over all pairs and saving the adapter (everything `train_dpo` does besides
loading). TRL's covers `DPOTrainer(...)` (tokenising the pairs, wrapping with LoRA) and
`trainer.train()` (reference log-probs on the fly with the adapter disabled, TRL's default).
Process CPU seconds are printed too: on a shared machine they are steadier than wall time.

Fairness: both run in the same precision (`--dtype float32`, the default, or `--dtype bfloat16`:
the base weights in bf16, TRL also with bf16=True) with the same torch thread count (default:
one core left free, as prefloop's jobs beside the web app). TRL's gradient checkpointing (on by
default in TRL) is turned off, as prefloop does not use it (`--trl-gradient-checkpointing` turns
it back on). TRL gets its fastest batching for the device by default: micro-batches of one pair
with gradient accumulation on a CPU (no padding across pairs), a whole step per batch on a GPU;
`--trl-batch/--trl-accum` override. The bench checks that TRL's tokenised pairs are exactly
prefloop's token ids, and evaluates the TRL-trained adapter with prefloop's end-of-run loss
(untimed) as a sanity check.

Run:  .venv/bin/python bench/dpo_throughput.py --groups 16 --k 4 --max-length 512 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from store.records import TrainingGroup  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Real-ish instructions, each about 20-35 tokens.
PROMPTS = [
    "Explain how a refrigerator keeps food cold, and why the coils on the back of it feel warm "
    "when it has been running for a while.",
    "I have a job interview for a junior data analyst position next week. What should I prepare, "
    "and which questions are they likely to ask me?",
    "Write a short, friendly email to my neighbour asking them to water my plants while I am away "
    "on holiday for two weeks in August.",
    "What is the difference between a list and a tuple in Python, and when should I prefer one "
    "over the other in everyday code?",
    "Summarise the main causes of the French Revolution for a high-school student who has never "
    "studied European history before.",
    "My sourdough bread comes out dense and flat every time. What am I probably doing wrong, and "
    "how can I fix it at home?",
    "Give me three ideas for a weekend trip within two hours of a large city, for a family with "
    "two young children and a dog.",
    "How do vaccines train the immune system? Please explain it simply, without assuming any "
    "background in biology or medicine.",
    "Compare renting and buying a home in a few sentences, covering the costs, the flexibility "
    "and the risks of each option.",
    "Translate the idea of compound interest into a simple example with numbers that a "
    "twelve-year-old could follow and check by hand.",
    "What are good habits for writing readable code in a team, especially when several people "
    "review each other's changes every day?",
    "Describe the water cycle in the order the steps happen, and say where the energy that "
    "drives it comes from in the first place.",
    "Suggest a simple weekly exercise plan for someone who sits at a desk all day and has about "
    "thirty minutes free each evening.",
    "Why does the moon show phases? Explain what we see from Earth over one month and why it "
    "changes from night to night.",
    "Help me plan a vegetarian dinner for six guests, including a starter, a main course and a "
    "dessert that can be prepared in advance.",
    "What should I check before buying a used car from a private seller, and which documents "
    "should I ask them to show me?",
]

# Sentences completions are built from: plain, explanatory prose of mixed length.
SENTENCES = [
    "The key idea is simpler than it first appears.",
    "Start with the basics and build up from there, one step at a time.",
    "In practice, most people find that a little preparation goes a long way.",
    "It helps to think about what happens before, during and after each step.",
    "A common mistake is to rush this part, which usually makes things harder later on.",
    "For example, you could set aside ten minutes each day and keep short notes.",
    "This works because small, regular changes add up over weeks and months.",
    "If something goes wrong, go back one step and check what changed.",
    "There are a few trade-offs worth keeping in mind.",
    "On the one hand, it saves time; on the other, it costs a bit more at the start.",
    "Most experts recommend keeping it simple until you know what you actually need.",
    "Make a short list of the things that matter most to you and rank them.",
    "You do not need special equipment, although a notebook and a timer are useful.",
    "The energy has to come from somewhere, and here it comes from the surroundings.",
    "Think of it like a pump that moves heat from one place to another.",
    "Another way to see it is to follow a single example from beginning to end.",
    "Ask questions early, because it is much cheaper to fix a misunderstanding then.",
    "Keep a record of what you tried, so you can compare the results fairly.",
    "When in doubt, choose the option that is easier to undo.",
    "Finally, remember that everyone learns at a different pace, and that is fine.",
    "It is worth checking the details twice, especially the dates and the numbers.",
    "A friendly, specific message is more likely to get a quick and positive answer.",
    "Temperature, time and patience are the three things that matter most here.",
    "The result depends on the conditions, so a little experimentation is normal.",
    "Write down the total cost, including the small items that are easy to forget.",
    "Over time, the difference becomes large enough to notice without measuring.",
    "Good habits are easier to keep when they are attached to something you already do.",
    "The short answer is yes, but with a few important exceptions.",
    "Let me walk you through it with a concrete example.",
    "Here is a simple plan you can adapt to your own situation.",
]


def synthetic_rows(tokenizer, groups: int, k: int, seed: int = 0) -> list[TrainingGroup]:
    """Deterministic ranked groups: real-ish prompts, K completions of 40-120 tokens each."""
    import random

    rng = random.Random(seed)
    rows = []
    for g in range(groups):
        prompt = PROMPTS[g % len(PROMPTS)]
        if g >= len(PROMPTS):
            prompt = f"{prompt} (Variant {g // len(PROMPTS) + 1}.)"
        texts = []
        for _ in range(k):
            target = rng.randint(40, 120)
            words: list[str] = []
            while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
                words.extend(rng.choice(SENTENCES).split())
            while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > target:
                words.pop()
            texts.append(" ".join(words))
        order = list(range(k))
        rng.shuffle(order)
        rows.append(TrainingGroup(prompt, texts, [[i] for i in order]))
    return rows


def pair_rows(tokenizer, rows: list[TrainingGroup]) -> list[dict]:
    """The same data as TRL pairs: every ordered pair of each ranking, chat-templated prompt."""
    from labeling.ranking import ordered_pairs

    pairs = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], add_generation_prompt=True, tokenize=False
        )
        for a, b in ordered_pairs(row.ranking):
            pairs.append({"prompt": prompt, "chosen": row.texts[a], "rejected": row.texts[b]})
    return pairs


class Timer:
    """Accumulates the seconds spent inside wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, name: str, fn):
        """fn, timed (wall and process CPU seconds) under name."""

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

        return timed


def run_prefloop(model_dir: str, rows: list[TrainingGroup], args, workdir: Path) -> dict:
    """Train with prefloop's train_dpo; wall time excludes loading weights and tokenizer."""
    import torch

    import tuning.dpo as dpo
    from tuning.config import DPOConfig, LoraSettings

    cfg = DPOConfig(
        beta=args.beta,
        loss_type="sigmoid",  # TRL's default DPO loss
        epochs=1,
        lr=args.lr,
        max_length=args.max_length,
        groups_per_step=args.groups_per_step,
        seed=0,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=list(LORA_TARGETS)),
        dtype=args.dtype,
    )
    timer = Timer()
    saved = {
        name: getattr(dpo, name)
        for name in ("load_version", "load_tokenizer", "reference_logps", "evaluate_groups")
    }
    for name, fn in saved.items():
        setattr(dpo, name, timer.wrap(name, fn))
    losses: list[float] = []
    try:
        out = workdir / f"prefloop-adapter-{time.time_ns()}"
        t0, c0 = time.perf_counter(), time.process_time()
        final = dpo.train_dpo(
            model_dir,
            rows,
            cfg,
            out,
            on_step=lambda _s, m: losses.append(m["loss"]) if "loss" in m else None,
            show_progress=False,
        ).metrics
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for name, fn in saved.items():
            setattr(dpo, name, fn)
    loading = timer.seconds.get("load_version", 0.0) + timer.seconds.get("load_tokenizer", 0.0)
    ref = timer.seconds.get("reference_logps", 0.0)
    final_eval = timer.seconds.get("evaluate_groups", 0.0)
    return {
        "wall": total - loading,
        "cpu": cpu - timer.cpu.get("load_version", 0.0) - timer.cpu.get("load_tokenizer", 0.0),
        "loading": loading,
        "phases": {
            "reference pass": ref,
            "final eval pass": final_eval,
            "rest (tokenise, LoRA wrap, train steps, save)": total - loading - ref - final_eval,
        },
        "steps": len(losses),
        "mean_train_loss": sum(losses) / len(losses),
        "final_loss": final["loss"],
        "final_acc": final["rewards/accuracies"],
    }


def run_trl(model_dir: str, rows: list[TrainingGroup], args, workdir: Path, device: str) -> dict:
    """Train with TRL's DPOTrainer on the expanded pairs; wall time excludes loading the model."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tuning.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    dataset = Dataset.from_list(pair_rows(tokenizer, rows))
    n_pairs = len(dataset)
    config = DPOConfig(
        output_dir=str(workdir / f"trl-{time.time_ns()}"),
        num_train_epochs=1,
        per_device_train_batch_size=args.trl_batch,
        gradient_accumulation_steps=args.trl_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # prefloop: warmup max(1, 10% of 4 steps) = 1 step
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        max_length=args.max_length,
        seed=0,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=args.trl_gradient_checkpointing,
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
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    t1 = time.perf_counter()
    result = trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "wall": t2 - t0,
        "cpu": c2 - c0,
        "phases": {"DPOTrainer(...) (tokenise, LoRA wrap)": t1 - t0, "trainer.train()": t2 - t1},
        "steps": trainer.state.global_step,
        "n_pairs": n_pairs,
        "mean_train_loss": result.training_loss,
        "trainer": trainer,
        "tokenizer": tokenizer,
    }


def check_same_tokens(trainer, tokenizer, rows: list[TrainingGroup], max_length: int) -> bool:
    """Whether TRL's tokenised pairs are exactly prefloop's prompt + completion token ids."""
    from tuning.batching import truncate
    from tuning.dpo import build_groups

    expected = []
    for g in build_groups(rows, tokenizer, max_length):
        t = truncate(g.tokens, max_length)
        for a, b in g.pairs:
            expected.append((t.prompt, t.completions[a], t.completions[b]))
    got = [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in trainer.train_dataset]
    return sorted(map(repr, expected)) == sorted(map(repr, got))


def final_loss_of(model, tokenizer, rows: list[TrainingGroup], args) -> tuple[float, float]:
    """prefloop's end-of-run loss and accuracy over all pairs, for any PEFT model (untimed)."""
    from tuning.config import DPOConfig
    from tuning.dpo import build_groups, evaluate_groups, reference_logps

    cfg = DPOConfig(
        beta=args.beta, max_length=args.max_length, groups_per_step=args.groups_per_step
    )
    groups = build_groups(rows, tokenizer, cfg.max_length)
    reference_logps(model, groups, tokenizer.pad_token_id, cfg, None, "")
    metrics = evaluate_groups(model, groups, tokenizer.pad_token_id, cfg)
    return metrics["loss"], metrics["rewards/accuracies"]


def main() -> int:
    """Run both trainers and print pairs/s, their ratio, wall times and final losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; best is reported")
    parser.add_argument("--groups-per-step", type=int, default=4)
    parser.add_argument(
        "--trl-batch",
        type=int,
        default=None,
        help="TRL pairs per micro-batch (default: its fastest here: 1 on a CPU, where padding "
        "across pairs costs most; the pairs of a whole step on a GPU)",
    )
    parser.add_argument(
        "--trl-accum", type=int, default=None, help="default: pairs per step / --trl-batch"
    )
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="keep TRL's default gradient checkpointing (off by default: prefloop does not use it)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the base weights of both (TRL: the model's dtype and bf16=True); LoRA stays float32",
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads for both (default: one core left free, as prefloop's jobs beside the "
        "web app)",
    )
    parser.add_argument("--model", default=None, help="model folder (default: prefloop's default)")
    parser.add_argument("--only", choices=["prefloop", "trl"], default=None)
    args = parser.parse_args()

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PREFLOOP_THREADS"] = str(args.threads)  # train_dpo's limit_threads() reads it

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from labeling.ranking import ordered_pairs
    from tuning.modeling import load_tokenizer
    from tuning.models_cache import ensure_default_model

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 1
    model_dir = str(args.model or ensure_default_model())
    tokenizer = load_tokenizer(model_dir)
    rows = synthetic_rows(tokenizer, args.groups, args.k)
    n_pairs = sum(len(ordered_pairs(r.ranking)) for r in rows)
    pairs_per_step = n_pairs // args.groups * args.groups_per_step
    if args.trl_batch is None:
        args.trl_batch = 1 if device == "cpu" else pairs_per_step // (args.trl_accum or 1)
    if args.trl_accum is None:
        args.trl_accum = max(1, pairs_per_step // args.trl_batch)
    c_lens = [
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for r in rows for t in r.texts
    ]
    p_lens = [
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r.prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for r in rows
    ]
    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    print(
        f"device: {device}{gpu}, torch threads: {args.threads}, {args.dtype}, "
        f"torch {torch.__version__}"
    )
    print(
        f"data: {args.groups} groups x K={args.k} -> {n_pairs} ordered pairs; prompt tokens "
        f"{min(p_lens)}-{max(p_lens)} (mean {statistics.mean(p_lens):.0f}), completion tokens "
        f"{min(c_lens)}-{max(c_lens)} (mean {statistics.mean(c_lens):.0f}); max length "
        f"{args.max_length}"
    )
    print(
        f"steps: prefloop {args.groups_per_step} groups = {pairs_per_step} pairs/step; TRL batch "
        f"{args.trl_batch} x accumulation {args.trl_accum} = {args.trl_batch * args.trl_accum} "
        f"pairs/step; gradient checkpointing in TRL: {args.trl_gradient_checkpointing}"
    )
    print("timing excludes loading weights/tokenizer for both", flush=True)

    results: dict[str, list[dict]] = {"prefloop": [], "trl": []}
    methods = [m for m in ("prefloop", "trl") if args.only in (None, m)]
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as tmp:
        work = Path(tmp)
        for r in range(args.repeat):
            for method in methods:
                if method == "prefloop":
                    res = run_prefloop(model_dir, rows, args, work)
                else:
                    res = run_trl(model_dir, rows, args, work, device)
                    trainer, tok = res.pop("trainer"), res.pop("tokenizer")
                    if r == 0:
                        res["same_tokens"] = check_same_tokens(trainer, tok, rows, args.max_length)
                        res["final_loss"], res["final_acc"] = final_loss_of(
                            trainer.accelerator.unwrap_model(trainer.model), tok, rows, args
                        )
                    del trainer
                res["pairs_per_s"] = n_pairs / res["wall"]
                results[method].append(res)
                print(
                    f"  run {r + 1} {method}: {res['wall']:.1f} s, "
                    f"{res['pairs_per_s']:.3f} pairs/s (process CPU {res['cpu']:.1f} s)",
                    flush=True,
                )

    print()
    best = {m: min(rs, key=lambda x: x["wall"]) for m, rs in results.items() if rs}
    for method, res in best.items():
        walls = ", ".join(f"{x['wall']:.1f}" for x in results[method])
        phases = "; ".join(f"{k} {v:.1f} s" for k, v in res["phases"].items())
        print(
            f"{method:9s} {res['pairs_per_s']:.3f} pairs/s   wall {res['wall']:.1f} s "
            f"(runs: {walls}; process CPU {res['cpu']:.1f} s)  steps {res['steps']}"
        )
        print(f"          phases: {phases}")
        extra = f"  [loading excluded: {res['loading']:.1f} s]" if "loading" in res else ""
        print(
            f"          mean train loss {res['mean_train_loss']:.4f}; final loss over all "
            f"{n_pairs} pairs {results[method][0]['final_loss']:.4f} "
            f"(acc {results[method][0]['final_acc']:.2f}){extra}"
        )
        if "same_tokens" in results[method][0]:
            same = results[method][0]["same_tokens"]
            print(f"          TRL tokens identical to prefloop's: {same}")
    if len(best) == 2:
        ratio = best["prefloop"]["pairs_per_s"] / best["trl"]["pairs_per_s"]
        cpu_ratio = best["trl"]["cpu"] / best["prefloop"]["cpu"]
        print(f"\nratio prefloop/TRL: {ratio:.2f}x pairs/s (by process CPU time: {cpu_ratio:.2f}x)")
        pf = best["prefloop"]
        train_only = pf["wall"] - pf["phases"]["final eval pass"]
        print(
            f"without prefloop's end-of-run evaluation pass (work TRL is not asked to do): "
            f"{n_pairs / train_only:.3f} pairs/s, "
            f"{best['trl']['wall'] / train_only:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
