"""ASVspoof 5 Track 1 / Track 2 metrics and score calibration (lowmem_aasist.detection), on the reference
document's test vector, cases worked out by hand, brute-force references and synthetic Gaussian scores."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from lowmem_aasist.detection import (
    A_DCF_NORMALISER,
    ACT_DCF_THRESHOLD,
    a_dcf,
    act_dcf,
    apply_calibration,
    cllr,
    fit_calibration,
    min_cllr,
    min_dcf,
    pav_llrs,
    t_eer,
    track1,
)

LN2 = math.log(2)

# --- Track 1 ---------------------------------------------------------------------------------------------------

VECTOR_BONAFIDE = [2.0, 1.0, 0.5, -0.3, 3.0]
VECTOR_SPOOF = [-2.0, -1.0, 0.2, -0.7, -3.0, 0.6]


def test_reference_test_vector():
    result = track1(VECTOR_BONAFIDE, VECTOR_SPOOF)
    assert result["eer"] == pytest.approx(18.3333333, abs=1e-4)
    assert result["eer_threshold"] == pytest.approx(0.2)
    assert result["min_dcf"] == pytest.approx(0.333333, abs=1e-6)
    assert result["act_dcf"] == pytest.approx(0.333333, abs=1e-6)
    assert result["cllr"] == pytest.approx(0.590091, abs=1e-6)
    assert result["min_cllr"] == pytest.approx(0.364478, abs=1e-6)
    assert set(result) == {"eer", "eer_threshold", "min_dcf", "act_dcf", "cllr", "min_cllr"}


def test_act_dcf_threshold_is_minus_ln_1_9():
    assert ACT_DCF_THRESHOLD == pytest.approx(-0.6418538861723947, abs=1e-15)


def test_all_scores_tied():
    # 2 bona fide and 3 spoof trials, all scoring 0. DET (bona fide sorted first on the tie): (Pmiss, Pfa) =
    # (0,1) (.5,1) (1,1) (1,2/3) (1,1/3) (1,0); 1.9 Pmiss + Pfa is smallest, 1, at (0, 1).
    # actDCF: 0 >= theta, so no miss, every spoof accepted: 0.05*10*1 / 0.5 = 1.
    # Cllr: softplus(0) = ln 2 for every trial: 1 bit. PAV pools the tie into one block, p = 2/5, and
    # LLR = logit(2/5) - ln(2/3) = 0, so minCllr is 1 bit as well: a tie is no separation.
    bonafide, spoof = np.zeros(2), np.zeros(3)
    assert min_dcf(bonafide, spoof) == pytest.approx(1.0)
    assert act_dcf(bonafide, spoof) == pytest.approx(1.0)
    assert cllr(bonafide, spoof) == pytest.approx(1.0)
    assert min_cllr(bonafide, spoof) == pytest.approx(1.0)
    llr_bonafide, llr_spoof = pav_llrs(bonafide, spoof)
    np.testing.assert_allclose(np.concatenate([llr_bonafide, llr_spoof]), 0.0, atol=1e-12)


def test_partial_tie_is_pooled():
    # Sorted, bona fide below spoof at 0: -1(s) 0(b) 0(s) 1(b) -> labels 0 1 0 1; PAV pools the middle pair:
    # p = 0, .5, .5, 1 -> LLR = -inf, 0, 0, +inf (N_bona = N_spoof). minCllr = 0.5 [ (0 + ln2)/2 + (ln2 + 0)/2 ] / ln2.
    llr_bonafide, llr_spoof = pav_llrs([1.0, 0.0], [0.0, -1.0])
    np.testing.assert_array_equal(llr_bonafide, [np.inf, 0.0])
    np.testing.assert_array_equal(llr_spoof, [0.0, -np.inf])
    assert min_cllr([1.0, 0.0], [0.0, -1.0]) == pytest.approx(0.5)


def test_one_trial_per_class():
    # Right way round: DET (0,1) (0,0) (1,0) -> EER 0 at threshold 0, minDCF 0, minCllr 0.
    # actDCF: the spoof's 0 >= theta = -0.64 is a false alarm: 0.5 * 1 / 0.5 = 1.
    # Cllr = 0.5 [ln(1 + e^-1) + ln 2] / ln 2.
    result = track1([1.0], [0.0])
    assert result["eer"] == 0.0 and result["eer_threshold"] == 0.0
    assert result["min_dcf"] == 0.0
    assert result["act_dcf"] == pytest.approx(1.0)
    assert result["cllr"] == pytest.approx(0.5 * (math.log1p(math.exp(-1)) + LN2) / LN2)
    assert result["min_cllr"] == 0.0
    # Wrong way round: DET (0,1) (1,1) (1,0) -> EER 100 %, minDCF min(1, 2.9, 1.9) = 1; PAV pools the two: minCllr 1.
    result = track1([0.0], [1.0])
    assert result["eer"] == pytest.approx(100.0)
    assert result["min_dcf"] == pytest.approx(1.0)
    assert result["min_cllr"] == pytest.approx(1.0)


def test_act_dcf_decision_at_the_threshold():
    # A bona fide score equal to theta is accepted (not a miss); a spoof equal to theta is accepted (a false alarm).
    assert act_dcf([ACT_DCF_THRESHOLD], [ACT_DCF_THRESHOLD]) == pytest.approx(0.05 * 10 / 0.5)
    # Both below theta: every bona fide missed, no false alarm: 0.95 / 0.5.
    assert act_dcf([-1.0], [-1.0]) == pytest.approx(1.9)


def test_perfect_separation():
    bonafide, spoof = [3.0, 4.0, 5.0], [0.0, 1.0, 2.0]
    result = track1(bonafide, spoof)
    assert result["eer"] == 0.0
    assert result["min_dcf"] == 0.0
    assert result["min_cllr"] == 0.0
    llr_bonafide, llr_spoof = pav_llrs(bonafide, spoof)
    assert np.all(llr_bonafide == np.inf) and np.all(llr_spoof == -np.inf)


def test_cllr_huge_scores_stay_finite():
    # softplus(1e4) = 1e4 and softplus(-1e4) = 0, so each class's mean loss is 1e4 / 2:
    # Cllr = 0.5 (5e3 + 5e3) / ln 2; a plain log1p(exp(.)) would give inf.
    value = cllr([-1e4, 1e4], [1e4, -1e4])
    assert value == pytest.approx(0.5 * 1e4 / LN2, rel=1e-12)
    assert cllr([1e4], [-1e4]) == 0.0


def test_cllr_at_other_priors():
    # LLR 0 everywhere: P softplus(-logit P) + (1-P) softplus(logit P) = -P ln P - (1-P) ln(1-P), the prior's entropy.
    for prior in (0.2, 0.5, 0.9):
        entropy = -(prior * math.log2(prior) + (1 - prior) * math.log2(1 - prior))
        assert cllr([0.0, 0.0], [0.0], prior=prior) == pytest.approx(entropy)
    # One bona fide at LLR 1, one spoof at -1, prior 0.2 (logit = -ln 4):
    # [0.2 ln(1 + e^(-1 + ln 4)) + 0.8 ln(1 + e^(-1 - ln 4))] / ln 2 = [0.2 ln(1 + 4/e) + 0.8 ln(1 + 1/(4e))] / ln 2.
    expected = (0.2 * math.log(1 + 4 / math.e) + 0.8 * math.log(1 + 1 / (4 * math.e))) / LN2
    assert cllr([1.0], [-1.0], prior=0.2) == pytest.approx(expected)


def _isotonic_min_max(labels: np.ndarray) -> np.ndarray:
    """Isotonic (non-decreasing) least-squares fit by the min-max formula p_i = max_{j<=i} min_{k>=i} mean(y[j..k])."""
    n = labels.size
    return np.array(
        [max(min(labels[j : k + 1].mean() for k in range(i, n)) for j in range(i + 1)) for i in range(n)]
    )


def test_pav_matches_brute_force_isotonic_fit():
    rng = np.random.default_rng(18)
    for _ in range(150):
        bonafide = rng.integers(0, 5, size=rng.integers(1, 7)).astype(float)
        spoof = rng.integers(0, 5, size=rng.integers(1, 7)).astype(float)
        scores = np.concatenate([bonafide, spoof])
        is_spoof = np.concatenate([np.zeros(bonafide.size), np.ones(spoof.size)])
        order = np.lexsort((is_spoof, scores))  # by score, bona fide first on ties
        posterior = np.empty(scores.size)
        posterior[order] = _isotonic_min_max(1 - is_spoof[order])
        with np.errstate(divide="ignore"):
            expected = np.log(posterior) - np.log(1 - posterior) - math.log(bonafide.size / spoof.size)
        got = np.concatenate(pav_llrs(bonafide, spoof))
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_min_cllr_is_at_most_cllr():
    rng = np.random.default_rng(5)
    for _ in range(20):
        bonafide, spoof = rng.normal(1, 1, 30), rng.normal(-1, 2, 40)
        assert min_cllr(bonafide, spoof) <= cllr(bonafide, spoof) + 1e-12


def test_empty_class_is_refused():
    with pytest.raises(ValueError, match="no bona fide scores"):
        track1([], [1.0])
    with pytest.raises(ValueError, match="no spoof scores"):
        min_cllr([1.0], np.array([]))
    with pytest.raises(ValueError, match="no nontarget scores"):
        a_dcf([1.0], [], [0.0])
    with pytest.raises(ValueError, match="no ASV spoof scores"):
        t_eer([1.0, 1.0], [0.0], [1.0], [0.0], [])
    with pytest.raises(ValueError, match="prior"):
        cllr([1.0], [0.0], prior=1.0)


# --- Track 2 ---------------------------------------------------------------------------------------------------


def test_a_dcf_normaliser():
    # min(10 * 0.0095 + 10 * 0.05, 1 * 0.9405) = min(0.595, 0.9405)
    assert A_DCF_NORMALISER == pytest.approx(0.595)


def test_a_dcf_hand_case():
    # target [2, 3], nontarget [0, 1], spoof [-1, 2.5]; cost = 0.9405 Pmiss + 0.095 Pfa_non + 0.5 Pfa_spoof, / 0.595:
    #   reject none                  0 + .095 + .5         -> 1
    #   reject <= -1  (Pfa_spoof .5)  .095 + .25           -> .579832
    #   reject <= 0   (Pfa_non .5)    .0475 + .25          -> .5
    #   reject <= 1   (Pfa_non 0)     .25                  -> .420168  = 50/119, the minimum
    #   reject <= 2   (Pmiss .5)      .47025 + .25         -> 1.210504
    #   reject <= 2.5 (Pfa_spoof 0)   .47025               -> .790336
    #   reject <= 3   (Pmiss 1)       .9405                -> 1.580672
    assert a_dcf([2.0, 3.0], [0.0, 1.0], [-1.0, 2.5]) == pytest.approx(50 / 119)


def test_a_dcf_never_splits_a_tie():
    # target [1, 2], nontarget [0], spoof [1]: a threshold either rejects both scores of 1 or neither.
    #   reject none .595 -> 1; reject <= 0: .5 -> .840336; reject <= 1: Pmiss .5, no FA: .47025 -> .790336;
    #   reject <= 2: .9405 -> 1.580672. Minimum .47025/.595. Splitting the tie (spoof rejected, target kept)
    #   would give an unreachable 0.
    assert a_dcf([1.0, 2.0], [0.0], [1.0]) == pytest.approx(0.47025 / 0.595)


def test_a_dcf_of_a_useless_system_is_one():
    # target [0] below nontarget [1] and spoof [1]: rejecting anything rejects the target first.
    #   reject none: .095 + .5 = .595 -> 1; reject <= 0: .9405 + .595 -> 2.580672; reject <= 1: .9405 -> 1.580672.
    # The best is to accept everything, the normaliser's own system: 1.
    assert a_dcf([0.0], [1.0], [1.0]) == pytest.approx(1.0)


def _a_dcf_loop(target: np.ndarray, nontarget: np.ndarray, spoof: np.ndarray) -> float:
    best = math.inf
    for t in np.concatenate([[-np.inf], np.unique(np.concatenate([target, nontarget, spoof]))]):
        cost = 0.9405 * np.mean(target <= t) + 0.095 * np.mean(nontarget > t) + 0.5 * np.mean(spoof > t)
        best = min(best, cost / 0.595)
    return best


def test_a_dcf_matches_a_threshold_loop():
    rng = np.random.default_rng(7)
    for _ in range(30):
        target, nontarget, spoof = (
            rng.integers(0, 8, size=rng.integers(1, 15)).astype(float) for _ in range(3)
        )
        assert a_dcf(target, nontarget, spoof) == pytest.approx(_a_dcf_loop(target, nontarget, spoof))


def test_t_eer_hand_case():
    # CM: 8 bona fide (4 target, 4 nontarget) all >= 6, spoof [-1, 5]. Rejecting <= -1: Pmiss_cm 0, Pfa_cm 1/2.
    # ASV: target [0, 10, 11, 12], nontarget [-3, -2, -1, 5], spoof [-5, 7]. Rejecting <= 0:
    #   Pmiss_asv 1/4, Pfa_non_asv 1/4, Pfa_spoof_asv 1/2.
    # There: tandem miss = 0 + 1 * 1/4, non-target branch = 1 * 1/4, spoof branch = 1/2 * 1/2 = 1/4: all three
    # equal (concurrent), so tandem FA = 1/4 for any rho, and the t-EER is 25 %.
    value = t_eer(
        [6.0, 7.0, 8.0, 9.0, 6.5, 7.5, 8.5, 9.5],
        [-1.0, 5.0],
        [0.0, 10.0, 11.0, 12.0],
        [-3.0, -2.0, -1.0, 5.0],
        [-5.0, 7.0],
    )
    assert value == pytest.approx(25.0)


def test_t_eer_perfect_systems():
    # Both systems separate their classes: at CM "reject <= 0" and ASV "reject <= 0" every rate is 0.
    assert t_eer([1.0, 1.0], [0.0], [1.0], [0.0], [0.0]) == 0.0


def _rejected(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.array([np.mean(scores <= t) for t in thresholds])


def _t_eer_loop(cm_bona, cm_spoof, asv_tar, asv_non, asv_spoof) -> float:
    """The same reading as t_eer, as a plain double loop over every (CM, ASV) threshold pair."""
    cm_t = np.concatenate([[-np.inf], np.unique(np.concatenate([cm_bona, cm_spoof]))])
    asv_t = np.concatenate([[-np.inf], np.unique(np.concatenate([asv_tar, asv_non, asv_spoof]))])
    cm_miss, cm_fa = _rejected(cm_bona, cm_t), 1 - _rejected(cm_spoof, cm_t)
    best, value = math.inf, math.nan
    for m, n, s in zip(
        _rejected(asv_tar, asv_t), 1 - _rejected(asv_non, asv_t), 1 - _rejected(asv_spoof, asv_t), strict=True
    ):
        miss = cm_miss + (1 - cm_miss) * m
        fa = 0.5 * (1 - cm_miss) * n + 0.5 * cm_fa * s
        i = int(np.argmin(np.abs(miss - fa)))
        rates = [miss[i], (1 - cm_miss[i]) * n, cm_fa[i] * s]
        if max(rates) - min(rates) < best:
            best, value = max(rates) - min(rates), 100 * cm_fa[i] * s
    return value


def test_t_eer_matches_a_double_loop():
    # small integer scores, so ties and flat stretches of the tandem error difference are common
    rng = np.random.default_rng(3)
    for _ in range(40):
        cm_tar, cm_non, cm_spoof, asv_tar, asv_non, asv_spoof = (
            rng.integers(0, 6, size=rng.integers(1, 10)).astype(float) for _ in range(6)
        )
        expected = _t_eer_loop(np.concatenate([cm_tar, cm_non]), cm_spoof, asv_tar, asv_non, asv_spoof)
        assert t_eer(np.concatenate([cm_tar, cm_non]), cm_spoof, asv_tar, asv_non, asv_spoof) == pytest.approx(expected)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _root(f, lo: float, hi: float) -> float:
    """A sign change of f in [lo, hi] by bisection."""
    positive = f(lo) > 0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (f(mid) > 0) == positive else (lo, mid)
    return (lo + hi) / 2


def _concurrent_t_eer_gaussian(mu_cm: float, mu_tar: float, mu_spoof_asv: float) -> float:
    """Population t-EER (percent) for unit-variance Gaussians: CM bona fide N(mu_cm), spoof N(0); ASV target
    N(mu_tar), nontarget N(0), spoof N(mu_spoof_asv). Solves miss = A = B in the two thresholds directly."""

    def branches(tau_asv: float) -> tuple[float, float]:
        m, n, s = _phi(tau_asv - mu_tar), 1 - _phi(tau_asv), 1 - _phi(tau_asv - mu_spoof_asv)
        # tandem miss = non-target branch fixes the CM threshold (the difference rises with it)
        tau_cm = _root(lambda t: _phi(t - mu_cm) * (1 - m + n) + m - n, -20.0, 20.0)
        return (1 - _phi(tau_cm - mu_cm)) * n, (1 - _phi(tau_cm)) * s

    grid = np.arange(-5.0, 10.0, 0.05)
    diff = [branches(t)[0] - branches(t)[1] for t in grid]
    k = next(k for k in range(len(grid) - 1) if (diff[k] > 0) != (diff[k + 1] > 0))
    tau = _root(lambda t: branches(t)[0] - branches(t)[1], grid[k], grid[k + 1])
    return 100 * branches(tau)[1]


def test_t_eer_gaussian_scores_match_population_value():
    # The population value is 8.450 %. With 20,000 trials per class the sample value is within ~0.15 points
    # (binomial error of a rate near 0.3 times 0.3); a reading that lets finite samples fall to the degenerate
    # "ASV rejects everything" end would report 0.
    expected = _concurrent_t_eer_gaussian(3.0, 3.0, 2.0)
    assert expected == pytest.approx(8.4503, abs=1e-3)
    rng = np.random.default_rng(0)
    n = 20_000
    cm_tar, cm_non, cm_spoof = rng.normal(3, 1, n), rng.normal(3, 1, n), rng.normal(0, 1, n)
    asv_tar, asv_non, asv_spoof = rng.normal(3, 1, n), rng.normal(0, 1, n), rng.normal(2, 1, n)
    assert t_eer(np.concatenate([cm_tar, cm_non]), cm_spoof, asv_tar, asv_non, asv_spoof) == pytest.approx(expected, abs=0.4)


def test_t_eer_is_fast_on_100k_trials():
    rng = np.random.default_rng(1)
    n = 100_000 // 5
    scores = [rng.normal(mu, 1, n) for mu in (3, 0, 3, 0, 2)]
    start = time.perf_counter()
    t_eer(*scores)
    assert time.perf_counter() - start < 2.0


# --- calibration -----------------------------------------------------------------------------------------------

MU_BONA, MU_SPOOF, SIGMA = 2.0, -1.0, 1.5
# log N(s; mu1, sigma) - log N(s; mu0, sigma) = (mu1 - mu0)/sigma^2 s - (mu1^2 - mu0^2)/(2 sigma^2)
TRUE_A = (MU_BONA - MU_SPOOF) / SIGMA**2  # 4/3
TRUE_B = -(MU_BONA**2 - MU_SPOOF**2) / (2 * SIGMA**2)  # -2/3


@pytest.fixture(scope="module")
def gaussian_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2024)
    return rng.normal(MU_BONA, SIGMA, 20_000), rng.normal(MU_SPOOF, SIGMA, 30_000)


@pytest.mark.parametrize("prior", [0.5, 0.2, 0.9])
def test_calibration_recovers_the_true_llr_map(gaussian_scores, prior):
    # The true LLR is affine in the score, so for every prior the weighted logistic regression estimates the
    # same (a, b): the logit(prior) offset is what keeps b the LLR's intercept (unequal class counts too).
    # Standard errors at 20,000 + 30,000 trials are ~0.01 for both.
    bonafide, spoof = gaussian_scores
    a, b = fit_calibration(bonafide, spoof, prior=prior)
    assert a == pytest.approx(TRUE_A, rel=0.03)
    assert b == pytest.approx(TRUE_B, abs=0.04)


def test_calibration_of_distorted_scores(gaussian_scores):
    # Scores 3 s + 5: the fitted map undoes it (a = TRUE_A / 3, b = TRUE_B - 5 a), and the calibrated Cllr is
    # below the raw one; it cannot go below minCllr (PAV is the best monotone map).
    bonafide, spoof = (3 * s + 5 for s in gaussian_scores)
    a, b = fit_calibration(bonafide, spoof)
    assert a == pytest.approx(TRUE_A / 3, rel=0.03)
    assert b == pytest.approx(TRUE_B - 5 * TRUE_A / 3, abs=0.25)
    calibrated = cllr(apply_calibration(bonafide, a, b), apply_calibration(spoof, a, b))
    assert min_cllr(bonafide, spoof) <= calibrated < cllr(bonafide, spoof)
    assert calibrated <= cllr(*gaussian_scores)  # the identity map on the true scale is one of the candidates


def test_calibration_of_uninformative_scores():
    # All scores equal: the slope is 0 and P softplus(-b - logit P) + (1-P) softplus(b + logit P) is smallest
    # where sigmoid(b + logit P) = P, i.e. b = 0 (LLR 0), for any prior and class counts.
    for prior in (0.5, 0.2):
        a, b = fit_calibration([1.0, 1.0], [1.0, 1.0, 1.0], prior=prior)
        assert a == pytest.approx(0.0, abs=1e-9)
        assert b == pytest.approx(0.0, abs=1e-9)


def test_calibration_of_separated_scores_stays_finite():
    # Perfect separation: the unpenalised optimum is a = +inf; the ridge keeps a finite, positive and confident.
    # By symmetry b = 0.
    for scale in (1.0, 1e4):
        bonafide, spoof = np.array([1.0, 2.0]) * scale, np.array([-1.0, -2.0]) * scale
        a, b = fit_calibration(bonafide, spoof)
        assert math.isfinite(a) and a > 0
        assert b == pytest.approx(0.0, abs=1e-9)
        assert cllr(apply_calibration(bonafide, a, b), apply_calibration(spoof, a, b)) < 1e-3


def test_apply_calibration():
    np.testing.assert_allclose(apply_calibration([0.0, 1.0, -2.0], 2.0, -1.0), [-1.0, 1.0, -5.0])
