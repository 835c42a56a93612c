"""The simulator is deterministic, and on its log the Bayesian pairs beat the naive rule."""

import hashlib

import pyarrow as pa
import pytest

from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.evaluate import precision
from pipeline.social.simulate import SimConfig, simulate


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "summary.json":  # the summary names the (different) folders
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_simulator_is_deterministic(tmp_path):
    a = simulate(tmp_path / "a" / "social", config=SimConfig(n_events=20_000, n_bots=0, seed=9))
    b = simulate(tmp_path / "b" / "social", config=SimConfig(n_events=20_000, n_bots=0, seed=9))
    assert a["events"] == b["events"] and 19_990 <= a["events"] <= 20_000
    assert _digest(tmp_path / "a" / "social") == _digest(tmp_path / "b" / "social")
    assert _digest(tmp_path / "a" / "social_truth") == _digest(tmp_path / "b" / "social_truth")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    summary = simulate(root / "social", config=SimConfig(n_events=300_000, seed=11))
    cfg = SocialConfig(export_webdataset=False, export_pickapic=False)
    return summary, build_social_pairs(root / "social", None, cfg, baseline=True)


def test_bayesian_pairs_beat_the_naive_rule(sim):
    summary, r = sim
    ours = precision(r.pairs, summary["truth_dir"])
    naive = precision(
        r.baseline.append_column("user_id", pa.nulls(r.baseline.num_rows, pa.string())), summary["truth_dir"]
    )
    assert ours["population_pairs"] > 50
    assert ours["population_precision"] >= 0.9
    assert ours["population_precision"] > naive["population_precision"] + 0.1
    assert ours["user_precision"] > 0.7  # per-user pairs: higher utility for that user


def test_bots_in_the_simulation_are_caught(sim):
    summary, r = sim
    assert r.stats["bots_flagged"] == summary["bots"]
    assert r.stats["events_self_excluded"] > 0
