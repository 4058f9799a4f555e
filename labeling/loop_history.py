"""The project's history as one picture: rounds -> dataset versions -> model versions ->
evaluations, the measures of each model version, and how far the running jobs are.

Everything here reads the store and returns plain records; the Loop page only draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from store import datasets, evals, models, prompts, rounds, runs
from store import db as storedb

BASE = models.BASE
# the measures charted per model version, with the eval kind and metric they come from first
# and the promotion gate's key used when no evaluation measured them
MEASURES = ("win_rate", "accuracy", "kl_per_token", "mean_length")


@dataclass
class LoopHistory:
    """What the store holds about the loop, as read in one go."""

    rounds: pd.DataFrame
    datasets: pd.DataFrame
    versions: pd.DataFrame
    evals: pd.DataFrame

    @property
    def empty(self) -> bool:
        """Whether nothing has happened yet: no round, dataset, model version or evaluation."""
        return all(df.empty for df in (self.rounds, self.datasets, self.versions, self.evals))


@dataclass
class Node:
    """One box of the lineage graph."""

    id: str
    kind: str  # model | round | dataset | eval
    label: str


@dataclass
class Lineage:
    """The lineage graph: nodes and (source, target, relation) edges."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str, str]] = field(default_factory=list)

    def node(self, node_id: str) -> Node | None:
        """The node with this id, if any."""
        return next((n for n in self.nodes if n.id == node_id), None)


@dataclass
class JobProgress:
    """A running job: what it does, how far it is and the time it probably needs still."""

    run_id: int
    kind: str
    what: str
    elapsed_s: float
    done: float | None = None
    total: float | None = None
    unit: str = ""
    eta_s: float | None = None

    @property
    def fraction(self) -> float | None:
        """Share done, between 0 and 1; None when the job reports no progress."""
        if self.done is None or not self.total:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)


def load_history(ws: storedb.Workspace) -> LoopHistory:
    """Read rounds, dataset versions, model versions and evaluations."""
    with storedb.connect(ws) as con:
        return LoopHistory(
            rounds.list_rounds(con),
            datasets.list_datasets(con),
            models.list_versions(con),
            evals.list_evals(con),
        )


def _num(value) -> float | None:
    """A finite float, or None for anything missing."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(value, spec: str = ".3f") -> str:
    x = _num(value)
    return "n/a" if x is None else format(x, spec)


def model_node(version: object) -> str:
    """The lineage node id of a model version (the base model for None)."""
    return f"m:{version if isinstance(version, str) and version else BASE}"


def _eval_groups(ev: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Evaluations grouped as they were run: win-rate and drift of the same version, opponent
    and rounds together; every other kind (preference accuracy, human A/B) on its own."""
    out: list[tuple[str, pd.DataFrame]] = []
    paired = ev[ev["kind"].isin(["winrate", "drift"])]
    keys = [
        (r.version, r.against if isinstance(r.against, str) else None, tuple(r.round_ids))
        for r in paired.itertuples(index=False)
    ]
    for key in dict.fromkeys(keys):
        rows = paired[[k == key for k in keys]]
        out.append((f"e:{'-'.join(str(i) for i in rows['id'])}", rows))
    for row in ev[~ev["kind"].isin(["winrate", "drift"])].itertuples():
        out.append((f"e:{row.id}", ev[ev["id"] == row.id]))
    return sorted(out, key=lambda item: int(item[1]["id"].min()))


def _eval_label(rows: pd.DataFrame) -> str:
    first = rows.iloc[0]
    ids = ", ".join(f"#{i}" for i in rows["id"])
    lines = []
    for row in rows.itertuples():
        m = row.metrics
        if row.kind in ("winrate", "human_ab"):
            lines.append(
                f"win-rate {_fmt(m.get('win_rate'), '.2f')} "
                f"[{_fmt(m.get('low'), '.2f')}, {_fmt(m.get('high'), '.2f')}]"
            )
        elif row.kind == "drift":
            lines.append(
                f"KL/token {_fmt(m.get('kl_per_token'))}, "
                f"length {_fmt(m.get('mean_length'), '.1f')}"
            )
        elif row.kind == "preference":
            lines.append(f"preference accuracy {_fmt(m.get('accuracy'))}")
    against = f" vs {first['against']}" if isinstance(first["against"], str) else ""
    return "\n".join([f"eval {ids}: {first['version']}{against}", *lines])


def lineage(history: LoopHistory) -> Lineage:
    """Rounds sampled from model versions, dataset versions frozen from rounds, model versions
    tuned on datasets from a parent, and the evaluations of each version."""
    g = Lineage([Node(model_node(BASE), "model", "base model (π_ref)")])
    for v in history.versions.itertuples():
        if getattr(v, "kind", models.POLICY) == models.REWARD:
            # a reward model judges, it is not sampled from: no edge from the base policy
            g.nodes.append(Node(model_node(v.id), "model", f"{v.id}\nreward model ({v.method})"))
            if isinstance(v.parent, str) and v.parent:
                g.edges.append((model_node(v.parent), model_node(v.id), "parent"))
        else:
            gate = "promoted" if v.promoted else "not promoted"
            g.nodes.append(Node(model_node(v.id), "model", f"{v.id}\n{v.method} · {gate}"))
            g.edges.append((model_node(v.parent), model_node(v.id), "parent"))
        if isinstance(v.dataset_id, str) and v.dataset_id:
            g.edges.append((f"d:{v.dataset_id}", model_node(v.id), "tuned on"))
    for r in history.rounds.itertuples():
        spec = (r.settings or {}).get("eval") if isinstance(r.settings, dict) else None
        what = "A/B evaluation" if spec else f"{r.split}"
        g.nodes.append(
            Node(
                f"r:{r.id}",
                "round",
                f"round {r.id}\n{what} · {r.groups} groups, {r.labelled_groups} labelled",
            )
        )
        if spec:
            for version in (spec.get("version"), spec.get("against")):
                g.edges.append((model_node(version), f"r:{r.id}", "A/B"))
        else:
            g.edges.append((model_node(r.model_version), f"r:{r.id}", "sampled"))
    for d in history.datasets.itertuples():
        part = (d.filters or {}).get("part") if isinstance(d.filters, dict) else None
        held = " (held-out part)" if part == "heldout" else ""
        g.nodes.append(
            Node(f"d:{d.id}", "dataset", f"{d.id}{held}\n{d.n_groups} groups, {d.n_pairs} pairs")
        )
        for round_id in d.rounds:
            g.edges.append((f"r:{int(round_id)}", f"d:{d.id}", "frozen"))
    for node_id, rows in _eval_groups(history.evals):
        g.nodes.append(Node(node_id, "eval", _eval_label(rows)))
        g.edges.append((model_node(rows.iloc[0]["version"]), node_id, "evaluated"))
    known = {n.id for n in g.nodes}
    g.edges = [e for e in dict.fromkeys(g.edges) if e[0] in known and e[1] in known]
    return g


def _dot_text(text: str) -> str:
    """Text as a quoted DOT string (shown as text, never as an HTML label)."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


STYLE = {
    "model": 'shape=box, style="rounded,filled", fillcolor="#dbeafe"',
    "round": 'shape=box, style=filled, fillcolor="#fef3c7"',
    "dataset": 'shape=cylinder, style=filled, fillcolor="#dcfce7"',
    "eval": 'shape=note, style=filled, fillcolor="#f3e8ff"',
}


def lineage_dot(graph: Lineage) -> str:
    """The lineage graph as Graphviz DOT source, left to right."""
    lines = ["digraph loop {", "  rankdir=LR;", '  node [fontname="sans-serif", fontsize=10];']
    lines.append('  edge [fontname="sans-serif", fontsize=8, color="#6b7280"];')
    for n in graph.nodes:
        lines.append(f"  {_dot_text(n.id)} [label={_dot_text(n.label)}, {STYLE[n.kind]}];")
    for source, target, relation in graph.edges:
        style = ", style=dashed" if relation in ("parent", "A/B") else ""
        lines.append(
            f"  {_dot_text(source)} -> {_dot_text(target)} [label={_dot_text(relation)}{style}];"
        )
    lines.append("}")
    return "\n".join(lines)


def _latest(ev: pd.DataFrame, kind: str, **match) -> dict | None:
    rows = ev[ev["kind"] == kind]
    for key, value in match.items():
        rows = rows[rows[key] == value]
    return None if rows.empty else rows.iloc[-1].to_dict()


def version_measures(history: LoopHistory) -> pd.DataFrame:
    """Per model version (base first, then oldest to newest): the latest win-rate against π_ref
    (the base model) with its interval, preference accuracy, KL to π_ref per token and mean
    length, each from the latest evaluation, else from the version's promotion gate."""
    ev = history.evals
    rows = []
    versions = [{"id": BASE, "parent": None, "dataset_id": None, "method": "base", "gate": None}]
    versions += [
        v for v in history.versions.to_dict("records") if v.get("kind") != models.REWARD
    ]  # policies: a reward model has no answers to measure
    for v in versions:
        vid = v["id"]
        gate = v["gate"] if isinstance(v["gate"], dict) else {}
        row = {
            "version": vid,
            "parent": v["parent"] if isinstance(v["parent"], str) else None,
            "dataset": v["dataset_id"] if isinstance(v["dataset_id"], str) else None,
            "method": v["method"],
        }
        wr = _latest(ev, "winrate", version=vid, against=BASE) if vid != BASE else None
        m = (wr or {}).get("metrics") or {}
        row.update(
            win_rate=_num(m.get("win_rate")),
            low=_num(m.get("low")),
            high=_num(m.get("high")),
            judge=(wr or {}).get("judge"),
            winrate_eval=(wr or {}).get("id"),
        )
        pref = _latest(ev, "preference", version=vid)
        accuracy = _num(((pref or {}).get("metrics") or {}).get("accuracy"))
        row["accuracy_from"] = "eval" if accuracy is not None else None
        if accuracy is None and _num(gate.get("preference_accuracy")) is not None:
            accuracy, row["accuracy_from"] = _num(gate["preference_accuracy"]), "gate"
        row["accuracy"] = accuracy
        drift = _latest(ev, "drift", version=vid)
        kl = _num(((drift or {}).get("metrics") or {}).get("kl_per_token"))
        row["kl_from"] = "eval" if kl is not None else None
        if kl is None and _num(gate.get("kl_per_token")) is not None:
            kl, row["kl_from"] = _num(gate["kl_per_token"]), "gate"
        row["kl_per_token"] = kl
        row["mean_length"] = _mean_length(ev, vid)
        rows.append(row)
    df = pd.DataFrame(rows)
    measured = df[list(MEASURES)].notna().any(axis=1)
    return df[measured | (df["version"] != BASE)].reset_index(drop=True)


def _mean_length(ev: pd.DataFrame, version: str) -> float | None:
    """The newest mean answer length (tokens) measured for a version, as the evaluated one or
    as the one it was compared against."""
    drift = ev[ev["kind"] == "drift"]
    for row in drift.iloc[::-1].itertuples():
        if row.version == version:
            value = _num(row.metrics.get("mean_length"))
        elif row.against == version:
            value = _num(row.metrics.get("mean_length_against"))
        else:
            continue
        if value is not None:
            return value
    return None


def estimate_eta(points: list[tuple[float, float]], total: float, elapsed: float) -> float | None:
    """Seconds a job probably needs still, from (seconds since start, units done) points and
    `elapsed` seconds so far: at the pace between its first and last report (so loading a
    model before the first one is not counted), or since the start with a single report."""
    if not points or not total or total <= 0:
        return None
    t_last, done = points[-1]
    if done >= total:
        return 0.0
    t_first, first = points[0]
    if len(points) > 1 and t_last > t_first and done > first:
        rate = (done - first) / (t_last - t_first)
    elif done > 0 and t_last > 0:
        rate = done / t_last
    else:
        return None
    return max((total - done) / rate - max(elapsed - t_last, 0.0), 0.0)


def _progress_source(con, run: dict) -> tuple[str, float, str] | None:
    """The metric that counts a job's progress, its total and its unit."""
    config = run["config"] if isinstance(run["config"], dict) else {}
    if run["kind"] == "tune" and _num(config.get("epochs")):
        return "epoch", float(config["epochs"]), "epochs"
    if run["kind"] == "sample" and _num(config.get("k")):
        n = len(prompts.list_prompts(con, config.get("split") or "train"))
        limit = _num(config.get("limit"))
        n = min(n, int(limit)) if limit else n
        return "completions", float(n * int(config["k"])), "completions"
    return None


def _describe(run: dict) -> str:
    config = run["config"] if isinstance(run["config"], dict) else {}
    if run["kind"] == "tune":
        parent = config.get("from") or BASE
        return f"tune ({config.get('method', '?')}) on {config.get('dataset')} from {parent}"
    if run["kind"] in ("sample", "eval"):
        return f"{run['kind']} {config.get('model_version', '?')}"
    return str(run["kind"])


def running_jobs(ws: storedb.Workspace) -> list[JobProgress]:
    """The running jobs, newest first, with their progress and an estimate of the time left."""
    out = []
    with storedb.connect(ws) as con:
        df = runs.list_runs(con)
        for run in df[df["status"] == "running"].to_dict("records"):
            job = JobProgress(
                int(run["id"]), run["kind"], _describe(run), runs.elapsed_s(con, run["id"])
            )
            source = _progress_source(con, run)
            if source is not None:
                name, job.total, job.unit = source
                timeline = runs.metric_timeline(con, run["id"], name)
                points = list(zip(timeline["at_s"].astype(float), timeline["value"], strict=True))
                job.done = points[-1][1] if points else 0.0
                job.eta_s = estimate_eta(points, job.total, job.elapsed_s)
            out.append(job)
    return out
