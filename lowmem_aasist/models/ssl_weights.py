"""Weights for the XLS-R front end: the published SSL_Anti-spoofing checkpoints, fairseq pre-trained checkpoints and
Hugging Face model folders, mapped onto :class:`~.ssl_aasist.XLSRAASIST` (reference §2.4-2.6).

* :func:`convert_state` (the family's ``convert_state``): a fine-tuned SSL_Anti-spoofing state dict
  (``LA_model.pth``: ``ssl_model.model.<fairseq name>`` + back-end keys; ``Best_LA_model_for_DF.pth``: the same
  under ``module.``) in the model's own names, strictly.
* :func:`load_ssl_front_end`: the front end alone from a fairseq ``xlsr2_300m.pt``, a Hugging Face folder or hub
  id, or the front end of a fine-tuned checkpoint (``fit --ssl-weights``).

Pre-training-only modules (``quantizer``, ``project_q``, ``final_proj``, ``mask_emb``; Hugging Face's
``project_hid``, ``masked_spec_embed``) are dropped with one note; any other missing or unexpected tensor is a
WeightsError naming it in the file's own naming.

Reading stays ``torch.load(weights_only=True)``. A fairseq checkpoint also pickles its training configuration:
``argparse.Namespace`` objects are rebuilt as they are (a bag of attributes), and objects of the libraries such a
file pickles its configuration and logging state with (omegaconf, fairseq, numpy, typing, enum, pathlib) are
replaced by an inert placeholder that runs none of their code. Any other class or function in the file is refused
unless ``trusted=True`` says the file comes from a source you trust (then it is unpickled in full).
"""

from __future__ import annotations

import argparse
import copy
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .family import WeightsError
from .ssl_aasist import XLSRAASIST, FrontEndConfig, import_transformers

PUBLISHED_PREFIX = "ssl_model.model."
"""Where SSL_Anti-spoofing keeps the fairseq model in its state dict."""
OWN_PREFIX = "ssl_model."
"""Where :class:`XLSRAASIST` keeps the Hugging Face model."""

# fairseq name <-> Hugging Face Wav2Vec2Model name (reference §2.6). {i}: a layer index; {p}: weight or bias.
_WEIGHT_NORM = (
    # Hugging Face applies weight norm with torch's parametrizations when torch has them (>= 2.1), and then the
    # legacy g / v tensors are called original0 / original1.
    ("parametrizations.weight.original0", "parametrizations.weight.original1")
    if hasattr(nn.utils.parametrizations, "weight_norm")
    else ("weight_g", "weight_v")
)
NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("feature_extractor.conv_layers.{i}.0.{p}", "feature_extractor.conv_layers.{i}.conv.{p}"),
    ("feature_extractor.conv_layers.{i}.2.1.{p}", "feature_extractor.conv_layers.{i}.layer_norm.{p}"),
    ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.0.weight_g", f"encoder.pos_conv_embed.conv.{_WEIGHT_NORM[0]}"),
    ("encoder.pos_conv.0.weight_v", f"encoder.pos_conv_embed.conv.{_WEIGHT_NORM[1]}"),
    ("encoder.layers.{i}.self_attn.k_proj.{p}", "encoder.layers.{i}.attention.k_proj.{p}"),
    ("encoder.layers.{i}.self_attn.v_proj.{p}", "encoder.layers.{i}.attention.v_proj.{p}"),
    ("encoder.layers.{i}.self_attn.q_proj.{p}", "encoder.layers.{i}.attention.q_proj.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{p}", "encoder.layers.{i}.attention.out_proj.{p}"),
    ("encoder.layers.{i}.self_attn_layer_norm.{p}", "encoder.layers.{i}.layer_norm.{p}"),
    ("encoder.layers.{i}.fc1.{p}", "encoder.layers.{i}.feed_forward.intermediate_dense.{p}"),
    ("encoder.layers.{i}.fc2.{p}", "encoder.layers.{i}.feed_forward.output_dense.{p}"),
    ("encoder.layers.{i}.final_layer_norm.{p}", "encoder.layers.{i}.final_layer_norm.{p}"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
)
FAIRSEQ_PRETRAINING_ONLY = ("quantizer.", "project_q.", "final_proj.", "mask_emb")
HF_PRETRAINING_ONLY = ("quantizer.", "project_q.", "project_hid.", "masked_spec_embed")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


_FORWARD = tuple((_pattern(fs), hf) for fs, hf in NAME_TABLE)
_BACKWARD = tuple((_pattern(hf), fs) for fs, hf in NAME_TABLE)


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, target in rules:
        match = pattern.fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    return None


def hf_name(fairseq_name: str) -> str | None:
    """The Hugging Face ``Wav2Vec2Model`` name of a fairseq ``Wav2Vec2Model`` tensor; None for names it lacks."""
    return _rename(fairseq_name, _FORWARD)


def fairseq_name(hf_key: str) -> str | None:
    """The inverse of :func:`hf_name`."""
    return _rename(hf_key, _BACKWARD)


def _is_pretraining_only(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p) for p in prefixes)


def _dropped_note(dropped: dict[str, Tensor], where: str) -> str:
    groups = sorted({name.split(".")[0] for name in dropped})
    values = sum(t.numel() for t in dropped.values())
    return (f"dropped {len(dropped)} pre-training-only tensors of {where} ({', '.join(groups)}: {values:,} values), "
            "unused by this model")


def fairseq_to_hf(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], prefix: str = "",
                  where: str = "the front end") -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """A fairseq ``Wav2Vec2Model`` state (names under ``prefix``) in Hugging Face names, checked strictly against
    ``expected`` (Hugging Face name -> shape); pre-training-only tensors dropped with one note. WeightsError names
    the first missing, unexpected or misshapen tensor by its name in the file (``prefix`` included)."""
    out: dict[str, Tensor] = {}
    dropped: dict[str, Tensor] = {}
    for name, tensor in state.items():
        short = name[len(prefix):]
        if _is_pretraining_only(short, FAIRSEQ_PRETRAINING_ONLY):
            dropped[short] = tensor
            continue
        target = hf_name(short)
        if target is None or target not in expected:
            raise WeightsError(f"unexpected key {name}")
        if tuple(tensor.shape) != expected[target]:
            raise WeightsError(f"{name} has shape {list(tensor.shape)}, expected {list(expected[target])}")
        out[target] = tensor
    missing = [target for target in expected if target not in out]
    if missing:
        raise WeightsError(f"missing key {prefix}{fairseq_name(missing[0]) or missing[0]}")
    return out, ((_dropped_note(dropped, where),) if dropped else ())


# --- the published fine-tuned checkpoints ------------------------------------------------------------------------


def _strip_module(state: Mapping[str, Tensor]) -> tuple[Mapping[str, Tensor], str]:
    # Best_LA_model_for_DF.pth was saved from nn.DataParallel: every key starts with "module." (reference §0.5).
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}, "module."
    return state, ""


def _expected_shapes(front: FrontEndConfig) -> dict[str, tuple[int, ...]]:
    from . import FAMILIES  # noqa: PLC0415 - the registry imports this module's family entries

    return FAMILIES[front.name].expected_shapes()


def convert_state(state: Mapping[str, Tensor], front: FrontEndConfig) -> tuple[dict[str, Tensor], tuple[str, ...]] | None:
    """The family's ``convert_state``: ``state`` in :class:`XLSRAASIST`'s own names, or None when it is not an
    XLSR-AASIST state for ``front`` (no ``LL.weight`` of width ``front.hidden``, decided without building anything).

    Accepts the model's own state dict (a run checkpoint), and the published layout: ``ssl_model.model.`` + fairseq
    names for the front end, the back end under its own names, everything optionally under ``module.``. A state in
    the published layout with a missing, unexpected or misshapen tensor raises WeightsError naming it as the file
    does.
    """
    stripped, module = _strip_module(state)
    ll = stripped.get("LL.weight")
    if ll is None or ll.dim() != 2 or ll.shape[1] != front.hidden:
        return None
    front_prefix = module + PUBLISHED_PREFIX
    if not any(k.startswith(front_prefix) for k in state):
        return dict(stripped), ()  # our own names: the family's exact match decides
    expected = _expected_shapes(front)
    back_expected = {k: v for k, v in expected.items() if not k.startswith(OWN_PREFIX)}
    front_expected = {k[len(OWN_PREFIX):]: v for k, v in expected.items() if k.startswith(OWN_PREFIX)}
    try:
        hf, notes = fairseq_to_hf({k: v for k, v in state.items() if k.startswith(front_prefix)}, front_expected,
                                  front_prefix, "the SSL model")
        out = {OWN_PREFIX + k: v for k, v in hf.items()}
        for name, tensor in state.items():
            if name.startswith(front_prefix):
                continue
            own = name[len(module):]
            if own not in back_expected:
                raise WeightsError(f"unexpected key {name}")
            if tuple(tensor.shape) != back_expected[own]:
                raise WeightsError(f"{name} has shape {list(tensor.shape)}, expected {list(back_expected[own])}")
            out[own] = tensor
        missing = [name for name in back_expected if name not in out]
        if missing:
            raise WeightsError(f"missing key {module}{missing[0]}")
    except WeightsError as exc:
        raise WeightsError(f"{front.name} weights in the SSL_Anti-spoofing layout, but {exc}") from None
    return out, notes


# --- reading checkpoint files safely ------------------------------------------------------------------------------


class ConfigPlaceholder:
    """Stands in for an object of a training framework's configuration or logging classes in a checkpoint: it
    accepts any constructor arguments and state and keeps none of it, so no code of the original class runs."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ConfigPlaceholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<configuration object, not read>"


CONFIG_MODULES = ("omegaconf", "fairseq", "numpy", "typing", "enum", "pathlib")
"""Top-level modules whose pickled objects are replaced by :class:`ConfigPlaceholder` (see the module docstring)."""
REAL_CLASSES = {"argparse.Namespace": argparse.Namespace}


def _placeholders(names: list[str]) -> tuple[list[Any], list[str]]:
    allowed: list[Any] = []
    refused: list[str] = []
    for name in sorted(names):
        if name in REAL_CLASSES:
            allowed.append(REAL_CLASSES[name])
        elif name.split(".")[0] in CONFIG_MODULES:
            allowed.append((ConfigPlaceholder, name))
        else:
            refused.append(name)
    return allowed, refused


def read_checkpoint(path: str | Path, trusted: bool = False) -> Any:
    """The object in a ``torch.save`` file, read with ``weights_only=True`` (memory-mapped where the format allows:
    a 3.6 GB fairseq file is not read whole). Configuration objects are handled as the module docstring says;
    any other pickled class or function raises WeightsError, unless ``trusted`` (a full, unsafe unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    is_zip = zipfile.is_zipfile(path)
    if trusted:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=is_zip)
        except Exception as exc:
            raise WeightsError(f"{path}: not a PyTorch checkpoint ({_first_line(exc)})") from None
    if torch.torch_version.TorchVersion(torch.__version__) < "2.6":  # safe_globals takes (stand-in, name) from 2.6
        raise WeightsError(f"{path}: reading a fairseq checkpoint safely needs torch >= 2.6 (this is {torch.__version__})")
    allowed: list[Any] = [argparse.Namespace]  # a legacy (not zip) file: what it needs beyond this is refused
    if is_zip:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:
            raise WeightsError(f"{path}: not a PyTorch checkpoint ({_first_line(exc)})") from None
        allowed, refused = _placeholders(unsafe)
        if refused:
            shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
            raise WeightsError(
                f"{path}: pickles {shown}, which a weights file does not need; refusing to run it. Only for a file "
                "from a source you trust: load it with trusted=True (fit --ssl-weights-trusted)"
            )
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:
        raise WeightsError(
            f"{path}: not readable as weights only ({_first_line(exc)}); only for a file from a source you trust: "
            "load it with trusted=True (fit --ssl-weights-trusted)"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


# --- the front end alone ------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> XLSRAASIST:
    model = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(model, XLSRAASIST):
        raise TypeError(f"--ssl-weights needs an XLSR-AASIST model, not {type(model).__name__}")
    return model


def _front_state_of(obj: Any, path: Path) -> tuple[dict[str, Tensor], str]:
    """The fairseq front-end tensors of a checkpoint object and the prefix their names carry."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # fairseq: {"args"/"cfg": ..., "model": state dict, "optimizer_history": ...}
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise WeightsError(f"{path}: not a wav2vec 2.0 checkpoint (expected a state dict of tensors)")
    _, module = _strip_module(obj)
    prefix = module + PUBLISHED_PREFIX
    if any(k.startswith(prefix) for k in obj):  # a fine-tuned SSL_Anti-spoofing model: its front end
        return {k: v for k, v in obj.items() if k.startswith(prefix)}, prefix
    return dict(obj), module


def load_ssl_front_end(model: nn.Module, source: str | Path, trusted: bool = False) -> list[str]:
    """Initialise ``model``'s wav2vec 2.0 front end (``fit --ssl-weights SOURCE``); the back end is untouched.

    ``source``: a fairseq checkpoint (``xlsr2_300m.pt``: ``{"model": state, "args"/"cfg": ...}``), a fine-tuned
    SSL_Anti-spoofing checkpoint (its front end), a local Hugging Face model folder, or a Hugging Face hub id such as
    ``facebook/wav2vec2-xls-r-300m`` (downloaded by transformers). Strict: a missing, unexpected or misshapen tensor
    is a WeightsError naming it. Returns notes (what was dropped or ignored), one line each.
    """
    net = _unwrap(model)
    expected = {k: tuple(v.shape) for k, v in net.ssl_model.state_dict().items()}
    path = Path(source).expanduser()
    hub_id = not path.exists() and path.suffix not in (".pt", ".pth", ".bin", ".ckpt", ".safetensors") and re.fullmatch(
        r"[\w.-]+/[\w.-]+", str(source))
    if path.is_dir() or hub_id:
        state, notes = _hf_front_end(net, str(path) if path.is_dir() else str(source), expected)
    elif path.is_file():
        obj = read_checkpoint(path, trusted=trusted)
        front_state, prefix = _front_state_of(obj, path)
        try:
            state, drop_notes = fairseq_to_hf(front_state, expected, prefix, "the fairseq model")
        except WeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from None
        notes = list(drop_notes)
    else:
        raise WeightsError(f"{source}: no such file or folder (give a fairseq .pt, a Hugging Face folder or hub id)")
    net.ssl_model.load_state_dict(state, strict=True)
    return notes


_ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "feat_extract_activation",
                 "do_stable_layer_norm", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "layer_norm_eps")


def _hf_front_end(net: XLSRAASIST, source: str, expected: dict[str, tuple[int, ...]]) -> tuple[dict[str, Tensor], list[str]]:
    transformers = import_transformers()
    ours = net.ssl_model.config
    try:
        theirs = transformers.Wav2Vec2Config.from_pretrained(source)
    except Exception as exc:
        raise WeightsError(f"{source}: not a Hugging Face wav2vec 2.0 model ({_first_line(exc)})") from None
    for key in _ARCHITECTURE:
        a, b = getattr(theirs, key, None), getattr(ours, key)
        if (list(a) if isinstance(a, list | tuple) else a) != (list(b) if isinstance(b, list | tuple) else b):
            raise WeightsError(f"{source}: {key} is {a!r}, but {net.front.name} has {b!r}")
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its table of unused keys: we check them below and say it in one note
    hf_logging.disable_progress_bar()
    try:
        loaded, info = transformers.Wav2Vec2Model.from_pretrained(source, config=copy.deepcopy(ours),
                                                                   output_loading_info=True)
    except Exception as exc:
        raise WeightsError(f"{source}: could not read the model ({_first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(info.get("mismatched_keys", ()), key=str)
    unexpected = sorted(info.get("unexpected_keys", ()))
    foreign = [k for k in unexpected if not _is_pretraining_only(k.removeprefix("wav2vec2."), HF_PRETRAINING_ONLY)]
    if missing:
        raise WeightsError(f"{source}: missing key {missing[0]}")
    if mismatched:
        item = mismatched[0]
        raise WeightsError(f"{source}: {item[0] if isinstance(item, tuple) else item} has another shape")
    if foreign:
        raise WeightsError(f"{source}: unexpected key {foreign[0]}")
    state = {k: v for k, v in loaded.state_dict().items()}
    if set(state) != set(expected):  # from_pretrained itself already compared them; guard against its changes
        raise WeightsError(f"{source}: keys differ from the model's: {sorted(set(state) ^ set(expected))[:3]}")
    notes = []
    if unexpected:
        groups = sorted({k.removeprefix("wav2vec2.").split(".")[0] for k in unexpected})
        notes.append(f"dropped {len(unexpected)} pre-training-only tensors of the Hugging Face model "
                     f"({', '.join(groups)}), unused by this model")
    trained_with = {k: getattr(theirs, k, None) for k in ("layerdrop", "mask_time_prob", "hidden_dropout",
                                                          "attention_dropout", "feat_proj_dropout")}
    differ = {k: v for k, v in trained_with.items() if v != getattr(ours, k)}
    if differ:
        notes.append("the folder's training settings are not used ("
                     + ", ".join(f"{k} {v}" for k, v in differ.items())
                     + "): this family fine-tunes as SSL_Anti-spoofing did")
    return state, notes
