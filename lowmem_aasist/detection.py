"""ASVspoof 5 detection metrics and score calibration, in plain numpy.

What it holds:
- Track 1 (stand-alone CM, higher score = bona fide): minDCF, actDCF, Cllr, minCllr (by PAV) and `track1`, which
  gathers them with the EER of `metrics.compute_eer`.
- Track 2 (SASV): the a-DCF on SASV scores and the concurrent t-EER of a CM and an ASV system in tandem.
- Calibration: a prior-weighted logistic regression that maps scores to log-likelihood ratios (LLRs).

Why a separate module: `metrics` reproduces the ASVspoof 2019 evaluation (EER, min t-DCF, its score files); the
ASVspoof 5 evaluation keeps that DET/EER procedure (so `det_curve` and `compute_eer` are reused from there) but
adds cost-based and information-theoretic metrics that read scores as natural-log LLRs, and so need calibration.
The formulas follow the written specification (ASVspoof 5 evaluation plan and package, Brümmer's PAV/ROCCH and
cross-entropy definitions, Kinnunen et al., TPAMI 2023); no code of those projects is used. Every function takes
score arrays and raises ValueError, with a message naming the class, when a class has no scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from .metrics import compute_eer, det_curve

# --- Track 1 cost model (ASVspoof 5 evaluation plan) ---------------------------------------------------------

P_SPOOF = 0.05
C_MISS = 1.0  # cost of rejecting a bona fide trial
C_FA = 10.0  # cost of accepting a spoof
# The costs of the two trivial systems (reject all, accept all); the cheaper one is the unit of the normalised DCF,
# so a system that is no better than a constant decision scores 1.
DCF_NORMALISER = min(C_MISS * (1 - P_SPOOF), C_FA * P_SPOOF)
# The Bayes decision threshold for natural-log LLRs under the cost model: -ln 1.9 = -0.6418538861723947.
def bayes_threshold(p_spoof: float) -> float:
    """The LLR above which accepting as bona fide costs less than rejecting, under C_MISS, C_FA and ``p_spoof``."""
    return -math.log(C_MISS * (1 - p_spoof) / (C_FA * p_spoof))


ACT_DCF_THRESHOLD = bayes_threshold(P_SPOOF)

# --- Track 2 (SASV) cost model ---------------------------------------------------------------------------------

SASV_P_TAR = 0.9405  # (1 - P_SPOOF) * 0.99
SASV_P_NON = 0.0095  # (1 - P_SPOOF) * 0.01
SASV_P_SPOOF = 0.05
SASV_C_MISS = 1.0
SASV_C_FA = 10.0
SASV_C_FA_SPOOF = 10.0
A_DCF_NORMALISER = min(SASV_C_FA * SASV_P_NON + SASV_C_FA_SPOOF * SASV_P_SPOOF, SASV_C_MISS * SASV_P_TAR)

# The t-EER's tandem false-alarm rate mixes non-target and spoof false alarms with this spoof prevalence; at the
# concurrent point both branches are equal, so the value does not depend on it.
T_EER_RHO = 0.5

# Ridge on the standardised calibration parameters: negligible for overlapping classes, but it keeps the optimum
# finite when the scores separate perfectly (the unpenalised optimum is then a slope of +infinity).
CALIBRATION_RIDGE = 1e-6
CALIBRATION_MAX_ITER = 100


def _scores(values: ArrayLike, name: str) -> np.ndarray:
    """values as a flat float64 array; ValueError if empty or NaN (a NaN cannot be ranked or costed)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"no {name} scores: the metric needs at least one {name} trial")
    if np.isnan(array).any():
        raise ValueError(f"{name} scores contain NaN")
    return array


def _softplus(x: np.ndarray) -> np.ndarray:
    """ln(1 + e^x) without overflow: log1p(exp(x)) is inf beyond x ~ 709, which made the official Cllr inf."""
    return np.logaddexp(0.0, x)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _check_prior(prior: float) -> float:
    if not 0 < prior < 1:
        raise ValueError(f"prior must lie strictly between 0 and 1, got {prior!r}")
    return float(prior)


# --- Track 1 ---------------------------------------------------------------------------------------------------


def min_dcf(bonafide: ArrayLike, spoof: ArrayLike) -> float:
    """Normalised minimum DCF of ASVspoof 5 Track 1, over the DET points of `metrics.det_curve`.

    min_i [C_MISS * 0.95 * Pmiss(i) + C_FA * 0.05 * Pfa(i)] / DCF_NORMALISER, i.e. min_i [1.9 Pmiss + Pfa] <= 1.
    """
    miss, false_alarm, _ = det_curve(_scores(bonafide, "bona fide"), _scores(spoof, "spoof"))
    dcf = C_MISS * (1 - P_SPOOF) * miss + C_FA * P_SPOOF * false_alarm
    return float(np.min(dcf) / DCF_NORMALISER)


def act_dcf(bonafide: ArrayLike, spoof: ArrayLike) -> float:
    """Normalised actual DCF: the scores read as natural-log LLRs and thresholded at the Bayes threshold.

    Miss = bona fide score < ACT_DCF_THRESHOLD; false alarm = spoof score >= ACT_DCF_THRESHOLD.
    """
    bonafide, spoof = _scores(bonafide, "bona fide"), _scores(spoof, "spoof")
    miss = np.mean(bonafide < ACT_DCF_THRESHOLD)
    false_alarm = np.mean(spoof >= ACT_DCF_THRESHOLD)
    return float((C_MISS * (1 - P_SPOOF) * miss + C_FA * P_SPOOF * false_alarm) / DCF_NORMALISER)


def cllr(bonafide: ArrayLike, spoof: ArrayLike, prior: float = 0.5) -> float:
    """Cost of the log-likelihood-ratio scores, in bits (prior-weighted binary cross-entropy).

    [P * mean_bona softplus(-s - logit P) + (1 - P) * mean_spoof softplus(s + logit P)] / ln 2.
    At prior 0.5 this is the ASVspoof 5 Cllr. It is not divided by the prior's entropy, so scores that carry no
    information (all 0) cost H(P) bits, 1 bit at P = 0.5. The softplus is stable, so |s| = 1e4 stays finite.
    """
    bonafide, spoof = _scores(bonafide, "bona fide"), _scores(spoof, "spoof")
    prior = _check_prior(prior)
    offset = _logit(prior)
    cost = prior * np.mean(_softplus(-bonafide - offset)) + (1 - prior) * np.mean(_softplus(spoof + offset))
    return float(cost / math.log(2))


def _pav(labels: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit (unit weights) of a 0/1 sequence by pool-adjacent-violators.

    A stack of blocks (sum, count); each new point is pooled with the blocks before it while their mean is above
    its own. Every point is pushed and popped at most once, so the loop is O(n).
    """
    sums: list[float] = []
    counts: list[int] = []
    for y in labels.tolist():
        block_sum, block_count = float(y), 1
        # mean(previous) > mean(current), compared without division
        while sums and sums[-1] * block_count > block_sum * counts[-1]:
            block_sum += sums.pop()
            block_count += counts.pop()
        sums.append(block_sum)
        counts.append(block_count)
    return np.repeat(np.array(sums) / np.array(counts), counts)


def pav_llrs(bonafide: ArrayLike, spoof: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(bona fide LLRs, spoof LLRs), each in the order given: the optimal monotone map of the scores to LLRs.

    Scores sorted ascending, each trial replaced by its label (1 bona fide, 0 spoof), isotonic regression by PAV
    gives the posterior p of each block, and LLR = logit(p) - ln(N_bona / N_spoof) removes the data's own prior.
    Tied scores put bona fide below spoof (pessimistic): a tie is then a violation, pooled into one block, so tied
    trials share one LLR and a tie cannot look like a separation. Blocks of one class give -inf or +inf.
    """
    bonafide, spoof = _scores(bonafide, "bona fide"), _scores(spoof, "spoof")
    scores = np.concatenate([bonafide, spoof])
    labels = np.concatenate([np.ones(bonafide.size), np.zeros(spoof.size)])
    # bona fide come first in `scores`, so a stable sort keeps them below spoofs of the same score
    order = np.argsort(scores, kind="mergesort")
    posterior = _pav(labels[order])
    with np.errstate(divide="ignore"):
        llr_sorted = np.log(posterior) - np.log1p(-posterior) - math.log(bonafide.size / spoof.size)
    llr = np.empty_like(llr_sorted)
    llr[order] = llr_sorted
    return llr[: bonafide.size], llr[bonafide.size :]


def min_cllr(bonafide: ArrayLike, spoof: ArrayLike) -> float:
    """Cllr (bits, prior 0.5) after the optimal monotone recalibration: the discrimination loss alone.

    The Cllr of `pav_llrs`. An infinite LLR only ever falls on its own class's side (a +inf block holds no spoof,
    a -inf block no bona fide), where softplus gives 0: the 0*inf terms are skipped by construction.
    """
    return cllr(*pav_llrs(bonafide, spoof))


def track1(bonafide: ArrayLike, spoof: ArrayLike) -> dict[str, float]:
    """All ASVspoof 5 Track 1 metrics: eer (percent), eer_threshold, min_dcf, act_dcf, cllr (bits), min_cllr."""
    bonafide, spoof = _scores(bonafide, "bona fide"), _scores(spoof, "spoof")
    eer, threshold = compute_eer(bonafide, spoof)
    return {
        "eer": 100.0 * eer,
        "eer_threshold": threshold,
        "min_dcf": min_dcf(bonafide, spoof),
        "act_dcf": act_dcf(bonafide, spoof),
        "cllr": cllr(bonafide, spoof),
        "min_cllr": min_cllr(bonafide, spoof),
    }


# --- Track 2 ---------------------------------------------------------------------------------------------------


def _rejection_curves(*classes: np.ndarray) -> list[np.ndarray]:
    """For each class, the fraction of its scores rejected ("score <= threshold") at every distinct threshold.

    Thresholds: one below every score (nothing rejected), then each distinct score of all classes pooled. Unlike
    det_curve, which walks the sorted scores one at a time, tied scores are never split, so each point is a
    decision rule some threshold really makes. With continuous scores both give the same points.
    """
    thresholds = np.unique(np.concatenate(classes))
    curves = []
    for scores in classes:
        rejected = np.searchsorted(np.sort(scores), thresholds, side="right") / scores.size
        curves.append(np.concatenate([[0.0], rejected]))
    return curves


def a_dcf(target: ArrayLike, nontarget: ArrayLike, spoof: ArrayLike) -> float:
    """Minimum normalised a-DCF of SASV scores (higher = accept), ASVspoof 5 Track 2's primary metric.

    a-DCF(t) = Cmiss*Ptar*Pmiss_tar(t) + Cfa*Pnon*Pfa_non(t) + Cfa_spoof*Pspoof*Pfa_spoof(t), over A_DCF_NORMALISER
    (0.595), minimised over every distinct threshold (trials with score <= t rejected) and "accept all".
    """
    miss_tar, rejected_non, rejected_spoof = _rejection_curves(
        _scores(target, "target"), _scores(nontarget, "nontarget"), _scores(spoof, "spoof")
    )
    cost = (
        SASV_C_MISS * SASV_P_TAR * miss_tar
        + SASV_C_FA * SASV_P_NON * (1 - rejected_non)
        + SASV_C_FA_SPOOF * SASV_P_SPOOF * (1 - rejected_spoof)
    )
    return float(np.min(cost) / A_DCF_NORMALISER)


def _first_non_negative(
    values: Callable[[np.ndarray, np.ndarray], np.ndarray], columns: int, size: int
) -> np.ndarray:
    """Per column j, the first i in [0, size) with values(i, j) >= 0 (size if none).

    values(i, j) must be non-decreasing in i; one vectorised bisection for all columns at once.
    """
    lo = np.zeros(columns, dtype=np.int64)
    hi = np.full(columns, size, dtype=np.int64)
    while True:
        j = np.flatnonzero(lo < hi)
        if j.size == 0:
            return lo
        mid = (lo[j] + hi[j]) // 2
        non_negative = values(mid, j) >= 0
        hi[j] = np.where(non_negative, mid, hi[j])
        lo[j] = np.where(non_negative, lo[j], mid + 1)


def _equal_error_cm_index(
    cm_miss: np.ndarray,
    cm_fa: np.ndarray,
    asv_miss: np.ndarray,
    asv_fa_non: np.ndarray,
    asv_fa_spoof: np.ndarray,
) -> np.ndarray:
    """For each ASV threshold j, the CM index i minimising |tandem miss - tandem FA| (first one on ties).

    h(i, j) = tandem miss - tandem FA is non-decreasing in i (the CM miss rate rises, its FA rate falls, and the
    coefficient of the CM miss rate, 1 - Pmiss_asv + (1 - rho) Pfa_non_asv, is >= 0), so the minimum of |h| lies
    at the sign change: found by bisection for all j at once, exact, in O(J log I) instead of O(I J).
    Where h is flat over several CM points, which one is taken does not matter: a step of the CM miss rate leaves
    h flat only if Pmiss_asv = 1 and Pfa_non_asv = 0, a step of its FA rate only if Pfa_spoof_asv = 0, and then
    the step changes none of tandem miss, non-target FA and spoof FA.
    """

    def h(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        miss = cm_miss[i] + (1 - cm_miss[i]) * asv_miss[j]
        fa = (1 - T_EER_RHO) * (1 - cm_miss[i]) * asv_fa_non[j] + T_EER_RHO * cm_fa[i] * asv_fa_spoof[j]
        return miss - fa

    size, columns = cm_miss.size, np.arange(asv_miss.size)
    k = _first_non_negative(h, columns.size, size)
    below = np.where(k > 0, h(np.maximum(k - 1, 0), columns), -np.inf)
    above = np.where(k < size, h(np.minimum(k, size - 1), columns), np.inf)
    return np.where(-below <= above, k - 1, k)  # on a tie the earlier index, as argmin would


def t_eer(
    cm_bonafide: ArrayLike,
    cm_spoof: ArrayLike,
    asv_target: ArrayLike,
    asv_nontarget: ArrayLike,
    asv_spoof: ArrayLike,
) -> float:
    """Concurrent tandem equal error rate (percent) of a CM and an ASV system (Kinnunen et al., TPAMI 2023).

    With the CM at threshold i and the ASV at threshold j (trials scoring <= the threshold rejected):
        tandem miss  = Pmiss_cm + (1 - Pmiss_cm) Pmiss_asv
        FA branches  = A = (1 - Pmiss_cm) Pfa_non_asv  (non-targets)   and   B = Pfa_cm Pfa_spoof_asv  (spoofs)
        tandem FA    = (1 - rho) A + rho B, rho = 0.5.
    The t-EER is the value at the concurrent point, where miss = A = B (then independent of rho). For each ASV
    threshold the CM threshold equalising tandem miss and tandem FA is found; the ASV threshold chosen is the one
    whose point is closest to concurrent; the value is 100 * B there.

    Readings chosen:
    - CM miss rate over all bona fide trials (targets and non-targets pooled, as a CM score file holds them),
      one rate in both formulas.
    - "Closest to concurrent" = smallest spread max(miss, A, B) - min(miss, A, B), first ASV threshold on ties.
      Where the equalisation is exact this is |A - B|, the criterion the definition names; |A - B| alone would
      also be 0 at the degenerate ASV threshold that rejects every trial (A = B = 0, tandem miss 1), which
      finite samples, never exactly concurrent elsewhere, would then always pick (t-EER 0).
    - Thresholds at every distinct score (ties never split), full resolution: the CM equalisation is a bisection
      (see _equal_error_cm_index), so 10^5 trials take well under a second without decimating the curves.
    """
    cm_miss, cm_rejected_spoof = _rejection_curves(_scores(cm_bonafide, "CM bona fide"), _scores(cm_spoof, "CM spoof"))
    cm_fa = 1 - cm_rejected_spoof
    asv_miss, asv_rejected_non, asv_rejected_spoof = _rejection_curves(
        _scores(asv_target, "ASV target"),
        _scores(asv_nontarget, "ASV nontarget"),
        _scores(asv_spoof, "ASV spoof"),
    )
    asv_fa_non, asv_fa_spoof = 1 - asv_rejected_non, 1 - asv_rejected_spoof
    i = _equal_error_cm_index(cm_miss, cm_fa, asv_miss, asv_fa_non, asv_fa_spoof)
    miss = cm_miss[i] + (1 - cm_miss[i]) * asv_miss
    fa_non = (1 - cm_miss[i]) * asv_fa_non
    fa_spoof = cm_fa[i] * asv_fa_spoof
    rates = np.stack([miss, fa_non, fa_spoof])
    j = int(np.argmin(rates.max(axis=0) - rates.min(axis=0)))
    return float(100.0 * fa_spoof[j])


# --- calibration -----------------------------------------------------------------------------------------------


def _weighted_logistic(x: np.ndarray, sign: np.ndarray, weight: np.ndarray, offset: float) -> np.ndarray:
    """(a, b) minimising sum weight * softplus(-sign * (a x + b + offset)) + ridge/2 |(a, b)|^2 by damped Newton.

    The objective is convex, so a Newton step with backtracking (Armijo) line search converges in a handful of
    iterations; the ridge makes the Hessian positive definite even when the classes separate.
    """

    def objective(theta: np.ndarray) -> float:
        z = theta[0] * x + theta[1] + offset
        return float(weight @ _softplus(-sign * z) + 0.5 * CALIBRATION_RIDGE * theta @ theta)

    theta = np.zeros(2)  # the "no information" map: a finite, well-conditioned start for any score scale
    value = objective(theta)
    for _ in range(CALIBRATION_MAX_ITER):
        z = theta[0] * x + theta[1] + offset
        # d/dz softplus(-sign z) = -sign * sigmoid(-sign z); sigmoid(u) = exp(-softplus(-u)) without overflow
        slope = -sign * np.exp(-_softplus(sign * z))
        curvature = weight * np.exp(-_softplus(z) - _softplus(-z))  # sigmoid(z) (1 - sigmoid(z))
        gradient = np.array([weight @ (slope * x), weight @ slope]) + CALIBRATION_RIDGE * theta
        hessian = np.array(
            [[curvature @ (x * x), curvature @ x], [curvature @ x, curvature.sum()]]
        ) + CALIBRATION_RIDGE * np.eye(2)
        step = -np.linalg.solve(hessian, gradient)
        decrease = float(gradient @ step)  # minus the squared Newton decrement: the predicted gain
        if -decrease < 1e-14:
            break
        size = 1.0
        while size > 1e-10 and objective(theta + size * step) > value + 1e-4 * size * decrease:
            size /= 2
        theta = theta + size * step
        value = objective(theta)
    return theta


def fit_calibration(bonafide: ArrayLike, spoof: ArrayLike, prior: float = 0.5) -> tuple[float, float]:
    """(a, b) of the affine map s -> a s + b that turns the scores into natural-log LLRs.

    Prior-weighted logistic regression (as BOSARIS): minimises the Cllr at `prior` of the calibrated scores,
    P/N_bona * sum_bona softplus(-(a s + b + logit P)) + (1-P)/N_spoof * sum_spoof softplus(a s + b + logit P),
    so with the logit(P) offset the result is an LLR whatever the class counts and the prior.
    Scores are standardised before fitting (Newton is then well conditioned and the ridge scale-free) and the
    parameters mapped back. A ridge of CALIBRATION_RIDGE on the standardised (a, b) and at most
    CALIBRATION_MAX_ITER Newton iterations keep the fit finite when the classes separate perfectly: the slope is
    then large (the LLRs confident) but finite.
    """
    bonafide, spoof = _scores(bonafide, "bona fide"), _scores(spoof, "spoof")
    prior = _check_prior(prior)
    scores = np.concatenate([bonafide, spoof])
    if not np.isfinite(scores).all():
        raise ValueError("calibration scores contain infinite values")
    centre, scale = float(np.mean(scores)), float(np.std(scores))
    if not scale > 0:
        scale = 1.0  # all scores equal: nothing to scale, the slope stays 0
    sign = np.concatenate([np.ones(bonafide.size), -np.ones(spoof.size)])
    weight = np.concatenate(
        [np.full(bonafide.size, prior / bonafide.size), np.full(spoof.size, (1 - prior) / spoof.size)]
    )
    a_std, b_std = _weighted_logistic((scores - centre) / scale, sign, weight, _logit(prior))
    return float(a_std / scale), float(b_std - a_std * centre / scale)


def effective_prior(p_spoof: float = P_SPOOF) -> float:
    """The bona fide prior at which Track 1's costs (C_MISS, C_FA) and a spoof prior ``p_spoof`` make the same
    decisions as equal costs: 0.95 / (0.95 + 0.5) = 0.655 for the ASVspoof 5 parameters."""
    bona = (1 - _check_prior(p_spoof)) * C_MISS
    return bona / (bona + p_spoof * C_FA)


def apply_calibration(scores: ArrayLike, a: float, b: float) -> np.ndarray:
    """The calibrated scores a * s + b (LLRs, when a and b come from fit_calibration)."""
    return a * np.asarray(scores, dtype=np.float64) + b
