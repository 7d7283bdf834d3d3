"""XLS-R + AASIST: the model as ../shared/reference/ssl-aasist.md specifies it (counts and shapes on the meta device,
no allocation), the published key layouts loading strictly, the front end's weight sources, safe unpickling, and
the model's training behaviour on the tiny variant. Nothing is downloaded.

Tests that build a model need transformers (the ``ssl`` extra) and skip without it; the registry and the profile
are checked without it.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lowmem_aasist.config import load_config
from lowmem_aasist.models import (
    FAMILIES,
    MissingDependencyError,
    WeightsError,
    count_parameters,
    detect_family,
    load,
    load_ssl_front_end,
)
from lowmem_aasist.models.ssl_aasist import FRONT_ENDS, min_samples
from lowmem_aasist.models.ssl_weights import ConfigPlaceholder

FULL, TINY = "XLSR-AASIST", "XLSR-AASIST-tiny"
REF_SAMPLES = 64_600


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason='the XLS-R front end needs transformers: pip install -e ".[ssl]"')


def _meta(name: str = FULL) -> torch.nn.Module:
    with torch.device("meta"):
        return FAMILIES[name].build()


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[TINY].build()


# --- the registry without transformers -------------------------------------------------------------------------


def test_without_transformers_the_family_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingDependencyError) as err:
        FAMILIES[FULL].build()
    assert 'pip install -e ".[ssl]"' in str(err.value) and "\n" not in str(err.value)
    # What the CLI and the config need stays available: the entry's data and the recipe profile.
    assert FAMILIES[FULL].policy_names[:2] == ("none", "layers") and FAMILIES[FULL].profile == "xlsr-aasist"
    cfg = load_config("xlsr-aasist")
    assert cfg.model.name == FULL
    # An AASIST-shaped file is told apart without building an XLS-R model.
    assert FAMILIES[FULL].convert_state({"fc.weight": torch.zeros(2, 2)}) is None


def test_profile_is_the_published_recipe():
    cfg = load_config("xlsr-aasist")
    t = cfg.train
    assert (t.batch, t.crop, t.epochs, t.lr, t.min_lr, t.weight_decay) == (14, 64_600, 100, 1e-6, 1e-6, 1e-4)
    assert t.crop_from == "start" and load_config("aasist").train.crop_from == "random"  # each paper's own rule
    assert t.class_weights == (0.1, 0.9) and t.precision == "fp32" and t.seed == 1234
    assert cfg.data.augment == "rawboost:5" and cfg.data.eval_samples == 64_600 and cfg.memory.optimizer == "adam"


# --- counts and shapes, full size, on the meta device ------------------------------------------------------------


def test_back_end_counts_full_size(transformers):
    model = _meta()
    params = {k: p for k, p in model.named_parameters() if not k.startswith("ssl_model.")}
    buffers = {k: b for k, b in model.named_buffers() if not k.startswith("ssl_model.")}
    assert sum(p.numel() for p in params.values()) == 447_242 and len(params) == 185
    assert len(buffers) == 60 and sum(b.numel() for k, b in buffers.items() if "running" in k) == 2_050
    assert params["LL.weight"].numel() + params["LL.bias"].numel() == 131_200


def test_front_end_counts_full_size(transformers):
    front = _meta().ssl_model
    # The reference counts 317,390,592 for fairseq's model, which also holds the pre-training modules (quantizer
    # 574,080, project_q 590,592, final_proj 787,200, mask_emb 1,024 = 1,952,896): Hugging Face's Wav2Vec2Model has
    # none of them (no masked_spec_embed either, with masking off).
    assert count_parameters(front) == 315_437_696 == 317_390_592 - 1_952_896
    assert not hasattr(front, "masked_spec_embed")
    assert count_parameters(front.encoder.layers[0]) == 12_596_224
    assert count_parameters(front.encoder.pos_conv_embed) == 8_389_760
    assert count_parameters(front.feature_extractor) == 4_210_176  # the convolutions and their LayerNorms
    cfg = front.config
    assert (cfg.do_stable_layer_norm, cfg.feat_extract_norm, cfg.apply_spec_augment, cfg.layerdrop) == (True, "layer",
                                                                                                        False, 0.0)


def test_frames_and_output_shapes(transformers):
    for front in FRONT_ENDS.values():
        assert front.frames(REF_SAMPLES) == 201 and min_samples(front) == 1_040
    full = _meta().eval()
    x = torch.empty(3, REF_SAMPLES, device="meta")
    assert full.features(x).shape == (3, 201, 1024) and full(x).shape == (3, 2)
    tiny = _tiny().eval()
    with torch.no_grad():
        assert tiny.features(torch.randn(1, REF_SAMPLES)).shape == (1, 201, 64)
        assert tiny(torch.randn(2, 16_000)).shape == (2, 2)
        assert tiny(torch.randn(2, 1, min_samples(tiny.front))).shape == (2, 2)  # [B, 1, T] and the shortest input
    with pytest.raises(ValueError, match=r"\[B, T\] or \[B, 1, T\]"):
        tiny(torch.randn(2, 2, 16_000))


# --- behaviour, tiny ---------------------------------------------------------------------------------------------


def test_bn1_never_reaches_the_output(transformers):
    model = _tiny().eval()
    assert not hasattr(model.encoder[0][0], "bn1")  # block 0 has none (reference, appendix A)
    assert [k for k in model.state_dict() if ".bn1.weight" in k] == [f"encoder.{i}.0.bn1.weight" for i in range(1, 6)]
    x = torch.randn(2, 8_000)
    with torch.no_grad():
        before = model(x)
        for i in range(1, 6):
            bn1 = model.encoder[i][0].bn1
            for t in (bn1.weight, bn1.bias, bn1.running_mean):
                t.normal_()
            bn1.running_var.uniform_(0.5, 2.0)
        assert torch.equal(model(x), before)
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert all(p.grad is None for k, p in model.named_parameters() if FAMILIES[TINY].never_trained(k))
    assert all(p.grad is not None for k, p in model.named_parameters() if not FAMILIES[TINY].never_trained(k))


def test_eval_is_deterministic_and_training_drops_out(transformers):
    model = _tiny()
    x = torch.randn(2, 8_000)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        a = model(x)
        b = model(x)
        torch.manual_seed(1)
        again = model(x)
    assert not torch.equal(a, b) and torch.equal(a, again)
    front = model.ssl_model.config
    assert (front.hidden_dropout, front.attention_dropout) == (0.1, 0.1)


def test_one_utterance_trains(transformers):
    assert FAMILIES[TINY].limits.min_micro_batch == 1
    model = _tiny()
    F.cross_entropy(model(torch.randn(1, 8_000)), torch.tensor([1])).backward()
    assert model.LL.weight.grad is not None and model.ssl_model.feature_extractor.conv_layers[0].conv.weight.grad is not None


@pytest.mark.parametrize("policy", ["layers", "cnn", "layers+cnn"])
def test_checkpoint_policies_are_exact(transformers, policy):
    from lowmem_aasist.memory.techniques import apply_checkpointing

    plain = _tiny()
    checkpointed = copy.deepcopy(plain)
    wrapped = apply_checkpointing(checkpointed, policy)
    layers = [f"ssl_model.encoder.layers.{i}" for i in range(2)]
    expected = {"layers": layers, "cnn": ["ssl_model.feature_extractor"],
                "layers+cnn": ["ssl_model.feature_extractor", *layers]}[policy]
    assert wrapped == expected
    x, y = torch.randn(2, 8_000), torch.tensor([0, 1])
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # the same dropout masks: recomputation replays them
        F.cross_entropy(model(x), y).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


# --- the published layout ----------------------------------------------------------------------------------------


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def _lin(prefix: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)}


def published_back_end(hidden: int = 1024) -> dict[str, tuple[int, ...]]:
    """The back end's keys and shapes, written from the reference's appendix A."""
    keys: dict[str, tuple[int, ...]] = {"pos_S": (1, 42, 64), "master1": (1, 1, 64), "master2": (1, 1, 64)}
    keys |= _lin("LL", 128, hidden) | _bn("first_bn", 1) | _bn("first_bn1", 64)
    for i, (cin, cout) in enumerate(((1, 32), (32, 32), (32, 64), (64, 64), (64, 64), (64, 64))):
        p = f"encoder.{i}.0"
        if i > 0:
            keys |= _bn(f"{p}.bn1", cin)
        keys |= {f"{p}.conv1.weight": (cout, cin, 2, 3), f"{p}.conv1.bias": (cout,)} | _bn(f"{p}.bn2", cout)
        keys |= {f"{p}.conv2.weight": (cout, cout, 2, 3), f"{p}.conv2.bias": (cout,)}
        if i in (0, 2):
            keys |= {f"{p}.conv_downsample.weight": (cout, cin, 1, 3), f"{p}.conv_downsample.bias": (cout,)}
    keys |= {"attention.0.weight": (128, 64, 1, 1), "attention.0.bias": (128,)} | _bn("attention.2", 128)
    keys |= {"attention.3.weight": (64, 128, 1, 1), "attention.3.bias": (64,)}
    for g in ("GAT_layer_S", "GAT_layer_T"):
        keys |= {f"{g}.att_weight": (64, 1)} | _lin(f"{g}.att_proj", 64, 64) | _lin(f"{g}.proj_with_att", 64, 64)
        keys |= _lin(f"{g}.proj_without_att", 64, 64) | _bn(f"{g}.bn", 64)
    for h, d in (("ST11", 64), ("ST12", 32), ("ST21", 64), ("ST22", 32)):
        p = f"HtrgGAT_layer_{h}"
        keys |= {f"{p}.att_weight{w}": (32, 1) for w in ("11", "22", "12", "M")}
        keys |= _lin(f"{p}.proj_type1", d, d) | _lin(f"{p}.proj_type2", d, d)
        for lin in ("att_proj", "att_projM", "proj_with_att", "proj_without_att", "proj_with_attM", "proj_without_attM"):
            keys |= _lin(f"{p}.{lin}", 32, d)
        keys |= _bn(f"{p}.bn", 32)
    for pool, d in (("pool_S", 64), ("pool_T", 64), ("pool_hS1", 32), ("pool_hT1", 32), ("pool_hS2", 32),
                    ("pool_hT2", 32)):
        keys |= _lin(f"{pool}.proj", 1, d)
    return keys | _lin("out_layer", 2, 160)


def published_front_end_full() -> dict[str, tuple[int, ...]]:
    """The fairseq XLS-R 300M keys and shapes of the reference's §2.4 table, pre-training modules included."""
    keys: dict[str, tuple[int, ...]] = {"mask_emb": (1024,)}
    for i, k in enumerate((10, 3, 3, 3, 3, 2, 2)):
        keys |= {f"feature_extractor.conv_layers.{i}.0.weight": (512, 1 if i == 0 else 512, k),
                 f"feature_extractor.conv_layers.{i}.0.bias": (512,),
                 f"feature_extractor.conv_layers.{i}.2.1.weight": (512,),
                 f"feature_extractor.conv_layers.{i}.2.1.bias": (512,)}
    keys |= _lin("post_extract_proj", 1024, 512) | {"quantizer.vars": (1, 640, 384)}
    keys |= _lin("quantizer.weight_proj", 640, 512) | _lin("project_q", 768, 768)
    keys |= {"encoder.pos_conv.0.bias": (1024,), "encoder.pos_conv.0.weight_g": (1, 1, 128),
             "encoder.pos_conv.0.weight_v": (1024, 64, 128)}
    for i in range(24):
        p = f"encoder.layers.{i}"
        for proj in "kvq":
            keys |= _lin(f"{p}.self_attn.{proj}_proj", 1024, 1024)
        keys |= _lin(f"{p}.self_attn.out_proj", 1024, 1024)
        keys |= {f"{p}.self_attn_layer_norm.weight": (1024,), f"{p}.self_attn_layer_norm.bias": (1024,)}
        keys |= _lin(f"{p}.fc1", 4096, 1024) | _lin(f"{p}.fc2", 1024, 4096)
        keys |= {f"{p}.final_layer_norm.weight": (1024,), f"{p}.final_layer_norm.bias": (1024,)}
    keys |= {"encoder.layer_norm.weight": (1024,), "encoder.layer_norm.bias": (1024,)}
    keys |= {"layer_norm.weight": (512,), "layer_norm.bias": (512,)} | _lin("final_proj", 768, 1024)
    return keys


def _meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("num_batches_tracked") else None)
            for k, s in shapes.items()}


def test_back_end_keys_are_the_published_ones(transformers):
    model = _meta()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("ssl_model.")}
    assert own == published_back_end()
    assert [k for k in model.state_dict() if not k.startswith("ssl_model.")][:3] == ["pos_S", "master1", "master2"]


@pytest.mark.parametrize("prefix", ["", "module."], ids=["LA_model", "Best_LA_model_for_DF"])
def test_published_full_size_layout_is_recognised(transformers, prefix):
    front = {f"ssl_model.model.{k}": v for k, v in published_front_end_full().items()}
    state = _meta_state({prefix + k: v for k, v in (front | published_back_end()).items()})
    assert sum(v.numel() for k, v in state.items() if ".model." in k) == 317_390_592
    assert detect_family(state) is FAMILIES[FULL]
    own, notes = FAMILIES[FULL].adopt(state)
    assert own.keys() == FAMILIES[FULL].expected_shapes().keys()
    assert len(notes) == 1 and "1,952,896 values" in notes[0]
    assert "final_proj, mask_emb, project_q, quantizer" in notes[0]


# fairseq names of Hugging Face ones, written from the reference's §2.6 table read right to left (independently of
# lowmem_aasist.models.ssl_weights, whose mapping these tests check).
_TO_FAIRSEQ = (
    (r"^feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"^feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_extractor.conv_layers.\1.2.1."),
    (r"^feature_projection\.layer_norm\.", "layer_norm."),
    (r"^feature_projection\.projection\.", "post_extract_proj."),
    (r"^encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0$", "encoder.pos_conv.0.weight_g"),
    (r"^encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1$", "encoder.pos_conv.0.weight_v"),
    (r"^encoder\.pos_conv_embed\.conv\.weight_g$", "encoder.pos_conv.0.weight_g"),
    (r"^encoder\.pos_conv_embed\.conv\.weight_v$", "encoder.pos_conv.0.weight_v"),
    (r"^encoder\.pos_conv_embed\.conv\.bias$", "encoder.pos_conv.0.bias"),
    (r"^encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
    (r"^encoder\.layer_norm\.", "encoder.layer_norm."),
)


def _fairseq(hf_key: str) -> str:
    for pattern, repl in _TO_FAIRSEQ:
        if re.search(pattern, hf_key):
            return re.sub(pattern, repl, hf_key)
    raise AssertionError(f"no fairseq name for {hf_key}")


def _pretraining_extras(hidden: int) -> dict[str, torch.Tensor]:
    # Shapes as the tiny model's would be; the loader drops them unchecked.
    return {"quantizer.vars": torch.randn(1, 640, 8), "quantizer.weight_proj.weight": torch.randn(640, 32),
            "quantizer.weight_proj.bias": torch.randn(640), "project_q.weight": torch.randn(16, 16),
            "project_q.bias": torch.randn(16), "final_proj.weight": torch.randn(16, hidden),
            "final_proj.bias": torch.randn(16), "mask_emb": torch.randn(hidden)}


def fairseq_front_end(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s front end as a fairseq pre-training checkpoint names it, pre-training modules included."""
    state = {_fairseq(k): v.clone() for k, v in model.ssl_model.state_dict().items()}
    return state | _pretraining_extras(model.front.hidden)


def published_state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``model``'s weights in the layout of LA_model.pth (prefix "") or Best_LA_model_for_DF.pth ("module.")."""
    front = {f"ssl_model.model.{k}": v for k, v in fairseq_front_end(model).items()}
    back = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("ssl_model.")}
    return {prefix + k: v for k, v in (front | back).items()}


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    # Distinct values everywhere (BatchNorm statistics included) so that a tensor landing in the wrong slot shows.
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in k else torch.randn_like(t) * 0.1)
            else:
                t.fill_(7)
    return model


@pytest.mark.parametrize("prefix", ["", "module."], ids=["LA_model", "Best_LA_model_for_DF"])
def test_published_checkpoint_loads_strictly(transformers, tmp_path, prefix):
    source = _randomised(_tiny()).eval()
    state = published_state(source, prefix)
    assert len([k for k in state if k.startswith(prefix + "ssl_model.model.quantizer")]) == 3
    path = tmp_path / "LA_model.pth"
    torch.save(state, path)
    notes: list[str] = []
    loaded, family = load(path, notes=notes)
    assert family is FAMILIES[TINY] and not loaded.training
    assert len(notes) == 1 and "dropped 8 pre-training-only tensors" in notes[0]
    theirs, ours = source.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    x = torch.randn(2, 8_000)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    assert load(path, TINY).family is FAMILIES[TINY]


def test_published_checkpoint_errors_name_the_key(transformers, tmp_path):
    good = published_state(_tiny(), "module.")

    def attempt(state: dict, name: str) -> str:
        path = tmp_path / name
        torch.save(state, path)
        with pytest.raises(WeightsError) as err:
            load(path)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
        return str(err.value)

    extra = good | {"module.ssl_model.model.encoder.layers.0.self_attn.rel_bias": torch.zeros(3)}
    assert "unexpected key module.ssl_model.model.encoder.layers.0.self_attn.rel_bias" in attempt(extra, "a.pth")
    stray = good | {"module.classifier.weight": torch.zeros(3)}
    assert "unexpected key module.classifier.weight" in attempt(stray, "b.pth")
    no_fc1 = {k: v for k, v in good.items() if k != "module.ssl_model.model.encoder.layers.1.fc1.weight"}
    assert "missing key module.ssl_model.model.encoder.layers.1.fc1.weight" in attempt(no_fc1, "c.pth")
    no_out = {k: v for k, v in good.items() if k != "module.out_layer.bias"}
    assert "missing key module.out_layer.bias" in attempt(no_out, "d.pth")
    misshapen = good | {"module.ssl_model.model.post_extract_proj.bias": torch.zeros(65)}
    assert "module.ssl_model.model.post_extract_proj.bias has shape [65], expected [64]" in attempt(misshapen, "e.pth")


def test_own_checkpoint_still_loads(transformers, tmp_path):
    model = _tiny()
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "step": 3}, path)
    loaded, family = load(path)
    assert family is FAMILIES[TINY] and torch.equal(loaded.LL.weight, model.LL.weight)


# --- the front end alone: fairseq and Hugging Face sources ---------------------------------------------------------


def _front_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.ssl_model.state_dict(), b.ssl_model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fairseq_pretrained_checkpoint_loads_with_weights_only(transformers, tmp_path):
    source = _randomised(_tiny(1))
    path = tmp_path / "xlsr2_300m.pt"
    args = argparse.Namespace(arch="wav2vec2", encoder_layerdrop=0.0, feature_grad_mult=1.0)
    torch.save({"args": args, "cfg": {"model": {"_name": "wav2vec2"}}, "model": fairseq_front_end(source),
                "optimizer_history": [{"num_updates": 3}]}, path)
    target = _tiny(2)
    back_before = {k: v.clone() for k, v in target.state_dict().items() if not k.startswith("ssl_model.")}
    notes = load_ssl_front_end(target, path)
    assert _front_equal(source, target)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in back_before.items())  # the back end untouched
    assert len(notes) == 1 and "mask_emb" in notes[0]
    # The front end of a fine-tuned checkpoint is a source too.
    published = tmp_path / "Best_LA_model_for_DF.pth"
    torch.save(published_state(source, "module."), published)
    other = _tiny(3)
    load_ssl_front_end(other, published)
    assert _front_equal(source, other)
    # Strict here as well, named as the file names it.
    broken = tmp_path / "broken.pt"
    state = fairseq_front_end(source)
    del state["encoder.layers.0.fc2.bias"]
    torch.save({"model": state}, broken)
    with pytest.raises(WeightsError, match=r"broken.pt: missing key encoder\.layers\.0\.fc2\.bias"):
        load_ssl_front_end(_tiny(), broken)


def _fake_module_class(monkeypatch, module: str, name: str, namespace: dict) -> type:
    # A class importable as ``module.name`` (so that pickle can save it), e.g. a fairseq config class.
    parts = module.split(".")
    for i in range(1, len(parts) + 1):  # its parent packages too: pickle imports the dotted name
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (), namespace)
    cls.__module__ = module
    setattr(sys.modules[module], name, cls)
    return cls


def test_config_objects_are_placeholders_and_run_nothing(transformers, tmp_path, monkeypatch):
    ran = []
    cfg_class = _fake_module_class(monkeypatch, "fairseq.dataclass.configs", "FairseqConfig",
                                   {"__setstate__": lambda self, state: ran.append(state)})
    cfg = cfg_class()
    cfg.__dict__["model"] = {"encoder_layerdrop": 0.0}
    path = tmp_path / "xlsr2_300m.pt"
    source = _tiny(1)
    torch.save({"cfg": cfg, "model": fairseq_front_end(source)}, path)
    for name in ("fairseq", "fairseq.dataclass", "fairseq.dataclass.configs"):  # as on a machine without fairseq
        monkeypatch.delitem(sys.modules, name)
    from lowmem_aasist.models.ssl_weights import read_checkpoint

    obj = read_checkpoint(path)
    assert isinstance(obj["cfg"], ConfigPlaceholder) and ran == []
    target = _tiny(2)
    load_ssl_front_end(target, path)
    assert _front_equal(source, target)


def _mark_unpickled(flag: list) -> list:
    flag.append("ran")
    return flag


class Arbitrary:
    """Not a configuration class: unpickling it runs a function of this module."""

    def __init__(self, flag: list) -> None:
        self.flag = flag

    def __reduce__(self):
        return _mark_unpickled, (self.flag,)


def test_other_pickled_code_is_refused_unless_trusted(transformers, tmp_path):
    path = tmp_path / "evil.pt"
    flag: list = []
    source = _tiny(1)
    torch.save({"extra": Arbitrary(flag), "model": fairseq_front_end(source)}, path)
    with pytest.raises(WeightsError, match=r"evil.pt: pickles test_ssl_aasist\._mark_unpickled.*trusted=True") as err:
        load_ssl_front_end(_tiny(), path)
    assert "\n" not in str(err.value)
    target = _tiny(2)
    load_ssl_front_end(target, path, trusted=True)
    assert _front_equal(source, target)


def _hf_pretraining_folder(transformers, tmp_path, front, seed: int = 4) -> tuple[str, torch.nn.Module]:
    config = front.hf_config()
    config.mask_time_prob, config.layerdrop = 0.075, 0.1  # as the hub's config says
    config.codevector_dim = config.proj_codevector_dim = 16
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForPreTraining(config)
    folder = tmp_path / "wav2vec2-tiny"
    model.save_pretrained(folder)
    return str(folder), model


def test_hugging_face_folder_loads_front_end(transformers, tmp_path):
    folder, pretrained = _hf_pretraining_folder(transformers, tmp_path, FRONT_ENDS[TINY])
    target = _tiny()
    notes = load_ssl_front_end(target, folder)
    theirs, ours = pretrained.wav2vec2.state_dict(), target.ssl_model.state_dict()
    assert set(theirs) - set(ours) == {"masked_spec_embed"}
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert target.ssl_model.config.layerdrop == 0.0 and target.ssl_model.config.apply_spec_augment is False
    assert any("pre-training-only" in n and "masked_spec_embed" in n for n in notes)
    assert any("layerdrop 0.1" in n for n in notes)


def test_hugging_face_folder_of_another_shape_is_refused(transformers, tmp_path):
    import dataclasses

    narrow = dataclasses.replace(FRONT_ENDS[TINY], hidden=32, heads=2)
    folder, _ = _hf_pretraining_folder(transformers, tmp_path, narrow)
    with pytest.raises(WeightsError, match="hidden_size is 32, but XLSR-AASIST-tiny has 64"):
        load_ssl_front_end(_tiny(), folder)
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_ssl_front_end(_tiny(), tmp_path / "absent.pt")


# --- fit, resume and score through the CLI ---------------------------------------------------------------------


def test_fit_trains_resumes_exactly_and_score_reads_the_checkpoint(transformers, tmp_path, capsys):
    import json
    import math

    import soundfile as sf

    from lowmem_aasist.cli import main
    from lowmem_aasist.data.demo import make_demo_corpus

    root = make_demo_corpus(tmp_path / "la", n_train=8, n_dev=4, n_eval=2, seed=6, workers=1)
    source = _randomised(_tiny(1))
    pretrained = tmp_path / "xlsr2_300m.pt"
    torch.save({"model": fairseq_front_end(source)}, pretrained)
    profile = tmp_path / "tiny.toml"
    profile.write_text(f'[model]\nname = "{TINY}"\n[train]\nlog_every = 1\n')
    common = ["fit", "--data", str(root), "--profile", str(profile), "--ssl-weights", str(pretrained), "--batch", "8",
              "--crop", "8000", "--precision", "fp32", "--workers", "0", "--lr", "1e-3", "--seed", "2"]

    def weights(out):
        return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*common, "--max-steps", "12", "--out", str(whole)]) == 0
    out = capsys.readouterr().out
    assert "mask_emb" in out  # the note on the dropped pre-training tensor
    losses = [json.loads(line)["loss"] for line in (whole / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    # It learnt: on the training clips (first 8,000 samples, eval mode) the weighted loss of the trained weights is
    # below that of the weights it started from (the same seed, then --ssl-weights).
    from lowmem_aasist.data.corpora import read_split
    from lowmem_aasist.models import load_model
    from lowmem_aasist.train.setup import seed_everything

    seed_everything(2)
    start = FAMILIES[TINY].build()
    load_ssl_front_end(start, pretrained)
    train = read_split(root, "train")
    x = torch.stack([torch.from_numpy(sf.read(p, dtype="float32")[0][:8000]) for p in train.path])
    y = torch.from_numpy(train.label).long()

    def loss(model):
        with torch.no_grad():
            return F.cross_entropy(model.eval()(x), y, weight=torch.tensor([0.1, 0.9])).item()

    assert loss(load_model(whole / "checkpoints" / "last.pt")) < 0.85 * loss(start)  # 0.566 against 0.745 here
    assert main([*common, "--max-steps", "3", "--out", str(part)]) == 0
    assert main([*common, "--max-steps", "12", "--out", str(part), "--resume"]) == 0
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    clip = next((root / "ASVspoof2019_LA_eval" / "flac").glob("*.flac"))
    assert main(["score", str(clip), "--weights", str(whole / "checkpoints" / "last.pt"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["windows"] >= 1 and isinstance(scored["score"], float)
