"""Helpers for the web app tests: a workspace with prompts and a round of known candidates."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from store import db as storedb
from store import prompts, rounds
from store.records import PromptRecord
from store.rounds import CandidateRecord

XSS = "<img src=x onerror=alert(1)>**bold**"


@dataclass
class SeededRound:
    """A round stored for a test: its id and, per group, the group id and candidate ids/texts."""

    round_id: int
    group_ids: list[int]
    candidate_ids: list[list[int]]
    texts: list[list[str]]
    prompts: list[str]


def make_workspace(root: Path, base_model: str = "tiny-model-unused") -> storedb.Workspace:
    """A fresh workspace at root."""
    return storedb.create(root, base_model=base_model)


def add_prompts(ws: storedb.Workspace, texts: list[str], split: str = "train") -> list[int]:
    """Store prompts; returns their ids."""
    with storedb.connect(ws) as con:
        prompts.add_prompts(con, [PromptRecord(t) for t in texts], split, "test")
        df = prompts.list_prompts(con, split)
    by_text = dict(zip(df["text"], df["id"], strict=True))
    return [int(by_text[t]) for t in texts]


def seed_round(
    ws: storedb.Workspace,
    n_groups: int = 3,
    k: int = 4,
    model_version: str = "base",
    first_texts: list[str] | None = None,
) -> SeededRound:
    """A round of n_groups groups with k known candidates each (group 1 may get given texts)."""
    prompt_texts = [f"Prompt number {g + 1}: say something nice." for g in range(n_groups)]
    prompt_ids = add_prompts(ws, prompt_texts)
    all_texts = [[f"answer {g + 1}.{c + 1}" for c in range(k)] for g in range(n_groups)]
    if first_texts:
        all_texts[0][: len(first_texts)] = first_texts
    group_ids, cand_ids = [], []
    with storedb.connect(ws) as con:
        round_id = rounds.create_round(con, model_version, "train", k, {"k": k}, "sampled")
        for pid, texts in zip(prompt_ids, all_texts, strict=True):
            gid, cids = rounds.add_group(con, round_id, pid, [CandidateRecord(t) for t in texts])
            group_ids.append(gid)
            cand_ids.append(cids)
    return SeededRound(round_id, group_ids, cand_ids, all_texts, prompt_texts)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
