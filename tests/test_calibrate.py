"""CPU calibration: real steps in fresh processes, techniques measured best case first, fit's peaks fed back."""

from __future__ import annotations

import json

import pytest

from lowmem_aasist.cli import main
from lowmem_aasist.memory import engine
from lowmem_aasist.memory.calibrate import Job, measure
from lowmem_aasist.memory.device import device_facts
from lowmem_aasist.memory.engine import cpu_cost, model_limits, plan_cpu, prepare_model, record_observed
from lowmem_aasist.memory.estimate import estimate_step_peak
from lowmem_aasist.memory.plan import Technique, predict_peak
from lowmem_aasist.models import get_family

MiB = 2**20
CROP = 4000


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_a_worker_step_counts_the_live_tensors_the_estimator_predicts():
    # The worker runs the real step under the live-tensor tracker; the fake-tensor estimator predicts the same count
    # for the steady state (its warm-up creates Adam's state, which the worker adds after its first step).
    points = list(measure([Job("AASIST-L", "none", "fp32", CROP, mb) for mb in (2, 4)]))
    for p in points:
        estimate = estimate_step_peak("AASIST-L", p.job.micro_batch, CROP, p.job.micro_batch, "fp32",
                                      prepare=lambda m: prepare_model(m, "none"))  # as fit and the worker build it
        assert p.live_peak == estimate
        assert p.rss_peak > p.rss_start > 100 * MiB and p.rss_peak - p.rss_start >= p.live_peak // 2
    assert points[1].live_peak > points[0].live_peak


def _fake_points(per_sample_rss: dict[str, int]):
    """Measurements as if taken: live 100 MiB per sample, resident extra 300 MiB + the policy's scratch per sample."""
    calls = []

    def fake(facts, model_name, t, crop, channels_last, smallest, stored):
        calls.append(t.checkpoint)
        points = [{"micro_batch": mb, "rss_start": 0, "live_peak": (10 + 100 * mb) * MiB // (3 if t.checkpoint == "tiled" else 1),
                   "rss_peak": 0} for mb in (2, 4)]
        for p in points:
            p["rss_peak"] = p["live_peak"] + (300 + per_sample_rss[t.checkpoint] * p["micro_batch"]) * MiB
        return f"key-{t.checkpoint}", {"points": points}

    return fake, calls


@pytest.mark.parametrize(("budget_mib", "measured", "chosen"), [
    (6000, ["none"], "none"),  # none fits at micro-batch 24: tiled cannot beat it, so it is never measured
    (1500, ["none", "tiled"], "tiled"),  # none fits only small micro-batches: tiled might win, so it is measured
])
def test_techniques_are_measured_best_case_first_until_none_can_win(monkeypatch, budget_mib, measured, chosen):
    from lowmem_aasist.memory import measure as measure_module

    fake, calls = _fake_points({"none": 40, "tiled": 10})
    monkeypatch.setattr(engine, "_cpu_measured", fake)
    # The planning process adds nothing. Otherwise this test process's own RSS joins every plan, and at 770-840 MiB
    # (as in one CI run) none at micro-batch 2 is the best plan that fits: tiled fits only below 8, where the noisy-
    # statistics penalty makes it dearer.
    monkeypatch.setattr(measure_module, "rss_now", lambda: 0)
    family = get_family("AASIST")
    techniques = [Technique("bf16", p) for p in family.auto_policies]
    plan, _, calibration = plan_cpu(device_facts(engine.torch.device("cpu")), "AASIST", techniques, budget_mib * MiB,
                                    24, 64_600, model_limits(family))
    assert calls == measured and plan.checkpoint == chosen
    assert [t.checkpoint for t in calibration.skipped] == [p for p in ("none", "tiled") if p not in measured]


def test_cost_lines_go_through_the_measured_points_and_add_the_planning_process():
    measured = {"points": [{"micro_batch": 2, "rss_start": 300, "live_peak": 210 * MiB, "rss_peak": 900 * MiB},
                           {"micro_batch": 4, "rss_start": 300, "live_peak": 410 * MiB, "rss_peak": 1200 * MiB}]}
    t = Technique("bf16", "none")
    cost, over = cpu_cost(measured, t, "AASIST", 64_600, process_extra=50 * MiB)
    # live 10 + 100 x mb MiB; extra (rss - live) 690 and 790 MiB: 590 + 50 x mb; the planning process adds 50 MiB.
    assert predict_peak(cost, {("bf16", "none"): over}, t, 2, 64_600) == 950 * MiB
    assert predict_peak(cost, {("bf16", "none"): over}, t, 12, 64_600) == (10 + 1200 + 590 + 600 + 50) * MiB


def test_a_fit_peak_refines_the_next_plan_keeping_the_highest_seen(capsys):
    args = ["probe", "--device", "cpu", "--model", "AASIST-L", "--crop", "8000", "--precision", "fp32",
            "--checkpoint", "none", "--budget", "2GB", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)["plan"]
    run = engine.plan_run("AASIST-L", engine.torch.device("cpu"), "2GB", 24, 8000, "fp32", "none")
    mb = run.plan.micro_batch
    assert record_observed(run, mb, run.plan.predicted_peak_bytes + 200 * MiB)
    assert not record_observed(run, mb, run.plan.predicted_peak_bytes + 100 * MiB)  # below the one kept at mb
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)["plan"]
    assert second["predicted_peak_bytes"] > first["predicted_peak_bytes"] + 100 * MiB or second["micro_batch"] < mb


def test_dev_scoring_under_a_budget_uses_the_largest_batch_that_fits():
    # Dev is scored between epochs under the same cap as training: 16 x 64,600 samples would not fit small budgets.
    import dataclasses

    from lowmem_aasist.memory.engine import dev_batch_within
    from lowmem_aasist.memory.inference import inference_cost

    run = engine.plan_run("AASIST-L", engine.torch.device("cpu"), "2GB", 4, CROP, "fp32", "none")
    cost = inference_cost("AASIST-L", CROP, "fp32", engine.torch.device("cpu"))
    assert dev_batch_within(dataclasses.replace(run, budget_bytes=cost.peak(3) + 1), CROP, "fp32", 16) == 3
    assert dev_batch_within(dataclasses.replace(run, budget_bytes=cost.peak(64)), CROP, "fp32", 16) == 16


def test_the_data_path_is_counted_in_the_plan_and_its_time_set_against_the_step(monkeypatch):
    """Hand-derived: live 10 + 100 x mb MiB, resident extra 300 + 40 x mb, the planning process adds nothing.
    2,200 MiB with the 5% margin leaves 2,090: micro-batch 12 needs 310 + 140 x 12 = 1,990 and fits; with 200 MiB
    of data path it needs 2,190 and does not, so the plan drops to 8 (1,630 MiB with the data path)."""
    from lowmem_aasist.memory import measure
    from lowmem_aasist.memory.plan import DataPath

    fake, _ = _fake_points({"none": 40})

    def timed(*args):
        key, measured = fake(*args)
        for p in measured["points"]:  # 1 s + 0.5 s per utterance: 0.625 s per utterance at micro-batch 8
            p["seconds"] = 1.0 + 0.5 * p["micro_batch"]
        return key, measured

    monkeypatch.setattr(engine, "_cpu_measured", timed)
    monkeypatch.setattr(measure, "rss_now", lambda: 0)
    family = get_family("AASIST")
    facts, limits = device_facts(engine.torch.device("cpu")), model_limits(family)

    def plan(data_path):
        return plan_cpu(facts, "AASIST", [Technique("bf16", "none")], 2200 * MiB, 24, 64_600, limits,
                        data_path=data_path)

    bare, _, _ = plan(None)
    assert bare.micro_batch == 12 and bare.predicted_peak_bytes == 1990 * MiB
    chosen, candidates, calibration = plan(DataPath("rawboost:5", 200 * MiB, 0.05))
    assert chosen.micro_batch == 8 and chosen.predicted_peak_bytes == 1630 * MiB and candidates[0] == chosen
    assert chosen.notes[-1] == ("data path in the training process (rawboost:5): 200.0 MiB counted in the peak, "
                                "50.0 ms per utterance = 8.0% on the calibration steps' 0.62 s per utterance")
    assert calibration.to_dict()["data_path"] == {"augment": "rawboost:5", "bytes": 200 * MiB, "seconds_per_item": 0.05}


def test_a_forked_child_is_credited_the_parents_file_pages_it_has_not_mapped():
    # Linux maps a parent's file pages into a forked child only when touched, so the child reads some tens of MiB
    # less resident than the parent at the fork; the page-exact correction brings it back (the calibration steps
    # run in such children and must read as a fresh interpreter would).
    import os

    from lowmem_aasist.memory.calibrate import _not_yet_mapped, file_pages
    from lowmem_aasist.memory.measure import rss_now

    parent, parent_rss = file_pages(), rss_now()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, json.dumps([rss_now(), _not_yet_mapped(parent)]).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        child_rss, lacking = json.loads(f.read())
    os.waitpid(pid, 0)
    assert lacking > 5 * MiB
    assert abs(child_rss + lacking - parent_rss) < 8 * MiB


def test_the_calibration_server_is_started_early_only_for_a_cpu_plan_without_cached_steps(tmp_path):
    from lowmem_aasist.memory.calibrate import likely_needed

    cache = tmp_path / "costs.json"
    assert likely_needed("cpu", "AASIST", cache)  # no cache yet
    cache.write_text(json.dumps({"cpu|v9|torch 2|EPYC|AASIST|bf16|none|cl=False|64600": {}}))
    assert not likely_needed("cpu", "AASIST", cache) and not likely_needed("cpu", "", cache)
    assert likely_needed("cpu", "AASIST-L", cache)
    assert not likely_needed("cuda", "AASIST-L", cache)
