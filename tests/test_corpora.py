"""Corpus layouts: detection, forced layouts, every reader on a tiny tree, and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lowmem_aasist.data.check import absent_line, check_data
from lowmem_aasist.data.corpora import (
    LA2019_PROTOCOL_FILES,
    LAYOUTS,
    LayoutError,
    ProtocolError,
    ProtocolNotFound,
    detect_layout,
    get_layout,
    has_training_splits,
    read_split,
    resolve_layout,
)
from lowmem_aasist.data.load import load_split
from lowmem_aasist.data.split import BONAFIDE, SPOOF, UNLABELED


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def touch_audio(folder: Path, names: list[str], suffix: str = ".flac") -> None:
    # Readers never open audio, so empty placeholders are enough to make a folder look real.
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}{suffix}").touch()


# ------------------------------------------------------------------------------------------ tree builders

LA2019_LINES = {
    "train": [
        "LA_0079 LA_T_1138215 - - bonafide",
        "LA_0079 LA_T_1271820 - A01 spoof",
        "LA_0080 LA_T_1 - A02 spoof",
    ],
    "dev": ["LA_0069 LA_D_1047731 - - bonafide", "LA_0069 LA_D_1105538 - A03 spoof"],
    "eval": ["LA_0039 LA_E_2834763 - A11 spoof", "LA_0014 LA_E_8877452 - - bonafide"],
}


def make_la2019(root: Path) -> Path:
    for split, lines in LA2019_LINES.items():
        name = LA2019_PROTOCOL_FILES[split]
        write(root / "ASVspoof2019_LA_cm_protocols" / name, "\n".join(lines) + "\n")
        touch_audio(root / f"ASVspoof2019_LA_{split}" / "flac", [line.split()[1] for line in lines])
    return root


LA2021_KEYS = [
    "LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval",
    "LA_0020 LA_E_6866159 none none bonafide bonafide notrim progress",
    "LA_0012 LA_E_5464494 g722 loc_tx A09 spoof notrim hidden_track",
    "LA_0023 LA_E_1000001 ulaw sin_tx bonafide bonafide notrim eval",
]
DF2021_KEYS = [
    "LA_0043 DF_E_2000026 mp3m4a asvspoof A09 spoof notrim eval traditional_vocoder - - - -",
    "VCC2TF1 DF_E_2000027 ogg vcc2020 bonafide bonafide notrim progress bonafide - - - -",
    "LA_0021 DF_E_2000028 nocodec asvspoof bonafide bonafide notrim eval bonafide - - - -",
]


def make_2021(root: Path, track: str, keys: list[str] | None, trl: list[str] | None) -> Path:
    eval_dir = root / f"ASVspoof2021_{track}_eval"
    utts = [line.split()[1] for line in keys] if keys else [f"{track}_E_{i}" for i in (3, 1, 2)]
    touch_audio(eval_dir / "flac", utts)
    if trl is not None:
        write(eval_dir / f"ASVspoof2021.{track}.cm.eval.trl.txt", "\n".join(trl) + "\n")
    if keys is not None:
        # As the keys tarball unpacks: ROOT/<TRACK>-keys-full/keys/<TRACK>/CM/trial_metadata.txt
        write(
            root / f"{track}-keys-full" / "keys" / track / "CM" / "trial_metadata.txt", "\n".join(keys) + "\n"
        )
    return root


AS5_HEADER = (
    "SPEAKER_ID FLAC_FILE_NAME SPEAKER_GENDER CODEC CODEC_Q CODEC_SEED ATTACK_TAG ATTACK_LABEL KEY TMP"
)
AS5_LINES = {
    "train": [
        "T_4850 T_0000000000 F - - - bonafide bonafide bonafide -",
        "T_1138 T_0000000001 M - - - AC3 A05 spoof -",
    ],
    "dev": [
        "D_0062 D_0000000001 F - - - AC1 A11 spoof -",
        "D_0062 D_0000000002 F - - - bonafide bonafide bonafide -",
    ],
    "eval": [
        "E_0001 E_0000000001 M C05 4 77 AC2 A20 spoof -",
        "E_0002 E_0000000002 F C01 1 12 bonafide bonafide bonafide -",
    ],
}
AS5_FILES = {
    "train": "ASVspoof5.train.tsv",
    "dev": "ASVspoof5.dev.track_1.tsv",
    "eval": "ASVspoof5.eval.track_1.tsv",
}


def make_as5(root: Path, header: bool = False, protocols: str = "ASVspoof5_protocols") -> Path:
    for split, lines in AS5_LINES.items():
        text = "\n".join(([AS5_HEADER] if header else []) + lines) + "\n"
        write(root / protocols / AS5_FILES[split], text)
    touch_audio(root / "flac_T", [line.split()[1] for line in AS5_LINES["train"]])
    touch_audio(root / "flac_D", [line.split()[1] for line in AS5_LINES["dev"]])
    touch_audio(root / "flac_E_eval", [line.split()[1] for line in AS5_LINES["eval"]])
    return root


def make_itw(root: Path) -> Path:
    write(root / "meta.csv", "file,speaker,label\n0.wav,Alec Guinness,spoof\n1.wav,Alec Guinness,bona-fide\n")
    touch_audio(root, ["0", "1"], ".wav")
    return root


def make_list(root: Path) -> Path:
    write(root / "list.csv", "path,label\nclips/a.wav,real\nclips/b.wav,fake\n")
    touch_audio(root / "clips", ["a", "b"], ".wav")
    return root


BUILDERS = {
    "asvspoof2019-la": make_la2019,
    "asvspoof2021-la": lambda root: make_2021(root, "LA", LA2021_KEYS, None),
    "asvspoof2021-df": lambda root: make_2021(root, "DF", DF2021_KEYS, None),
    "asvspoof5": make_as5,
    "in-the-wild": make_itw,
    "list": make_list,
}


# ------------------------------------------------------------------------------------------ detection


def test_table_names_and_order() -> None:
    assert list(LAYOUTS) == list(BUILDERS)
    assert [name for name, layout in LAYOUTS.items() if has_training_splits(layout)] == [
        "asvspoof2019-la",
        "asvspoof5",
    ]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_detects_each_layout(tmp_path: Path, name: str) -> None:
    root = BUILDERS[name](tmp_path / "corpus")
    assert detect_layout(root).name == name
    assert resolve_layout(str(root)).name == name
    split = read_split(root, LAYOUTS[name].splits[-1])
    assert split.layout == name and len(split) > 0


def test_list_file_itself_is_detected(tmp_path: Path) -> None:
    listed = write(tmp_path / "clips.tsv", "path\tlabel\n/abs/a.wav\tbonafide\n")
    assert detect_layout(listed).name == "list"
    assert list(read_split(listed, "eval").path) == ["/abs/a.wav"]


def test_unknown_folder_lists_every_layout_on_one_line(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(LayoutError) as info:
        detect_layout(tmp_path / "stuff")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"--data {tmp_path / 'stuff'}: not a corpus lowmem-aasist knows; expected one of: "
    )
    assert message.endswith("; or give --layout NAME")
    for layout in LAYOUTS.values():
        assert f"{layout.name} ({layout.needs})" in message


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no such folder"):
        read_split(tmp_path / "nope", "eval")
    with pytest.raises(LayoutError, match="no such file"):
        resolve_layout(tmp_path / "nope.csv", "list")


def test_forced_layout(tmp_path: Path) -> None:
    # A 2019 LA folder that also holds the 2021 LA eval set: auto picks 2019, --layout picks 2021.
    root = make_2021(make_la2019(tmp_path), "LA", LA2021_KEYS, None)
    assert detect_layout(root).name == "asvspoof2019-la"
    assert resolve_layout(root, "asvspoof2021-la").name == "asvspoof2021-la"
    assert read_split(root, "eval", layout="asvspoof2021-la").layout == "asvspoof2021-la"
    # Forcing a layout the folder does not hold names the protocol that is missing.
    with pytest.raises(ProtocolError, match=r"ASVspoof5\.train\.tsv: protocol not found"):
        read_split(root, "train", layout="asvspoof5")


def test_unknown_layout_name(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="unknown layout; choose auto or one of: asvspoof2019-la, "):
        get_layout("asvspoof2015")
    with pytest.raises(LayoutError):
        get_layout("auto")
    with pytest.raises(LayoutError, match="unknown layout"):
        read_split(make_itw(tmp_path), "eval", layout="itw")


def test_split_a_layout_lacks(tmp_path: Path) -> None:
    root = make_itw(tmp_path)
    with pytest.raises(LayoutError) as info:
        read_split(root, "train")
    assert str(info.value) == (
        f"--data {root} is an In-the-Wild corpus (layout in-the-wild): it has split eval only, not 'train'"
    )
    with pytest.raises(LayoutError, match="it has splits train, dev, eval, not 'test'"):
        read_split(make_la2019(tmp_path / "la"), "test")


# ------------------------------------------------------------------------------------------ ASVspoof 2019 LA


@pytest.mark.parametrize("split", ["train", "dev", "eval"])
def test_la2019_reads_protocol_columns_in_order(tmp_path: Path, split: str) -> None:
    root = make_la2019(tmp_path)
    new = read_split(root, split)
    rows = [line.split() for line in LA2019_LINES[split]]
    assert list(new.utt) == [r[1] for r in rows]
    assert list(new.path) == [f"{root}/ASVspoof2019_LA_{split}/flac/{r[1]}.flac" for r in rows]
    assert new.label.tolist() == [1 if r[4] == "bonafide" else 0 for r in rows]
    assert list(new.attack) == [r[3] for r in rows]
    assert list(new.meta["speaker"]) == [line.split()[0] for line in LA2019_LINES[split]]
    assert new.name == split and new.labeled


def test_la2019_errors(tmp_path: Path) -> None:
    root = make_la2019(tmp_path)
    proto = root / "ASVspoof2019_LA_cm_protocols" / LA2019_PROTOCOL_FILES["dev"]
    write(proto, "LA_0069 LA_D_1047731 - - bonafide\nLA_0069 LA_D_1105538 - A03 maybe\n")
    with pytest.raises(
        ProtocolError, match=rf"^{proto}:2: expected 'SPEAKER UTT - ATTACK bonafide\|spoof', got "
    ):
        read_split(root, "dev")
    write(proto, "\n\n")
    with pytest.raises(ProtocolError, match="protocol is empty"):
        read_split(root, "dev")
    proto.unlink()
    with pytest.raises(ProtocolError, match="protocol not found"):
        read_split(root, "dev")


# ------------------------------------------------------------------------------------------ ASVspoof 2021


def test_2021_la_keys_nested_and_default_phase(tmp_path: Path) -> None:
    root = make_2021(tmp_path, "LA", LA2021_KEYS, ["LA_E_9332881", "LA_E_6866159"])
    split = read_split(root, "eval")
    assert list(split.utt) == ["LA_E_9332881", "LA_E_1000001"]
    assert list(split.path) == [f"{root}/ASVspoof2021_LA_eval/flac/{u}.flac" for u in split.utt]
    assert split.label.tolist() == [SPOOF, BONAFIDE]
    assert list(split.attack) == ["A07", "-"]
    assert list(split.meta["phase"]) == ["eval", "eval"]
    assert list(split.meta["codec"]) == ["alaw", "ulaw"]


def test_2021_keys_found_one_level_deeper(tmp_path: Path) -> None:
    make_2021(tmp_path, "LA", None, None)
    write(
        tmp_path / "downloads" / "LA-keys-full" / "keys" / "LA" / "CM" / "trial_metadata.txt", LA2021_KEYS[0]
    )
    assert read_split(tmp_path, "eval").label.tolist() == [SPOOF]


@pytest.mark.parametrize(
    ("phase", "utts"),
    [
        ("progress", ["LA_E_6866159"]),
        ("hidden_track", ["LA_E_5464494"]),
        ("all", ["LA_E_9332881", "LA_E_6866159", "LA_E_5464494", "LA_E_1000001"]),
    ],
)
def test_2021_phase_filter(tmp_path: Path, phase: str, utts: list[str]) -> None:
    split = read_split(make_2021(tmp_path, "LA", LA2021_KEYS, None), "eval", phase=phase)
    assert list(split.utt) == utts


def test_2021_bad_phase(tmp_path: Path) -> None:
    root = make_2021(tmp_path, "LA", LA2021_KEYS, None)
    with pytest.raises(LayoutError, match="--phase dev: not an ASVspoof 2021 phase"):
        read_split(root, "eval", phase="dev")


def test_2021_df_extra_columns(tmp_path: Path) -> None:
    root = make_2021(tmp_path, "DF", DF2021_KEYS, None)
    split = read_split(root, "eval")
    assert split.layout == "asvspoof2021-df"
    assert list(split.utt) == ["DF_E_2000026", "DF_E_2000028"]
    assert list(split.attack) == ["A09", "-"]
    assert list(split.meta["codec"]) == ["mp3m4a", "nocodec"]
    assert list(split.path)[0] == f"{root}/ASVspoof2021_DF_eval/flac/DF_E_2000026.flac"


def test_2021_without_keys_reads_the_trl_unlabeled(tmp_path: Path) -> None:
    root = make_2021(tmp_path, "LA", None, ["LA_E_2", "", "LA_E_1"])
    split = read_split(root, "eval")
    assert list(split.utt) == ["LA_E_2", "LA_E_1"]
    assert split.label.tolist() == [UNLABELED, UNLABELED] and not split.labeled
    assert list(split.attack) == ["?", "?"]
    with pytest.raises(
        ProtocolError, match="phase 'progress' needs the keys file keys/LA/CM/trial_metadata.txt"
    ):
        read_split(root, "eval", phase="progress")


def test_2021_trl_in_2019_column_order(tmp_path: Path) -> None:
    root = make_2021(tmp_path, "DF", None, ["LA_0043 DF_E_2000026 - A09 spoof"])
    split = read_split(root, "eval")
    assert list(split.utt) == ["DF_E_2000026"] and split.label.tolist() == [UNLABELED]


def test_2021_without_keys_or_trl_lists_the_flac_folder(tmp_path: Path) -> None:
    root = make_2021(tmp_path, "LA", None, None)
    assert list(read_split(root, "eval").utt) == ["LA_E_1", "LA_E_2", "LA_E_3"]


def test_2021_malformed_keys(tmp_path: Path) -> None:
    root = make_2021(tmp_path, "LA", LA2021_KEYS[:1] + ["LA_0020 LA_E_6866159 none none bonafide"], None)
    keys = root / "LA-keys-full" / "keys" / "LA" / "CM" / "trial_metadata.txt"
    with pytest.raises(ProtocolError, match=rf"^{keys}:2: expected 'SPEAKER UTT CODEC"):
        read_split(root, "eval")


# ------------------------------------------------------------------------------------------ ASVspoof 5


@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("protocols", ["ASVspoof5_protocols", "."])
def test_as5_splits(tmp_path: Path, header: bool, protocols: str) -> None:
    root = make_as5(tmp_path, header=header, protocols=protocols)
    train = read_split(root, "train")
    assert list(train.utt) == ["T_0000000000", "T_0000000001"]
    assert list(train.path) == [f"{root}/flac_T/{u}.flac" for u in train.utt]
    assert train.label.tolist() == [BONAFIDE, SPOOF]
    assert list(train.attack) == ["-", "A05"]
    assert list(train.meta["speaker"]) == ["T_4850", "T_1138"]
    assert list(train.meta["gender"]) == ["F", "M"]
    assert list(read_split(root, "dev").path)[0] == f"{root}/flac_D/D_0000000001.flac"
    ev = read_split(root, "eval")
    assert list(ev.path) == [f"{root}/flac_E_eval/{u}.flac" for u in ev.utt]
    assert list(ev.meta["codec"]) == ["C05", "C01"]


def test_as5_eval_folder_holding_the_first_file_wins(tmp_path: Path) -> None:
    root = make_as5(tmp_path)
    (root / "flac_E_eval" / "E_0000000001.flac").rename(tmp_path / "moved.flac")
    touch_audio(root / "flac_E_prog", ["E_0000000001"])
    assert list(read_split(root, "eval").path)[0] == f"{root}/flac_E_prog/E_0000000001.flac"


def test_as5_detected_by_one_protocol_and_malformed_line(tmp_path: Path) -> None:
    proto = write(
        tmp_path / AS5_FILES["eval"], "E_0001 E_0000000001 M C05 4 77 AC2 A20 spoof -\nE_0002 E_2 F\n"
    )
    assert detect_layout(tmp_path).name == "asvspoof5"
    with pytest.raises(ProtocolError, match=rf"^{proto}:2: expected 'SPEAKER_ID FLAC_FILE_NAME"):
        read_split(tmp_path, "eval")
    with pytest.raises(ProtocolError, match="protocol not found"):
        read_split(tmp_path, "train")


def make_as5_train_dev(root: Path) -> Path:
    """An ASVspoof 5 copy from before the eval release: train and dev protocols only."""
    make_as5(root)
    (root / "ASVspoof5_protocols" / AS5_FILES["eval"]).unlink()
    return root


def test_as5_without_eval_protocol_names_it_beside_the_others(tmp_path: Path) -> None:
    root = make_as5_train_dev(tmp_path)
    assert detect_layout(root).name == "asvspoof5"
    with pytest.raises(ProtocolNotFound) as info:
        read_split(root, "eval")
    message = str(info.value)
    assert "\n" not in message and info.value.path == root / "ASVspoof5_protocols" / AS5_FILES["eval"]
    assert message == (
        f"{root}/ASVspoof5_protocols/{AS5_FILES['eval']}: protocol not found; this copy holds the train, dev "
        f"protocols only; put {AS5_FILES['eval']} beside them to use the eval split"
    )


def test_as5_without_eval_protocol_still_trains(tmp_path: Path) -> None:
    # What fit needs: the layout has training splits and both load (placeholders are index problems, not errors).
    root = make_as5_train_dev(tmp_path)
    assert has_training_splits(resolve_layout(root))
    for split in ("train", "dev"):
        ix = load_split(root, split, "asvspoof5")
        assert ix.split.name == split and list(ix.split.utt) == [line.split()[1] for line in AS5_LINES[split]]


# ------------------------------------------------------------------------------------------ check_data


def test_check_data_reports_a_missing_protocol_as_an_absent_split(tmp_path: Path) -> None:
    root = make_as5_train_dev(tmp_path / "as5")
    report = check_data(root)
    assert list(report["splits"]) == ["train", "dev"]
    assert report["splits"]["train"]["files"] == 2 and report["splits"]["dev"]["files"] == 2
    missing = f"{root}/ASVspoof5_protocols/{AS5_FILES['eval']}"
    assert report["absent"] == {"eval": missing}
    assert absent_line(report) == f"eval split absent: protocol {missing} not found; checked train, dev only"
    # Generic, not an ASVspoof 5 special case: a 2019 LA copy with the train protocol only.
    la = make_la2019(tmp_path / "la")
    for split in ("dev", "eval"):
        (la / "ASVspoof2019_LA_cm_protocols" / LA2019_PROTOCOL_FILES[split]).unlink()
    report = check_data(la)
    assert list(report["splits"]) == ["train"] and list(report["absent"]) == ["dev", "eval"]
    assert absent_line(report) == (
        f"dev, eval splits absent: protocols {la}/ASVspoof2019_LA_cm_protocols/{LA2019_PROTOCOL_FILES['dev']}, "
        f"{la}/ASVspoof2019_LA_cm_protocols/{LA2019_PROTOCOL_FILES['eval']} not found; checked train only"
    )
    assert absent_line(check_data(make_itw(tmp_path / "itw"))) is None


def test_check_data_without_any_protocol_is_an_error(tmp_path: Path) -> None:
    la = make_la2019(tmp_path / "la")
    for name in LA2019_PROTOCOL_FILES.values():
        (la / "ASVspoof2019_LA_cm_protocols" / name).unlink()
    with pytest.raises(ProtocolNotFound) as info:
        check_data(la)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"{la}: no protocol of an ASVspoof 2019 LA corpus (layout asvspoof2019-la) found (train {la}/"
    )
    assert all(name in message for name in LA2019_PROTOCOL_FILES.values())
    with pytest.raises(ProtocolNotFound, match="no protocol of an ASVspoof 5 corpus"):
        check_data(la, layout="asvspoof5")
    # A layout of one split keeps that split's own message.
    with pytest.raises(ProtocolNotFound, match=rf"^{la}/meta\.csv: protocol not found; --data must be"):
        check_data(la, layout="in-the-wild")
    # A protocol that is present but broken is still an error, not an absent split.
    root = make_as5_train_dev(tmp_path / "as5")
    write(root / "ASVspoof5_protocols" / AS5_FILES["dev"], "D_0062 D_1 F\n")
    with pytest.raises(ProtocolError, match=r"ASVspoof5\.dev\.track_1\.tsv:1: expected") as info:
        check_data(root)
    assert not isinstance(info.value, ProtocolNotFound)


# ------------------------------------------------------------------------------------------ In-the-Wild


def test_itw_labels(tmp_path: Path) -> None:
    root = make_itw(tmp_path)
    split = read_split(root, "eval")
    assert list(split.utt) == ["0", "1"]
    assert list(split.path) == [f"{root}/0.wav", f"{root}/1.wav"]
    assert split.label.tolist() == [SPOOF, BONAFIDE]
    assert list(split.attack) == ["spoof", "-"]
    assert list(split.meta["speaker"]) == ["Alec Guinness", "Alec Guinness"]


def test_itw_needs_the_exact_header_and_labels(tmp_path: Path) -> None:
    write(tmp_path / "a" / "meta.csv", "file,speaker,label,extra\n0.wav,x,spoof,1\n")
    with pytest.raises(LayoutError, match="not a corpus"):
        detect_layout(tmp_path / "a")
    meta = write(tmp_path / "b" / "meta.csv", "file,speaker,label\n0.wav,x,spoof\n1.wav,y,real\n")
    with pytest.raises(ProtocolError, match=rf"^{meta}:3: expected 'FILE.wav,SPEAKER,bona-fide\|spoof'"):
        read_split(tmp_path / "b", "eval")


# ------------------------------------------------------------------------------------------ generic list


def test_list_label_spellings(tmp_path: Path) -> None:
    spellings = ["bonafide", "Bona-Fide", "bona fide", "REAL", "genuine", "1", "spoof", "Fake", "0", ""]
    rows = "".join(f"c{i}.wav,{label}\n" for i, label in enumerate(spellings))
    split = read_split(write(tmp_path / "l.csv", "Path,Label\n" + rows), "eval")
    assert split.label.tolist() == [BONAFIDE] * 6 + [SPOOF] * 3 + [UNLABELED]
    assert list(split.attack) == ["-"] * 6 + ["spoof"] * 3 + ["?"]


def test_list_paths_ids_attack_and_meta(tmp_path: Path) -> None:
    listed = write(
        tmp_path / "sets" / "list.tsv",
        "utt\tpath\tlabel\tattack\tsource\nx1\t../audio/a.wav\tspoof\tA07\tyoutube\nx2\t/abs/b.flac\treal\t\tpodcast\n",
    )
    split = read_split(listed.parent, "eval")
    assert list(split.utt) == ["x1", "x2"]
    assert list(split.path) == [str(tmp_path / "audio" / "a.wav"), "/abs/b.flac"]
    assert list(split.attack) == ["A07", "-"]
    assert list(split.meta) == ["source"] and list(split.meta["source"]) == ["youtube", "podcast"]


def test_list_txt_sniffs_the_delimiter_and_stem_is_the_id(tmp_path: Path) -> None:
    split = read_split(write(tmp_path / "l.txt", "id,path,label\n,sub/clip.wav,fake\n"), "eval")
    assert list(split.utt) == ["clip"] and list(split.path) == [str(tmp_path / "sub" / "clip.wav")]


def test_list_errors(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", "path,label\na.wav,real\nb.wav,maybe\n")
    with pytest.raises(ProtocolError, match=rf"^{bad}:3: expected label bonafide\|.*got 'maybe'$"):
        read_split(bad, "eval")
    short = write(tmp_path / "short.csv", "path,label,speaker\na.wav,real\n")
    with pytest.raises(ProtocolError, match=rf"^{short}:2: expected 3 fields"):
        read_split(short, "eval")
    headless = write(tmp_path / "headless.csv", "a.wav,real\n")
    with pytest.raises(ProtocolError, match=rf"^{headless}:1: expected a header naming"):
        read_split(headless, "eval")
    with pytest.raises(LayoutError, match="split eval only, not 'train'"):
        read_split(bad, "train")


def test_folder_with_both_lists_is_not_a_list_corpus(tmp_path: Path) -> None:
    write(tmp_path / "list.csv", "path,label\na.wav,real\n")
    write(tmp_path / "list.tsv", "path\tlabel\na.wav\treal\n")
    with pytest.raises(LayoutError, match="not a corpus"):
        detect_layout(tmp_path)


def test_large_protocol_is_parsed_as_flat_arrays(tmp_path: Path) -> None:
    root = tmp_path
    lines = [
        f"LA_{i % 50:04d} LA_T_{i:07d} - {'-' if i % 9 == 0 else 'A0' + str(i % 6 + 1)} "
        for i in range(20000)
    ]
    text = "\n".join(line + ("bonafide" if i % 9 == 0 else "spoof") for i, line in enumerate(lines))
    write(root / "ASVspoof2019_LA_cm_protocols" / LA2019_PROTOCOL_FILES["train"], text)
    split = read_split(root, "train")
    assert len(split) == 20000 and split.label.dtype == np.int8
    assert split.counts() == {"bonafide": 2223, "spoof": 17777}
