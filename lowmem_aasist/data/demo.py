"""Synthetic demo corpus in the ASVspoof 2019 LA layout.

The corpus lets the whole pipeline (protocol parsing, streaming, training,
scoring) run end to end without downloading the real data set.  Bona fide
utterances are produced by a small source-filter speech synthesiser; spoofed
ones come out of the very same synthesiser and then pass through a
vocoder-like artefact (band limit at 4-5 kHz plus a faint spectral image just
below 8 kHz).  Everything else -- lengths, loudness, silences, noise floor --
is drawn from identical distributions for both classes, so the artefact is
the only cue a detector can learn.  A small AASIST-L learns that cue within a
few hundred steps, while no cheaper shortcut (level, duration, bandwidth below
4 kHz) exists.

Every utterance is a pure function of ``(seed, split, index)``, which is what
makes the output byte-identical regardless of how many worker processes
render it.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = [
    "GENERATOR_VERSION",
    "SAMPLE_RATE",
    "demo_corpus_ready",
    "ensure_demo_corpus",
    "make_demo_corpus",
]

# Bump whenever the rendered audio or layout changes, so cached corpora made by
# an older generator are rebuilt instead of silently reused.
GENERATOR_VERSION = 2
SAMPLE_RATE = 16_000

MARKER_NAME = ".complete"
# Written before any audio, so a half-built or crashed folder can be told
# apart from somebody's real corpus and be deleted safely.
OWNER_STAMP = ".lowmem-aasist-demo"
PROTOCOL_DIR = "ASVspoof2019_LA_cm_protocols"


@dataclass(frozen=True)
class _Split:
    name: str
    number: int
    utt_prefix: str
    protocol_file: str
    speakers: tuple[str, ...]


def _speaker_range(first: int, last: int) -> tuple[str, ...]:
    return tuple(f"LA_{k:04d}" for k in range(first, last + 1))


# Speaker ranges follow the real corpus: disjoint between splits.
SPLITS: tuple[_Split, ...] = (
    _Split("train", 0, "LA_T_", "ASVspoof2019.LA.cm.train.trn.txt", _speaker_range(79, 98)),
    _Split("dev", 1, "LA_D_", "ASVspoof2019.LA.cm.dev.trl.txt", _speaker_range(69, 78)),
    _Split("eval", 2, "LA_E_", "ASVspoof2019.LA.cm.eval.trl.txt", _speaker_range(1, 68)),
)


@dataclass(frozen=True)
class _Attack:
    """One simulated vocoder; all of them band-limit, they differ in detail."""

    cutoff_hz: tuple[float, float]  # full stop (>= 60 dB) is reached here
    transition_hz: float  # width of the cosine roll-off below the cutoff
    image_db: tuple[float, float]  # level of the mirrored copy near Nyquist
    image_width_hz: float  # how much low-band content gets mirrored


ATTACKS: dict[str, _Attack] = {
    "A01": _Attack((4000.0, 4500.0), 150.0, (-42.0, -38.0), 450.0),
    "A02": _Attack((4500.0, 5000.0), 250.0, (-45.0, -40.0), 350.0),
    "A03": _Attack((4000.0, 5000.0), 100.0, (-38.0, -34.0), 500.0),
    "A04": _Attack((4200.0, 4800.0), 300.0, (-44.0, -40.0), 600.0),
}


@dataclass(frozen=True)
class _Utterance:
    split_number: int
    index: int
    utt_id: str
    speaker: str
    attack: str | None  # None means bona fide

    @property
    def label(self) -> str:
        return "bonafide" if self.attack is None else "spoof"


@dataclass(frozen=True)
class _Voice:
    """Per-speaker traits, so the same speaker sounds alike across utterances."""

    f0_hz: float
    tract_scale: float  # shorter vocal tracts shift all formants up
    breathiness: float
    open_quotient: float


# --------------------------------------------------------------------------
# Planning: which utterance is which.  Kept separate from rendering so the
# plan can be made once in the parent and shipped to workers.
# --------------------------------------------------------------------------


def _class_counts(n: int, bonafide_fraction: float) -> int:
    # Clamp so every split holds both classes even when n is tiny.
    return min(max(round(n * bonafide_fraction), 1), n - 1)


def _plan_split(split: _Split, n: int, bonafide_fraction: float, seed: int) -> list[_Utterance]:
    # A stream key of a different shape than the per-utterance ones
    # ([seed, split, i]) keeps planning and rendering randomness independent.
    rng = np.random.default_rng([seed, 1000 + split.number])
    is_bonafide = np.zeros(n, dtype=bool)
    is_bonafide[: _class_counts(n, bonafide_fraction)] = True
    rng.shuffle(is_bonafide)
    numbers = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    speakers = rng.integers(len(split.speakers), size=n)
    attack_names = sorted(ATTACKS)
    attacks = rng.integers(len(attack_names), size=n)
    return [
        _Utterance(
            split_number=split.number,
            index=i,
            utt_id=f"{split.utt_prefix}{numbers[i]}",
            speaker=split.speakers[speakers[i]],
            attack=None if is_bonafide[i] else attack_names[attacks[i]],
        )
        for i in range(n)
    ]


def _voice_for(seed: int, speaker: str) -> _Voice:
    rng = np.random.default_rng([seed, 2000, int(speaker.removeprefix("LA_"))])
    return _Voice(
        f0_hz=float(np.exp(rng.uniform(np.log(100.0), np.log(220.0)))),
        tract_scale=float(rng.uniform(0.88, 1.12)),
        breathiness=float(rng.uniform(0.03, 0.12)),
        open_quotient=float(rng.uniform(0.45, 0.7)),
    )


# --------------------------------------------------------------------------
# Speech synthesis (identical for both classes).
# --------------------------------------------------------------------------

_FRAME = 512
_HOP = 256
# Resonance ranges for an average tract, (low, high) centre and bandwidth in
# Hz.  The two highest stand in for the upper vocal-tract modes that give
# real voiced speech its (weak) energy up to 8 kHz; without them bona fide
# vowels would be nearly band-limited themselves.
_FORMANT_RANGES = np.array(
    [
        [300.0, 850.0],
        [850.0, 2300.0],
        [2200.0, 3100.0],
        [3300.0, 3900.0],
        [4300.0, 5000.0],
        [5400.0, 6200.0],
        [6600.0, 7500.0],
    ]
)
_BANDWIDTH_RANGES = np.array(
    [
        [60.0, 120.0],
        [80.0, 150.0],
        [100.0, 220.0],
        [150.0, 300.0],
        [200.0, 400.0],
        [300.0, 600.0],
        [400.0, 800.0],
    ]
)
# Parallel-branch levels relative to F1, giving the usual downward tilt.
_FORMANT_LEVEL_DB = np.array(
    [
        [0.0, 0.0],
        [-10.0, -4.0],
        [-18.0, -10.0],
        [-24.0, -16.0],
        [-28.0, -20.0],
        [-30.0, -22.0],
        [-34.0, -26.0],
    ]
)


@dataclass(frozen=True)
class _Segment:
    start: int
    stop: int
    kind: str  # "syllable", "fricative" or "pause"
    level: float


def _syllable_plan(rng: np.random.Generator, n: int) -> list[_Segment]:
    segments: list[_Segment] = []
    t = 0
    while t < n:
        if segments and rng.random() < 0.15:
            stop = t + int(rng.uniform(0.08, 0.35) * SAMPLE_RATE)
            segments.append(_Segment(t, min(stop, n), "pause", 0.0))
            t = stop
            continue
        level = float(rng.uniform(0.5, 1.0))
        if rng.random() < 0.35:
            stop = t + int(rng.uniform(0.03, 0.09) * SAMPLE_RATE)
            segments.append(_Segment(t, min(stop, n), "fricative", level * float(rng.uniform(0.2, 0.6))))
            t = stop
        stop = t + int(rng.uniform(0.10, 0.30) * SAMPLE_RATE)
        if t < n:
            segments.append(_Segment(t, min(stop, n), "syllable", level))
        t = stop + int(rng.uniform(0.0, 0.04) * SAMPLE_RATE)
    return segments


def _envelopes(segments: Sequence[_Segment], n: int) -> tuple[np.ndarray, np.ndarray]:
    voiced = np.zeros(n)
    fricative = np.zeros(n)
    for seg in segments:
        length = seg.stop - seg.start
        if seg.kind == "pause" or length <= 0:
            continue
        shape = np.sin(np.pi * (np.arange(length) + 0.5) / length)
        target = voiced if seg.kind == "syllable" else fricative
        # An exponent below 1 flattens the top: vowels hold their level,
        # fricative bursts stay peaked.
        target[seg.start : seg.stop] = seg.level * shape ** (0.6 if seg.kind == "syllable" else 1.0)
    return voiced, fricative


def _pitch_contour(rng: np.random.Generator, n: int, voice: _Voice) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    knot_times = np.arange(0.0, n / SAMPLE_RATE + 0.25, 0.2)
    drift = np.interp(t, knot_times, rng.normal(0.0, 0.07, size=knot_times.size))
    declination = np.linspace(rng.uniform(0.0, 0.08), -rng.uniform(0.0, 0.12), n)
    vibrato = rng.uniform(0.003, 0.015) * np.sin(
        2 * np.pi * rng.uniform(4.0, 7.0) * t + rng.uniform(0, 2 * np.pi)
    )
    base = voice.f0_hz * np.exp(rng.normal(0.0, 0.05))
    return np.clip(base * np.exp(drift + declination + vibrato), 90.0, 250.0)


def _glottal_flow(rng: np.random.Generator, f0: np.ndarray, open_quotient: float) -> np.ndarray:
    """Rosenberg-style pulse train; its derivative is the excitation."""
    phase = np.cumsum(f0 / SAMPLE_RATE) + rng.random()
    frac = phase % 1.0
    rise = open_quotient * rng.uniform(0.6, 0.75)
    fall = open_quotient - rise
    opening = 0.5 * (1.0 - np.cos(np.pi * frac / rise))
    closing = np.cos(0.5 * np.pi * (frac - rise) / fall)
    return np.where(frac < rise, opening, np.where(frac < open_quotient, closing, 0.0))


def _frame_count(n: int) -> int:
    return n // _HOP + _FRAME // _HOP


def _frame_times(n: int) -> np.ndarray:
    return (np.arange(_frame_count(n)) * _HOP - _FRAME // 2) / SAMPLE_RATE


def _resonance(freqs: np.ndarray, centre: np.ndarray, bandwidth: np.ndarray) -> np.ndarray:
    """Magnitude of a peak-normalised two-pole band-pass, per frame and bin."""
    f = np.maximum(freqs[None, :], 1.0)
    c = centre[:, None]
    q = c / bandwidth[:, None]
    return 1.0 / np.sqrt(1.0 + (q * (f / c - c / f)) ** 2)


def _formant_gains(
    rng: np.random.Generator, segments: Sequence[_Segment], n: int, voice: _Voice
) -> np.ndarray:
    syllables = [s for s in segments if s.kind == "syllable"] or list(segments)
    centres = np.array([(s.start + s.stop) / 2 / SAMPLE_RATE for s in syllables])
    count = len(syllables)
    times = _frame_times(n)
    freqs = np.fft.rfftfreq(_FRAME, 1.0 / SAMPLE_RATE)
    gains = np.zeros((times.size, freqs.size))
    for k in range(len(_FORMANT_RANGES)):
        # Targets per syllable, interpolated between syllable centres, so the
        # resonances glide the way articulators do.
        targets = rng.uniform(*_FORMANT_RANGES[k], size=count) * voice.tract_scale
        widths = rng.uniform(*_BANDWIDTH_RANGES[k], size=count)
        level = 10.0 ** (rng.uniform(*_FORMANT_LEVEL_DB[k]) / 20.0)
        track = np.interp(times, centres, targets)
        width_track = np.interp(times, centres, widths)
        gains += level * _resonance(freqs, track, width_track)
    return gains


def _fricative_gains(rng: np.random.Generator, n: int) -> np.ndarray:
    freqs = np.fft.rfftfreq(_FRAME, 1.0 / SAMPLE_RATE)
    centre = rng.uniform(2500.0, 7000.0)
    shape = _resonance(freqs, np.array([centre]), np.array([centre / rng.uniform(1.5, 3.0)]))
    return np.repeat(shape, _frame_count(n), axis=0)


def _stft_filter(x: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Time-varying zero-phase filtering by weighted overlap-add.

    A sqrt-Hann window is used for analysis and for synthesis; the squared
    windows then sum to ``overlap / 2`` at any hop that divides the frame.
    """
    n = x.size
    overlap = _FRAME // _HOP
    window = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_FRAME) / _FRAME))
    n_frames = gains.shape[0]
    padded = np.zeros((n_frames + overlap - 1) * _HOP)
    padded[_FRAME // 2 : _FRAME // 2 + n] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, _FRAME)[::_HOP][:n_frames] * window
    filtered = np.fft.irfft(np.fft.rfft(frames, axis=1) * gains, n=_FRAME, axis=1) * window
    blocks = filtered.reshape(n_frames, overlap, _HOP)
    out = np.zeros((n_frames + overlap - 1, _HOP))
    for j in range(overlap):
        out[j : j + n_frames] += blocks[:, j]
    return out.reshape(-1)[_FRAME // 2 : _FRAME // 2 + n] / (overlap / 2)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _synth_speech(rng: np.random.Generator, n: int, voice: _Voice) -> np.ndarray:
    segments = _syllable_plan(rng, n)
    voiced_env, fricative_env = _envelopes(segments, n)
    flow = _glottal_flow(rng, _pitch_contour(rng, n, voice), voice.open_quotient)
    pulses = np.diff(flow, prepend=0.0)
    pulses /= max(_rms(pulses), 1e-12)
    # Aspiration is louder while the glottis is open, as in real breathy voice.
    breath = voice.breathiness * rng.standard_normal(n) * (0.4 + flow)
    source = (pulses + breath) * voiced_env
    speech = _stft_filter(source, _formant_gains(rng, segments, n, voice))
    hiss = rng.standard_normal(n) * fricative_env
    speech += _stft_filter(hiss, _fricative_gains(rng, n))
    # The filters' responses are cut at the region edges and truncation can
    # cut a syllable; raised-cosine fades keep both edges free of clicks,
    # which would otherwise be broadband in either class.
    fade = min(n // 2, int(0.02 * SAMPLE_RATE))
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)
    speech[:fade] *= ramp
    speech[n - fade :] *= ramp[::-1]
    return speech


# --------------------------------------------------------------------------
# Spoofing artefact, loudness, and final assembly.
# --------------------------------------------------------------------------


def _cosine_edge(freqs: np.ndarray, start: float, stop: float) -> np.ndarray:
    """1 below ``start``, 0 above ``stop``, raised-cosine in between."""
    pos = np.clip((freqs - start) / (stop - start), 0.0, 1.0)
    return 0.5 + 0.5 * np.cos(np.pi * pos)


def _vocoder_artefact(rng: np.random.Generator, x: np.ndarray, attack: _Attack) -> np.ndarray:
    # Zero-pad to a multiple of 1024: FFTs of arbitrary (possibly prime)
    # lengths are many times slower.  ``x`` starts and ends in silence, so the
    # filter's circular wrap-around only moves ringing between silences.
    size = -(-x.size // 1024) * 1024
    spectrum = np.fft.rfft(x, n=size)
    freqs = np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
    cutoff = rng.uniform(*attack.cutoff_hz)
    # Exactly zero above the cutoff: far beyond the required 60 dB stop band.
    low_pass = _cosine_edge(freqs, cutoff - attack.transition_hz, cutoff)
    band_limited = np.fft.irfft(spectrum * low_pass)[: x.size]
    # Flipping every other sample's sign mirrors f to Nyquist - f, which is
    # the imaging left behind by a sloppy upsampler.  Only the lowest band is
    # mirrored, and DC is faded out so there is no tone at Nyquist.
    low = _cosine_edge(freqs, attack.image_width_hz - 100.0, attack.image_width_hz)
    low *= 1.0 - _cosine_edge(freqs, 20.0, 80.0)
    image = np.fft.irfft(spectrum * low)[: x.size]
    image[1::2] *= -1.0
    return band_limited + 10.0 ** (rng.uniform(*attack.image_db) / 20.0) * image


_LOUDNESS_DBFS = (-32.0, -22.0)
_PEAK_LIMIT = 10.0 ** (-1.0 / 20.0)


def _normalise_loudness(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    # Measure the active (speech) frames only, so pauses do not bias the level
    # and both classes end up on the same target distribution.
    hop = int(0.02 * SAMPLE_RATE)
    frames = x[: x.size // hop * hop].reshape(-1, hop)
    frame_rms = np.sqrt(np.mean(np.square(frames), axis=1))
    active = frames[frame_rms >= frame_rms.max() * 10.0 ** (-30.0 / 20.0)]
    target = 10.0 ** (rng.uniform(*_LOUDNESS_DBFS) / 20.0)
    y = x * (target / max(_rms(active), 1e-12))
    peak = float(np.max(np.abs(y)))
    return y * (_PEAK_LIMIT / peak) if peak > _PEAK_LIMIT else y


def _render(seed: int, utt: _Utterance) -> np.ndarray:
    """The int16 samples of one utterance; a pure function of its inputs."""
    speech_ss, artefact_ss, finish_ss = np.random.SeedSequence([seed, utt.split_number, utt.index]).spawn(3)
    rng = np.random.default_rng(speech_ss)
    n = int(rng.uniform(1.0, 4.0) * SAMPLE_RATE)
    lead = int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
    trail = int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
    audio = np.zeros(n)
    audio[lead : n - trail] = _synth_speech(rng, n - lead - trail, _voice_for(seed, utt.speaker))
    # The artefact sees the silences too, so its filter ringing spreads into
    # them as it would in a real vocoder's output instead of being cut off.
    if utt.attack is not None:
        audio = _vocoder_artefact(np.random.default_rng(artefact_ss), audio, ATTACKS[utt.attack])
    finish = np.random.default_rng(finish_ss)
    audio = _normalise_loudness(finish, audio)
    # A faint noise floor and TPDF dither, drawn alike for both classes, so
    # silences are not digital zero (which would be a trivial cue).
    audio += 10.0 ** (finish.uniform(-95.0, -85.0) / 20.0) * finish.standard_normal(n)
    scaled = audio * 32767.0 + finish.random(n) - finish.random(n)
    return np.clip(np.round(scaled), -32768, 32767).astype(np.int16)


def _audio_path(root: Path, split: _Split, utt_id: str) -> Path:
    return root / f"ASVspoof2019_LA_{split.name}" / "flac" / f"{utt_id}.flac"


def _render_batch(root: str, seed: int, batch: Sequence[_Utterance]) -> int:
    """Worker entry point (top level so spawned processes can import it)."""
    for utt in batch:
        path = _audio_path(Path(root), SPLITS[utt.split_number], utt.utt_id)
        sf.write(path, _render(seed, utt), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return len(batch)


def _protocol_line(utt: _Utterance) -> str:
    return f"{utt.speaker} {utt.utt_id} - {utt.attack or '-'} {utt.label}\n"


# --------------------------------------------------------------------------
# Corpus on disk: atomic build, marker, cache check.
# --------------------------------------------------------------------------


def _params(n_train: int, n_dev: int, n_eval: int, bonafide_fraction: float, seed: int) -> dict[str, object]:
    return {
        "n_train": int(n_train),
        "n_dev": int(n_dev),
        "n_eval": int(n_eval),
        "bonafide_fraction": float(bonafide_fraction),
        "seed": int(seed),
    }


def _marker_content(params: dict[str, object]) -> dict[str, object]:
    return {"generator": "lowmem_aasist.data.demo", "version": GENERATOR_VERSION, "params": params}


def _batches(items: Sequence[_Utterance], size: int) -> Iterator[list[_Utterance]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _render_all(
    tmp: Path,
    seed: int,
    utterances: Sequence[_Utterance],
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    total = len(utterances)
    done = 0

    def report(count: int) -> None:
        # One call per file, so callers may either read ``done`` or simply
        # advance a bar by one on every call.
        nonlocal done
        for _ in range(count):
            done += 1
            if progress is not None:
                progress(done, total)

    if workers <= 1:
        for batch in _batches(utterances, 1):
            report(_render_batch(str(tmp), seed, batch))
        return
    # Spawn rather than fork: the parent may hold torch/OpenMP threads, and
    # forking those is a known way to deadlock.  Small batches keep the
    # progress bar moving while amortising the inter-process overhead.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_render_batch, str(tmp), seed, b) for b in _batches(utterances, 4)]
        for future in as_completed(futures):
            report(future.result())


def _owned_or_empty(path: Path) -> bool:
    return not any(path.iterdir()) or (path / OWNER_STAMP).exists() or (path / MARKER_NAME).exists()


def _discard(path: Path) -> None:
    if not path.exists():
        return
    if not _owned_or_empty(path):
        raise FileExistsError(f"{path} exists and was not made by the demo corpus generator; not touching it")
    shutil.rmtree(path)


def _remove_dead_partials(root: Path) -> None:
    """Clear leftovers of earlier crashed runs, sparing live concurrent ones."""
    try:
        import psutil
    except ImportError:  # without it we cannot tell live runs apart; keep all
        return
    for candidate in root.parent.glob(f".{glob.escape(root.name)}.partial-*"):
        pid = candidate.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)


def _write_marker(root: Path, params: dict[str, object]) -> None:
    tmp = root / f"{MARKER_NAME}.tmp"
    tmp.write_text(json.dumps(_marker_content(params), sort_keys=True) + "\n")
    os.replace(tmp, root / MARKER_NAME)


def _install(tmp: Path, root: Path, params: dict[str, object]) -> None:
    # Another process may have finished the same corpus meanwhile; its bytes
    # equal ours, so keep it rather than pull it from under its readers.
    if not demo_corpus_ready(root, **params):
        _discard(root)
        try:
            os.replace(tmp, root)
        except OSError:
            if not demo_corpus_ready(root, **params):
                raise
    # The marker goes last: a crash before this point leaves a folder that
    # demo_corpus_ready() rejects and ensure_demo_corpus() rebuilds.
    if not demo_corpus_ready(root, **params):
        _write_marker(root, params)
    shutil.rmtree(tmp, ignore_errors=True)


def make_demo_corpus(
    root: Path,
    *,
    n_train: int = 800,
    n_dev: int = 200,
    n_eval: int = 200,
    bonafide_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate the demo corpus into ``root`` (ASVspoof 2019 LA layout).

    Any other demo corpus at ``root`` is replaced (a complete one with the
    same parameters is kept, its bytes being identical); a folder that this
    generator did not create raises ``FileExistsError`` instead.  ``progress``
    gets ``(done, total)`` as audio files are written.  The output depends on
    the parameters and ``seed`` only, never on ``workers``.
    """
    root = Path(root)
    params = _params(n_train, n_dev, n_eval, bonafide_fraction, seed)
    counts = (n_train, n_dev, n_eval)
    if min(counts) < 2:
        raise ValueError(f"each split needs at least 2 utterances (one per class), got {counts}")
    if not 0.0 < bonafide_fraction < 1.0:
        raise ValueError(f"bonafide_fraction must lie strictly between 0 and 1, got {bonafide_fraction}")

    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(root)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / OWNER_STAMP).write_text("created by lowmem_aasist.data.demo; safe to delete\n")
        (tmp / PROTOCOL_DIR).mkdir()
        plan: list[_Utterance] = []
        for split, n in zip(SPLITS, counts, strict=True):
            utterances = _plan_split(split, n, bonafide_fraction, seed)
            _audio_path(tmp, split, "x").parent.mkdir(parents=True)
            with open(tmp / PROTOCOL_DIR / split.protocol_file, "w", newline="\n") as fh:
                fh.writelines(_protocol_line(u) for u in utterances)
            plan.extend(utterances)
        _render_all(tmp, seed, plan, workers, progress)
        _install(tmp, root, params)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def demo_corpus_ready(
    root: Path,
    *,
    n_train: int = 800,
    n_dev: int = 200,
    n_eval: int = 200,
    bonafide_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> bool:
    """True when ``root`` holds a complete corpus made with these parameters.

    Accepts the same keywords as :func:`make_demo_corpus`; ``workers`` and
    ``progress`` do not affect the output and are ignored.
    """
    del workers, progress
    root = Path(root)
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if marker != _marker_content(_params(n_train, n_dev, n_eval, bonafide_fraction, seed)):
        return False
    # Cheap sanity check against files deleted after the build.
    for split, n in zip(SPLITS, (n_train, n_dev, n_eval), strict=True):
        if not (root / PROTOCOL_DIR / split.protocol_file).is_file():
            return False
        audio_dir = _audio_path(root, split, "x").parent
        if not audio_dir.is_dir() or sum(1 for _ in audio_dir.glob("*.flac")) != n:
            return False
    return True


def ensure_demo_corpus(
    root: Path,
    *,
    n_train: int = 800,
    n_dev: int = 200,
    n_eval: int = 200,
    bonafide_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Return ``root``, generating the corpus first unless it is already there."""
    kwargs = {
        "n_train": n_train,
        "n_dev": n_dev,
        "n_eval": n_eval,
        "bonafide_fraction": bonafide_fraction,
        "seed": seed,
        "workers": workers,
        "progress": progress,
    }
    if demo_corpus_ready(root, **kwargs):
        return Path(root)
    return make_demo_corpus(root, **kwargs)
