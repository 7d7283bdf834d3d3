"""Augmentations that draw on a folder of recordings: additive noise (MUSAN or any folder) and reverberation (RIRs).

Spec syntax::

    noise:dir=~/musan,snr=5-20                  any audio below the folder, SNR uniform in [5, 20] dB
    noise:dir=~/musan,kind=noise/music          only files below a subfolder named noise or music
    noise:dir=~/musan,kind=speech,babble=3-7    babble: 3 to 7 speech windows summed, then set to the SNR
    reverb:dir=~/RIRS_NOISES/simulated_rirs     convolve with a random room impulse response

Both index their folder once, when the spec is parsed: every file libsndfile can read (recursively, symlinks
followed, see :func:`~lowmem_aasist.audio.list_audio_files`) is opened for its header only, and the index keeps
nothing but the relative paths (one byte buffer plus offsets) and the 16 kHz lengths, as numpy arrays. Memory
therefore grows by tens of bytes per file, never with the audio, and a data-loader worker forked from the main
process shares the arrays without touching their pages (a Python list of str would be copied page by page as
reference counts change). Files whose header cannot be read are skipped at index time and counted
(``skipped``). Per item only one window of ``len(x)`` samples is decoded, with
:func:`~lowmem_aasist.audio.read_segment`; a file that fails then (deleted, truncated, changed) is replaced by
another draw, up to :data:`_TRIES` draws, after which the item is returned unchanged: a worker never crashes on
a bad noise file.

Levels. ``noise`` scales the noise so that 10*log10(P_x / P_n) equals the drawn SNR exactly, P being the mean
square over the whole item, and adds it linearly: nothing is clipped and nothing renormalised, because the
model reads float waveforms (a sum beyond [-1, 1] is harmless to it) while a clip or a peak normalisation
would add distortion or a level change that depends on the augmentation, a cue the model could learn instead
of the artefacts. ``reverb`` rescales its output to the input's RMS for the same reason.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import soxr

from ..audio import SAMPLE_RATE, AudioError, audio_info, list_audio_files, read_segment, tile
from .base import Params, augmentation

__all__ = ["AddNoise", "FolderIndex", "Reverb", "index_folder"]

_TRIES = 8
"""Draws per item before giving up on a window (unreadable file or silent window) and leaving the item as is."""

_SILENT_MS = 1e-10
"""Mean square below which a noise window counts as silence (-100 dBFS): scaling it up to an SNR would only
amplify dither or rounding noise."""

_RIR_SEARCH_S = 0.5
"""The direct-path peak is looked for in the first half second of an RIR file: simulated and measured RIRs start
with at most a few tens of ms of propagation delay, and searching further could lock onto a late reflection."""

_RIR_KEEP_S = 1.0
"""RIR tail kept after the peak. RIRS_NOISES simulated RIRs are about 1 s long, and in real rooms (RT60 < 1 s)
the energy left after 1 s is more than 60 dB down, so the cap bounds the FFT size without an audible change.
A multichannel RIR is read as the mean of its channels (the project's reading convention for any file)."""


class FolderIndex:
    """Paths and 16 kHz lengths of the readable audio files below a folder; no audio is held."""

    def __init__(self, root: Path, relative: list[str], lengths: list[int], skipped: int) -> None:
        self.root = str(root)
        encoded = [os.fsencode(r) for r in relative]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.skipped = skipped

    def __len__(self) -> int:
        return int(self.lengths.size)

    def path(self, i: int) -> str:
        rel = self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes()
        return os.path.join(self.root, os.fsdecode(rel))


def index_folder(params: Params, key: str = "dir", kinds: tuple[str, ...] = ()) -> FolderIndex:
    """Index the folder named by ``params``' ``key``: every readable audio file below it, or only those below a
    subfolder named one of ``kinds`` (MUSAN's ``noise``, ``music``, ``speech``), at any depth. Raises SpecError
    naming the part when the folder is missing or holds no readable audio."""
    root = params.folder(key)
    files = list_audio_files(root)
    relative, lengths, skipped = [], [], 0
    for path in files:
        rel = path.relative_to(root)
        if kinds and not {d.lower() for d in rel.parts[:-1]} & set(kinds):
            continue
        try:
            lengths.append(audio_info(path).frames_16k)
        except AudioError:
            skipped += 1
            continue
        relative.append(str(rel))
    if not relative:
        where = f" below a subfolder named {'/'.join(kinds)}" if kinds else ""
        bad = f" ({skipped} unreadable file(s) skipped)" if skipped else ""
        raise params.fail(f"{key}={root}: no readable audio file{where}{bad}")
    if skipped:
        # Not an error: large noise collections often hold a few broken files, and the rest is still usable.
        warnings.warn(f"--augment part {params.part!r}: skipped {skipped} unreadable audio file(s) under {root}",
                      RuntimeWarning, stacklevel=2)
    return FolderIndex(root, relative, lengths, skipped)


class _Drawer:
    """Random windows of the indexed files, read on demand with bounded retries."""

    def __init__(self, index: FolderIndex, name: str) -> None:
        self.index, self.name = index, name
        self.read_failures = 0  # per process: each worker counts its own

    def _read(self, i: int, frames: int, rng: np.random.Generator) -> np.ndarray:
        path, length = self.index.path(i), int(self.index.lengths[i])
        if length >= frames:
            return read_segment(path, int(rng.integers(0, length - frames + 1)), frames)
        # A short file is tiled from a random phase, so that items do not all start at the file's onset.
        whole = read_segment(path, 0, length)
        return tile(np.roll(whole, -int(rng.integers(0, length))), frames)

    def draw(self, frames: int, sr: int, rng: np.random.Generator, head: bool = False) -> np.ndarray | None:
        """``frames`` samples at ``sr`` Hz of a random file (a random window, or its start with ``head``, cut
        to the file's length), float64; None when :data:`_TRIES` draws found nothing readable and audible."""
        # Files are read at 16 kHz; an item at another rate needs the matching stretch of the file.
        need = frames if sr == SAMPLE_RATE else math.ceil(frames * SAMPLE_RATE / sr) + 1
        for _ in range(_TRIES):
            i = int(rng.integers(len(self.index)))
            try:
                if head:
                    w = read_segment(self.index.path(i), 0, min(need, int(self.index.lengths[i])))
                else:
                    w = self._read(i, need, rng)
            except (AudioError, ValueError, OSError) as e:
                # ValueError: the file got shorter than its indexed length. The message is per file, so
                # Python's warning registry prints each bad file once per process, not once per item.
                self.read_failures += 1
                warnings.warn(f"{self.name}: skipping {e}", RuntimeWarning, stacklevel=2)
                continue
            if sr != SAMPLE_RATE:
                w = soxr.resample(w, SAMPLE_RATE, sr, quality="HQ")
                w = w[:frames] if head else tile(w, frames)
            w = w.astype(np.float64)
            if np.mean(np.square(w)) > _SILENT_MS:
                return w
        return None


class AddNoise:
    """Additive noise at a uniform random SNR (dB) over the whole item; ``talkers`` windows summed (babble)."""

    def __init__(self, index: FolderIndex, snr: tuple[float, float], talkers: tuple[int, int] = (1, 1)) -> None:
        self.index, self.snr, self.talkers = index, snr, talkers
        self._drawer = _Drawer(index, "noise")

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        snr = rng.uniform(*self.snr)
        count = int(rng.integers(self.talkers[0], self.talkers[1] + 1))
        x64 = x.astype(np.float64)
        if x.size == 0:
            return x.copy()
        noise = np.zeros(x.size)
        for _ in range(count):
            w = self._drawer.draw(x.size, sr, rng)
            if w is None:
                break
            # Each talker at unit power, so that babble is not dominated by whichever recording is loudest.
            noise += (w / math.sqrt(np.mean(np.square(w)))) if count > 1 else w
        p_noise = np.mean(np.square(noise))
        if p_noise <= _SILENT_MS:
            return x.copy()
        scale = math.sqrt(np.mean(np.square(x64)) / (p_noise * 10.0 ** (snr / 10.0)))
        return (x64 + scale * noise).astype(np.float32)


class Reverb:
    """Convolution with a random RIR, aligned on its direct-path peak, output rescaled to the input's RMS."""

    def __init__(self, index: FolderIndex) -> None:
        self.index = index
        self._drawer = _Drawer(index, "reverb")

    def _rir(self, sr: int, rng: np.random.Generator) -> np.ndarray | None:
        search, keep = round(_RIR_SEARCH_S * sr), round(_RIR_KEEP_S * sr)
        h = self._drawer.draw(search + keep, sr, rng, head=True)
        if h is None:
            return None
        peak = int(np.argmax(np.abs(h[:search])))
        if h[peak] == 0.0:  # silent start, sound only later: not an impulse response
            return None
        # Starting at the peak removes the propagation delay, so the reverberant item stays aligned with its
        # label's timing and with the other augmentations; the polarity flip (inaudible) keeps the output in
        # phase with the input.
        h = h[peak:peak + keep] * np.sign(h[peak])
        return h / math.sqrt(np.sum(np.square(h)))

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        h = self._rir(sr, rng)
        x64 = x.astype(np.float64)
        rms_x = math.sqrt(np.mean(np.square(x64))) if x.size else 0.0
        if h is None or rms_x == 0.0:
            return x.copy()
        n = x.size
        size = _fast_length(n + h.size - 1)  # no circular wrap into the first n samples
        y = np.fft.irfft(np.fft.rfft(x64, size) * np.fft.rfft(h, size), size)[:n]
        rms_y = math.sqrt(np.mean(np.square(y)))
        if rms_y == 0.0:
            return x.copy()
        return (y * (rms_x / rms_y)).astype(np.float32)


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: pocketfft is fast on those, and a power of two could nearly double n."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35 << max(0, (-(-n // p35) - 1).bit_length())  # p35 times the smallest power of two reaching n
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


@augmentation("noise", "additive noise/music/babble from a folder: dir=FOLDER,snr=5-20[,kind=noise/music/speech]"
              "[,babble=3-7]")
def _build_noise(params: Params) -> AddNoise:
    snr = params.range("snr", (5.0, 20.0), -30.0, 100.0)
    kinds = params.choices("kind", (), ("noise", "music", "speech"))
    low, high = params.range("babble", (1.0, 1.0), 1.0, 50.0)
    if low != int(low) or high != int(high):
        raise params.fail(f"babble={low:g}-{high:g} must be whole numbers of talkers")
    index = index_folder(params, "dir", kinds)
    return AddNoise(index, snr, (int(low), int(high)))


@augmentation("reverb", "convolution with a random room impulse response from a folder: dir=FOLDER")
def _build_reverb(params: Params) -> Reverb:
    return Reverb(index_folder(params, "dir"))
