"""The ``--budget`` option: parse a size string and check it against what the device has.

Sizes are binary whatever the spelling: ``GB`` = ``GiB`` = ``G`` = 2^30 bytes (likewise MB, KB, TB), because that
is how GPU memory is sold and shown: a "6 GB" card has 6,144 MiB and ``nvidia-smi`` reports MiB. A decimal reading
would make ``--budget 6GB`` 7% smaller than the card the user means.
"""

from __future__ import annotations

import re
from decimal import Decimal

from .device import DeviceFacts

KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40

# Provisional floor for CUDA and CPU alike: AASIST-L's weights, optimizer state and one tiny batch plus allocator
# slack need about this much, so below it no plan can fit. The planner will refuse too-small budgets precisely
# (per model and device); this only turns obvious typos (``--budget 6MB``) into an early, clear error.
MIN_BUDGET_BYTES = 256 * MiB

_UNITS = {"b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}

# Number: digits with an optional fraction (6, 6.5, .5). Not accepted, on purpose: exponents (1e3GB reads as a
# typo more often than as intent), signs, nan/inf, thousands separators. Unit: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB
# or bare K/M/G, any case; a bare T is left out (nobody means terabytes here) and a bare number is refused
# because it is ambiguous (bytes? GB?).
_SIZE = re.compile(r"(?P<num>\d*\.?\d+)\s*(?:(?P<prefix>[kmgt])(?P<i>i)?b|(?P<bare>[kmg])|(?P<bytes>b))", re.I)

_EXPECTED = "expected a size like 6GB, 6.5GiB or 6144MB (GB = GiB = 2^30 bytes), or auto"


class BudgetError(Exception):
    """A ``--budget`` that cannot be used; the message is one line naming the input and what is accepted."""


def parse_budget(text: str) -> int | None:
    """Bytes for a size string such as ``6GB``, ``6.5 GiB``, ``6144MB`` or ``512M``; None for ``auto``.

    Fractions of a byte are rounded down. Raises BudgetError for anything else, including zero.
    """
    stripped = text.strip()
    if stripped.lower() == "auto":
        return None
    match = _SIZE.fullmatch(stripped)
    if match is None:
        if re.fullmatch(r"\d*\.?\d+", stripped):
            raise BudgetError(f"--budget {text!r}: a size needs a unit (6GB, 6144MB); {_EXPECTED}")
        raise BudgetError(f"--budget {text!r}: {_EXPECTED}")
    unit = match["prefix"] or match["bare"] or match["bytes"]
    # Decimal, not float: 6.1GB must be the exact byte count, not 6.1 rounded to binary first.
    value = int(Decimal(match["num"]) * _UNITS[unit.lower()])
    if value <= 0:
        raise BudgetError(f"--budget {text!r}: must be more than zero; {_EXPECTED}")
    return value


def resolve_budget(
    text: str,
    facts: DeviceFacts,
    margin_fraction: float = 0.05,
    min_margin_bytes: int = 256 * MiB,
) -> tuple[int, list[str]]:
    """The memory budget in bytes for ``facts``' device, and warnings to show the user.

    ``auto`` is the free memory minus a safety margin of ``max(margin_fraction * total, min_margin_bytes)``: the
    margin absorbs fragmentation and what other processes start using mid-run. On CUDA nothing else is taken off:
    ``facts.free_bytes`` already includes this process's context, which the planner charges itself.

    An explicit size above the device's total is an error; above what is free now, a warning (other processes may
    let go of memory before the run needs it, and the user may know that). Below ``MIN_BUDGET_BYTES``, an error.
    """
    if not 0 <= margin_fraction < 1 or min_margin_bytes < 0:
        raise ValueError(f"margin_fraction {margin_fraction} must be in [0, 1), min_margin_bytes {min_margin_bytes} >= 0")
    # "on Tesla T4" for a GPU; a CPU's model name says nothing about RAM, so say what the number is.
    where = f"on {facts.name or 'the GPU'}" if facts.kind == "cuda" else "of host RAM"
    requested = parse_budget(text)
    if requested is None:
        margin = max(int(margin_fraction * facts.total_bytes), min_margin_bytes)
        budget = facts.free_bytes - margin
        if budget < MIN_BUDGET_BYTES:
            raise BudgetError(
                f"--budget auto: {format_bytes(facts.free_bytes)} free {where}, minus a "
                f"{format_bytes(margin)} safety margin, is below the smallest accepted budget "
                f"({format_bytes(MIN_BUDGET_BYTES)}); free some memory or give a size"
            )
        return budget, []
    shown = text.strip()
    if requested < MIN_BUDGET_BYTES:
        raise BudgetError(
            f"--budget {shown}: the smallest accepted budget is {format_bytes(MIN_BUDGET_BYTES)} (GB = GiB = 2^30 bytes)"
        )
    if requested > facts.total_bytes:
        raise BudgetError(
            f"--budget {shown} exceeds the device's total memory ({format_bytes(facts.total_bytes)} {where})"
        )
    warnings = []
    if requested > facts.free_bytes:
        warnings.append(
            f"--budget {shown} is more than the {format_bytes(facts.free_bytes)} free now {where}; "
            "the run may run out of memory unless other processes release theirs"
        )
    return requested, warnings


def format_bytes(n: int) -> str:
    """``6.00 GiB``, ``512 MiB``, ``1.5 MiB``, ``800 B``: binary units, as the budget is given."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n >= GiB:
        return f"{sign}{n / GiB:.2f} GiB"
    for size, unit in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= size:
            # Whole numbers print without decimals (512 MiB), others with one (1.5 MiB).
            return f"{sign}{n // size} {unit}" if n % size == 0 else f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{n} B"
