"""Turning groups (a prompt and its K completions) into packed tensors, and scoring them.

A group's prompt is run through the model once, not once per candidate: each row of a batch
holds one prompt followed by several of its completions, and an attention mask lets every
completion see the prompt and its own earlier tokens only, with positions that restart after
the prompt. Each completion token is therefore scored exactly as in its own
prompt + completion sequence, while the prompt's tokens (and their gradients) are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows are filled with completions up to max(max_length, ROW_TOKENS) tokens: long enough to share
# a prompt among several candidates, short enough that attention stays a small part of the cost.
ROW_TOKENS = 1024

PAD, PROMPT = 0, 1  # segment ids; completion j of a row has segment id 2 + j


@dataclass
class GroupTokens:
    """One group's token ids: the prompt once, each candidate's completion."""

    prompt: list[int]
    completions: list[list[int]]


@dataclass
class Batch:
    """Candidates of several groups, packed as rows of one prompt followed by its completions.

    Rows are sorted longest first; each completion token records the row and column of the
    position that predicts it, and the candidate it belongs to.
    """

    input_ids: torch.Tensor  # (rows, length), right-padded
    segment_ids: torch.Tensor  # (rows, length): 0 padding, 1 prompt, 2 + j completion j of the row
    position_ids: torch.Tensor  # (rows, length): each completion continues from its prompt
    row_lengths: list[int]  # tokens in each row, non-increasing
    row_starts: list[int]  # index of each row's first completion token (plus the total)
    prompt_lengths: list[int]  # prompt tokens at the start of each row
    spans: list[tuple[int, int, int]]  # (row, first column, tokens) of each completion in a row
    source_row: torch.Tensor  # (tokens,) row of the position predicting each completion token
    source_col: torch.Tensor  # (tokens,) its column
    labels: torch.Tensor  # (tokens,) every completion token of every candidate
    candidate: torch.Tensor  # (tokens,) the candidate each completion token belongs to
    group_offsets: list[int]  # index of each group's first candidate
    n_candidates: int

    def to(self, device: torch.device) -> Batch:
        """The same batch on another device."""
        move = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()
        }
        return Batch(**move)


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, length, length) boolean mask: True where a query position may attend."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = causal & (k != PAD) & ((k == PROMPT) | (k == q))
    # padding attends to itself only, so no row of the mask is empty (empty rows give NaN)
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device) & (q == PAD)
    return allowed[:, None]


def truncate(group: GroupTokens, max_length: int) -> GroupTokens:
    """Fit every candidate into max_length tokens: keep the prompt's end, cut completions."""
    prompt = (
        group.prompt[-max(1, max_length // 2) :]
        if len(group.prompt) >= max_length
        else group.prompt
    )
    room = max(1, max_length - len(prompt))
    return GroupTokens(prompt, [c[:room] for c in group.completions])


def _rows(group: GroupTokens, budget: int) -> list[list[int]]:
    """Split a group's candidates (by index) into rows of at most budget tokens each."""
    rows: list[list[int]] = []
    used = 0
    for i, c in enumerate(group.completions):
        if rows and used + len(c) <= budget:
            rows[-1].append(i)
            used += len(c)
        else:
            rows.append([i])
            used = len(group.prompt) + len(c)
    return rows


def collate(groups: list[GroupTokens], pad_id: int, max_length: int) -> Batch:
    """Pack the candidates of groups into one batch."""
    groups = [truncate(g, max_length) for g in groups]
    budget = max(max_length, ROW_TOKENS)
    offsets, first = [], 0
    for g in groups:
        offsets.append(first)
        first += len(g.completions)
    layout = [
        (g, at, row) for g, at in zip(groups, offsets, strict=True) for row in _rows(g, budget)
    ]
    size = [len(g.prompt) + sum(len(g.completions[i]) for i in row) for g, _, row in layout]
    order = sorted(range(len(layout)), key=lambda r: -size[r])
    length = size[order[0]]

    ids, segs, pos = [], [], []
    source_row, source_col, labels, candidate, row_starts = [], [], [], [], []
    prompt_lengths, spans = [], []
    for r, index in enumerate(order):
        g, at, row = layout[index]
        row_starts.append(len(labels))
        p = len(g.prompt)
        if not p:
            raise ValueError("every group needs a prompt of at least one token")
        row_ids, row_seg, row_pos = list(g.prompt), [PROMPT] * p, list(range(p))
        prompt_lengths.append(p)
        for j, i in enumerate(row):
            c = g.completions[i]
            if not c:
                continue  # nothing to score: its log-probability is 0
            start = len(row_ids)
            spans.append((r, start, len(c)))
            row_ids += c
            row_seg += [2 + j] * len(c)
            row_pos += range(p, p + len(c))
            # token t of the completion is predicted by the previous token of the same sequence:
            # the prompt's last token for t = 0, else the completion's own token t - 1
            source_row += [r] * len(c)
            source_col += [p - 1, *range(start, start + len(c) - 1)]
            labels += c
            candidate += [at + i] * len(c)
        pad = length - len(row_ids)
        ids.append(row_ids + [pad_id] * pad)
        segs.append(row_seg + [PAD] * pad)
        pos.append(row_pos + [0] * pad)
    row_starts.append(len(labels))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return Batch(
        tensor(ids),
        tensor(segs),
        tensor(pos),
        [size[i] for i in order],
        row_starts,
        prompt_lengths,
        spans,
        tensor(source_row),
        tensor(source_col),
        tensor(labels),
        tensor(candidate),
        offsets,
        first,
    )


def buckets(lengths: list[int], overhead: float) -> list[tuple[int, int]]:
    """Split rows sorted longest first into runs padded separately, minimising padded tokens.

    Each run costs its rows times its longest row, plus overhead tokens for the extra forward
    pass; returns (first row, end row) of each run.
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(end):
            cost = best[begin] + (end - begin) * lengths[begin] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    runs, end = [], n
    while end:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP and similar wrappers
    return model


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether a training forward pass of model recomputes activations in the backward pass."""
    return model.training and any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules()
    )


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention takes it: 0 where allowed, the dtype's min elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@dataclass
class _AttentionPlan:
    """Index tensors that let one run's attention skip everything a token may not see."""

    prompt_mask: torch.Tensor  # (rows, 1, P, P): causal within each row's prompt
    query_index: torch.Tensor  # (completions, C) flat row*length positions of completion tokens
    key_index: torch.Tensor  # (completions, P + C): the row's prompt, then the completion
    completion_mask: torch.Tensor  # (completions, 1, C, P + C)
    assemble: torch.Tensor  # (rows * length,) where each position's output is, prompt then rest


def _attention_plan(
    batch: Batch, first: int, end: int, length: int, device: torch.device
) -> _AttentionPlan:
    """The attention plan of rows first..end of a batch, cut to length columns."""
    rows = end - first
    prompts = torch.tensor(batch.prompt_lengths[first:end], device=device)
    spans = [(r - first, s, n) for r, s, n in batch.spans if first <= r < end]
    p_max = int(prompts.max())
    t = torch.arange(p_max, device=device)
    prompt_mask = torch.ones(p_max, p_max, dtype=torch.bool, device=device).tril()
    prompt_mask = prompt_mask & (t[None, None, :] < prompts[:, None, None])
    # every query sees at least the row's first token, so no mask row is empty

    span = torch.tensor(spans or [(0, 0, 1)], device=device)
    row, start, size = span[:, 0], span[:, 1], span[:, 2]
    c_max = int(size.max())
    i = torch.arange(c_max, device=device)
    at = torch.minimum(i[None, :], size[:, None] - 1)  # padding repeats the last token
    query_index = row[:, None] * length + start[:, None] + at
    span_prompt = prompts[row]
    prompt_keys = row[:, None] * length + torch.minimum(t[None, :], span_prompt[:, None] - 1)
    key_index = torch.cat([prompt_keys, query_index], dim=1)
    sees_prompt = (t[None, None, :] < span_prompt[:, None, None]).expand(-1, c_max, -1)
    sees_self = i[None, None, :] <= at[:, :, None]
    completion_mask = torch.cat([sees_prompt, sees_self], dim=-1)[:, None]

    assemble = torch.zeros(rows * length, dtype=torch.long, device=device)
    col = torch.arange(p_max, device=device)
    in_prompt = col[None, :] < prompts[:, None]
    prompt_at = (torch.arange(rows, device=device)[:, None] * length + col[None, :])[in_prompt]
    assemble[prompt_at] = torch.arange(rows * p_max, device=device).view(rows, p_max)[in_prompt]
    if spans:
        valid = i[None, :] < size[:, None]
        out_at = rows * p_max + torch.arange(len(spans) * c_max, device=device)
        assemble[query_index[valid]] = out_at.view(len(spans), c_max)[valid]
    return _AttentionPlan(prompt_mask[:, None], query_index, key_index, completion_mask, assemble)


_PLANS: list[_AttentionPlan] = []  # the plan of the forward pass in progress
_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
ATTENTION = "prefloop_shared_prompt"


def _sdpa(query, key, value, mask, dropout: float, scaling: float | None) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    kwargs = {}
    if groups > 1 and _HAS_GQA:
        kwargs["enable_gqa"] = True
    elif groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, **kwargs
    )


def shared_prompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over packed rows that computes only what each token may see.

    Prompt tokens attend causally within their prompt; each completion's tokens attend to the
    row's prompt and causally to themselves. The same numbers as a dense masked attention, at a
    fraction of the work when a row holds several completions.
    """
    plan = _PLANS[-1]
    rows, heads, length, dim = query.shape
    p_max = plan.prompt_mask.shape[-1]
    prompt_out = _sdpa(
        query[:, :, :p_max],
        key[:, :, :p_max],
        value[:, :, :p_max],
        plan.prompt_mask,
        dropout,
        scaling,
    )

    def flat(x: torch.Tensor) -> torch.Tensor:  # (rows, h, length, d) -> (rows * length, h, d)
        return x.transpose(1, 2).reshape(rows * length, x.shape[1], dim)

    q, k, v = flat(query), flat(key), flat(value)
    completion_out = _sdpa(
        q[plan.query_index].transpose(1, 2),
        k[plan.key_index].transpose(1, 2),
        v[plan.key_index].transpose(1, 2),
        plan.completion_mask,
        dropout,
        scaling,
    )
    out = torch.cat(
        [
            prompt_out.transpose(1, 2).reshape(-1, heads, dim),
            completion_out.transpose(1, 2).reshape(-1, heads, dim),
        ]
    )
    return out[plan.assemble].view(rows, length, heads, dim), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # older transformers: the dense mask is used instead
        return False
    AttentionInterface.register(ATTENTION, shared_prompt_attention)
    return True


_SHARED_ATTENTION = _register_attention()


def _configs(model: torch.nn.Module) -> list:
    """The distinct model configs whose attention implementation the forward pass reads."""
    seen, found = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation_internal") and id(config) not in seen:
            seen.add(id(config))
            found.append(config)
    return found


# Padded tokens one more forward pass is worth: on a CPU a pass costs little beyond its tokens,
# on a GPU small passes leave it idle, so rows are split into separately padded runs only there.
RUN_OVERHEAD_TOKENS = {"cpu": 32.0}
DEFAULT_RUN_OVERHEAD_TOKENS = 4096.0


def sequence_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each candidate's completion tokens (one number per candidate)."""
    logps, _ = token_logps(model, batch)
    return logps.new_zeros(batch.n_candidates).index_add(0, batch.candidate, logps)


def per_candidate(values: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """Flat per-token values split into one vector per candidate, in token order."""
    order = torch.argsort(batch.candidate, stable=True)
    counts = torch.bincount(batch.candidate, minlength=batch.n_candidates).tolist()
    return list(torch.split(values[order], counts))


def token_logps(
    model: torch.nn.Module, batch: Batch, with_entropy: bool = False, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability (and optionally the policy's entropy) at every completion token, in the
    flat order of batch.labels; batch.candidate says which candidate each token belongs to.
    The entropy carries gradients only with entropy_grad (an entropy bonus), else it is a
    metric."""

    def predicting(first: int, end: int, length: int) -> torch.Tensor:
        tokens = slice(batch.row_starts[first], batch.row_starts[end])
        return (batch.source_row[tokens] - first) * length + batch.source_col[tokens]

    token_logps, entropies = [], []
    for (first, end, _), (logits, _) in _packed_forward(model, batch, predicting):
        tokens = slice(batch.row_starts[first], batch.row_starts[end])
        token_logps.append(-F.cross_entropy(logits, batch.labels[tokens], reduction="none"))
        if with_entropy:
            # as a metric, no graph: it would keep several (tokens, vocab) tensors alive
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                logp_all = F.log_softmax(logits, -1)
                entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    logps = torch.cat(token_logps)
    return logps, torch.cat(entropies) if with_entropy else None


def token_hidden(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(tokens, hidden) final hidden state at the position predicting each completion token, in
    the flat order of batch.labels: what a per-token value head reads."""

    def predicting(first: int, end: int, length: int) -> torch.Tensor:
        tokens = slice(batch.row_starts[first], batch.row_starts[end])
        return (batch.source_row[tokens] - first) * length + batch.source_col[tokens]

    parts = [hidden for _, (_, hidden) in _packed_forward(model, batch, predicting, True)]
    return torch.cat(parts)


def last_token_hidden(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(candidates, hidden) final hidden state at each candidate's last completion token: what
    a scalar head reads, each candidate seeing only its prompt and itself. A candidate with no
    completion tokens gets zeros."""
    ends = torch.tensor([s + n - 1 for _, s, n in batch.spans], dtype=torch.long)
    last_token = torch.tensor([n for *_, n in batch.spans], dtype=torch.long).cumsum(0) - 1
    owner = batch.candidate.cpu()[last_token] if batch.spans else last_token
    rows = torch.tensor([r for r, *_ in batch.spans], dtype=torch.long)

    def last_positions(first: int, end: int, length: int) -> torch.Tensor:
        mine = (rows >= first) & (rows < end)
        return ((rows[mine] - first) * length + ends[mine]).to(batch.input_ids.device)

    parts = [hidden for _, (_, hidden) in _packed_forward(model, batch, last_positions, True)]
    if not parts:
        raise ValueError("no candidate of the batch has a completion token")
    hidden = torch.cat(parts)
    out = hidden.new_zeros(batch.n_candidates, hidden.shape[-1])
    return out.index_copy(0, owner.to(hidden.device), hidden)


def _packed_forward(model: torch.nn.Module, batch: Batch, positions, keep_hidden: bool = False):
    """Forward passes over the batch's rows in separately padded runs.

    positions(first row, end row, run length) gives the flat positions of a run to read; yields
    ((first, end, length), (float logits, final hidden states or None)) at those positions.
    """
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    dtype = head.weight.dtype if head is not None else torch.float32
    configs = _configs(inner)
    impl = configs[0]._attn_implementation if configs else None
    if impl == "sdpa" and (not _SHARED_ATTENTION or _checkpointing(inner)):
        # gradient checkpointing recomputes the layers in the backward pass, after the shared
        # attention's plan is gone: a dense mask passed as an argument is recomputed with them
        impl = None
    if impl not in ("sdpa", "eager", None):
        raise ValueError(
            f"attention implementation {impl!r} cannot score packed rows; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    device = batch.input_ids.device
    overhead = RUN_OVERHEAD_TOKENS.get(device.type, DEFAULT_RUN_OVERHEAD_TOKENS)
    for first, end in buckets(batch.row_lengths, overhead):
        length = batch.row_lengths[first]
        source = positions(first, end, length)
        if not len(source):
            continue
        inputs = {
            "input_ids": batch.input_ids[first:end, :length],
            "position_ids": batch.position_ids[first:end, :length],
            "use_cache": False,
        }
        if impl == "sdpa":  # attention that skips what a token may not see
            _PLANS.append(_attention_plan(batch, first, end, length, device))
            saved = [(c, c._attn_implementation_internal) for c in configs]
            for config, _ in saved:
                config._attn_implementation_internal = ATTENTION
            try:
                out = _head_logits(model, head, source, keep_hidden, **inputs)
            finally:
                for config, value in saved:
                    config._attn_implementation_internal = value
                _PLANS.pop()
        else:  # a dense mask: additive for eager attention, boolean for anything else
            mask = attention_mask(batch.segment_ids[first:end, :length])
            if impl == "eager":
                mask = _additive(mask, dtype)
            out = _head_logits(model, head, source, keep_hidden, attention_mask=mask, **inputs)
        yield (first, end, length), out


def _head_logits(
    model, head, source: torch.Tensor, keep_hidden: bool = False, **inputs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens, vocab) float logits at the flat positions source, from one forward pass, and
    with keep_hidden the final hidden states there (what the LM head reads)."""
    fired, kept = [], []

    # Only the positions that predict a completion token go through the LM head.
    def gather(_module, args):
        fired.append(True)
        hidden = args[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, source)
        if keep_hidden:
            kept.append(picked)
        return (picked[None],)

    hook = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = model(**inputs).logits
    finally:
        if hook is not None:
            hook.remove()
    logits = logits.reshape(-1, logits.shape[-1])
    if not fired:  # the model did not call its output embeddings as a module
        if keep_hidden:
            raise ValueError("this model's hidden states cannot be read at its output head")
        logits = logits.index_select(0, source)
    return logits.float(), (kept[0] if keep_hidden else None)
