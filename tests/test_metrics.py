"""EER as the ASVspoof 2019 evaluation computes it, on cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lowmem_aasist.metrics import compute_eer, det_curve, eer_percent


def test_perfect_separation_is_zero():
    eer, threshold = compute_eer(np.array([2.0, 3.0]), np.array([-1.0, 0.0]))
    assert eer == 0.0
    assert threshold == 0.0  # the highest spoof score: everything above it is accepted


def test_inverted_is_one():
    assert compute_eer(np.array([-1.0, 0.0]), np.array([2.0, 3.0]))[0] == 1.0


def test_hand_worked_case():
    # bona fide 1, 3, 5, 7; spoof 2, 4. Sorted: 1b 2s 3b 4s 5b 7b. Points (miss, fa) for thresholds
    # [0.999, 1, 2, 3, 4, 5, 7]: (0,1) (1/4,1) (1/4,1/2) (1/2,1/2) (1/2,0) (3/4,0) (1,0) -> EER 1/2 at threshold 3.
    bona, spoof = np.array([1.0, 3.0, 5.0, 7.0]), np.array([2.0, 4.0])
    miss, fa, thr = det_curve(bona, spoof)
    np.testing.assert_allclose(miss, [0, 1 / 4, 1 / 4, 1 / 2, 1 / 2, 3 / 4, 1])
    np.testing.assert_allclose(fa, [1, 1, 1 / 2, 1 / 2, 0, 0, 0])
    np.testing.assert_allclose(thr, [0.999, 1, 2, 3, 4, 5, 7])
    assert compute_eer(bona, spoof) == (0.5, 3.0)


def test_near_ties_follow_float_arithmetic():
    # bona fide 1, 3, 5; spoof 2, 4: |miss - fa| is 1/6 at both (1/3, 1/2) and (2/3, 1/2) on paper, but in float64
    # 2/3 - 1/2 < 1/2 - 1/3, so the reference's argmin lands on the second: (2/3 + 1/2) / 2 = 7/12.
    assert compute_eer(np.array([1.0, 3.0, 5.0]), np.array([2.0, 4.0]))[0] == pytest.approx(7 / 12, abs=1e-12)


def test_all_scores_equal_ties_sorted_bona_fide_first():
    # Stable sort keeps bona fide (listed first) before spoofs at a tie: points (0,1) (1/2,1) (1,1) (1,1/2) (1,0);
    # |miss - fa| is smallest (0) at (1,1) -> EER 1.0 (a constant score cannot separate anything).
    eer, _ = compute_eer(np.zeros(2), np.zeros(2))
    assert eer == 1.0


def test_single_bona_fide():
    # bona fide 0.5; spoofs 0, 1, 2, 3. Sorted: 0s .5b 1s 2s 3s -> points (0,1) (0,3/4) (1,3/4) (1,1/2) ...
    # smallest |diff| 1/2 at (1,1/2)? no: (0,3/4)->3/4, (1,3/4)->1/4 -> EER (1 + 3/4) / 2 = 7/8.
    assert compute_eer(np.array([0.5]), np.array([0.0, 1.0, 2.0, 3.0]))[0] == pytest.approx(7 / 8)


def test_percent_and_labels():
    scores = np.array([1.0, 3.0, 5.0, 7.0, 2.0, 4.0])
    labels = np.array([1, 1, 1, 1, 0, 0])
    assert eer_percent(scores, labels) == 50.0


def test_needs_both_classes():
    with pytest.raises(ValueError, match="at least one bona fide and one spoof"):
        compute_eer(np.array([1.0]), np.array([]))
