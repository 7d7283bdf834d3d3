"""Audio reading for lowmem-aasist: 16 kHz mono float32 arrays from any file libsndfile can decode.

Everything here is numpy + soundfile + soxr (no torch), so data-loader workers and the scoring CLI can
use it cheaply. Conventions shared by every function:

* Samples are decoded as float32, the dtype the reference AASIST scores were computed with.
* Multi-channel audio is mixed to mono by averaging the channels.
* Files not at 16 kHz are resampled with soxr ("HQ"). All lengths and positions in the API are in
  16 kHz samples, whatever the file's own rate.
* Any file that cannot be used raises :class:`AudioError` with a one-line ``'<path>: <reason>'``;
  no soundfile/libsndfile/OSError escapes. Caller mistakes (bad arguments, a window past the end of
  the file) raise ``ValueError`` instead, because they are bugs, not bad data.

Known libsndfile behaviour the code relies on or guards against:

* A truncated FLAC opens fine and reports the frame count from its header; decoding the part that is
  still present works, and reading into the missing part raises ``LibsndfileError`` ("flac decoder
  lost sync"). That becomes an ``AudioError`` ("corrupt or truncated audio data (...)"), so a window
  inside the intact prefix can be read while :func:`read_audio` of the whole file fails.
* Truncated WAV/OGG files report the shortened length in their header, so they just read shorter.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "EVAL_SAMPLES",
    "SAMPLE_RATE",
    "AudioError",
    "AudioInfo",
    "audio_info",
    "eval_input",
    "iter_windows",
    "list_audio_files",
    "read_audio",
    "read_segment",
    "tile",
]

SAMPLE_RATE = 16_000
EVAL_SAMPLES = 64_600  # the reference evaluation input length (~4 s)

PathLike = str | os.PathLike[str]

# Both the one-shot and the streaming resampler must use the same quality: iter_windows relies on
# soxr's stream producing the same samples as soxr.resample over the whole file.
_SOXR_QUALITY = "HQ"

# Extra context read on each side of a window before resampling it, so the resampler's filter sees the
# same neighbourhood as when the whole file is resampled. Measured: 64 samples at 16 kHz suffice when
# downsampling and ~128 source samples when upsampling from 2-8 kHz; these leave a wide safety factor.
_MARGIN_16K = 1024
_MARGIN_SRC = 256

# Types soundfile raises on open/decode failures (LibsndfileError is a RuntimeError).
_SF_ERRORS = (sf.SoundFileError, RuntimeError, OSError)

# libsndfile format names -> file extensions. Names not listed here fall back to their own lowercase
# form (FLAC -> .flac, CAF -> .caf ...).
_FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "AIFF": ("aiff", "aif", "aifc"),
    "AU": ("au", "snd"),
    "OGG": ("ogg", "oga", "opus"),
    "MP3": ("mp3",),
    "WAV": ("wav",),
    "WAVEX": ("wav",),
    "RF64": ("rf64", "wav"),
    "NIST": ("nist", "sph"),
    "IRCAM": ("sf", "ircam"),
    "SVX": ("svx", "8svx"),
    "MPC2K": (),
}
# RAW has no header, so it cannot be decoded without being told its layout. MAT4/MAT5 would mean
# ".mat", and most .mat files in a data tree are feature matrices, not audio.
_UNLISTABLE_FORMATS = frozenset({"RAW", "MAT4", "MAT5"})


class AudioError(Exception):
    """A file that cannot be used as audio; ``str(e)`` is the single line ``'<path>: <reason>'``."""

    path: str
    reason: str

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        # Reasons may come from libsndfile; keep the message on one line so logs stay greppable.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type[AudioError], tuple[str, str]]:
        # The default pickling calls cls(*args) with the formatted message only, which would fail;
        # data-loader worker processes pickle exceptions to send them to the main process.
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file."""

    frames: int  # frames in the file at its own rate
    samplerate: int
    channels: int

    @property
    def frames_16k(self) -> int:
        """Length of the file after resampling to 16 kHz, i.e. ``len(read_audio(path))``."""
        if self.samplerate == SAMPLE_RATE:
            return self.frames
        # soxr's one-shot output length is frames * out / in rounded half up; integer arithmetic keeps
        # it exact for any length.
        return (2 * self.frames * SAMPLE_RATE + self.samplerate) // (2 * self.samplerate)


# ----------------------------------------------------------------------------------------------------
# Opening and decoding (all libsndfile errors are translated here)


def _short_message(exc: BaseException) -> str:
    # LibsndfileError's str() repeats the path ("Error opening '<path>': ..."); the raw libsndfile text
    # alone is shorter and the path is already in front of the AudioError message.
    msg = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    msg = " ".join(msg.split()).rstrip(".")
    # Some libsndfile decoder messages carry their own "Error : " prefix, which says nothing here.
    msg = re.sub(r"^error\s*:\s*", "", msg, flags=re.IGNORECASE) or msg
    return msg if len(msg) <= 120 else msg[:117] + "..."


def _check_path(path: str) -> None:
    # libsndfile reports a missing file, a directory and an unreadable file all as vague "System error"
    # or "Format not recognised"; asking the OS first gives the user a reason they can act on.
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise AudioError(path, "file not found") from None
    except PermissionError:
        raise AudioError(path, "permission denied") from None
    except OSError as e:
        raise AudioError(path, e.strerror or type(e).__name__) from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device could block forever inside libsndfile.
        raise AudioError(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise AudioError(path, "permission denied")
    if st.st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")


def _open(path: str) -> sf.SoundFile:
    _check_path(path)
    try:
        return sf.SoundFile(path)
    except _SF_ERRORS as e:
        raise AudioError(path, f"not a readable audio file ({_short_message(e)})") from None


def _info_of(f: sf.SoundFile, path: str) -> AudioInfo:
    info = AudioInfo(frames=int(f.frames), samplerate=int(f.samplerate), channels=int(f.channels))
    if info.frames <= 0:
        raise AudioError(path, "empty file (0 samples)")
    return info


def _decode(f: sf.SoundFile, path: str, frames: int) -> np.ndarray:
    """Decode ``frames`` frames (-1: to the end) from the current position, mixed to mono float32."""
    try:
        block = f.read(frames, dtype="float32", always_2d=True)
    except _SF_ERRORS as e:
        raise AudioError(path, f"corrupt or truncated audio data ({_short_message(e)})") from None
    if block.shape[1] == 1:
        mono = block[:, 0]
    else:
        mono = block.mean(axis=1, dtype=np.float32)
    # Checked before resampling: the resampler would smear one bad sample over its filter length, and
    # a NaN reaching the model poisons a whole batch (or a whole training run) silently.
    if not np.isfinite(mono).all():
        raise AudioError(path, "contains NaN or Inf samples")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _seek(f: sf.SoundFile, path: str, frame: int) -> None:
    try:
        f.seek(frame)
    except _SF_ERRORS as e:
        raise AudioError(path, f"cannot seek to frame {frame} ({_short_message(e)})") from None


def _resample(x: np.ndarray, samplerate: int) -> np.ndarray:
    y = soxr.resample(x, samplerate, SAMPLE_RATE, quality=_SOXR_QUALITY)
    return np.asarray(y, dtype=np.float32)


def _read_all(f: sf.SoundFile, path: str, info: AudioInfo) -> np.ndarray:
    x = _decode(f, path, -1)
    if x.size == 0:
        # The header promised samples but the decoder produced none.
        raise AudioError(path, "empty file (0 samples)")
    if info.samplerate != SAMPLE_RATE:
        x = _resample(x, info.samplerate)
    return x


def _short_read(path: str, info: AudioInfo) -> AudioError:
    return AudioError(
        path, f"audio data ends before the {info.frames} frames its header declares (truncated file?)"
    )


def _read_window(f: sf.SoundFile, path: str, info: AudioInfo, start: int, frames: int) -> np.ndarray:
    """Samples [start, start + frames) at 16 kHz; the caller has checked the bounds."""
    if frames == 0:
        return np.zeros(0, dtype=np.float32)
    end = start + frames
    sr = info.samplerate
    if sr == SAMPLE_RATE:
        _seek(f, path, start)
        x = _decode(f, path, frames)
        if x.size < frames:
            raise _short_read(path, info)
        return x

    # Resample a covering source range on its own. Its first source frame must fall exactly on a 16 kHz
    # sample, or every output sample would be shifted by a fraction of a sample relative to
    # read_audio. Source frame k*p coincides with 16 kHz sample k*q, so start on a multiple of p.
    g = math.gcd(sr, SAMPLE_RATE)
    p, q = sr // g, SAMPLE_RATE // g
    margin = max(_MARGIN_16K, -(-_MARGIN_SRC * SAMPLE_RATE // sr))
    first_block = max(0, (start - margin) // q)
    last_block = -(-(end + margin) // q)
    src_start = first_block * p
    src_end = min(info.frames, last_block * p)
    _seek(f, path, src_start)
    x = _decode(f, path, src_end - src_start)
    if x.size < src_end - src_start:
        raise _short_read(path, info)
    y = _resample(x, sr)
    offset = start - first_block * q
    out = y[offset : offset + frames]
    if out.size != frames:  # only if soxr's length rule changed; never return a short window silently
        raise AssertionError(f"resampled window has {out.size} samples, expected {frames}")
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------------------------------
# Public API


def audio_info(path: PathLike) -> AudioInfo:
    """Header facts of ``path`` without decoding any audio.

    Raises AudioError if the file cannot be opened or declares no samples, so that a successful call
    means the file is usable as far as its header can tell.
    """
    p = os.fspath(path)
    with _open(p) as f:
        return _info_of(f, p)


def read_audio(path: PathLike) -> np.ndarray:
    """The whole file as a 1-D float32 array at 16 kHz, mono; ``len`` equals ``audio_info(path).frames_16k``."""
    p = os.fspath(path)
    with _open(p) as f:
        return _read_all(f, p, _info_of(f, p))


def read_segment(path: PathLike, start: int, frames: int, info: AudioInfo | None = None) -> np.ndarray:
    """Samples ``[start, start + frames)`` (16 kHz units) of the file, decoding only that part.

    Equal to ``read_audio(path)[start:start + frames]`` exactly for 16 kHz files and to within float32
    rounding (~1e-7) for resampled ones. ``info`` may be passed by a caller that already has it; the
    header is parsed on open anyway, so it is only compared with the file (a mismatch means the file
    changed since, and raises AudioError). A window reaching past the end of the file is the caller's
    bug and raises ValueError: nothing is zero-padded here.
    """
    start, frames = int(start), int(frames)
    if start < 0 or frames < 0:
        raise ValueError(f"start and frames must be >= 0, got start={start}, frames={frames}")
    p = os.fspath(path)
    with _open(p) as f:
        actual = _info_of(f, p)
        if info is not None and info != actual:
            raise AudioError(p, f"file changed since it was inspected (now {actual}, expected {info})")
        if start + frames > actual.frames_16k:
            raise ValueError(
                f"{p}: window [{start}, {start + frames}) is past the end of the file "
                f"({actual.frames_16k} samples at 16 kHz)"
            )
        return _read_window(f, p, actual, start, frames)


def tile(x: np.ndarray, n: int) -> np.ndarray:
    """The reference input convention: the first ``n`` samples of ``x``, a shorter clip repeated end
    to end and cut to ``n``. Returns a new array (never a view of ``x``) of ``x``'s dtype."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"tile expects a 1-D array, got shape {x.shape}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if x.size == 0 and n > 0:
        raise ValueError("cannot tile an empty array")
    # np.resize repeats cyclically and truncates, which is exactly the reference's np.tile + slice.
    return np.resize(x, n)


def eval_input(path: PathLike, samples: int = EVAL_SAMPLES) -> np.ndarray:
    """A model's evaluation input: ``tile(read_audio(path), samples)``, decoding only the first ``samples`` (plus
    resampler context) of long files."""
    p = os.fspath(path)
    with _open(p) as f:
        info = _info_of(f, p)
        if info.frames_16k >= samples:
            return _read_window(f, p, info, 0, samples)
        return tile(_read_all(f, p, info), samples)


def iter_windows(
    path: PathLike,
    window: int = EVAL_SAMPLES,
    hop: int = EVAL_SAMPLES // 2,
    chunk: int = 16_000 * 10,
) -> Iterator[np.ndarray]:
    """Fixed-length windows covering a whole recording, read with bounded memory.

    Yields float32 arrays of exactly ``window`` samples (16 kHz) starting at 0, hop, 2*hop, ... while
    they fit, then one window ending exactly at the end of the recording if the last regular window
    did not reach it. A recording shorter than ``window`` yields a single ``tile()``d window. The file
    is decoded ``chunk`` source frames at a time (resampled with a streaming soxr resampler), so
    memory is O(window + chunk) however long the recording is; windows match the slices of
    ``read_audio``. Opening problems raise AudioError here, at the call; decoding problems (corrupt
    data, NaN) raise AudioError from the iteration, possibly after some windows were yielded.
    """
    for name, value in (("window", window), ("hop", hop), ("chunk", chunk)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    p = os.fspath(path)
    # Validate eagerly: a generator body would only run (and fail) at the first next().
    audio_info(p)
    return _windows(p, int(window), int(hop), int(chunk))


def _windows(path: str, window: int, hop: int, chunk: int) -> Iterator[np.ndarray]:
    with _open(path) as f:
        stream = None
        if f.samplerate != SAMPLE_RATE:
            stream = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32", quality=_SOXR_QUALITY)
        # buf holds 16 kHz samples [buf_start, buf_start + len(buf)); after each chunk it is trimmed to
        # the last `window` samples, which is all the next regular window or the final one can need.
        buf = np.zeros(0, dtype=np.float32)
        buf_start = 0
        next_start = 0  # start of the next regular window
        covered = 0  # end of the last window yielded
        at_eof = False
        while not at_eof:
            x = _decode(f, path, chunk)
            at_eof = x.size < chunk
            if stream is not None:
                x = np.asarray(stream.resample_chunk(x, last=at_eof), dtype=np.float32)
            if x.size:
                buf = np.concatenate((buf, x))
            buf_end = buf_start + buf.size
            while next_start + window <= buf_end:
                i = next_start - buf_start
                # A copy, so a caller holding windows does not keep whole chunks alive.
                yield buf[i : i + window].copy()
                covered = next_start + window
                next_start += hop
            keep_from = max(buf_start, buf_end - window)
            buf = buf[keep_from - buf_start :]
            buf_start = keep_from

        total = buf_start + buf.size
        if total == 0:
            raise AudioError(path, "empty file (0 samples)")
        if total < window:
            yield tile(buf, window)
        elif covered < total:
            yield buf[buf.size - window :].copy()


@functools.lru_cache(maxsize=1)
def _audio_extensions() -> frozenset[str]:
    exts: set[str] = set()
    for name in sf.available_formats():
        if name in _UNLISTABLE_FORMATS:
            continue
        exts.update("." + e for e in _FORMAT_EXTENSIONS.get(name, (name.lower(),)))
    return frozenset(exts)


def list_audio_files(path: PathLike) -> list[Path]:
    """``[path]`` for a file (whatever its extension: the caller named it); for a directory, every
    file below it, recursively and following symlinks, whose extension libsndfile can read
    (case-insensitive), sorted. Raises AudioError if ``path`` does not exist."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise AudioError(root, "file not found")
    exts = _audio_extensions()
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    # followlinks because data sets are often assembled from symlinked folders; seen_dirs stops a
    # link that points back up the tree from recursing forever.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        for name in filenames:
            # "._x.wav" files are macOS AppleDouble metadata that copies from a Mac leave beside every
            # real file; they carry an audio extension but are not audio.
            if name.startswith("._"):
                continue
            if os.path.splitext(name)[1].lower() in exts:
                candidate = Path(dirpath, name)
                if candidate.is_file():
                    found.append(candidate)
    return sorted(found)
