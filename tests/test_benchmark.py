"""The benchmark runs: every phase on tiny sizes, without NePS or matplotlib.

Its numbers are not checked, only that each phase produces them and that
the results are one JSON document with every target of the issue.
"""

from __future__ import annotations

import json
from dataclasses import replace

from benchmarks import bench, probes
from benchmarks.workload import MaxPlusOne, summarize, typical_config

from neps_redis import SampledConfig

TINY = replace(
    bench.QUICK,
    floor_calls=20,
    processes=(1,),
    lifecycle_trials=(10,),
    growth_sizes=(40, 80),
    growth_ops=5,
    read_budget_s=0.01,
    sample_budget_s=0.01,
    export_sizes=(80,),
    export_changes=5,
    memory_trials=50,
    round_trip_trials=20,
    round_trip_lifecycles=2,
)


def test_the_trivial_optimizer_continues_after_the_largest_integer_id():
    optimizer = MaxPlusOne(SampledConfig)

    configs = optimizer({"1": None, "7": None, "x": None}, None, n=2)

    assert [c.id for c in configs] == ["8", "9"]
    assert configs[0].config == typical_config(8)
    assert len(typical_config(8)) == 10


def test_summaries_give_percentiles_in_microseconds():
    summary = summarize([1_000 * i for i in range(1, 101)])

    assert summary["n"] == 100
    assert summary["p50_us"] == 50.5
    assert summary["max_us"] == 100.0
    assert summarize([]) == {"n": 0}


def test_the_floor_is_measured_for_each_transport(redis_url):
    floor = probes.measure_floor({"tcp": redis_url}, calls=20)

    assert floor["tcp"]["ping"]["n"] == 20
    assert floor["tcp"]["evalsha"]["p50_us"] > 0


def test_a_tiny_benchmark_reports_every_phase_and_target_as_json(server, tmp_path):
    # When the whole benchmark runs on tiny sizes, NePS left out
    results = bench.run_benchmark(
        TINY,
        quick=True,
        binary=server.binary,
        transport="unix",
        with_neps=False,
        work=tmp_path,
    )

    # Then each phase measured something, and it all is one JSON document
    json.loads(json.dumps(results))
    assert [g["trials"] for g in results["growth"]] == [40, 80]
    lifecycle = results["lifecycle"][0]
    assert lifecycle["completed"] == 10 and lifecycle["verified"]
    assert lifecycle["steps"]["claim"]["n"] == 10
    assert results["round_trips"]["claim"]["round_trips"] >= 1
    assert results["memory"]["bytes_per_trial"] > 0
    assert results["export"]["available"] == (probes.find_exporter()[0] is not None)
    assert set(results["targets"]) >= {
        "claim_p50_vs_floor",
        "report_p50_vs_floor",
        "sample_excl_optimizer_p50_vs_floor",
        "read_all_after_1_change_p50_growth",
        "throughput_vs_neps_4p_400",
        "throughput_vs_neps_4p_2000",
        "read_all_after_1_change_ms",
        "memory_bytes_per_trial",
    }
    assert results["targets"]["throughput_vs_neps_4p_400"]["met"] is None
    assert any("NePS" in note for note in results["notes"])
