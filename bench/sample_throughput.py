"""Sampling throughput: prefloop's hf engine against `transformers.generate`, side by side.

Both sample the same chat-templated prompts (the demo prompts, repeated as needed), K
completions each, in batches of the same number of prompts, with the same temperature, top-p and
token limit, from the same model in the same precision and thread count, and both return each
sampled token's log-probability at temperature 1 (what GRPO, PPO and the stored rounds need):

- `generate`: `model.generate` on every prompt repeated K times with `output_logits=True`,
  log-probabilities gathered from the raw logits afterwards (prefloop's engine before it had its
  own loop, and what a script around transformers does);
- `hf`: `tuning.generation.HFGenerator`, prefloop's engine (each prompt prefilled once for its K
  samples, last-position logits only, log-probabilities gathered as tokens are drawn, finished
  rows leave the batch and its cache).

Figures: generated tokens per second (stop tokens counted, padding not), completions per second,
mean completion length, and the ratio hf / generate measured in the same run. With `--dtype
float32,bfloat16` both engines run in each precision (interleaved) and the run also prints hf
bf16 / hf float32: what `prefloop sample --dtype auto` gains on a CPU with native bf16 units.
Loading the model is not timed. The engines draw different random numbers, so their completions
differ; the greedy-equality check is in tests/test_sampling.py.

Run:  .venv/bin/python bench/sample_throughput.py --prompts 32 --k 4 --max-new-tokens 80
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENGINES = ("generate", "hf")


def demo_prompts(n: int) -> list[str]:
    """n prompts from the demo set, cycled when n is larger."""
    lines = (ROOT / "labeling" / "data" / "demo_prompts.jsonl").read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    return [texts[i % len(texts)] for i in range(n)]


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
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=None,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad,
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
        lengths = []
        for row in new.tolist():
            stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
            lengths.append(len(row) if stop is None else stop + 1)
        return lengths, logps

    return run


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32, help="prompts sampled")
    ap.add_argument("--k", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch (prefloop's default)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine (the best is kept)")
    ap.add_argument(
        "--dtype",
        default="float32",
        help="float32, bfloat16, or both comma-separated (each engine runs in each)",
    )
    ap.add_argument("--model", default=None, help="model folder (default: prefloop's default)")
    args = ap.parse_args()

    import torch

    from tuning.generation import HFGenerator
    from tuning.modeling import limit_threads, load_base, load_tokenizer, prompt_ids
    from tuning.models_cache import ensure_default_model

    dtypes = args.dtype.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        ap.error("--dtype: float32, bfloat16 or float32,bfloat16")
    limit_threads()
    model_dir = str(args.model or ensure_default_model())
    tokenizer = load_tokenizer(model_dir)
    prompts = [prompt_ids(tokenizer, t, None) for t in demo_prompts(args.prompts)]
    engines = {}
    for dtype in dtypes:
        ours = HFGenerator(load_base(model_dir, dtype=dtype), tokenizer)
        engines[("generate", dtype)] = generate_engine(ours.model, tokenizer, ours.stop_ids)
        engines[("hf", dtype)] = ours
        measure(ours, prompts[: args.batch][:2], args)  # warm-up, untimed
    print(
        f"{args.prompts} prompts x K={args.k}, <= {args.max_new_tokens} new tokens, "
        f"{args.batch} prompts per batch, T={args.temperature} top-p={args.top_p}, "
        f"{args.dtype}, {torch.get_num_threads()} threads, model {model_dir}"
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
        ratio = (
            results[("hf", dtype)]["tokens_per_s"] / results[("generate", dtype)]["tokens_per_s"]
        )
        print(f"hf / generate tokens per second ({dtype}): {ratio:.2f}x")
    if len(dtypes) == 2:
        ratio = (
            results[("hf", "bfloat16")]["tokens_per_s"] / results[("hf", "float32")]["tokens_per_s"]
        )
        print(f"hf bfloat16 / hf float32 tokens per second: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
