"""--budget parsing and resolution against hand-built device facts (no hardware asked)."""

from __future__ import annotations

import dataclasses

import pytest

from lowmem_aasist.memory.budget import (
    MIN_BUDGET_BYTES,
    BudgetError,
    GiB,
    KiB,
    MiB,
    format_bytes,
    parse_budget,
    resolve_budget,
)
from lowmem_aasist.memory.device import DeviceFacts

# A 6 GiB Turing card (RTX 2060-class) with 5 GiB free, and a 16 GiB laptop with 10 GiB available.
TURING_6G = DeviceFacts(
    kind="cuda",
    name="NVIDIA GeForce RTX 2060",
    total_bytes=6 * GiB,
    free_bytes=5 * GiB,
    reserved_bytes=0,
    compute_capability=(7, 5),
    native_bf16=False,
    context_bytes=400 * MiB,
    source="nvml",
)
CPU_16G = DeviceFacts(
    kind="cpu",
    name="Fake CPU",
    total_bytes=16 * GiB,
    free_bytes=10 * GiB,
    reserved_bytes=0,
    compute_capability=None,
    native_bf16=False,
    context_bytes=0,
    source="psutil",
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GB", 6 * GiB),
        ("6gb", 6 * GiB),
        ("6GiB", 6 * GiB),
        ("6gib", 6 * GiB),
        ("6 GB", 6 * GiB),
        ("6 gb", 6 * GiB),
        ("  6GB  ", 6 * GiB),
        ("6G", 6 * GiB),
        ("6144MB", 6 * GiB),
        ("6144MiB", 6 * GiB),
        ("6.5GB", 6 * GiB + 512 * MiB),
        ("1.5G", 3 * 512 * MiB),
        (".5GB", 512 * MiB),
        ("512M", 512 * MiB),
        ("2048MiB", 2 * GiB),
        ("1048576K", GiB),
        ("1048576KB", GiB),
        ("1048576kib", GiB),
        ("1TB", 2**40),
        ("1TiB", 2**40),
        ("1073741824B", GiB),
        ("6.1GB", 6549825126),  # exact: int(6.1 * 2^30) computed in decimal, not via a binary float
        ("0.3KB", 307),  # fractions of a byte round down
    ],
)
def test_accepted_sizes(text: str, expected: int) -> None:
    assert parse_budget(text) == expected


def test_gb_means_gib() -> None:
    assert parse_budget("6GB") == parse_budget("6144MB") == parse_budget("6GiB") == 6 * 2**30


@pytest.mark.parametrize("text", ["auto", "AUTO", " Auto "])
def test_auto_parses_to_none(text: str) -> None:
    assert parse_budget(text) is None


@pytest.mark.parametrize(
    "text",
    ["abc", "", "   ", "0", "6", "6.5", "0GB", "0.0GB", "0.0001B", "-1GB", "+1GB", "6XB", "6Gi", "3T", "nan",
     "inf", "nanGB", "infGB", "1e3GB", "6,144MB", "6.GB", "GB", "6 G B", "6GB6", "auto6GB", "6GB\n2GB"],
)
def test_rejected_sizes(text: str) -> None:
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert repr(text) in msg  # names the input exactly as given
    assert "6GB" in msg and "auto" in msg  # says what is accepted


def test_bare_number_says_unit_missing() -> None:
    with pytest.raises(BudgetError, match="needs a unit"):
        parse_budget("6")


def test_auto_is_free_minus_margin() -> None:
    # 5% of 6 GiB is 307 MiB > the 256 MiB floor, so the fractional margin wins.
    budget, warnings = resolve_budget("auto", TURING_6G)
    assert budget == 5 * GiB - int(0.05 * 6 * GiB)
    assert warnings == []
    # The floor wins when 5% of total is smaller.
    small = dataclasses.replace(TURING_6G, total_bytes=2 * GiB, free_bytes=2 * GiB)
    assert resolve_budget("auto", small)[0] == 2 * GiB - 256 * MiB
    assert resolve_budget("auto", TURING_6G, margin_fraction=0.0, min_margin_bytes=0)[0] == 5 * GiB
    assert resolve_budget("auto", CPU_16G)[0] == 10 * GiB - int(0.05 * 16 * GiB)


def test_auto_with_too_little_free_memory_is_an_error() -> None:
    crowded = dataclasses.replace(TURING_6G, free_bytes=300 * MiB)
    with pytest.raises(BudgetError, match="smallest accepted budget") as err:
        resolve_budget("auto", crowded)
    assert "\n" not in str(err.value)


def test_explicit_budget_within_free_memory() -> None:
    assert resolve_budget("4GB", TURING_6G) == (4 * GiB, [])
    assert resolve_budget("8GB", CPU_16G) == (8 * GiB, [])


def test_above_total_is_an_error() -> None:
    with pytest.raises(BudgetError) as err:
        resolve_budget("16GB", TURING_6G)
    assert str(err.value) == (
        "--budget 16GB exceeds the device's total memory (6.00 GiB on NVIDIA GeForce RTX 2060)"
    )
    with pytest.raises(BudgetError, match="host RAM"):
        resolve_budget("32GB", CPU_16G)


def test_above_free_is_a_warning() -> None:
    budget, warnings = resolve_budget("5.5GB", TURING_6G)
    assert budget == 5 * GiB + 512 * MiB
    assert len(warnings) == 1 and "5.00 GiB free" in warnings[0] and "\n" not in warnings[0]
    # Exactly the total is allowed (with the warning), one byte more is not.
    assert resolve_budget("6GB", TURING_6G)[0] == 6 * GiB
    with pytest.raises(BudgetError, match="exceeds"):
        resolve_budget(f"{6 * GiB + 1}B", TURING_6G)


def test_too_small_is_an_error() -> None:
    assert MIN_BUDGET_BYTES == 256 * MiB
    assert resolve_budget("256MB", TURING_6G)[0] == 256 * MiB
    with pytest.raises(BudgetError, match="smallest accepted budget is 256 MiB"):
        resolve_budget("255MB", TURING_6G)
    with pytest.raises(BudgetError, match="smallest accepted"):
        resolve_budget("6MB", CPU_16G)


def test_bad_margin_arguments() -> None:
    with pytest.raises(ValueError):
        resolve_budget("auto", TURING_6G, margin_fraction=1.0)
    with pytest.raises(ValueError):
        resolve_budget("auto", TURING_6G, min_margin_bytes=-1)


@pytest.mark.parametrize(
    ("n", "text"),
    [(6 * GiB, "6.00 GiB"), (15360 * MiB, "15.00 GiB"), (512 * MiB, "512 MiB"), (3 * MiB // 2, "1.5 MiB"),
     (KiB, "1 KiB"), (800, "800 B"), (0, "0 B"), (-512 * MiB, "-512 MiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_cuda_cap_is_the_budget_minus_the_context_even_on_a_big_card(monkeypatch):
    # An 80 GiB card and a 1 GiB budget: the allocator gets 1 GiB minus the context, not a 1% floor (819 MiB).
    import torch

    from lowmem_aasist.memory.enforce import enforce_budget

    set_to: list[float] = []
    props = type("Props", (), {"total_memory": 80 * GiB})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: set_to.append(f))
    enforce_budget(torch.device("cuda", 0), 1 * GiB, 500 * MiB)
    assert set_to == [(1 * GiB - 500 * MiB) / (80 * GiB)]
    enforce_budget(torch.device("cuda", 0), 300 * MiB, 500 * MiB)  # the context alone is over: nothing allocatable
    assert set_to[-1] == 0.0
