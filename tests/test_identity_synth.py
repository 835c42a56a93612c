"""The synthetic identity mixtures used by the scale benchmark (pipeline/identity/synth.py)."""

from dataclasses import replace

import numpy as np

from pipeline.identity.synth import (
    DLIB_PHOTO_QUANTILES,
    PRESETS,
    equal_size_sample,
    lookalike_pair_median,
    make_mixture,
    pair_quantiles,
)


def test_dlib_preset_reproduces_the_photo_quantiles():
    """The stored targets are measurements on the shared photos; the preset must still match them."""
    E, y, _ = equal_size_sample(PRESETS["dlib"], n_ids=300, per_id=6, seed=0)
    q = pair_quantiles(E, y)
    for key, want in DLIB_PHOTO_QUANTILES.items():
        assert abs(q[key] - want) < 0.004, (key, q[key], want)


def test_sizes_singletons_zipf_and_lookalikes():
    m = make_mixture(60_000, seed=3)
    sizes = np.bincount(m.labels)
    p = PRESETS["dlib"]
    assert sizes.sum() == 60_000 and sizes.min() >= 1 and sizes.max() <= p.max_size
    assert abs((sizes == 1).sum() / 60_000 - p.singleton_share) < 0.005  # (plus a truncated last one)
    rec = sizes[sizes >= 2]
    # Zipf: P(s) ~ s^-2 on 2..2000, so P(2) / P(4) = 4 and a heavy tail of large identities
    ratio = (rec == 2).mean() / (rec == 4).mean()
    assert 3.3 < ratio < 4.8, ratio
    assert (rec >= 100).sum() >= 20
    look = m.lookalike_of
    assert abs((look >= 0).mean() - p.lookalike_share) < 0.005
    assert (look[look >= 0] != np.flatnonzero(look >= 0)).all() and (look[look[look >= 0]] == -1).all()
    # a look-alike's faces are much closer to its parent's faces than other people's are
    E, y = m.embeddings, m.labels
    pairs = [(c, look[c]) for c in np.flatnonzero(look >= 0) if sizes[c] >= 2 and sizes[look[c]] >= 2][:50]
    near = np.median([np.median(E[y == a] @ E[y == b].T) for a, b in pairs])
    rng = np.random.default_rng(0)
    far = np.median(E[rng.choice(60_000, 2000)] @ E[rng.choice(60_000, 2000)].T)
    assert near > 0.9 > far + 0.05, (near, far)


def test_lookalike_median_and_heavy_tailed_spreads():
    assert 0.90 < lookalike_pair_median(PRESETS["dlib"]) < 0.94
    heavy = make_mixture(30_000, seed=4).face_spread
    light = make_mixture(30_000, replace(PRESETS["dlib"], spread_df=float("inf")), seed=4).face_spread
    med = np.median(heavy)
    assert abs(np.median(light) / med - 1) < 0.03
    # Student-t(3) log spreads: identities twice as spread as the median are a few in a thousand,
    # practically none with log-normal spreads of the same scale
    assert (heavy > 2 * med).mean() > 0.002 > (light > 2 * med).mean()


def test_mixture_written_into_a_memory_mapped_npy_is_the_same(tmp_path):
    """The 10M bench generates straight into a memory-mapped .npy (no N x D copy in memory)."""
    import pytest

    from pipeline.identity.synth import make_mixture

    ref = make_mixture(3_000, seed=5)
    out = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float32, shape=(3_000, 128))
    m = make_mixture(3_000, seed=5, out=out)
    out.flush()
    assert m.embeddings is out
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), ref.embeddings)
    np.testing.assert_array_equal(m.labels, ref.labels)
    with pytest.raises(ValueError, match="out must be float32"):
        make_mixture(3_000, seed=5, out=np.empty((3_000, 64), np.float32))
