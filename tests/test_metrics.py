"""EER, min t-DCF, score files and the evaluation report, as the ASVspoof 2019 evaluation computes them, on
cases worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lowmem_aasist.metrics import (
    ASVSPOOF2019_COST,
    AsvErrorRates,
    AsvScores,
    CmScores,
    ScoreFileError,
    TdcfCost,
    asv_error_rates,
    compute_eer,
    det_curve,
    eer_percent,
    evaluate,
    format_evaluation,
    min_tdcf,
    read_asv_scores,
    read_cm_scores,
    tdcf_weights,
)


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


def test_tie_at_the_eer_point():
    # bona fide 2, 3; spoof 1, 2. The stable sort puts bona fide 2 (listed first) before spoof 2: 1s 2b 2s 3b.
    # Points: (0,1) (0,1/2) (1/2,1/2) (1/2,0) (1,0); |miss - fa| is 0 at the mid-tie point -> EER 1/2 at threshold 2.
    assert compute_eer(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == (0.5, 2.0)


# --- ASV error rates ---------------------------------------------------------------------------------------


def test_asv_error_rates_by_hand():
    # target 2, 4, 6; nontarget 1, 3. Sorted 1n 2t 3n 4t 6t -> (miss, fa) at thresholds [.999, 1, 2, 3, 4, 6]:
    # (0,1) (0,1/2) (1/3,1/2) (1/3,0) (2/3,0) (1,0); smallest |diff| 1/6 at threshold 2.
    # At 2: pfa = nontarget >= 2 -> {3} = 1/2; pmiss = target < 2 -> {} = 0 (the target AT 2 is accepted here, though
    # the sweep counted it as a miss); pmiss_spoof = spoof < 2 -> {0} of 0, 2, 5, 7 = 1/4 (spoof 2 is accepted).
    rates = asv_error_rates([2.0, 4.0, 6.0], [1.0, 3.0], [0.0, 2.0, 5.0, 7.0])
    assert rates == AsvErrorRates(pfa=0.5, pmiss=0.0, pmiss_spoof=0.25, threshold=2.0)


def test_asv_error_rates_without_spoof_trials():
    assert asv_error_rates([2.0, 4.0, 6.0], [1.0, 3.0], []).pmiss_spoof is None


def test_asv_error_rates_need_target_and_nontarget():
    with pytest.raises(ValueError, match="one target and one nontarget"):
        asv_error_rates([], [1.0], [0.0])


# --- min t-DCF -----------------------------------------------------------------------------------------------


def test_cost_model_defaults():
    c = ASVSPOOF2019_COST
    assert (c.p_spoof, c.c_miss, c.c_fa, c.c_miss_asv, c.c_fa_asv, c.c_miss_cm, c.c_fa_cm) == (
        0.05,
        1,
        10,
        1,
        10,
        1,
        10,
    )
    assert c.p_tar == pytest.approx(0.9405) and c.p_non == pytest.approx(0.0095)
    assert c.p_tar + c.p_non + c.p_spoof == pytest.approx(1.0, abs=1e-12)


def test_min_tdcf_normalised_by_c1():
    # Pmiss_asv 0.5, Pfa_asv 0.2, Pmiss_spoof_asv 0:
    #   C1 = 0.9405 * (1 - 0.5) - 0.0095 * 10 * 0.2 = 0.47025 - 0.019 = 0.45125; C2 = 10 * 0.05 * 1 = 0.5.
    # min(C1, C2) = C1, so t-DCF_norm = Pmiss_cm + (0.5 / 0.45125) Pfa_cm = Pmiss_cm + 1.10803 Pfa_cm.
    # CM: spoof 1, 2, 4, 6; bona fide 3, 5, 7, 8. Sorted 1s 2s 3b 4s 5b 6s 7b 8b -> (miss, fa) at thresholds
    # [.999, 1, 2, 3, 4, 5, 6, 7, 8]: (0,1) (0,3/4) (0,1/2) (1/4,1/2) (1/4,1/4) (1/2,1/4) (1/2,0) (3/4,0) (1,0)
    # -> 1.108 0.831 0.554 0.804 0.527 0.777 0.500 0.750 1.000: minimum 1/2 at threshold 6.
    asv = AsvErrorRates(pfa=0.2, pmiss=0.5, pmiss_spoof=0.0, threshold=0.0)
    assert tdcf_weights(asv) == pytest.approx((0.45125, 0.5), abs=1e-12)
    value, threshold = min_tdcf([3.0, 5.0, 7.0, 8.0], [1.0, 2.0, 4.0, 6.0], asv)
    assert value == pytest.approx(0.5, abs=1e-6)
    assert threshold == 6.0


def test_min_tdcf_normalised_by_c2():
    # Pmiss_asv 0.2, Pfa_asv 0.1, Pmiss_spoof_asv 0.5:
    #   C1 = 0.9405 * 0.8 - 0.0095 * 10 * 0.1 = 0.7524 - 0.0095 = 0.7429; C2 = 10 * 0.05 * 0.5 = 0.25 = min.
    # t-DCF_norm = 2.9716 Pmiss_cm + Pfa_cm. CM: spoof 1, 2, 4, 6; bona fide 5, 7, 8, 9. Sorted 1s 2s 4s 5b 6s 7b ...
    # -> (0,1) (0,3/4) (0,1/2) (0,1/4) (1/4,1/4) (1/4,0) (1/2,0) ... -> 1, .75, .5, .25, .993, .743, 1.486, ...
    # minimum 1/4 at threshold 4 (every spoof above 4, i.e. spoof 6, gets through; no bona fide is lost).
    asv = AsvErrorRates(pfa=0.1, pmiss=0.2, pmiss_spoof=0.5, threshold=0.0)
    assert tdcf_weights(asv) == pytest.approx((0.7429, 0.25), abs=1e-12)
    value, threshold = min_tdcf([5.0, 7.0, 8.0, 9.0], [1.0, 2.0, 4.0, 6.0], asv)
    assert value == pytest.approx(0.25, abs=1e-6)
    assert threshold == 4.0


def test_perfect_cm_has_zero_min_tdcf():
    asv = AsvErrorRates(pfa=0.1, pmiss=0.2, pmiss_spoof=0.5, threshold=0.0)
    assert min_tdcf([3.0, 4.0], [1.0, 2.0], asv) == (0.0, 2.0)


def _brute_force_min_tdcf(
    bonafide: np.ndarray, spoof: np.ndarray, asv: AsvErrorRates, cost: TdcfCost
) -> float:
    """The t-DCF formula evaluated at every real threshold, accepting a trial when its score is above it."""
    c1 = cost.p_tar * (cost.c_miss_cm - cost.c_miss_asv * asv.pmiss) - cost.p_non * cost.c_fa_asv * asv.pfa
    c2 = cost.c_fa_cm * cost.p_spoof * (1 - asv.pmiss_spoof)
    best = np.inf
    for t in [min(bonafide.min(), spoof.min()) - 1, *bonafide, *spoof]:
        p_miss = np.mean(bonafide <= t)
        p_fa = np.mean(spoof > t)
        best = min(best, (c1 * p_miss + c2 * p_fa) / min(c1, c2))
    return float(best)


def test_min_tdcf_matches_brute_force_and_is_at_most_one():
    # Continuous random scores have no ties, so every point of the sweep is a real threshold and the sweep's minimum
    # must equal the naive one. It is <= 1: the sweep holds accept-all (cost C2) and reject-all (C1), one of which
    # is min(C1, C2), i.e. 1 after normalising.
    rng = np.random.default_rng(0)
    for _ in range(50):
        bonafide = rng.normal(rng.uniform(-1, 3), 1.0, rng.integers(1, 40))
        spoof = rng.normal(0.0, rng.uniform(0.5, 2), rng.integers(1, 40))
        if np.unique(np.concatenate([bonafide, spoof])).size < 3:
            continue
        asv = AsvErrorRates(
            pfa=rng.uniform(0, 0.5), pmiss=rng.uniform(0, 0.5), pmiss_spoof=rng.uniform(0, 0.9), threshold=0.0
        )
        value, _ = min_tdcf(bonafide, spoof, asv)
        assert value <= 1.0 + 1e-12
        assert value == pytest.approx(
            _brute_force_min_tdcf(bonafide, spoof, asv, ASVSPOOF2019_COST), abs=1e-12
        )


@pytest.mark.parametrize(
    ("bonafide", "spoof", "asv", "cost", "message"),
    [
        ([1.0, 2.0], [0.0], AsvErrorRates(0.1, 0.1, None, 0.0), ASVSPOOF2019_COST, "no spoof trials"),
        ([1.0, np.nan], [0.0], AsvErrorRates(0.1, 0.1, 0.1, 0.0), ASVSPOOF2019_COST, "NaN or infinite"),
        ([1.0, 1.0], [0.0], AsvErrorRates(0.1, 0.1, 0.1, 0.0), ASVSPOOF2019_COST, "soft CM scores"),
        # Pmiss_asv 1 and Pfa_asv 1: C1 = 0.9405 * 0 - 0.0095 * 10 = -0.095 < 0.
        ([1.0, 2.0], [0.0], AsvErrorRates(1.0, 1.0, 0.1, 0.0), ASVSPOOF2019_COST, "must be non-negative"),
        # Pmiss_spoof_asv 1: C2 = 0, nothing to normalise by.
        ([1.0, 2.0], [0.0], AsvErrorRates(0.1, 0.1, 1.0, 0.0), ASVSPOOF2019_COST, "cannot be normalised"),
        ([1.0, 2.0], [0.0], AsvErrorRates(0.1, 0.1, 0.1, 0.0), TdcfCost(p_spoof=0.1), "sum to 1"),
    ],
)
def test_min_tdcf_sanity_failures(bonafide, spoof, asv, cost, message):
    with pytest.raises(ValueError, match=message) as info:
        min_tdcf(bonafide, spoof, asv, cost)
    assert "\n" not in str(info.value)


# --- score files ---------------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "scores.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_cm_scores(tmp_path):
    # Blank lines are skipped, CRLF endings and tabs are fine.
    path = _write(tmp_path, "LA_E_1 - bonafide 1.5\r\n\n  LA_E_2\tA07 spoof -2e-1\r\nLA_E_3 A08 spoof 3\n")
    cm = read_cm_scores(path)
    assert cm.utt == ["LA_E_1", "LA_E_2", "LA_E_3"]
    assert cm.attack == ["-", "A07", "A08"]
    assert cm.key.dtype == np.int8 and cm.key.tolist() == [1, 0, 0]
    assert cm.score.dtype == np.float64 and cm.score.tolist() == [1.5, -0.2, 3.0]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("LA_E_2 A07 spoof", "too few fields"),
        ("LA_E_2 A07 spoof 0.5 extra", "too many fields"),
        ("LA_E_2 bonafide 0.5", "3-column layout"),
        ("LA_E_2 A07 fake 0.5", "bad key"),
        ("LA_E_2 A07 spoof high", "score not a number"),
        ("LA_E_2 A07 spoof nan", "NaN score"),
        ("LA_E_2 A07 spoof -inf", "infinite score"),
    ],
)
def test_malformed_cm_line_names_file_and_line(tmp_path, line, why):
    # The bad line is line 3 (line 2 is blank and still counts).
    path = _write(tmp_path, f"LA_E_1 - bonafide 1.0\n\n{line}\nLA_E_3 A08 spoof 0.0\n")
    with pytest.raises(ScoreFileError) as info:
        read_cm_scores(path)
    assert str(info.value) == f"{path}:3: expected 'UTT ATTACK bonafide|spoof SCORE', got '{line}'", why


def test_long_bad_line_is_truncated(tmp_path):
    path = _write(tmp_path, "x" * 200 + "\n")
    message = str(pytest.raises(ScoreFileError, read_cm_scores, path).value)
    assert message == f"{path}:1: expected 'UTT ATTACK bonafide|spoof SCORE', got '{'x' * 77}...'"


def test_duplicate_utterance(tmp_path):
    path = _write(tmp_path, "LA_E_1 - bonafide 1.0\nLA_E_2 A07 spoof 0.0\nLA_E_1 - bonafide 2.0\n")
    with pytest.raises(ScoreFileError, match=r":3: utterance 'LA_E_1' already scored on line 1$"):
        read_cm_scores(path)


def test_missing_empty_and_binary_files(tmp_path):
    missing = tmp_path / "nope.txt"
    assert str(pytest.raises(ScoreFileError, read_cm_scores, missing).value) == f"{missing}: no such file"
    for text in ("", "\n  \n"):
        with pytest.raises(ScoreFileError, match="empty"):
            read_cm_scores(_write(tmp_path, text))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"LA_E_1 - bonafide 1.0\n\xff\xfe\n")
    assert str(pytest.raises(ScoreFileError, read_cm_scores, binary).value) == f"{binary}:2: not UTF-8 text"
    assert str(pytest.raises(ScoreFileError, read_asv_scores, missing).value) == f"{missing}: no such file"


def test_read_asv_scores(tmp_path):
    path = _write(
        tmp_path, "LA_0039 target 1.5\nLA_0039 nontarget -2\n\nLA_0040 spoof 0.25\nLA_0040 target 3\n"
    )
    asv = read_asv_scores(path)
    assert asv.target.tolist() == [1.5, 3.0]
    assert asv.nontarget.tolist() == [-2.0]
    assert asv.spoof.tolist() == [0.25]


@pytest.mark.parametrize(
    "line", ["LA_0039 bonafide 1.0", "LA_0039 target", "LA_0039 - target 1.0", "LA_0039 spoof x"]
)
def test_malformed_asv_line(tmp_path, line):
    path = _write(tmp_path, f"LA_0039 target 1.0\n{line}\n")
    with pytest.raises(ScoreFileError) as info:
        read_asv_scores(path)
    assert str(info.value) == f"{path}:2: expected 'SPEAKER target|nontarget|spoof SCORE', got '{line}'"


def test_asv_file_needs_every_trial_type(tmp_path):
    path = _write(tmp_path, "LA_0039 target 1.0\nLA_0039 target 2.0\n")
    with pytest.raises(ScoreFileError, match=r": no nontarget or spoof trials"):
        read_asv_scores(path)


# --- evaluate ------------------------------------------------------------------------------------------------


def _cm(rows: list[tuple[str, str, float]]) -> CmScores:
    return CmScores(
        utt=[f"u{i}" for i in range(len(rows))],
        attack=[a for a, _, _ in rows],
        key=np.array([k == "bonafide" for _, k, _ in rows], dtype=np.int8),
        score=np.array([s for _, _, s in rows]),
    )


# bona fide 1, 3, 5, 7; A02 spoofs -1, 0 (listed first, to check sorting); A01 spoofs 2, 4.
CM_ROWS = [("-", "bonafide", 1.0), ("A02", "spoof", -1.0), ("-", "bonafide", 3.0), ("A01", "spoof", 2.0)]
CM_ROWS += [("-", "bonafide", 5.0), ("A02", "spoof", 0.0), ("A01", "spoof", 4.0), ("-", "bonafide", 7.0)]


def test_evaluate_pooled_and_per_attack():
    # Pooled: sorted -1s 0s 1b 2s 3b 4s 5b 7b -> (0,1) (0,3/4) (0,1/2) (1/4,1/2) (1/4,1/4) ... |diff| 0 at threshold 2:
    # EER 25 %. A01 alone (2, 4) against bona fide 1, 3, 5, 7 is test_hand_worked_case: 50 %. A02 (-1, 0) lies
    # below every bona fide: 0 %.
    result = evaluate(_cm(CM_ROWS))
    assert set(result) == {"eer", "eer_threshold", "min_tdcf", "per_attack", "counts", "min_dcf", "act_dcf", "cllr",
                           "min_cllr", "t_eer"}
    assert result["eer"] == 25.0 and result["eer_threshold"] == 2.0
    assert result["min_tdcf"] is None
    assert list(result["per_attack"].items()) == [("A01", 50.0), ("A02", 0.0)]
    assert result["counts"] == {"bonafide": 4, "spoof": 4, "A01": 2, "A02": 2}
    assert json.loads(json.dumps(result)) == result
    text = format_evaluation(result)
    assert "min t-DCF: not computed (give --asv-scores ASV_SCORE_FILE)" in text.splitlines()
    assert "EER: 25.0000 %" in text
    assert any(line.split() == ["A01", "2", "50.0000"] for line in text.splitlines())


def test_evaluate_with_asv_scores():
    # ASV target 2, 4, 6; nontarget 1, 3; spoof 0, 2, 5, 7 -> rates (pfa 1/2, pmiss 0, pmiss_spoof 1/4), see
    # test_asv_error_rates_by_hand: C1 = 0.9405 - 0.0095 * 10 * 0.5 = 0.893, C2 = 10 * 0.05 * 0.75 = 0.375.
    # Pooled CM points (above) -> (0.893 Pmiss + 0.375 Pfa) / 0.375: (0,1) 1, (0,3/4) .75, (0,1/2) .5, (1/4,1/2) 1.095,
    # (1/4,1/4) .845, (1/2,1/4) 1.44, (1/2,0) 1.19, ... -> 0.5 (threshold 0, letting the spoofs above 0 through).
    asv = AsvScores(np.array([2.0, 4.0, 6.0]), np.array([1.0, 3.0]), np.array([0.0, 2.0, 5.0, 7.0]))
    result = evaluate(_cm(CM_ROWS), asv)
    assert result["min_tdcf"] == pytest.approx(0.5, abs=1e-6)
    assert json.loads(json.dumps(result)) == result
    assert "min t-DCF: 0.500000" in format_evaluation(result).splitlines()


@pytest.mark.parametrize(
    ("drop", "message"), [("bonafide", "no bona fide trials"), ("spoof", "no spoof trials")]
)
def test_evaluate_needs_both_classes(drop, message):
    with pytest.raises(ValueError, match=message):
        evaluate(_cm([row for row in CM_ROWS if row[1] != drop]))


def test_evaluate_from_files(tmp_path):
    lines = [f"LA_E_{i} {attack} {key} {score}" for i, (attack, key, score) in enumerate(CM_ROWS)]
    cm_path = _write(tmp_path, "\n".join(lines) + "\n", "cm.txt")
    asv_path = _write(
        tmp_path,
        "a target 2\na target 4\na target 6\nb nontarget 1\nb nontarget 3\n"
        "c spoof 0\nc spoof 2\nc spoof 5\nc spoof 7\n",
        "asv.txt",
    )
    result = evaluate(read_cm_scores(cm_path), read_asv_scores(asv_path))
    assert result["eer"] == 25.0 and result["min_tdcf"] == pytest.approx(0.5, abs=1e-6)
