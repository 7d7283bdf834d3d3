"""Corpus layouts: recognise a corpus folder by its files and read each split into a flat ``Split``.

Every layout is one row of ``LAYOUTS`` (what makes it, which splits it has, a detector and a reader), so adding a
corpus means adding a row, and ``--data`` works without ``--layout`` for every corpus in the table. Readers only
parse protocol files and build path strings; they never open or stat audio (the audio index does that, once, for
all layouts), except where a layout must list a folder to find where its audio lives.

Paths are built from ``--data`` as given (absolute when it is), so the 2019 LA reader yields exactly the strings
the former ``asvspoof2019`` reader did.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .split import BONAFIDE, SPOOF, UNLABELED, Split, make_split

KEYS = {"bonafide": BONAFIDE, "spoof": SPOOF}
PHASES = ("progress", "eval", "hidden_track", "all")
"""ASVspoof 2021 scoring phases as the keys' 8th column names them; ``all`` keeps every trial."""

# Deep enough for ROOT/<wrapper>/LA-keys-full/keys/LA/CM; shallow enough that a walk costs a few directory reads.
KEYS_MAX_DEPTH = 5
# Audio folders hold up to 600k files; listing one would take longer than reading every protocol.
AUDIO_DIR_NAMES = ("flac", "wav")


class ProtocolError(Exception):
    """A missing, unreadable or malformed protocol; one line naming the file (and line). The CLI exits 1."""


class ProtocolNotFound(ProtocolError):
    """A split's protocol file is absent (as opposed to unreadable or malformed).

    Kept apart because a partial copy of a corpus is normal (ASVspoof 5 was released in stages; many copies hold
    train and dev only): ``check-data`` reports such a split as absent and checks the others. ``path`` is the
    file that was looked for and ``hint`` what to do about it, for callers that compose their own line.
    """

    def __init__(self, message: str, path: Path, hint: str) -> None:
        super().__init__(message)
        self.path = path
        self.hint = hint


class LayoutError(Exception):
    """A folder no layout recognises, an unknown layout name or a split the layout lacks; one line. Exit 2."""


@dataclass(frozen=True)
class Layout:
    name: str
    needs: str  # what files make this layout, for the message when nothing is recognised
    splits: tuple[str, ...]
    detect: Callable[[Path], bool]
    read: Callable[[Path, str, str], Split]  # (root, split, phase) -> Split; only 2021 uses phase
    title: str = ""  # "In-the-Wild corpus": how error messages call it

    def describe(self) -> str:
        title = self.title or f"{self.name} corpus"
        return f"{'an' if title[0] in 'AEIOUaeiou' else 'a'} {title}"


# ----------------------------------------------------------------------------------------------- helpers


def _read_lines(path: Path, what: str = "protocol") -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{path}: cannot read {what} ({exc})") from None


def _bad_line(path: Path, number: int, expected: str, line: str) -> ProtocolError:
    return ProtocolError(f"{path}:{number}: expected {expected}, got {line.strip()[:80]!r}")


def _not_found(path: Path, hint: str) -> ProtocolNotFound:
    return ProtocolNotFound(f"{path}: protocol not found; {hint}", path, hint)


def _empty(path: Path) -> ProtocolError:
    return ProtocolError(f"{path}: protocol is empty")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _subdirs(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Immediate subfolders, sorted so that every choice made among them is reproducible."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if e.name not in skip and e.is_dir())
    except OSError:
        return []


# ------------------------------------------------------------------------------------- ASVspoof 2019 LA

LA2019_PROTOCOL_DIR = "ASVspoof2019_LA_cm_protocols"
LA2019_PROTOCOL_FILES = {
    "train": "ASVspoof2019.LA.cm.train.trn.txt",
    "dev": "ASVspoof2019.LA.cm.dev.trl.txt",
    "eval": "ASVspoof2019.LA.cm.eval.trl.txt",
}


def _detect_la2019(root: Path) -> bool:
    return _is_dir(root / LA2019_PROTOCOL_DIR)


def _read_la2019(root: Path, split: str, phase: str) -> Split:
    proto = root / LA2019_PROTOCOL_DIR / LA2019_PROTOCOL_FILES[split]
    if not _is_file(proto):
        raise _not_found(
            proto, f"--data must be the folder holding {LA2019_PROTOCOL_DIR}/ (ASVspoof 2019 LA layout)"
        )
    prefix = str(root / f"ASVspoof2019_LA_{split}" / "flac") + "/"
    utts, paths, labels, attacks, speakers = [], [], [], [], []
    for number, line in enumerate(_read_lines(proto), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 or fields[4] not in KEYS:
            raise _bad_line(proto, number, "'SPEAKER UTT - ATTACK bonafide|spoof'", line)
        utts.append(fields[1])
        paths.append(prefix + fields[1] + ".flac")
        speakers.append(fields[0])
        attacks.append(fields[3])
        labels.append(KEYS[fields[4]])
    if not utts:
        raise _empty(proto)
    return make_split(split, "asvspoof2019-la", utts, paths, labels, attacks, {"speaker": speakers})


# ------------------------------------------------------------------------------------- ASVspoof 2021 LA/DF


def _find_2021_keys(root: Path, track: str) -> Path | None:
    """The keys package's CM trial_metadata.txt for ``track``, wherever under ``root`` it was unpacked.

    Breadth first, in sorted order, so the shallowest copy wins and the choice does not depend on the file
    system's listing order. Only ``keys/<track>/CM`` matches: the stage-1 packages (``keys/CM``, progress phase
    only) would silently drop most trials.
    """
    level = [root]
    for depth in range(KEYS_MAX_DEPTH + 1):
        below: list[Path] = []
        for folder in level:
            if folder.name == "CM" and folder.parent.name == track and folder.parent.parent.name == "keys":
                found = folder / "trial_metadata.txt"
                if _is_file(found):
                    return found
            if depth < KEYS_MAX_DEPTH:
                below.extend(_subdirs(folder, skip=AUDIO_DIR_NAMES))
        level = below
    return None


def _read_2021_keys(keys: Path, track: str, audio_prefix: str, phase: str) -> Split:
    utts, paths, labels, attacks, phases, codecs = [], [], [], [], [], []
    keep_all = phase == "all"
    for number, line in enumerate(_read_lines(keys, "keys file"), start=1):
        fields = line.split()
        if not fields:
            continue
        # LA lines have 8 columns; DF lines carry vocoder and source-corpus columns after the 8th.
        if len(fields) < 8 or fields[5] not in KEYS:
            raise _bad_line(
                keys, number, "'SPEAKER UTT CODEC TRANSMISSION ATTACK bonafide|spoof TRIM PHASE ...'", line
            )
        if not keep_all and fields[7] != phase:
            continue
        label = KEYS[fields[5]]
        utts.append(fields[1])
        paths.append(audio_prefix + fields[1] + ".flac")
        labels.append(label)
        attacks.append("-" if label == BONAFIDE else fields[4])
        phases.append(fields[7])
        codecs.append(fields[2])
    if not utts:
        if keep_all:
            raise _empty(keys)
        raise ProtocolError(f"{keys}: no trials of phase {phase!r}; choose one of {', '.join(PHASES)}")
    meta = {"phase": phases, "codec": codecs}
    return make_split("eval", f"asvspoof2021-{track.lower()}", utts, paths, labels, attacks, meta)


def _read_2021_trl(trl: Path) -> list[str]:
    # The official list has one utterance id per line. Some redistributed copies use the 2019 column order
    # (SPEAKER UTT - ATTACK KEY); every ASVspoof protocol puts the utterance second, so take that column.
    # Their keys are not trusted: labels come from the keys package only.
    utts = []
    for number, line in enumerate(_read_lines(trl), start=1):
        fields = line.split()
        if not fields:
            continue
        if 1 < len(fields) < 5:
            raise _bad_line(trl, number, "one utterance id per line (or 'SPEAKER UTT - ATTACK KEY')", line)
        utts.append(fields[0] if len(fields) == 1 else fields[1])
    if not utts:
        raise _empty(trl)
    return utts


def _list_flac(audio_dir: Path) -> list[str]:
    try:
        with os.scandir(audio_dir) as entries:
            return sorted(e.name[:-5] for e in entries if e.name.endswith(".flac"))
    except OSError:
        return []


def _reader_2021(track: str) -> Callable[[Path, str, str], Split]:
    def read(root: Path, split: str, phase: str) -> Split:
        if phase not in PHASES:
            raise LayoutError(
                f"--phase {phase}: not an ASVspoof 2021 phase; choose one of {', '.join(PHASES)}"
            )
        eval_dir = root / f"ASVspoof2021_{track}_eval"
        audio_dir = eval_dir / "flac"
        prefix = str(audio_dir) + "/"
        keys = _find_2021_keys(root, track)
        if keys is not None:
            return _read_2021_keys(keys, track, prefix, phase)
        keys_hint = f"keys/{track}/CM/trial_metadata.txt (from {track}-keys-full.tar.gz) under {root}"
        if phase not in ("eval", "all"):
            raise ProtocolError(f"{root}: phase {phase!r} needs the keys file {keys_hint}; none found")
        # Without keys the phases cannot be told apart: every trial is read, unlabelled.
        trl = eval_dir / f"ASVspoof2021.{track}.cm.eval.trl.txt"
        if _is_file(trl):
            utts = _read_2021_trl(trl)
        else:
            utts = _list_flac(audio_dir)
            if not utts:
                raise _not_found(trl, f"and no keys file {keys_hint}, and no .flac files in {audio_dir}")
        paths = [prefix + u + ".flac" for u in utts]
        return make_split(
            "eval", f"asvspoof2021-{track.lower()}", utts, paths, [UNLABELED] * len(utts), ["?"] * len(utts)
        )

    return read


def _detector_2021(track: str) -> Callable[[Path], bool]:
    def detect(root: Path) -> bool:
        return _is_dir(root / f"ASVspoof2021_{track}_eval")

    return detect


# ------------------------------------------------------------------------------------------ ASVspoof 5

AS5_PROTOCOL_FILES = {
    "train": "ASVspoof5.train.tsv",
    "dev": "ASVspoof5.dev.track_1.tsv",
    "eval": "ASVspoof5.eval.track_1.tsv",
}
AS5_AUDIO_DIRS = {"train": "flac_T", "dev": "flac_D"}
AS5_COLUMNS = (
    "SPEAKER_ID FLAC_FILE_NAME SPEAKER_GENDER CODEC CODEC_Q CODEC_SEED ATTACK_TAG ATTACK_LABEL KEY TMP"
)


def _as5_protocol(root: Path, split: str) -> Path | None:
    """The split's protocol in ROOT or one of its immediate subfolders (the protocols tarball unpacks into
    ``ASVspoof5_protocols/``, but people also flatten it into ROOT)."""
    name = AS5_PROTOCOL_FILES[split]
    if _is_file(root / name):
        return root / name
    for folder in _subdirs(root):
        if _is_file(folder / name):
            return folder / name
    return None


def _detect_as5(root: Path) -> bool:
    return any(_as5_protocol(root, split) is not None for split in AS5_PROTOCOL_FILES)


def _as5_eval_audio(root: Path, first: str) -> Path:
    # The eval tarballs unpack into flac_E_eval; other releases (or renamed copies) may use another suffix.
    found = [d for d in _subdirs(root) if d.name == "flac_E" or d.name.startswith("flac_E_")]
    if len(found) > 1:
        for folder in found:
            if _is_file(folder / f"{first}.flac"):
                return folder
    return found[0] if found else root / "flac_E_eval"


def _read_as5(root: Path, split: str, phase: str) -> Split:
    proto = _as5_protocol(root, split)
    if proto is None:
        name = AS5_PROTOCOL_FILES[split]
        present = {s: p for s in AS5_PROTOCOL_FILES if (p := _as5_protocol(root, s)) is not None}
        if not present:
            raise _not_found(
                root / name,
                "--data must be the folder holding the ASVspoof5.*.tsv protocols (or a subfolder such as "
                "ASVspoof5_protocols/ holding them)",
            )
        # A partial copy (the corpus was released in stages): name the file where its siblings are, since
        # that is where it belongs, and say which splits the copy does hold.
        beside = next(iter(present.values())).parent
        raise _not_found(
            beside / name,
            f"this copy holds the {', '.join(present)} protocol{'s' if len(present) > 1 else ''} only; "
            f"put {name} beside {'them' if len(present) > 1 else 'it'} to use the {split} split",
        )
    names, labels, attacks, speakers, genders, codecs = [], [], [], [], [], []
    for number, line in enumerate(_read_lines(proto), start=1):
        fields = line.split()
        if not fields or (not names and fields[0] == "SPEAKER_ID"):
            continue
        # The files are named .tsv but separated by single spaces; str.split handles both.
        if len(fields) < 9 or fields[8] not in KEYS:
            raise _bad_line(proto, number, f"'{AS5_COLUMNS}' with KEY bonafide|spoof", line)
        label = KEYS[fields[8]]
        names.append(fields[1])
        labels.append(label)
        # ATTACK_LABEL is the attack system (A01..A32); ATTACK_TAG groups attack conditions.
        attacks.append("-" if label == BONAFIDE else fields[7])
        speakers.append(fields[0])
        genders.append(fields[2])
        codecs.append(fields[3])
    if not names:
        raise _empty(proto)
    audio_dir = root / AS5_AUDIO_DIRS[split] if split in AS5_AUDIO_DIRS else _as5_eval_audio(root, names[0])
    prefix = str(audio_dir) + "/"
    paths = [prefix + n + ".flac" for n in names]
    meta = {"speaker": speakers, "gender": genders, "codec": codecs}
    return make_split(split, "asvspoof5", names, paths, labels, attacks, meta)


# ------------------------------------------------------------------------------------------ In-the-Wild

ITW_HEADER = ["file", "speaker", "label"]
ITW_LABELS = {"bona-fide": BONAFIDE, "spoof": SPOOF}


def _detect_itw(root: Path) -> bool:
    meta = root / "meta.csv"
    if not _is_file(meta):
        return False
    try:
        with open(meta, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader([f.readline()]), [])
    except (OSError, UnicodeDecodeError):
        return False
    return [h.strip() for h in header] == ITW_HEADER


def _read_itw(root: Path, split: str, phase: str) -> Split:
    meta = root / "meta.csv"
    if not _is_file(meta):
        raise _not_found(
            meta, "--data must be the release_in_the_wild folder holding meta.csv and the wav files"
        )
    prefix = str(root) + "/"
    utts, paths, labels, attacks, speakers = [], [], [], [], []
    try:
        with open(meta, encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(f)
            header = next(rows, [])
            if [h.strip() for h in header] != ITW_HEADER:
                raise _bad_line(meta, 1, "header 'file,speaker,label'", ",".join(header))
            for row in rows:
                if not row:
                    continue
                if len(row) != 3 or row[2] not in ITW_LABELS or not row[0]:
                    raise _bad_line(meta, rows.line_num, "'FILE.wav,SPEAKER,bona-fide|spoof'", ",".join(row))
                label = ITW_LABELS[row[2]]
                utts.append(os.path.splitext(row[0])[0])
                paths.append(prefix + row[0])
                labels.append(label)
                attacks.append("-" if label == BONAFIDE else "spoof")
                speakers.append(row[1])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ProtocolError(f"{meta}: cannot read protocol ({exc})") from None
    if not utts:
        raise _empty(meta)
    return make_split(split, "in-the-wild", utts, paths, labels, attacks, {"speaker": speakers})


# ------------------------------------------------------------------------------------------ generic list

LIST_SUFFIXES = (".csv", ".tsv", ".txt")
LIST_NAMES = ("list.csv", "list.tsv")
LIST_LABELS = {
    "bonafide": BONAFIDE,
    "bona-fide": BONAFIDE,
    "bona fide": BONAFIDE,
    "real": BONAFIDE,
    "genuine": BONAFIDE,
    "1": BONAFIDE,
    "spoof": SPOOF,
    "fake": SPOOF,
    "0": SPOOF,
    "": UNLABELED,
}


def _list_file(root: Path) -> Path | None:
    if root.suffix.lower() in LIST_SUFFIXES and _is_file(root):
        return root
    # A folder with both would be ambiguous about which list is meant; neither is picked.
    found = [root / n for n in LIST_NAMES if _is_file(root / n)]
    return found[0] if len(found) == 1 else None


def _detect_list(root: Path) -> bool:
    return _list_file(root) is not None


def _list_delimiter(path: Path, header: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "\t"
    if suffix == ".csv":
        return ","
    # A .txt says nothing about its separator; the header line does.
    return "\t" if "\t" in header else ","


def _read_list(root: Path, split: str, phase: str) -> Split:
    path = _list_file(root)
    if path is None:
        raise _not_found(
            root, "--data must be a .csv/.tsv/.txt list or a folder holding list.csv or list.tsv"
        )
    lines = _read_lines(path, "list")
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]  # spreadsheet exports start with a byte-order mark
    if not lines or not lines[0].strip():
        raise _empty(path)
    rows = csv.reader(lines, delimiter=_list_delimiter(path, lines[0]))
    try:
        header = [h.strip() for h in next(rows)]
    except csv.Error as exc:
        raise ProtocolError(f"{path}:1: cannot parse header ({exc})") from None
    lower = [h.lower() for h in header]
    if "path" not in lower or "label" not in lower or len(set(lower)) != len(lower):
        raise _bad_line(path, 1, "a header naming distinct columns including 'path' and 'label'", lines[0])
    col_path, col_label = lower.index("path"), lower.index("label")
    col_utt = lower.index("utt") if "utt" in lower else lower.index("id") if "id" in lower else None
    col_attack = lower.index("attack") if "attack" in lower else None
    roles = {col_path, col_label, col_utt, col_attack}
    extra = [(i, header[i]) for i in range(len(header)) if i not in roles]
    base = path.parent
    utts, paths, labels, attacks = [], [], [], []
    meta: dict[str, list[str]] = {name: [] for _, name in extra}
    expected_row = f"{len(header)} fields ({','.join(header)})"
    try:
        for row in rows:
            number = rows.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise _bad_line(path, number, expected_row, lines[number - 1])
            file = row[col_path].strip()
            label = LIST_LABELS.get(row[col_label].strip().lower())
            if not file:
                raise _bad_line(path, number, "a non-empty path", lines[number - 1])
            if label is None:
                raise _bad_line(
                    path,
                    number,
                    "label bonafide|bona-fide|bona fide|real|genuine|1, spoof|fake|0, or empty for unknown",
                    row[col_label],
                )
            full = file if os.path.isabs(file) else os.path.normpath(os.path.join(base, file))
            utt = row[col_utt].strip() if col_utt is not None else ""
            attack = row[col_attack].strip() if col_attack is not None else ""
            utts.append(utt or os.path.splitext(os.path.basename(file))[0])
            paths.append(full)
            labels.append(label)
            attacks.append("-" if label == BONAFIDE else attack or ("spoof" if label == SPOOF else "?"))
            for i, name in extra:
                meta[name].append(row[i])
    except csv.Error as exc:
        raise ProtocolError(f"{path}:{rows.line_num}: cannot parse line ({exc})") from None
    if not utts:
        raise _empty(path)
    return make_split(split, "list", utts, paths, labels, attacks, meta)


# ------------------------------------------------------------------------------------------ the table

_TRAIN_DEV_EVAL = ("train", "dev", "eval")

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        # 2019 LA first: a folder holding both it and the 2021 eval set is most useful as a training corpus.
        Layout(
            "asvspoof2019-la",
            f"{LA2019_PROTOCOL_DIR}/",
            _TRAIN_DEV_EVAL,
            _detect_la2019,
            _read_la2019,
            "ASVspoof 2019 LA corpus",
        ),
        Layout(
            "asvspoof2021-la",
            "ASVspoof2021_LA_eval/",
            ("eval",),
            _detector_2021("LA"),
            _reader_2021("LA"),
            "ASVspoof 2021 LA evaluation corpus",
        ),
        Layout(
            "asvspoof2021-df",
            "ASVspoof2021_DF_eval/",
            ("eval",),
            _detector_2021("DF"),
            _reader_2021("DF"),
            "ASVspoof 2021 DF evaluation corpus",
        ),
        Layout(
            "asvspoof5",
            "ASVspoof5.{train,dev.track_1,eval.track_1}.tsv here or in a subfolder",
            _TRAIN_DEV_EVAL,
            _detect_as5,
            _read_as5,
            "ASVspoof 5 corpus",
        ),
        Layout(
            "in-the-wild",
            "meta.csv with header file,speaker,label",
            ("eval",),
            _detect_itw,
            _read_itw,
            "In-the-Wild corpus",
        ),
        # Last: a folder that happens to hold a list.csv beside a real corpus is read as that corpus.
        Layout(
            "list",
            "a .csv/.tsv/.txt file with path and label columns, or a folder holding list.csv or list.tsv",
            ("eval",),
            _detect_list,
            _read_list,
            "file list",
        ),
    )
}


def _existing_root(root: str | Path) -> Path:
    path = Path(root)
    if not path.exists():
        kind = "file" if path.suffix.lower() in LIST_SUFFIXES else "folder"
        raise LayoutError(f"--data {root}: no such {kind}")
    return path


def detect_layout(root: str | Path) -> Layout:
    """The first layout in ``LAYOUTS`` whose files ``root`` holds; LayoutError listing them all if none."""
    path = _existing_root(root)
    for layout in LAYOUTS.values():
        if layout.detect(path):
            return layout
    known = ", ".join(f"{layout.name} ({layout.needs})" for layout in LAYOUTS.values())
    raise LayoutError(
        f"--data {root}: not a corpus lowmem-aasist knows; expected one of: {known}; or give --layout NAME"
    )


def get_layout(name: str) -> Layout:
    """The layout called ``name`` (not ``auto``: use ``resolve_layout`` for that)."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(
            f"--layout {name}: unknown layout; choose auto or one of: {', '.join(LAYOUTS)}"
        ) from None


def resolve_layout(root: str | Path, layout: str = "auto") -> Layout:
    """``detect_layout(root)`` for ``auto``, else the named layout (``root`` must exist either way)."""
    if layout == "auto":
        return detect_layout(root)
    _existing_root(root)
    return get_layout(layout)


def read_split(root: str | Path, split: str, layout: str = "auto", phase: str = "eval") -> Split:
    """Parse one split of the corpus at ``root``; ``phase`` picks ASVspoof 2021 trials (ignored elsewhere)."""
    chosen = resolve_layout(root, layout)
    if split not in chosen.splits:
        has = (
            f"split {chosen.splits[0]} only"
            if len(chosen.splits) == 1
            else f"splits {', '.join(chosen.splits)}"
        )
        raise LayoutError(
            f"--data {root} is {chosen.describe()} (layout {chosen.name}): it has {has}, not {split!r}"
        )
    return chosen.read(Path(root), split, phase)


def has_training_splits(layout: Layout) -> bool:
    """Whether a model can be trained on this layout alone (it has both a train and a dev split)."""
    return "train" in layout.splits and "dev" in layout.splits
