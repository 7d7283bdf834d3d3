"""Where a training step's memory goes, per module, and what each memory technique saves there (``probe --explain``).

Two figures per configuration, both from fake tensors (no real allocation, so any model size and crop is cheap):

* **Saved for backward, per section.** While the forward pass runs, a ``saved_tensors_hooks`` pack hook sees
  every tensor autograd keeps for backward and charges the bytes of its storage (each storage once, parameters and
  buffers left out) to the section running at that moment: the front end (everything before ``encoder.0``), each
  residual block ``encoder.0`` ... ``encoder.5``, and the graph half (GAT, HtrgGAT, graph pools, readout). Only
  the innermost pair of saved-tensor hooks applies, so inside a non-reentrant checkpoint the checkpoint's own hooks
  take over and what it recomputes later is, rightly, not counted; the checkpoint's inputs, which it does keep,
  are saved outside those hooks and are counted.
  A storage saved by two sections (a block's output is the next block's input) counts once, in the first.
* **Peak per sample**: the live-tensor peak of a whole training step (forward, backward) at micro-batch 2 minus
  micro-batch 1, counted as :func:`.estimate.estimate_step_peak` counts it, so it is the figure the planner uses.
  It can differ from the saved bytes: with checkpointing the peak moves into backward, where recomputed
  activations, their gradients and the saved tensors are live together.

Both come from the same fake step: the section and saved-tensor hooks are installed on the model before its
tensors are made fake, and keep no reference to any tensor, so counting leaves the peak untouched. Per-sample
bytes are micro-batch 2 minus 1, which cancels what every forward saves once whatever the batch (autocast's bf16
copies of the weights, BatchNorm's per-channel statistics, the master nodes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models import build_model, family_of
from .estimate import adam8bit_state_bytes, fake_module
from .measure import build_step, tracked_step
from .techniques import apply_checkpointing, apply_lean_pooling

OPTIMIZER = "optimizer state"
WEIGHTS = "weights+grads"
MIB = 1 << 20

# The rows of the table: (precision, policy, lean). "Stock" is the unmodified recipe (stock max-pool, no
# checkpointing); every lean row uses the exact lean max-pool the trainer always applies.
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("fp32", "none", False),
    ("fp32", "none", True),
    ("fp32", "block0-segments", True),
    ("bf16", "none", False),
    ("bf16", "none", True),
    ("bf16", "gat", True),
    ("bf16", "encoder", True),
    ("bf16", "block0-segments", True),
    ("bf16", "block0", True),
    ("bf16", "tiled", True),
)



def sections(model: nn.Module) -> tuple[str, ...]:
    """The section names of ``model`` (its family's ``sections``), in forward order."""
    return tuple(section.label for section in family_of(model).sections)


@dataclass(frozen=True)
class Breakdown:
    """One configuration's memory. ``per_module`` holds bytes per sample saved for backward in each section (see
    :func:`sections`), plus two fixed entries, not per sample: ``"weights+grads"`` (fp32 parameters, their
    gradients and the buffers) and ``"optimizer state"`` (torch Adam's two fp32 moments, computed)."""

    precision: str
    policy: str
    lean: bool
    per_module: dict[str, int]
    peak_per_sample: int

    @property
    def saved_per_sample(self) -> int:
        """Bytes per sample saved for backward over all sections (the fixed entries left out)."""
        return sum(v for k, v in self.per_module.items() if k not in (OPTIMIZER, WEIGHTS))

    @property
    def label(self) -> str:
        return f"{self.precision} {'lean' if self.lean else 'stock'} {self.policy}"


class SavedBySection:
    """Hooks that charge what autograd saves during a forward of ``model`` to the section running at the time.

    Installed by :meth:`install` on the real model before its tensors are swapped for fake ones (the hooks
    belong to the modules, so they survive the swap). Each forward starts a fresh count; :attr:`last` holds the
    most recent forward's bytes per section. Storages are keyed by identity and no reference is kept: every saved
    storage stays alive through the rest of the forward (the graph holds it), so an id cannot be reused before
    the count of that forward is complete, and not holding them leaves the measured peak untouched.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sections = family_of(model).sections
        self.names = tuple(section.label for section in self.sections)
        self.current = self.names[0]
        self.last: dict[str, int] = dict.fromkeys(self.names, 0)
        self._counts: dict[str, int] = {}
        self._seen: set[int] = set()
        self._exclude: set[int] = set()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def install(self) -> SavedBySection:
        model = self.model
        model.register_forward_pre_hook(self._start)
        # always_call: the saved-tensor hooks must come off even if the forward raises.
        model.register_forward_hook(self._stop, always_call=True)
        # Hooks on the section modules fire once per forward; a checkpoint's recompute in backward calls the
        # wrapped bodies directly, and no saved-tensor hooks of ours are active then anyway.
        for section in self.sections[1:]:
            module = model.get_submodule(section.path)
            if section.at == "start":
                module.register_forward_pre_hook(self._enter(section.label))
            else:
                module.register_forward_hook(self._enter(section.label))
        return self

    def _enter(self, name: str) -> Callable[..., None]:
        return lambda *_: self._set(name)

    def _set(self, name: str) -> None:
        self.current = name

    def _start(self, *_: object) -> None:
        # Parameters and buffers are looked up now, not at install: they are made fake after install.
        self._exclude = {id(t.untyped_storage()) for t in chain(self.model.parameters(), self.model.buffers())}
        self._seen = set()
        self._counts = dict.fromkeys(self.names, 0)
        self.current = self.names[0]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()

    def _stop(self, *_: object) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        self.last = self._counts
        self._seen = set()  # storages of this forward may die from now on; their ids mean nothing any more

    def _pack(self, t: Tensor) -> Tensor:
        if t.layout is torch.strided:
            st = t.untyped_storage()
            key = id(st)
            if key not in self._exclude and key not in self._seen:
                self._seen.add(key)
                self._counts[self.current] += st.nbytes()
        return t


def _unpack(t: Tensor) -> Tensor:
    return t


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: the per-sample peak needs gradients but no optimizer state."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


def _run(
    model_name: str, crop: int, micro_batch: int, precision: str, policy: str, lean: bool
) -> tuple[int, dict[str, int]]:
    """One tracked training step of one micro-batch on fake tensors: (live-tensor peak, saved bytes per section).

    The estimator's step (:func:`.measure.build_step`, :func:`.measure.tracked_step`, CPU), without its warm-up
    step and without Adam: those add the optimizer state and the previous gradients, which are the same at every
    micro-batch, so micro-batch 2 minus 1 is unchanged (tests/test_explain.py checks it against
    :func:`.estimate.estimate_step_peak`) and each run costs a third of the time.
    """
    model = build_model(model_name).train()
    # The trainer's order (engine.prepare_model): lean pooling, then checkpointing, then our hooks.
    if lean:
        apply_lean_pooling(model)
    apply_checkpointing(model, policy)
    saved = SavedBySection(model).install()
    mode = FakeTensorMode()
    fake_module(model, mode)  # as the estimator does: the step never meets a real tensor
    with mode:
        opt = _NoStep(list(model.parameters()))
        step = build_step(model, opt, micro_batch, crop, micro_batch, precision, "cpu")
        peak, _ = tracked_step(step, model, opt, "cpu")
    return peak, saved.last


def fixed_bytes(model_name: str) -> dict[str, int]:
    """Bytes that do not grow with the batch: weights+grads, and the optimizer state of torch Adam and 8-bit Adam.

    Computed from the parameters' sizes, not measured (bitsandbytes runs neither on the CPU nor on fake tensors).
    """
    model = build_model(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sum(2 * p.numel() * p.element_size() for p in params)  # fp32 weight + fp32 gradient
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    adam = sum(2 * 4 * p.numel() for p in params)  # exp_avg and exp_avg_sq, float32
    return {WEIGHTS: weights, "adam": adam, "adam8bit": adam8bit_state_bytes(params)}


def breakdown(model_name: str, crop: int, precision: str, policy: str, lean: bool) -> Breakdown:
    """Memory of one configuration: saved-for-backward bytes per sample by section, and the peak per sample.

    ``policy`` is a checkpoint policy (:data:`.techniques.POLICIES`), ``lean`` applies the lean max-pool. Both
    figures come from the same two fake steps (micro-batch 1 and 2, the CPU's autocast rules); about half a second
    each for AASIST at any crop.
    """
    (p1, s1), (p2, s2) = (_run(model_name, crop, mb, precision, policy, lean) for mb in (1, 2))
    per_module = {name: s2[name] - s1[name] for name in s1}
    fixed = fixed_bytes(model_name)
    per_module[WEIGHTS] = fixed[WEIGHTS]
    per_module[OPTIMIZER] = fixed["adam"]
    return Breakdown(precision, policy, lean, per_module, p2 - p1)


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def explain(model_name: str, crop: int, console: Console) -> list[Breakdown]:
    """Print a rich table of :data:`ROWS` for ``model_name`` at ``crop`` on ``console``; return the rows.

    "peak vs stock" compares with the first row, the unmodified fp32 recipe. About 10 s on a busy 2-core CPU.
    """
    rows = [breakdown(model_name, crop, precision, policy, lean) for precision, policy, lean in ROWS]
    fixed = fixed_bytes(model_name)
    stock = rows[0].peak_per_sample
    names = [name for name in rows[0].per_module if name not in (WEIGHTS, OPTIMIZER)]
    table = Table(
        "precision",
        "pooling",
        "checkpoint",
        *names,
        "saved total",
        "peak/sample",
        "peak vs stock",
        title=f"Where training memory goes: {model_name}, crop {crop:,}, MiB per sample",
        caption=(
            f"{names[0]} ... saved total: what the forward pass keeps for backward, per section (fake-tensor count; "
            "a storage kept by two sections counts in the first; a checkpointed part keeps only its inputs, as it "
            "is recomputed in backward). peak/sample: the estimator's live-tensor peak of a whole step, per sample "
            "(micro-batch 2 minus 1); with checkpointing it is reached in backward, where recomputed activations "
            "and gradients join what was kept.\n"
            f"Fixed, not per sample: weights+grads {_mib(fixed[WEIGHTS])} MiB; optimizer state adam "
            f"{_mib(fixed['adam'])} MiB vs adam8bit {_mib(fixed['adam8bit'])} MiB (computed from the parameter "
            "sizes, not measured)."
        ),
    )
    for col in table.columns[3:]:
        col.justify = "right"
    for r in rows:
        pm = r.per_module
        table.add_row(
            r.precision,
            "lean" if r.lean else "stock",
            r.policy,
            *(_mib(pm[k]) for k in names),
            _mib(r.saved_per_sample),
            _mib(r.peak_per_sample),
            f"{100 * (r.peak_per_sample / stock - 1):+.0f}%",
        )
    console.print(table)
    return rows
