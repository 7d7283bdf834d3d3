"""RawBoost (Tak et al., ICASSP 2022): convolutive, impulsive and stationary noise made of random multi-band-stop
filters, with the published algorithms 1-8 and default parameters (as SSL_Anti-spoofing trains: algo 5 for LA, 3
for DF). Written from the published description in numpy alone; the filters are Hamming-windowed sinc designs.

One difference from the published pipeline: it runs on the training crop the loader read, not on the whole
utterance before the cut, because the loader never decodes whole files. Filters reach at most ~500 samples, so the
difference is the normalisation's scope (the crop's peak instead of the utterance's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Params, augmentation


@dataclass(frozen=True)
class Bands:
    """The random notch filters' ranges (the published defaults)."""

    n_bands: int = 5
    min_f: float = 20.0
    max_f: float = 8000.0
    min_bw: float = 100.0
    max_bw: float = 1000.0
    min_coeff: int = 10
    max_coeff: int = 100


@dataclass(frozen=True)
class RawBoostParams:
    bands: Bands = Bands()
    min_g: float = 0.0
    max_g: float = 0.0
    min_bias: float = 5.0
    """Subtracted from min_g (and max_bias from max_g) for every non-linear term of LnL."""
    max_bias: float = 20.0
    n_f: int = 5
    """LnL's terms: x, x^2, ..., x^n_f."""
    p_isd: float = 10.0
    """ISD touches up to this percentage of samples."""
    g_sd: float = 2.0
    snr: tuple[float, float] = (10.0, 40.0)
    """SSI's signal-to-noise ratio range, dB."""


def band_stop(taps: int, f1: float, f2: float, fs: float) -> np.ndarray:
    """A linear-phase FIR that passes [0, f1] and [f2, fs/2] (odd ``taps``, Hamming window, unit gain at 0 Hz)."""
    nyq = fs / 2
    lo, hi = f1 / nyq, f2 / nyq
    m = np.arange(taps) - (taps - 1) / 2
    # Ideal response as a sum of pass bands: [0, lo] and [hi, 1] in units of Nyquist.
    h = lo * np.sinc(lo * m) + (np.sinc(m) - hi * np.sinc(hi * m))
    h *= np.hamming(taps)
    return h / h.sum()


def notch_filter(rng: np.random.Generator, bands: Bands, min_g: float, max_g: float, fs: float) -> np.ndarray:
    """A cascade of ``n_bands`` random band-stops, scaled so that its peak gain is a random G dB."""
    b = np.ones(1)
    for _ in range(bands.n_bands):
        fc = rng.uniform(bands.min_f, bands.max_f)
        bw = rng.uniform(bands.min_bw, bands.max_bw)
        taps = int(rng.uniform(bands.min_coeff, bands.max_coeff))
        taps += 1 - taps % 2  # odd: a band-stop needs a tap at the centre
        f1 = max(fc - bw / 2, 1e-3)
        f2 = min(fc + bw / 2, fs / 2 - 1e-3)
        b = np.convolve(b, band_stop(taps, f1, f2, fs))
    gain_db = min_g + (max_g - min_g) * rng.random()  # the published ranges have low > high (-5 to -20 dB)
    peak = np.abs(np.fft.rfft(b, 1024)[:512]).max()  # 512 points over [0, fs/2), like the published design
    return 10 ** (gain_db / 20) * b / peak


def filter_fir(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x`` filtered by ``b``, advanced by half the filter so the output lines up with the input (same length)."""
    n = len(b) + 1
    y = np.convolve(np.concatenate([x, np.zeros(n)]), b)[: len(x) + n]
    return y[n // 2: n // 2 + len(x)]


def norm_wav(x: np.ndarray, always: bool) -> np.ndarray:
    peak = np.abs(x).max(initial=0.0)
    return x / peak if peak > 0 and (always or peak > 1) else x


def lnl(x: np.ndarray, rng: np.random.Generator, p: RawBoostParams, fs: float) -> np.ndarray:
    """Linear and non-linear convolutive noise: sum of filtered powers of ``x``, the higher ones quieter."""
    y = np.zeros_like(x)
    min_g, max_g = p.min_g, p.max_g
    for i in range(p.n_f):
        if i == 1:
            min_g, max_g = min_g - p.min_bias, max_g - p.max_bias
        y += filter_fir(x ** (i + 1), notch_filter(rng, p.bands, min_g, max_g, fs))
    return norm_wav(y - y.mean(), always=False)


def isd(x: np.ndarray, rng: np.random.Generator, p: RawBoostParams) -> np.ndarray:
    """Impulsive signal-dependent noise on a random few percent of the samples."""
    beta = rng.uniform(0, p.p_isd)
    n = int(len(x) * beta / 100)
    where = rng.permutation(len(x))[:n]
    f = rng.uniform(-1, 1, n) * rng.uniform(-1, 1, n)
    y = x.copy()
    y[where] += p.g_sd * x[where] * f
    return norm_wav(y, always=False)


def ssi(x: np.ndarray, rng: np.random.Generator, p: RawBoostParams, fs: float) -> np.ndarray:
    """Stationary coloured noise at a random SNR (over the whole input)."""
    noise = rng.standard_normal(len(x))
    noise = norm_wav(filter_fir(noise, notch_filter(rng, p.bands, p.min_g, p.max_g, fs)), always=True)
    snr = rng.uniform(*p.snr)
    scale = np.linalg.norm(x) / (np.linalg.norm(noise) * 10 ** (snr / 20) + 1e-300)
    return x + scale * noise


ALGOS = {1: "LnL", 2: "ISD", 3: "SSI", 4: "LnL, ISD, SSI", 5: "LnL, ISD", 6: "LnL, SSI", 7: "ISD, SSI",
         8: "LnL + ISD in parallel"}


@dataclass(frozen=True)
class RawBoost:
    algo: int = 5
    params: RawBoostParams = RawBoostParams()

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        y, p = x.astype(np.float64), self.params
        if self.algo == 8:
            y = norm_wav(lnl(y, rng, p, sr) + isd(y, rng, p), always=False)
        else:
            for op in ALGOS[self.algo].split(", "):
                y = lnl(y, rng, p, sr) if op == "LnL" else isd(y, rng, p) if op == "ISD" else ssi(y, rng, p, sr)
        return y.astype(np.float32)


@augmentation("rawboost", "RawBoost algorithm 1-8 (5: LnL then ISD, the LA recipe; 3: SSI, the DF recipe); "
                          "snr=10-40 sets SSI's range")
def _build(params: Params) -> RawBoost:
    algo = params.integer("algo", 5, 1, 8, positional=True)
    snr = params.range("snr", RawBoostParams.snr, -20.0, 100.0)
    return RawBoost(algo, RawBoostParams(snr=snr))
