"""Sampling throughput: prefloop's hf engine against `transformers.generate`, side by side.

All engines sample the same chat-templated prompts (the demo prompts, repeated as needed), K
completions each, with the same temperature, top-p and token limit (by default those of
`prefloop sample`: K=4, 128 new tokens, T=0.8, top-p 0.95), from the same model in the same
precision and thread count:

- `plain`: a plain `transformers.generate` loop, one prompt at a time with
  `num_return_sequences=K` and nothing kept but the tokens (what a first script does);
- `generate`: `model.generate` on every prompt repeated K times with `output_logits=True`,
  log-probabilities gathered from the raw logits afterwards (prefloop's engine before it had its
  own loop, and what a script around transformers does);
- `hf`: `tuning.generation.HFGenerator`, prefloop's engine (each prompt prefilled once for its K
  samples, last-position logits only, log-probabilities gathered as tokens are drawn, finished
  rows leave the batch and its cache).

`generate` and `hf` work in batches of `--batch` prompts and return each sampled token's
log-probability at temperature 1 (what GRPO, PPO and the stored rounds need).

Figures: generated tokens per second (stop tokens counted, padding not), completions per second,
mean completion length, the ratios hf / plain and hf / generate measured in the same run, and
hf's share of the machine's compute limit for decoding: 2·N FLOPs per generated token (N the
model's parameters) at the matmul peak measured in the same run and precision (prefill and
attention not counted, so the share is an upper bound on what decoding could reach). With `--dtype
float32,bfloat16` both engines run in each precision (interleaved) and the run also prints hf
bf16 / hf float32: what `prefloop sample --dtype auto` gains on a CPU with native bf16 units.
Loading the model is not timed. The engines draw different random numbers, so their completions
differ; the greedy-equality check is in tests/test_sampling.py.

Run:  .venv/bin/python bench/sample_throughput.py            (prefloop sample's defaults)
      .venv/bin/python bench/sample_throughput.py --dtype float32,bfloat16 --engines hf,generate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENGINES = ("plain", "generate", "hf")


def demo_prompts(n: int) -> list[str]:
    """n prompts from the demo set, cycled when n is larger."""
    lines = (ROOT / "labeling" / "data" / "demo_prompts.jsonl").read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    return [texts[i % len(texts)] for i in range(n)]


def sampling_kwargs(temperature, top_p, max_new_tokens, stop_ids, pad) -> dict:
    """`model.generate`'s arguments for nucleus sampling with prefloop's stop tokens."""
    return dict(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad,
    )


def stop_lengths(rows: list[list[int]], stop_ids: list[int]) -> list[int]:
    """Each generated row's length up to and including its first stop token."""
    lengths = []
    for row in rows:
        stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
        lengths.append(len(row) if stop is None else stop + 1)
    return lengths


def generate_engine(model, tokenizer, stop_ids: list[int]):
    """The baseline: `model.generate` with raw logits kept, log-probs gathered afterwards."""
    import torch
    import torch.nn.functional as F

    @torch.no_grad()
    def run(prompts: list[list[int]], k: int, *, max_new_tokens, temperature, top_p, seed):
        pad = tokenizer.pad_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.repeat_interleave(k, 0).to(model.device),
            attention_mask=mask.repeat_interleave(k, 0).to(model.device),
            **sampling_kwargs(temperature, top_p, max_new_tokens, stop_ids, pad),
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, width:]
        logps = torch.stack(
            [
                F.log_softmax(s.float(), -1).gather(-1, new[:, t, None]).squeeze(-1)
                for t, s in enumerate(out.logits)
            ],
            1,
        )
        return stop_lengths(new.tolist(), stop_ids), logps

    return run


def plain_engine(model, tokenizer, stop_ids: list[int]):
    """The plain loop: `model.generate` on one prompt at a time, K return sequences, tokens only."""
    import torch

    @torch.no_grad()
    def run(prompts: list[list[int]], k: int, *, max_new_tokens, temperature, top_p, seed):
        lengths = []
        for i, p in enumerate(prompts):
            torch.manual_seed(seed + i)
            out = model.generate(
                input_ids=torch.tensor([p], device=model.device),
                attention_mask=torch.ones((1, len(p)), dtype=torch.long, device=model.device),
                num_return_sequences=k,
                **sampling_kwargs(
                    temperature, top_p, max_new_tokens, stop_ids, tokenizer.pad_token_id
                ),
            )
            lengths += stop_lengths(out[:, len(p) :].tolist(), stop_ids)
        return lengths, None

    return run


def matmul_peak(dtype: str, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul in this precision at the current thread count, best of a few."""
    import torch

    a = torch.randn(size, size).to(getattr(torch, dtype))
    b = torch.randn(size, size).to(getattr(torch, dtype))
    a @ b  # warm-up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def measure(engine, prompts: list[list[int]], args) -> dict:
    """Wall time, generated tokens and completions of one engine over every batch."""
    from tuning.generation import HFGenerator

    tokens = completions = 0
    start = time.perf_counter()
    for b in range(0, len(prompts), args.batch):
        batch = prompts[b : b + args.batch]
        kw = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed + b,
        )
        if isinstance(engine, HFGenerator):
            lengths = [s.n_tokens for g in engine.generate(batch, args.k, **kw) for s in g]
        else:
            lengths, _ = engine(batch, args.k, **kw)
        tokens += sum(lengths)
        completions += len(lengths)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "completions_per_s": completions / wall,
        "mean_length": tokens / completions,
    }


def main() -> int:
    from tuning.config import SamplingConfig

    d = SamplingConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32, help="prompts sampled")
    ap.add_argument("--k", type=int, default=d.k, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument(
        "--batch", type=int, default=d.prompts_per_batch, help="prompts per batch (generate, hf)"
    )
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine (the best is kept)")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16, both comma-separated (each engine runs in each), or auto: what "
        "`prefloop sample` loads on this machine",
    )
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads (default: every core, what a CLI job gets with no web app running)",
    )
    ap.add_argument("--model", default=None, help="model folder (default: prefloop's default)")
    args = ap.parse_args()

    import torch

    from tuning.generation import HFGenerator
    from tuning.modeling import decoding_dtype, dtype_name, load_base, load_tokenizer, prompt_ids
    from tuning.models_cache import ensure_default_model

    dtypes = [dtype_name(decoding_dtype(x)) if x == "auto" else x for x in args.dtype.split(",")]
    if not set(dtypes) <= {"float32", "bfloat16"}:
        ap.error("--dtype: auto, float32, bfloat16 or float32,bfloat16")
    names = args.engines.split(",")
    if not set(names) <= set(ENGINES) or "hf" not in names:
        ap.error(f"--engines: hf and any of {', '.join(ENGINES)}")
    torch.set_num_threads(args.threads)
    model_dir = str(args.model or ensure_default_model())
    tokenizer = load_tokenizer(model_dir)
    prompts = [prompt_ids(tokenizer, t, None) for t in demo_prompts(args.prompts)]
    engines, n_params = {}, 0
    for dtype in dtypes:
        ours = HFGenerator(load_base(model_dir, dtype=dtype), tokenizer)
        n_params = sum(p.numel() for p in ours.model.parameters())
        makers = {"plain": plain_engine, "generate": generate_engine}
        for name in names:
            engines[(name, dtype)] = (
                ours if name == "hf" else makers[name](ours.model, tokenizer, ours.stop_ids)
            )
        measure(ours, prompts[: args.batch][:2], args)  # warm-up, untimed
    print(
        f"{args.prompts} prompts x K={args.k}, <= {args.max_new_tokens} new tokens, "
        f"{args.batch} prompts per batch, T={args.temperature} top-p={args.top_p}, "
        f"{','.join(dtypes)}, {torch.get_num_threads()} threads, model {model_dir} "
        f"({n_params / 1e6:.1f}M parameters)"
    )
    results: dict[tuple[str, str], dict] = {}
    for _ in range(args.repeat):
        for key, engine in engines.items():  # interleaved: a slower moment hits every engine
            r = measure(engine, prompts, args)
            if key not in results or r["wall_s"] < results[key]["wall_s"]:
                results[key] = r
    print(
        f"{'engine':<10} {'dtype':<9} {'wall s':>8} {'tokens/s':>9} {'completions/s':>14} "
        f"{'mean len':>9}"
    )
    for (name, dtype), r in results.items():
        print(
            f"{name:<10} {dtype:<9} {r['wall_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
            f"{r['completions_per_s']:>14.2f} {r['mean_length']:>9.1f}"
        )
    for dtype in dtypes:
        hf = results[("hf", dtype)]["tokens_per_s"]
        for name in names:
            if name != "hf":
                ratio = hf / results[(name, dtype)]["tokens_per_s"]
                print(f"hf / {name} tokens per second ({dtype}): {ratio:.2f}x")
        peak = matmul_peak(dtype)
        limit = peak / (2 * n_params)
        print(
            f"compute limit ({dtype}): matmul peak {peak / 1e9:.0f} GFLOP/s -> "
            f"{limit:.0f} tokens/s; hf reaches {hf / limit:.0%} of it"
        )
    if len(dtypes) == 2:
        ratio = (
            results[("hf", "bfloat16")]["tokens_per_s"] / results[("hf", "float32")]["tokens_per_s"]
        )
        print(f"hf bfloat16 / hf float32 tokens per second: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
