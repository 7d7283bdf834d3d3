"""The audio index: every file's length and sample rate from its header, read once and cached on disk.

Training picks uniform crop starts, which needs each file's length; opening a header per item costs a
file open per step (slow on network storage), and a bad file found mid-epoch kills a run hours in. So
each split is indexed up front: ``os.stat`` every path, and read the header (``audio_info``) only where
the cache has no entry with the same size and mtime. An unchanged corpus is then re-indexed without
opening a single audio file, and bad files are known before training starts.

Known limit of the size + mtime key: a file rewritten with the same size within one mtime tick of the
previous index run is not noticed (as with make and rsync). Local file systems stamp nanoseconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..audio import AudioError, audio_info
from .split import Split

__all__ = [
    "IndexResult",
    "Problem",
    "TooManyBadFiles",
    "check_max_bad",
    "default_index_dir",
    "index_split",
    "parse_max_bad",
    "sample_rates",
]

# Bump when the meaning of a cached column changes (e.g. how frames_16k is computed), so old caches are
# rebuilt rather than trusted.
CACHE_VERSION = 1

# Stat work is handed to threads in chunks: per-path tasks would cost more in scheduling than a local
# stat does, while on network storage a chunk still keeps several round trips in flight.
_STAT_CHUNK = 2048
# Header reads are batched so a fresh 180k-file index is not 180k futures; small enough that the
# progress bar still moves smoothly on slow storage.
_READ_BATCH = 16

_INT32_MAX = np.iinfo(np.int32).max
_MISSING = "file not found"


class TooManyBadFiles(Exception):
    """More files of a split are missing or unreadable than ``--max-bad`` allows."""


@dataclass(frozen=True)
class Problem:
    """A file that cannot be used: its position in the split, its path and why (``AudioError.reason``)."""

    index: int
    path: str
    reason: str


@dataclass(frozen=True)
class IndexResult:
    split: Split  # the input with frames (16 kHz samples) and samplerate filled in; -1 where the file is bad
    problems: tuple[Problem, ...]  # in split order
    scanned: int  # headers read this time; 0 when everything came from the cache
    seconds: float
    cache_file: Path | None = None  # None when no cache could be read or written (the index still works)


def default_index_dir() -> Path:
    """``$XDG_CACHE_HOME/lowmem-aasist/index``, or ``~/.cache/lowmem-aasist/index``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored; honouring it would scatter
    # caches into whatever directory a run was started from.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "lowmem-aasist" / "index"


# ----------------------------------------------------------------------------------------------------
# Cache file


@dataclass
class _Cache:
    size: np.ndarray  # int64; -1 where stat failed
    mtime_ns: np.ndarray  # int64
    frames: np.ndarray  # int32 (16 kHz)
    samplerate: np.ndarray  # int32
    code: np.ndarray  # int32 index into reasons; -1 for a good file
    reasons: list[str]


def _cache_path(split: Split, cache_dir: Path) -> Path:
    h = hashlib.sha1()
    # Offsets are hashed too: the same bytes cut into different paths are a different list.
    h.update(np.ascontiguousarray(split.path.offsets, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(split.path.data, dtype=np.uint8).tobytes())
    return cache_dir / f"{h.hexdigest()}.npz"


def _load_cache(path: Path, n: int) -> _Cache | None:
    # Any failure means "no cache": a cache must never be the reason a run cannot start.
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or int(z["n"]) != n:
                return None
            cache = _Cache(
                size=z["size"],
                mtime_ns=z["mtime_ns"],
                frames=z["frames"],
                samplerate=z["samplerate"],
                code=z["code"],
                reasons=[str(r) for r in z["reasons"].tolist()],
            )
    except Exception:
        return None
    columns = {
        "size": np.int64,
        "mtime_ns": np.int64,
        "frames": np.int32,
        "samplerate": np.int32,
        "code": np.int32,
    }
    for name, dtype in columns.items():
        a = getattr(cache, name)
        if a.dtype != dtype or a.shape != (n,):
            return None
    # Out-of-range codes would only surface later as an IndexError far from here.
    if n and (cache.code.min() < -1 or cache.code.max() >= len(cache.reasons)):
        return None
    return cache


def _save_cache(path: Path, cache: _Cache) -> bool:
    # Unused reasons are dropped so the list cannot grow run after run as files are fixed.
    used, inverse = np.unique(cache.code[cache.code >= 0], return_inverse=True)
    code = np.full_like(cache.code, -1)
    code[cache.code >= 0] = inverse
    buffer = io.BytesIO()
    np.savez(
        buffer,
        version=np.int64(CACHE_VERSION),
        n=np.int64(len(cache.size)),
        size=cache.size,
        mtime_ns=cache.mtime_ns,
        frames=cache.frames,
        samplerate=cache.samplerate,
        code=code,
        # A fixed-width unicode array, so loading needs no pickle.
        reasons=np.array([cache.reasons[i] for i in used.tolist()], dtype=str),
    )
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temporary sibling + rename, so a concurrent reader or a crash sees the old cache or the new one.
        # No fsync (unlike storage.py, which would also pull in torch): losing a cache costs a rescan.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return False


# ----------------------------------------------------------------------------------------------------
# Worker tasks (run in pool threads; results go back to the calling thread through a queue)


def _stat_reason(exc: BaseException) -> str:
    # Same wording as audio.audio_info would use, so a problem reads the same whether or not it was
    # found without opening the file.
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return _MISSING
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"invalid path ({exc})"  # ValueError: an embedded NUL byte


def _stat_chunk(paths: Sequence[str]) -> tuple[list[int], list[int], dict[int, str]]:
    sizes: list[int] = []
    mtimes: list[int] = []
    errors: dict[int, str] = {}
    for j, p in enumerate(paths):
        try:
            st = os.stat(p)
        except (OSError, ValueError) as e:
            sizes.append(-1)
            mtimes.append(-1)
            errors[j] = _stat_reason(e)
            continue
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return sizes, mtimes, errors


def _read_header(path: str) -> tuple[int, int, str | None]:
    try:
        info = audio_info(path)
    except AudioError as e:
        return -1, -1, e.reason
    n = info.frames_16k
    # A few samples at a high rate can round to nothing at 16 kHz; no crop can be taken from that.
    if n <= 0:
        return -1, -1, "empty file (0 samples at 16 kHz)"
    if n > _INT32_MAX:
        return -1, -1, f"too long ({n} samples at 16 kHz, more than 37 hours)"
    return n, info.samplerate, None


def _read_batch(paths: Sequence[str]) -> list[tuple[int, int, str | None]]:
    return [_read_header(p) for p in paths]


# ----------------------------------------------------------------------------------------------------
# Indexing


class _Scan:
    """One indexing pass over a split: stat every path in chunks, read the headers of new or changed files in
    batches (each path once, however often it is listed), and fill the per-file arrays as results arrive. Workers
    only stat and read; every array is written from the calling thread."""

    def __init__(self, paths: list[str], cache: _Cache | None, progress: Callable[[int], None] | None,
                 threads: int) -> None:
        n = len(paths)
        self.paths, self.cache, self.progress, self.threads = paths, cache, progress, threads
        self.size = np.full(n, -1, dtype=np.int64)
        self.mtime = np.full(n, -1, dtype=np.int64)
        self.frames = np.full(n, -1, dtype=np.int32)
        self.samplerate = np.full(n, -1, dtype=np.int32)
        self.code = np.full(n, -1, dtype=np.int32)
        # Starting from the cached list keeps cached codes valid as they are copied over.
        self.reasons: list[str] = list(cache.reasons) if cache is not None else []
        self._reason_code = {r: i for i, r in enumerate(self.reasons)}
        self.scanned = 0
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding = 0
        # Rows waiting for a read in flight, and results of reads already done (only new/changed files, so small
        # when cached).
        self._pending: dict[str, list[int]] = {}
        self._read: dict[str, tuple[int, int, str | None]] = {}

    def run(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="index")
        try:
            for start in range(0, len(self.paths), _STAT_CHUNK):
                self._submit("stat", start, _stat_chunk, self.paths[start : start + _STAT_CHUNK])
            while self._outstanding:
                kind, key, result, error = self._done.get()
                self._outstanding -= 1
                if error is not None:
                    raise error
                (self._on_stat if kind == "stat" else self._on_read)(key, result)
        finally:
            # On an error or Ctrl-C, drop the queued work instead of finishing a full scan first.
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _code_of(self, reason: str) -> int:
        if reason not in self._reason_code:
            self._reason_code[reason] = len(self.reasons)
            self.reasons.append(reason)
        return self._reason_code[reason]

    def _report(self, k: int) -> None:
        if self.progress is not None and k:
            self.progress(k)

    def _submit(self, kind: str, key: object, fn: Callable, arg: object) -> None:
        def task() -> None:
            try:
                self._done.put((kind, key, fn(arg), None))
            except BaseException as e:  # re-raised in the calling thread, which would otherwise wait forever
                self._done.put((kind, key, None, e))

        self._outstanding += 1
        self._pool.submit(task)

    def _unchanged_since_cache(self, start: int, stop: int, ok: np.ndarray) -> np.ndarray:
        """Rows whose size and mtime match the cache, their header fields copied from it."""
        c = self.cache
        if c is None:
            return np.zeros_like(ok)
        same = ok & (c.size[start:stop] == self.size[start:stop]) & (c.mtime_ns[start:stop] == self.mtime[start:stop])
        self.frames[start:stop][same] = c.frames[start:stop][same]
        self.samplerate[start:stop][same] = c.samplerate[start:stop][same]
        self.code[start:stop][same] = c.code[start:stop][same]
        return same

    def _on_stat(self, start: int, result: tuple[list[int], list[int], dict[int, str]]) -> None:
        sizes, mtimes, errors = result
        stop = start + len(sizes)
        self.size[start:stop] = sizes
        self.mtime[start:stop] = mtimes
        for j, reason in errors.items():
            self.code[start + j] = self._code_of(reason)
        ok = self.size[start:stop] >= 0
        todo = ok & ~self._unchanged_since_cache(start, stop, ok)
        new_paths: list[str] = []
        known = 0
        for i in (np.flatnonzero(todo) + start).tolist():
            p = self.paths[i]
            if p in self._read:
                self._store(i, self._read[p])
                known += 1
            elif p in self._pending:
                self._pending[p].append(i)
            else:
                self._pending[p] = [i]
                new_paths.append(p)
        for b in range(0, len(new_paths), _READ_BATCH):
            batch = new_paths[b : b + _READ_BATCH]
            self._submit("read", batch, _read_batch, batch)
        self._report(len(sizes) - int(todo.sum()) + known)

    def _store(self, rows: int | list[int], result: tuple[int, int, str | None]) -> None:
        f16, sr, reason = result
        self.frames[rows] = f16
        self.samplerate[rows] = sr
        self.code[rows] = -1 if reason is None else self._code_of(reason)

    def _on_read(self, batch: list[str], results: list[tuple[int, int, str | None]]) -> None:
        finished = 0
        for p, result in zip(batch, results, strict=True):
            rows = self._pending.pop(p)
            self._read[p] = result
            self._store(rows, result)
            finished += len(rows)
        self.scanned += len(batch)
        self._report(finished)

    def unchanged(self) -> bool:
        """Nothing read and every stat and code as cached: the cache needs no rewrite."""
        c = self.cache
        return (c is not None and self.scanned == 0 and np.array_equal(c.size, self.size)
                and np.array_equal(c.mtime_ns, self.mtime) and np.array_equal(c.code, self.code))


def index_split(
    split: Split,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int = 8,
) -> IndexResult:
    """Fill ``split.frames`` and ``split.samplerate`` from the audio headers and list the bad files.

    Every path is stat'ed on every call; headers are read only for files that are new or whose size or
    mtime changed since the cached index (``cache_dir``, default :func:`default_index_dir`), so an
    unchanged corpus reads none. ``progress(n)`` is called from the calling thread with the number of
    files finished since its last call; the calls add up to ``len(split)``. A missing, corrupt, stale or
    unwritable cache only costs time, never raises.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    t0 = time.perf_counter()
    n = len(split)
    paths = list(split.path)
    cache_file = _cache_path(split, Path(cache_dir) if cache_dir is not None else default_index_dir())
    cache = _load_cache(cache_file, n) if n else None
    scan = _Scan(paths, cache, progress, threads)
    scan.run()

    used_file: Path | None = cache_file if cache is not None else None
    if n and not scan.unchanged():
        fresh = _Cache(scan.size, scan.mtime, scan.frames, scan.samplerate, scan.code, scan.reasons)
        used_file = cache_file if _save_cache(cache_file, fresh) else None
    bad = np.flatnonzero(scan.code >= 0).tolist()
    return IndexResult(
        split=replace(split, frames=scan.frames, samplerate=scan.samplerate),
        problems=tuple(Problem(i, paths[i], scan.reasons[scan.code[i]]) for i in bad),
        scanned=scan.scanned,
        seconds=time.perf_counter() - t0,
        cache_file=used_file,
    )


def sample_rates(split: Split) -> dict[int, int]:
    """Stored sample rate -> number of good files with it, in ascending rate (needs an indexed split)."""
    if split.samplerate is None or split.frames is None:
        raise ValueError(f"split {split.name!r} has not been indexed (frames/samplerate are missing)")
    good = (split.frames > 0) & (split.samplerate > 0)
    rates, counts = np.unique(split.samplerate[good], return_counts=True)
    return {int(r): int(c) for r, c in zip(rates.tolist(), counts.tolist(), strict=True)}


# ----------------------------------------------------------------------------------------------------
# The --max-bad rule


def _parse_max_bad(spec: str) -> tuple[str, Fraction]:
    s = spec.strip()
    try:
        if s.endswith("%"):
            number = s[:-1].strip()
            # Fraction parses decimal text exactly, so "2.3%" of 1000 files is exactly 23, not 22.999...
            value = Fraction(number)
            # Fraction also accepts "1/2"; only plain decimals are meant.
            if "/" in number or not 0 <= value <= 100:
                raise ValueError
            return "fraction", value / 100
        if not (s.isascii() and s.isdigit()):  # rejects signs, decimals, exponents
            raise ValueError
        return "count", Fraction(int(s))
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"--max-bad must be a percentage like 5% (0-100%) or a count like 20, got {spec!r}"
        ) from None


def parse_max_bad(spec: str) -> tuple[str, float]:
    """``"5%"`` -> ``("fraction", 0.05)``; ``"12"`` -> ``("count", 12)``; anything else raises ValueError."""
    kind, value = _parse_max_bad(spec)
    return (kind, float(value)) if kind == "fraction" else (kind, int(value))


def check_max_bad(
    n_bad: int, n_total: int, spec: str, split_name: str, *, data_root: str | os.PathLike[str] | None = None
) -> None:
    """Raise TooManyBadFiles when ``n_bad`` exceeds the ``--max-bad`` limit (reaching it exactly is
    allowed). ``data_root`` fills in the suggested ``check-data`` command; without it the message says ROOT."""
    kind, limit = _parse_max_bad(spec)
    allowed = limit * n_total if kind == "fraction" else limit
    if n_bad <= allowed:
        return
    share = 100 * n_bad / n_total if n_total else 100.0
    pct = f"{share:.1f}%" if share >= 0.1 else "<0.1%"
    verb = "is" if n_bad == 1 else "are"
    root = os.fspath(data_root) if data_root is not None else "ROOT"
    raise TooManyBadFiles(
        f"{split_name}: {n_bad:,} of {n_total:,} files ({pct}) {verb} missing or unreadable, more than "
        f"--max-bad {spec.strip()}; run `lowmem-aasist check-data --data {root}` to list them"
    )
