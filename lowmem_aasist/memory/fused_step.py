"""The optimizer step fused into backward: each parameter is updated, and its gradient freed, as soon as its gradient
is complete, so a step never holds every gradient at once.

It is meant for a 300 M-parameter front end (XLS-R), whose fp32 gradients alone are 1.2 GiB and, with activation
checkpointing, make the ordinary step's peak (at its end, every gradient held beside weights and Adam state). AASIST
gains nothing worth having: its 1.1 MiB of gradients barely exist yet at its peak, at the start of backward (0.08 MiB
saved at crop 16,000, micro-batch 2, fp32, measured with the live-tensor tracker). :class:`OptimizerInBackward` keeps one inner optimizer per parameter (torch Adam
or bitsandbytes' 8-bit Adam / AdamW, from the same factory as the ordinary path) and registers a post-accumulate-grad
hook on each parameter (``Tensor.register_post_accumulate_grad_hook``, PyTorch >= 2.1) that steps it. It is itself a
``torch.optim.Optimizer``, so the training loop keeps its one shape::

    optimizer.zero_grad(set_to_none=True)
    for n, micro_batch in enumerate(micro_batches):
        with stepping(optimizer) if n == last else nullcontext():   # the last backward applies the update
            loss(micro_batch).backward()
    scaler.step(optimizer)      # applies what backward did not (nothing, after a stepping backward)
    scaler.update()
    scheduler.step()            # one scheduler, on this object: every inner optimizer follows its lr

The semantics, and why:

- **Accumulation.** The hooks step only inside :meth:`OptimizerInBackward.stepping`, which wraps the last
  micro-batch; earlier micro-batches accumulate ``.grad`` as usual, so the update uses the gradient summed over
  the whole batch, bit-identical to the ordinary path. No exact scheme can do better: Adam's second moment needs the
  square of the *summed* gradient, so every parameter's sum must be held until its last contribution. With
  accumulation k > 1 every gradient is therefore held during the later micro-batches and the peak is as without
  fusion; the saving is real at k = 1 only (pair it with activation checkpointing and micro-batch = batch).
- **Outside** :meth:`stepping` the hooks do nothing and :meth:`step` is the ordinary step (per parameter, the same
  arithmetic), so an object never used with :meth:`stepping` behaves exactly like the plain optimizer, and a step
  whose last backward forgot :meth:`stepping` is still exact (it only saves nothing).
- **Learning-rate schedule.** This object's ``param_groups`` are the real ones (one per group given, with the
  inner optimizers' hyper-parameters); a scheduler drives them, and each hook copies its group's hyper-parameters
  into the inner optimizer just before stepping it: the same Python float as the ordinary path, every step.
- **GradScaler (fp16) is refused** (:func:`fused_step_problems`): skipping a step whose gradients overflowed needs
  the global inf check, which only exists once every gradient has been computed, by when most parameters would
  already have been updated with the overflowed ones. fp32 and bf16 need no scaler.
- **Gradient clipping by global norm is impossible** for the same reason (the norm is known only when every
  gradient exists); the recipe does not clip. Nor can anything read ``.grad`` after the step: it is None.
- **DistributedDataParallel is refused**: the hook would apply the rank's own gradient before the all-reduce.
- **Out of memory** inside :meth:`stepping`, after some parameters were updated, cannot be retried as if it had
  never happened (the update is in place): it becomes :class:`PartialStepError` (one line: resume from the last
  checkpoint with a smaller micro-batch). Before the first update (a forward pass) the OOM passes through and the
  trainer's backoff redoes the step.
- **state_dict** has exactly the ordinary optimizer's format (the same parameter indices, groups and per-parameter
  state; only tensors and plain types, so ``torch.load(weights_only=True)`` reads it): a run can resume with the
  fused step switched on or off.
- **Checkpointing** is compatible: a parameter's hook runs after its last use in backward, recomputation included
  (non-reentrant ``torch.utils.checkpoint`` and the hand-written block Functions, tested bit-identical). Anything
  that splits one parameter's gradient over two accumulations in one backward (reentrant checkpointing of a shared
  weight) is refused with an error rather than stepped twice.
- **zero_grad** is the ordinary one. After a stepping backward every updated parameter's ``.grad`` is already
  None, whatever ``set_to_none`` says (so no gradient is held between steps either, e.g. while dev is scored);
  outside :meth:`stepping` gradients behave as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from .plan import NoPlanError

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
"""Builds an optimizer from a list of parameter groups, e.g.
``lambda groups: make_optimizer("adam", groups, lr, betas, weight_decay)``."""


class PartialStepError(NoPlanError):
    """Out of memory after the fused step had updated some parameters: the step cannot be redone exactly."""


def fused_step_problems(precision: str, distributed: bool) -> list[str]:
    """Why the optimizer step cannot be fused into backward in this run (empty: it can); one line each."""
    problems = []
    if precision == "fp16":
        problems.append("the optimizer step in backward cannot run with fp16: GradScaler must see every gradient "
                        "before any parameter is updated; use bf16 or fp32")
    if distributed:
        problems.append("the optimizer step in backward cannot run under torchrun: each parameter would be updated "
                        "with its rank's own gradient before the all-reduce; run one process")
    return problems


def stepping(optimizer: torch.optim.Optimizer) -> AbstractContextManager:
    """The context for the last micro-batch's backward: :meth:`OptimizerInBackward.stepping`, or a no-op for an
    ordinary optimizer (the loop does not ask which it has)."""
    return optimizer.stepping() if isinstance(optimizer, OptimizerInBackward) else nullcontext()


class _StateView(Mapping):
    """``optimizer.state`` as the ordinary optimizer has it (parameter -> its state), read from the inner
    optimizers, so memory accounting (:func:`~.optim.optimizer_state_bytes`) sees the same tensors."""

    def __init__(self, inner: dict[Tensor, torch.optim.Optimizer]) -> None:
        self._inner = inner

    def __getitem__(self, p: Tensor) -> dict:
        return self._inner[p].state[p]

    def __contains__(self, p: object) -> bool:
        return p in self._inner and p in self._inner[p].state  # never creates an entry, unlike indexing

    def __iter__(self) -> Iterator[Tensor]:
        return (p for p, opt in self._inner.items() if p in opt.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


class OptimizerInBackward(torch.optim.Optimizer):
    """An optimizer whose update runs inside backward, one parameter at a time (see the module's docstring).

    ``params`` is what an optimizer takes (parameters, or parameter groups as dicts); ``make`` builds the ordinary
    optimizer from a list of groups and is called once per parameter with a one-parameter group. Parameters that do
    not require gradients get no hook (nothing to update; a later unfrozen one is updated by :meth:`step`).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], make: OptimizerFactory) -> None:
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        inner: dict[Tensor, torch.optim.Optimizer] = {}
        full_groups = []
        for group in groups:
            members = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            for p in members:
                if p in inner:
                    raise ValueError("a parameter appears twice in the optimizer's parameters")
                inner[p] = make([{**_hyper(group), "params": [p]}])
            # The group as the ordinary optimizer would hold it: its own keys plus the optimizer's defaults (an empty
            # group gets the defaults from the base class below).
            hyper = _hyper(inner[members[0]].param_groups[0]) if members else _hyper(group)
            full_groups.append({**hyper, "params": members})
        if not inner:
            raise ValueError("optimizer got an empty parameter list")
        first = next(iter(inner.values()))
        super().__init__(full_groups, first.defaults)
        self._inner = inner
        self.state = _StateView(inner)  # type: ignore[assignment]  # a read-only view, not the base's defaultdict
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._armed = False  # inside stepping(): hooks update
        self._stepped: set[int] = set()  # ids of the parameters updated by the current stepping()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in inner if p.requires_grad]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_inner"):  # the base __init__ adds the groups given; later ones would have no hooks
            raise NotImplementedError("OptimizerInBackward takes all its parameters when it is built")
        super().add_param_group(param_group)

    def _step_one(self, p: Tensor) -> None:
        opt = self._inner[p]
        # The scheduler set this step's lr (and any other hyper-parameter) on our group: the inner optimizer uses
        # exactly those values, as the ordinary optimizer would.
        opt.param_groups[0].update(_hyper(self._group_of[p]))
        opt.step()

    def _on_grad(self, p: Tensor) -> None:
        if not self._armed:  # an earlier micro-batch: keep accumulating .grad, as without fusion
            return
        if id(p) in self._stepped:
            raise RuntimeError("a parameter received a second gradient in one stepping() backward: stepping() must "
                               "wrap only the last micro-batch's backward (and reentrant checkpointing must not "
                               "split a parameter's gradient)")
        self._stepped.add(id(p))
        self._step_one(p)
        p.grad = None  # the point of it all: this gradient is not held until the end of backward

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Within this context each parameter is updated as soon as its gradient is complete, and the gradient is
        freed. Wrap the last micro-batch's forward and backward in it, once per optimizer step."""
        self._stepped.clear()
        self._armed = True
        try:
            yield
        except torch.OutOfMemoryError as exc:
            if not self._stepped:
                raise  # nothing updated yet: the trainer may redo the step
            n, total = len(self._stepped), len(self._handles)
            raise PartialStepError(
                f"out of memory in the backward pass that applies the optimizer step, after {n} of {total} trainable "
                "parameters were updated: the step cannot be redone; resume from the last checkpoint with a smaller "
                "--micro-batch (--resume keeps the run)") from exc
        finally:
            self._armed = False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        """The ordinary step for every parameter whose gradient is still held: none after a backward inside
        :meth:`stepping`, all of them (the plain optimizer's update) after one outside it."""
        if closure is not None:
            raise NotImplementedError("OptimizerInBackward.step takes no closure: the update runs in backward")
        for p in self._inner:
            if p.grad is not None:
                self._step_one(p)

    def remove_hooks(self) -> None:
        """Detach the hooks from the parameters (after which this is an ordinary, per-parameter optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """The ordinary optimizer's state dict: groups with parameter indices, and each parameter's state."""
        groups, state, index = [], {}, 0
        for group in self.param_groups:
            ids = list(range(index, index + len(group["params"])))
            groups.append({**_hyper(group), "params": ids})
            for i, p in zip(ids, group["params"], strict=True):
                own = self._inner[p].state_dict()["state"]  # {0: state} once the parameter has been stepped
                if 0 in own:
                    state[i] = own[0]
            index += len(ids)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the ordinary optimizer (the same format)."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state dict's parameter groups do not match the optimizer's")
        for group, saved_group in zip(self.param_groups, saved, strict=True):
            group.update(_hyper(saved_group))
            for i, p in zip(saved_group["params"], group["params"], strict=True):
                own = state_dict["state"].get(i)
                self._inner[p].load_state_dict({"state": {0: own} if own is not None else {},
                                                "param_groups": [{**_hyper(saved_group), "params": [0]}]})
