import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from pipeline.identity.metrics import bcubed_prf, evaluate, nmi, pairwise_prf


def test_hand_computed_example():
    # true: {0,1,2} {3,4}; pred: {0,1} {2,3,4}
    true = np.array([0, 0, 0, 1, 1])
    pred = np.array([5, 5, 7, 7, 7])
    pw = pairwise_prf(pred, true)
    # pred pairs: (0,1),(2,3),(2,4),(3,4) = 4; true pairs: 3 + 1 = 4; TP: (0,1),(3,4) = 2
    assert pw["pairwise_precision"] == pytest.approx(2 / 4)
    assert pw["pairwise_recall"] == pytest.approx(2 / 4)
    assert pw["pairwise_f"] == pytest.approx(0.5)
    b = bcubed_prf(pred, true)
    # precision per item: 0:2/2 1:2/2 2:1/3 3:2/3 4:2/3 -> (1+1+1/3+2/3+2/3)/5 = 11/15
    assert b["bcubed_precision"] == pytest.approx(11 / 15)
    # recall per item: 0:2/3 1:2/3 2:1/3 3:2/2 4:2/2 -> (2/3+2/3+1/3+1+1)/5 = 11/15
    assert b["bcubed_recall"] == pytest.approx(11 / 15)


def test_all_singletons_and_perfect():
    true = np.array([0, 0, 1, 1, 2])
    single = np.arange(5)
    pw = pairwise_prf(single, true)
    assert pw["pairwise_precision"] == 1.0 and pw["pairwise_recall"] == 0.0
    b = bcubed_prf(single, true)
    assert b["bcubed_precision"] == 1.0 and b["bcubed_recall"] == pytest.approx((0.5 * 4 + 1) / 5)
    e = evaluate(true * 10 + 3, true)
    assert e["pairwise_f"] == 1.0 and e["bcubed_f"] == 1.0 and e["nmi"] == pytest.approx(1.0)
    assert e["n_pred_clusters"] == e["n_true_clusters"] == 3


def test_nmi_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        t = rng.integers(0, 7, 300)
        p = rng.integers(0, 9, 300)
        assert nmi(p, t) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-10)
    t = rng.integers(0, 7, 300)
    assert nmi(t, t) == pytest.approx(1.0)
