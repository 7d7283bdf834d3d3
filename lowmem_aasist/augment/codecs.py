"""Codec and channel augmentation: lossy codec round trips (MP3, Ogg/Vorbis, Ogg/Opus), G.711 µ-law and A-law at
8 kHz, and a telephone channel, all in memory with numpy, soundfile and soxr.

Spec (see :mod:`lowmem_aasist.augment.base`)::

    codec                                        one of every available codec per item, compression 0.2-0.9
    codec:codecs=mp3/opus,compression=0.5-0.95       draw from these only (repeat a name to weight it)
    mp3:compression=0.9  ogg  opus  mulaw  alaw  telephone   one codec, always

``compression`` is libsndfile's ``compression_level``, drawn uniformly per item: **0 is the highest bit-rate, 1 the
lowest** (it names how hard the codec squeezes, not how good the result is). Measured at 16 kHz with soundfile 0.14.0
and libsndfile 1.2.2 on 4 s of a noisy tone / a speech-like harmonic signal, with the cost of one 4 s item on one core
of a shared 2-core x86 machine:

    mp3        constant bit-rate: 166 kbps at 0, 132 at 0.2, 83 at 0.5, 25 at 0.9, 8 at 0.99, in 16.6 kbps steps
               (libsndfile refuses 1.0, which becomes 0.99). LAME low-passes near 7 kHz, near 6 kHz at 25 kbps,
               below 3.4 kHz at 8 kbps. About 27 ms.
    ogg        Vorbis, variable bit-rate: 72 / 44 kbps at 0, 45 / 33 at 0.5, 33 / 23 at 1; keeps the whole 8 kHz
               band even at 1. About 15 ms.
    opus       261 kbps at 0, 210 at 0.2, 134 at 0.5, 31 / 17 at 0.9, 9 at 0.99, where nothing above 5 kHz
               survives. About 80 ms, 135 ms from 0.85 up: the dearest by far.
    mulaw      G.711 µ-law (µ = 255), 8 bits at 8 kHz; ignores compression. Under 1 ms.
    alaw       G.711 A-law (A = 87.6), 8 bits at 8 kHz; ignores compression. Under 1 ms.
    telephone  300-3400 Hz band-pass (the -6 dB points) at 8 kHz, a linear channel without companding; ignores
               compression. About 1 ms.

Every output has the input's length, is finite float32 and is clipped to [-1, 1]: a decoder writing PCM saturates at
full scale, and the input is clipped before encoding for the same reason.

Delay. libsndfile usually trims the codec's delay and padding itself (the Ogg pre-skip and granule position, the LAME
tag of an MP3), and the decoded signal then lines up with the input sample for sample (an MP3 may come back a
sample short). The exception measured: MP3 at constant bit-rates of 32 kbps and below (compression >= 0.85) decodes with
1105 extra leading samples (presumably LAME's 576 plus the decoder's 529, the tag that would trim them missing from
such small frames) and padding to a whole frame: 65,664 samples for 64,000.
Rather than hard-code what one library version does, each lossy round trip is aligned to its input by
cross-correlation over lags of -256..+2048 samples, then cut or zero-padded to the input's length. A strictly periodic
input may be aligned a whole period off, which changes nothing but the edges. G.711 and the telephone channel need no
alignment: soxr's resampling and the zero-phase FFT band-pass add no delay.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

import numpy as np
import soundfile as sf
import soxr

from .base import Params, augmentation

LOSSY: dict[str, tuple[str, str]] = {"mp3": ("MP3", "MPEG_LAYER_III"), "ogg": ("OGG", "VORBIS"), "opus": ("OGG", "OPUS")}
"""Spec name -> soundfile (format, subtype)."""
NARROWBAND = ("mulaw", "alaw", "telephone")
CODECS = (*LOSSY, *NARROWBAND)

MU = 255.0
A = 87.6
PHONE_RATE = 8000
PHONE_BAND = (300.0, 3400.0)
# Widths of the raised-cosine band edges, centred on the nominal edges so these are the -6 dB points.
PHONE_EDGES = (100.0, 200.0)

MAX_DELAY = 2048
"""Largest codec delay searched for, in samples: above the 1105 measured for MP3 without its LAME tag."""
MAX_ADVANCE = 256
"""Codecs only delay; a small advance is allowed in case a decoder trims more than the delay it added."""

# Rates each encoder accepted here; another input rate is resampled to the first listed rate >= it (else the highest),
# since e.g. Opus refuses 22.05 and 44.1 kHz.
RATES = {
    "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    "ogg": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    "opus": (8000, 12000, 16000, 24000, 48000),
}


@cache
def codec_available(codec: str) -> bool:
    """Whether the installed libsndfile can encode and decode ``codec`` (checked once, by a tiny round trip)."""
    if codec not in LOSSY:
        return codec in NARROWBAND
    fmt, subtype = LOSSY[codec]
    if subtype not in sf.available_subtypes(fmt):
        return False
    probe = np.zeros(1600, np.float32)
    try:
        return len(_encode_decode(probe, 16000, codec, 0.5)) > 0
    # TypeError: a soundfile older than 0.13 has no compression_level; the rest: a library that lists but fails it.
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return False


def available_codecs() -> tuple[str, ...]:
    return tuple(c for c in CODECS if codec_available(c))


def _encode_decode(x: np.ndarray, sr: int, codec: str, compression: float) -> np.ndarray:
    fmt, subtype = LOSSY[codec]
    extra = {}
    if codec == "mp3":
        # Constant bit-rate makes the level a bit-rate ladder (166 -> 8 kbps); libsndfile rejects 1.0.
        compression = min(compression, 0.99)
        extra["bitrate_mode"] = "CONSTANT"
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype, compression_level=float(compression), **extra)
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float32", always_2d=False)
    return y.reshape(-1)


def align(y: np.ndarray, x: np.ndarray, max_delay: int = MAX_DELAY, max_advance: int = MAX_ADVANCE) -> np.ndarray:
    """``y`` shifted by the lag that best matches it to ``x`` (within -max_advance..+max_delay), cut or zero-padded
    to ``len(x)``. Lag 0 wins ties, so silence or an uncorrelated output stays where it is."""
    n = len(x)
    if n == 0 or len(y) == 0:
        return np.zeros(n, np.float32)
    size = 1 << int(len(x) + len(y)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(y, size) * np.conj(np.fft.rfft(x, size)), size)
    lags = np.r_[0:min(max_delay, len(y) - 1) + 1, -min(max_advance, n - 1):0]
    lag = int(lags[np.argmax(corr[lags % size])])
    out = np.zeros(n, np.float32)
    if lag >= 0:
        part = y[lag:lag + n]
        out[:len(part)] = part
    else:
        part = y[:n + lag]
        out[-lag:-lag + len(part)] = part
    return out


def lossy_round_trip(x: np.ndarray, sr: int, codec: str, compression: float) -> np.ndarray:
    """``x`` encoded with ``codec`` ("mp3", "ogg", "opus") at compression level ``compression`` and decoded, aligned."""
    x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
    if len(x) == 0:
        return x.copy()
    rates = RATES[codec]
    rate = sr if sr in rates else next((r for r in rates if r >= sr), rates[-1])
    coded = x if rate == sr else _resample(x, sr, rate)
    y = _encode_decode(coded, rate, codec, compression)
    if rate != sr:
        y = _resample(y, rate, sr)
    return np.clip(align(y, x), -1.0, 1.0)


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    return np.asarray(soxr.resample(x, sr_in, sr_out), np.float32)


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    """``y`` cut or zero-padded to ``n`` samples (soxr's output length is rounded from the rate ratio)."""
    out = np.zeros(n, np.float32)
    out[:min(n, len(y))] = y[:n]
    return out


def mulaw_quantise(x: np.ndarray, mu: float = MU) -> np.ndarray:
    """The µ-law curve, quantised to 8 bits (sign + 7-bit magnitude, mid-tread so silence stays silent), expanded."""
    x = np.clip(x, -1.0, 1.0)
    compressed = np.log1p(mu * np.abs(x)) / np.log1p(mu)
    level = np.round(compressed * 127.0) / 127.0
    return (np.sign(x) * np.expm1(level * np.log1p(mu)) / mu).astype(np.float32)


def alaw_quantise(x: np.ndarray, a: float = A) -> np.ndarray:
    """The A-law curve (linear below 1/A, logarithmic above), quantised to 8 bits like :func:`mulaw_quantise`."""
    x = np.clip(x, -1.0, 1.0)
    mag = np.abs(x)
    norm = 1.0 + np.log(a)
    compressed = np.where(mag < 1.0 / a, a * mag / norm, (1.0 + np.log(np.maximum(a * mag, 1.0))) / norm)
    level = np.round(compressed * 127.0) / 127.0
    expanded = np.where(level < 1.0 / norm, level * norm / a, np.exp(level * norm - 1.0) / a)
    return (np.sign(x) * expanded).astype(np.float32)


def band_pass(x: np.ndarray, sr: int, lo: float, hi: float, edges: tuple[float, float] = PHONE_EDGES) -> np.ndarray:
    """Zero-phase band-pass by an FFT-domain mask with raised-cosine edges of widths ``edges`` centred on ``lo``
    and ``hi``; zero-padded so the filter's short ring does not wrap around the ends."""
    n = len(x)
    if n == 0:
        return np.zeros(0, np.float32)
    size = 1 << int(n + 4 * sr // int(min(edges))).bit_length()
    f = np.fft.rfftfreq(size, 1.0 / sr)

    def ramp(edge: float, width: float) -> np.ndarray:  # 0 below edge - width/2, 1 above edge + width/2
        t = np.clip((f - (edge - width / 2)) / width, 0.0, 1.0)
        return 0.5 - 0.5 * np.cos(np.pi * t)

    mask = ramp(lo, edges[0]) * (1.0 - ramp(hi, edges[1]))
    return np.fft.irfft(np.fft.rfft(x, size) * mask, size)[:n].astype(np.float32)


def narrowband_round_trip(x: np.ndarray, sr: int, codec: str) -> np.ndarray:
    """``x`` through an 8 kHz channel: G.711 ``mulaw``/``alaw``, or the ``telephone`` band-pass."""
    x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
    n = len(x)
    if n == 0:
        return x.copy()
    low = x if sr == PHONE_RATE else _resample(x, sr, PHONE_RATE)
    if codec == "mulaw":
        low = mulaw_quantise(low)
    elif codec == "alaw":
        low = alaw_quantise(low)
    elif codec == "telephone":
        low = band_pass(low, PHONE_RATE, *PHONE_BAND)
    else:
        raise ValueError(f"unknown narrowband codec {codec!r}")
    y = low if sr == PHONE_RATE else _resample(low, PHONE_RATE, sr)
    return np.clip(_fit(y, n), -1.0, 1.0)


def round_trip(x: np.ndarray, sr: int, codec: str, compression: float = 0.5) -> np.ndarray:
    """``x`` through ``codec`` (one of :data:`CODECS`), same length, float32 in [-1, 1]."""
    if codec in LOSSY:
        return lossy_round_trip(x, sr, codec, compression)
    return narrowband_round_trip(x, sr, codec)


@dataclass(frozen=True)
class Codec:
    """One codec and one compression drawn per item (both draws always made, so the stream never depends on which)."""

    codecs: tuple[str, ...]
    compression: tuple[float, float] = (0.2, 0.9)

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        codec = self.codecs[int(rng.integers(len(self.codecs)))]
        compression = float(rng.uniform(*self.compression))
        return round_trip(x, sr, codec, compression)


def _checked(params: Params, picked: tuple[str, ...]) -> tuple[str, ...]:
    missing = [c for c in dict.fromkeys(picked) if not codec_available(c)]
    if missing:
        fmt, subtype = LOSSY[missing[0]]
        raise params.fail(f"{missing[0]}: this libsndfile ({sf.__libsndfile_version__}) cannot encode "
                          f"{fmt}/{subtype}; available: {'/'.join(available_codecs())}")
    return picked


def _compression(params: Params) -> tuple[float, float]:
    return params.range("compression", (0.2, 0.9), 0.0, 1.0)


@augmentation("codec", "lossy codec or telephone channel round trip, one per item: "
                       "codecs=mp3/ogg/opus/mulaw/alaw/telephone (default: all available), "
                       "compression=0.2-0.9 (compression level, 0 = highest bit-rate)")
def build_codec(params: Params) -> Codec:
    picked = params.choices("codecs", available_codecs(), CODECS)
    return Codec(_checked(params, picked), _compression(params))


def _register_single(name: str) -> None:
    if name in LOSSY:
        fmt, subtype = LOSSY[name]
        text = f"{fmt}/{subtype} round trip: compression=0.2-0.9 (compression level, 0 = highest bit-rate)"

        def build(params: Params) -> Codec:
            return Codec(_checked(params, (name,)), _compression(params))
    else:
        text = {"mulaw": "G.711 µ-law at 8 kHz", "alaw": "G.711 A-law at 8 kHz",
                "telephone": "300-3400 Hz band-pass at 8 kHz"}[name]

        def build(params: Params) -> Codec:
            return Codec((name,))

    augmentation(name, text)(build)


for _name in CODECS:
    _register_single(_name)
