"""The Loop page through streamlit.testing on a real workspace built with the store API: the
lineage of rounds, datasets, versions and evaluations, the per-version charts, running jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

from labeling.curation import freeze_versions
from labeling.loop_history import estimate_eta
from store import db as storedb
from store import evals, labels, models, runs
from store.records import LabelRecord
from tests.fixtures_app import make_workspace, seed_round
from tests.test_app import open_app


def _rank_all(ws: storedb.Workspace, seeded) -> None:
    with storedb.connect(ws) as con:
        labels.add_labels(
            con,
            [
                LabelRecord(gid, "ann", [[c] for c in cids])
                for gid, cids in zip(seeded.group_ids, seeded.candidate_ids, strict=True)
            ],
        )


def _version(ws: storedb.Workspace, parent: str | None, dataset: str, gate: dict) -> str:
    staged = ws.artifacts / "adapters" / f".staging-{dataset}"
    staged.mkdir(parents=True)
    (staged / "adapter_config.json").write_text("{}")
    with storedb.connect(ws) as con:
        version = models.register_version(
            ws, con, staged, parent=parent, dataset_id=dataset, method="dpo", config={},
            run_id=None,
        )  # fmt: skip
        models.set_gate(con, version, gate, True)
    return version


def _winrate(rate: float, low: float, high: float) -> dict:
    return {"wins": 6, "losses": 3, "ties": 1, "win_rate": rate, "low": low, "high": high, "n": 10}


@pytest.fixture
def loop_ws(tmp_path: Path, monkeypatch) -> storedb.Workspace:
    """Two rounds of two model versions, two dataset versions, evaluations of both versions."""
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    r1 = seed_round(ws, n_groups=3, k=4)
    _rank_all(ws, r1)
    d1 = freeze_versions(ws).train
    v1 = _version(ws, None, d1, {"passed": True, "preference_accuracy": 0.61, "kl_per_token": 0.2})
    r2 = seed_round(ws, n_groups=2, k=4, model_version=v1)
    _rank_all(ws, r2)
    d2 = freeze_versions(ws).train
    v2 = _version(ws, v1, d2, {"passed": True, "preference_accuracy": 0.5, "kl_per_token": 0.3})
    assert (d1, d2, v1, v2) == ("d1", "d2", "v1", "v2")
    with storedb.connect(ws) as con:
        evals.add_eval(con, "winrate", "v1", _winrate(0.6, 0.31, 0.83), against="base",
                       judge="llm", round_ids=[7, 8])  # fmt: skip
        evals.add_eval(con, "drift", "v1", {"kl_per_token": 0.05, "mean_length": 20.0,
                       "mean_length_against": 15.0}, against="base", round_ids=[7, 8])  # fmt: skip
        evals.add_eval(con, "winrate", "v2", _winrate(0.7, 0.4, 0.89), against="base",
                       judge="llm", round_ids=[9, 8])  # fmt: skip
        evals.add_eval(con, "drift", "v2", {"kl_per_token": 0.09, "mean_length": 24.0,
                       "mean_length_against": 15.0}, against="base", round_ids=[9, 8])  # fmt: skip
        evals.add_eval(con, "preference", "v2", {"accuracy": 0.72, "pairs": 12})
        # against v1, not π_ref: not a point of the win-rate-against-π_ref chart
        evals.add_eval(con, "winrate", "v2", _winrate(0.1, 0.0, 0.4), against="v1",
                       judge="llm", round_ids=[9, 7])  # fmt: skip
    return ws


def _charts(at) -> dict[str, object]:
    """Each Altair chart's title -> the rows of its data (the layer whose data has a version)."""
    out = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        frames = [convert_arrow_bytes_to_pandas_df(d.data.data) for d in chart.proto.datasets]
        data = next(f for f in frames if "version" in f.columns)
        title = spec["title"]["text"] if isinstance(spec.get("title"), dict) else spec["title"]
        out[title] = data
    return out


def _by_version(frame, column: str) -> dict[str, float]:
    return {str(v): pytest.approx(float(x)) for v, x in zip(frame["version"], frame[column],
            strict=True)}  # fmt: skip


def test_loop_page_shows_lineage_and_charts_per_version(loop_ws):
    at = open_app("Loop")
    assert not at.exception, at.exception
    assert at.title[0].value == "Loop"

    (graph,) = at.get("graphviz_chart")
    dot = graph.proto.spec
    for node in ('"m:base"', '"m:v1"', '"m:v2"', '"r:1"', '"r:2"', '"d:d1"', '"d:d2"'):
        assert f"{node} [label=" in dot
    for edge in ('"m:base" -> "r:1"', '"r:1" -> "d:d1"', '"d:d1" -> "m:v1"', '"m:v1" -> "r:2"',
                 '"r:2" -> "d:d2"', '"r:1" -> "d:d2"', '"d:d2" -> "m:v2"', '"m:v1" -> "m:v2"',
                 '"m:base" -> "m:v1"'):  # fmt: skip
        assert edge in dot, edge
    # each evaluation run is one node under its version: win-rate and drift together
    assert '"m:v1" -> "e:1-2"' in dot and '"m:v2" -> "e:3-4"' in dot
    assert '"m:v2" -> "e:5"' in dot and '"m:v2" -> "e:6"' in dot
    assert "win-rate 0.60 [0.31, 0.83]" in dot and "preference accuracy 0.720" in dot

    charts = _charts(at)
    winrate = charts["Win-rate against π_ref (95% Wilson interval)"]
    assert _by_version(winrate, "win_rate") == {"v1": 0.6, "v2": 0.7}
    assert _by_version(winrate, "low") == {"v1": 0.31, "v2": 0.4}
    assert _by_version(winrate, "high") == {"v1": 0.83, "v2": 0.89}
    # v1 was not evaluated for preference accuracy: its gate's value
    assert _by_version(charts["Preference accuracy"], "accuracy") == {"v1": 0.61, "v2": 0.72}
    assert _by_version(charts["KL to π_ref"], "kl_per_token") == {"v1": 0.05, "v2": 0.09}
    assert _by_version(charts["Mean length"], "mean_length") == {
        "base": 15.0, "v1": 20.0, "v2": 24.0,
    }  # fmt: skip
    table = next(df.value for df in at.dataframe if "accuracy_from" in df.value.columns)
    assert list(table["version"]) == ["base", "v1", "v2"]
    assert list(table["accuracy_from"].fillna("-")) == ["-", "gate", "eval"]
    assert "No job is running" in " ".join(c.value for c in at.caption)


def test_empty_workspace_says_to_start_a_round(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    at = open_app("Loop")
    assert not at.exception, at.exception
    assert not at.error
    assert any("Nothing yet" in i.value and "start a round" in i.value.lower() for i in at.info)
    assert not at.get("graphviz_chart") and not at.get("vega_lite_chart")


def test_a_running_tuning_job_shows_its_progress_and_time_left(loop_ws):
    config = {"method": "dpo", "dataset": "d2", "from": "v2", "epochs": 2}
    with storedb.connect(loop_ws) as con:
        run_id = runs.start_run(con, "tune", config)  # this process: alive, so running
        runs.heartbeat(con, run_id, {"epoch": 0.5, "loss": 0.69}, 1)
    time.sleep(1.0)
    with storedb.connect(loop_ws) as con:
        runs.heartbeat(con, run_id, {"epoch": 1.0, "loss": 0.6}, 2)
    at = open_app("Loop")
    assert not at.exception, at.exception
    (bar,) = at.progress
    assert bar.value == 50
    assert "tune (dpo) on d2 from v2" in bar.text.replace("\\", "")
    assert "1 of 2 epochs (50%)" in bar.text
    # half an epoch per ~second since the first report: about two seconds left, not minutes
    assert "s left" in bar.text and "min" not in bar.text.split("epochs")[-1]
    with storedb.connect(loop_ws) as con:
        runs.finish_run(con, run_id, "v3")
    at.run()
    assert not at.progress


def test_estimate_eta_by_hand():
    # pace between the first and last report: 4 units in 20 s; 5 to go = 25 s, 5 s spent since
    assert estimate_eta([(10.0, 1.0), (30.0, 5.0)], 10.0, 35.0) == pytest.approx(20.0)
    # one report: the pace since the start
    assert estimate_eta([(20.0, 5.0)], 10.0, 20.0) == pytest.approx(20.0)
    assert estimate_eta([(20.0, 10.0)], 10.0, 25.0) == 0.0
    assert estimate_eta([], 10.0, 5.0) is None
    assert estimate_eta([(3.0, 0.0)], 10.0, 5.0) is None
    # overdue: never negative
    assert estimate_eta([(10.0, 5.0)], 10.0, 100.0) == 0.0


def test_a_reward_model_is_drawn_as_one_and_left_out_of_the_policy_charts(loop_ws):
    staged = loop_ws.artifacts / "adapters" / ".staging-rm"
    staged.mkdir(parents=True)
    (staged / "adapter_config.json").write_text("{}")
    with storedb.connect(loop_ws) as con:
        v3 = models.register_version(
            loop_ws, con, staged, parent=None, dataset_id="d2", method="rm", config={},
            run_id=None, promoted=False, kind=models.REWARD,
        )  # fmt: skip
    at = open_app("Loop")
    assert not at.exception, at.exception
    (graph,) = at.get("graphviz_chart")
    dot = graph.proto.spec
    assert f'"m:{v3}" [label="{v3}\\nreward model (rm)"' in dot
    assert f'"d:d2" -> "m:{v3}"' in dot and f'"m:base" -> "m:{v3}"' not in dot
    table = next(df.value for df in at.dataframe if "accuracy_from" in df.value.columns)
    assert list(table["version"]) == ["base", "v1", "v2"]
