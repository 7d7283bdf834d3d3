"""One frozen, typed configuration: dataclass defaults (the paper's recipe) < TOML profile < command-line overrides.

A profile is a TOML file with the tables ``[model]``, ``[train]``, ``[data]``, ``[demo]`` and ``[memory]``; every key must be a
field of that table's dataclass and of its type. All problems in a profile are reported at once.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.corpora import LAYOUTS
from .data.index import parse_max_bad
from .data.split import CROP_FROM
from .memory.plan import OPTIMIZERS, PRECISIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class ConfigError(Exception):
    """A profile or override that cannot be used; the message names the file and key."""


def _one_of(where: str, value: str, choices: tuple[str, ...] | list[str], auto: bool = False) -> list[str]:
    allowed = ("auto", *choices) if auto else tuple(choices)
    if value in allowed:
        return []
    return [f"{where} must be {'auto or ' if auto else ''}one of {', '.join(choices)}, got {value!r}"]


def checkpoint_policies() -> tuple[str, ...]:
    """Every checkpoint policy some model family offers, in the order the families list them."""
    from .models import FAMILIES  # torch: loaded when a config is validated, not when the CLI starts

    return tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.policy_names))


@dataclass(frozen=True)
class ModelConfig:
    name: str = "AASIST"
    """The model family (lowmem_aasist.models.FAMILIES): AASIST, AASIST-L, XLSR-AASIST (XLSR-AASIST-tiny: tests)."""
    ssl_weights: str = ""
    """XLSR-AASIST only: initialise the wav2vec 2.0 front end from a fairseq .pt, a fine-tuned SSL_Anti-spoofing
    checkpoint, a Hugging Face folder or hub id (fit --ssl-weights); empty: random initialisation."""
    ssl_weights_trusted: bool = False
    """Unpickle the --ssl-weights file fully (only for files you trust); otherwise only tensors and known configs."""

    def validate(self) -> list[str]:
        from .models import FAMILIES

        return _one_of("model.name", self.name, list(FAMILIES))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: run all epochs)."""
    batch: int = 24
    """Effective batch: utterances per optimizer step."""
    crop: int = 64_600
    """Training crop length in samples at 16 kHz."""
    crop_from: str = "random"
    """Where the training crop starts: "random" (a uniform window, AASIST's recipe) or "start" (the first ``crop``
    samples of every recording, short ones tiled: SSL_Anti-spoofing's recipe)."""
    lr: float = 1e-4
    min_lr: float = 5e-6
    """Cosine decay per step from lr down to min_lr over the whole run."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    class_weights: tuple[float, float] = (0.1, 0.9)
    """Cross-entropy weights for (spoof, bona fide)."""
    seed: int = 1234
    precision: str = "fp32"
    """fp32, bf16 (autocast), fp16 (autocast + GradScaler, CUDA only) or auto (bf16 where native, else fp32)."""
    channels_last: bool = False
    """Channels-last memory format for the 2-D encoder (faster bf16 convolutions on CPU)."""
    workers: int = -1
    """DataLoader worker processes; -1 chooses from the cores."""
    log_every: int = 10
    """Log a metrics line every this many optimizer steps."""
    sync_bn: bool = False
    """Under torchrun: synchronise BatchNorm statistics across processes (default: per process, as the reference)."""
    save_every: int = 0
    """Save checkpoints/last.pt every this many optimizer steps (0: every 5 minutes of work), and at each epoch end."""

    def validate(self) -> list[str]:
        errors = []
        for name in ("epochs", "batch", "crop", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) < 0:
                errors.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        errors += _one_of("train.precision", self.precision, PRECISIONS, auto=True)
        errors += _one_of("train.crop_from", self.crop_from, CROP_FROM)
        if not 0 < self.min_lr <= self.lr:
            errors.append(f"train.min_lr must be in (0, lr], got {self.min_lr} with lr {self.lr}")
        if self.workers < -1:
            errors.append(f"train.workers must be >= 0 (or -1 for automatic), got {self.workers}")
        return errors


@dataclass(frozen=True)
class DataConfig:
    root: str = ""
    """The corpus folder (or list file); empty: --data or --demo must say."""
    layout: str = "auto"
    """Corpus layout, recognised from the folder's files (auto) or forced: asvspoof2019-la, asvspoof5, ..."""
    max_bad: str = "5%"
    """Stop before training when more of a split than this is missing or unreadable: a percentage or a count."""
    eval_samples: int = 64_600
    """Input length for dev scoring: the first N samples, short clips tiled (64,600 = the reference input)."""
    dev_batch: int = 16
    augment: str = ""
    """Training augmentation spec (lowmem_aasist.augment), e.g. "rawboost:5+codec:p=0.5"; empty or "none": off."""

    def validate(self) -> list[str]:
        from .augment.base import SpecError, parse_spec

        errors = []
        try:
            parse_spec(self.augment)
        except SpecError as exc:
            errors.append(str(exc))
        if self.eval_samples < 1:
            errors.append(f"data.eval_samples must be >= 1, got {self.eval_samples}")
        if self.dev_batch < 1:
            errors.append(f"data.dev_batch must be >= 1, got {self.dev_batch}")
        if self.layout != "auto" and self.layout not in LAYOUTS:
            errors.append(f"data.layout must be auto or one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        try:
            parse_max_bad(self.max_bad)
        except ValueError as exc:
            errors.append(f"data.max_bad: {exc}")
        return errors


@dataclass(frozen=True)
class DemoConfig:
    n_train: int = 800
    n_dev: int = 200
    n_eval: int = 200
    seed: int = 0
    cache: str = ""
    """Where the generated corpus is kept (empty: ~/.cache/lowmem-aasist/demo)."""

    def validate(self) -> list[str]:
        return [f"demo.{n} must be >= 2, got {getattr(self, n)}" for n in ("n_train", "n_dev", "n_eval") if getattr(self, n) < 2]


@dataclass(frozen=True)
class MemoryConfig:
    budget: str = ""
    """Memory budget to plan for: "" (no planning: the plain recipe), "auto" (free memory minus a margin) or a size
    such as 6GB (GB = GiB = 2^30 bytes). On CUDA the process's GPU memory as NVML counts it; on CPU its peak RSS."""
    checkpoint: str = "auto"
    """Activation-checkpointing policy, one of the model family's, or auto (the planner chooses)."""
    optimizer: str = "adam"
    """adam (the paper's), adam8bit or adamw8bit (bitsandbytes; saves ~1.4 MiB on AASIST), or auto."""
    micro_batch: int = 0
    """Utterances per forward pass (0: the planner chooses); train.batch / micro_batch steps are accumulated."""
    optimizer_in_backward: bool = False
    """Apply each parameter's optimizer update in backward, as soon as its gradient is complete, and free the
    gradient (bit-identical to the ordinary step; saves the gradients' memory at accumulation 1; not with fp16 or
    torchrun)."""

    def validate(self) -> list[str]:
        errors = []
        errors += _one_of("memory.checkpoint", self.checkpoint, checkpoint_policies(), auto=True)
        errors += _one_of("memory.optimizer", self.optimizer, OPTIMIZERS, auto=True)
        if self.micro_batch < 0:
            errors.append(f"memory.micro_batch must be >= 0, got {self.micro_batch}")
        return errors


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "demo": DemoConfig,
    "memory": MemoryConfig,
}


def _coerce(value: Any, annotation: Any, where: str) -> tuple[Any, str | None]:
    """Check a TOML/CLI value against a field's annotation; ints are accepted where floats are expected."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            return None, f"{where} must be a list of {len(args)} numbers, got {value!r}"
        items = []
        for v, a in zip(value, args, strict=True):
            item, err = _coerce(v, a, where)
            if err:
                return None, err
            items.append(item)
        return tuple(items), None
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover
        raise TypeError(f"unsupported annotation {hint}")
    if not ok:
        return None, f"{where} must be {hint.__name__}, got {value!r}"
    return value, None


def _merge(base: Config, tables: dict[str, Any], source: str) -> tuple[Config, list[str]]:
    errors: list[str] = []
    sections = {}
    for section, values in tables.items():
        if section not in _SECTIONS:
            errors.append(f"{source}: unknown table [{section}]; valid tables: {', '.join(_SECTIONS)}")
            continue
        if not isinstance(values, dict):
            errors.append(f"{source}: [{section}] must be a table")
            continue
        cls = _SECTIONS[section]
        hints = typing.get_type_hints(cls)
        changes = {}
        for key, value in values.items():
            if key not in hints:
                errors.append(f"{source}: unknown key {section}.{key}; valid keys: {', '.join(hints)}")
                continue
            coerced, err = _coerce(value, hints[key], f"{source}: {section}.{key}")
            if err:
                errors.append(err)
            else:
                changes[key] = coerced
        sections[section] = dataclasses.replace(getattr(base, section), **changes)
    return dataclasses.replace(base, **sections), errors


def _across_tables(cfg: Config) -> list[str]:
    from .models import get_family

    family = get_family(cfg.model.name)
    if cfg.memory.checkpoint in ("auto", *family.policy_names):
        return []
    return [f"memory.checkpoint {cfg.memory.checkpoint!r} does not apply to {family.name}; choose auto or one of "
            f"{', '.join(family.policy_names)}"]


def resolve_profile(name: str | Path) -> Path:
    """A profile by path or by name in profiles/ (``demo`` -> profiles/demo.toml)."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = PROFILES_DIR / f"{name}.toml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
    raise ConfigError(f"profile {str(name)!r} not found: give a .toml path or one of: {known}")


def load_config(
    profile: str | Path | None = None, overrides: dict[str, Any] | None = None, base: Config | None = None
) -> Config:
    """Defaults (or ``base``, e.g. a run's saved config), then the profile, then ``overrides`` ({"train.batch": 8,
    ...}); raises ConfigError listing all problems."""
    cfg = base or Config()
    errors: list[str] = []
    if profile is not None:
        path = resolve_profile(profile)
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable TOML profile ({exc})") from None
        cfg, errors = _merge(cfg, tables, str(path))
    if overrides:
        nested: dict[str, dict[str, Any]] = {}
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            nested.setdefault(section, {})[key] = value
        cfg, more = _merge(cfg, nested, "command line")
        errors += more
    if not errors:
        for section in _SECTIONS:
            errors += getattr(cfg, section).validate()
    if not errors:
        errors += _across_tables(cfg)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config stored with :meth:`Config.to_dict` (e.g. in a checkpoint)."""
    cfg, errors = _merge(Config(), data, source)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg

