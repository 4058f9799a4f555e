"""Packed batches score every candidate exactly as its own prompt + completion sequence would."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tuning.batching import GroupTokens, collate, sequence_logps, truncate


def _straight_logps(model, group: GroupTokens) -> torch.Tensor:
    """Each candidate alone: one unpadded prompt + completion forward, full logits."""
    out = []
    for c in group.completions:
        ids = torch.tensor([group.prompt + c])
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        logps = F.log_softmax(logits[len(group.prompt) - 1 : -1], dim=-1)
        out.append(logps.gather(-1, torch.tensor(c)[:, None]).sum())
    return torch.stack(out)


def _groups(vocab: int, seed: int, shapes: list[tuple[int, list[int]]]) -> list[GroupTokens]:
    rng = random.Random(seed)
    return [
        GroupTokens(
            [rng.randrange(3, vocab) for _ in range(p)],
            [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths],
        )
        for p, lengths in shapes
    ]


SHAPES = [(7, [5, 12, 1, 9]), (3, [20, 4]), (15, [8, 8, 8]), (1, [6])]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    with torch.no_grad():  # a non-zero adapter, so that prompt gradients matter
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft


def _check(model, groups: list[GroupTokens], pad_id: int, max_length: int, atol: float) -> None:
    batch = collate(groups, pad_id, max_length)
    assert batch.n_candidates == sum(len(g.completions) for g in groups)
    params = [p for p in model.parameters() if p.requires_grad]

    packed = sequence_logps(model, batch)
    packed_grads = torch.autograd.grad(packed.sum(), params)
    straight = torch.cat([_straight_logps(model, truncate(g, max_length)) for g in groups])
    straight_grads = torch.autograd.grad(straight.sum(), params)

    torch.testing.assert_close(packed, straight, atol=atol, rtol=1e-5)
    for a, b in zip(packed_grads, straight_grads, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-3)
    at = 0
    for g, offset in zip(groups, batch.group_offsets, strict=True):
        assert offset == at
        at += len(g.completions)


def test_packed_logps_and_grads_equal_straight_tiny(tiny_model_dir: Path) -> None:
    from tuning.modeling import load_base, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora(load_base(str(tiny_model_dir)))
    groups = _groups(len(tok), 0, SHAPES)
    _check(model, groups, tok.pad_token_id, 512, atol=1e-4)


def test_rows_split_when_a_group_is_long(tiny_model_dir: Path, monkeypatch) -> None:
    import tuning.batching as batching
    from tuning.modeling import load_base, load_tokenizer

    monkeypatch.setattr(batching, "ROW_TOKENS", 16)
    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora(load_base(str(tiny_model_dir)))
    groups = _groups(len(tok), 1, SHAPES)
    batch = collate(groups, tok.pad_token_id, 16)
    assert batch.input_ids.shape[0] > len(groups)  # some groups needed several rows
    assert batch.input_ids.shape[1] <= 16
    _check(model, groups, tok.pad_token_id, 16, atol=1e-4)


def test_separately_padded_runs_give_the_same_numbers(tiny_model_dir: Path, monkeypatch) -> None:
    import tuning.batching as batching
    from tuning.modeling import load_base, load_tokenizer

    monkeypatch.setattr(batching, "RUN_OVERHEAD_TOKENS", {"cpu": 0.0})  # a run per row length
    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora(load_base(str(tiny_model_dir)))
    groups = _groups(len(tok), 4, SHAPES)
    batch = collate(groups, tok.pad_token_id, 512)
    assert len(batching.buckets(batch.row_lengths, 0.0)) == len(set(batch.row_lengths)) > 1
    _check(model, groups, tok.pad_token_id, 512, atol=1e-4)


def test_empty_completion_scores_zero(tiny_model_dir: Path) -> None:
    from tuning.modeling import load_base, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_base(str(tiny_model_dir))
    group = GroupTokens([5, 6, 7], [[8, 9], [], [10]])
    with torch.no_grad():
        logps = sequence_logps(model, collate([group], tok.pad_token_id, 512))
        alone = _straight_logps(model, GroupTokens(group.prompt, [[8, 9], [10]]))
    assert logps[1] == 0
    torch.testing.assert_close(logps[[0, 2]], alone, atol=1e-4, rtol=1e-5)


def test_buckets_trade_padding_against_passes() -> None:
    from tuning.batching import buckets

    assert buckets([100, 100, 100], 32) == [(0, 3)]
    assert buckets([400, 100, 90], 32) == [(0, 1), (1, 3)]
    assert buckets([400, 100, 90], 10_000) == [(0, 3)]
    assert buckets([5], 0) == [(0, 1)]


def test_dense_mask_fallback_gives_the_same_numbers(tiny_model_dir: Path, monkeypatch) -> None:
    import tuning.batching as batching
    from tuning.modeling import load_base, load_tokenizer

    monkeypatch.setattr(batching, "_SHARED_ATTENTION", False)  # sdpa with a boolean 4D mask
    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora(load_base(str(tiny_model_dir)))
    _check(model, _groups(len(tok), 5, SHAPES), tok.pad_token_id, 512, atol=1e-4)


def test_eager_attention_gives_the_same_numbers(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tuning.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    model = _lora(model.eval())
    _check(model, _groups(len(tok), 2, SHAPES), tok.pad_token_id, 512, atol=1e-4)


@pytest.mark.slow
def test_packed_logps_and_grads_equal_straight_default_model(default_model_dir: Path) -> None:
    from tuning.modeling import load_base, load_tokenizer, prompt_ids

    tok = load_tokenizer(str(default_model_dir))
    model = _lora(load_base(str(default_model_dir)))
    prompt = prompt_ids(tok, "Explain why the sky is blue in two sentences.", None)
    texts = [
        "Sunlight is scattered by the air, and blue light is scattered the most.",
        "Because of Rayleigh scattering.",
        "The sky reflects the ocean.",
    ]
    group = GroupTokens(prompt, [tok(t, add_special_tokens=False)["input_ids"] for t in texts])
    other = _groups(len(tok), 3, [(20, [30, 10])])
    _check(model, [group, *other], tok.pad_token_id, 512, atol=1e-3)
