"""PipelineConfig's groups: each checks its own options at once, in a one-line error naming the field."""

import pytest

from layerstream.coordinator.pipeline_config import (
    Budget,
    CpuOptions,
    ExpertOptions,
    PipelineConfig,
    ProcessOptions,
    ReaderOptions,
)
from layerstream.cpus import usable_cpus
from layerstream.errors import ConfigError


@pytest.mark.parametrize("make,message", [
    # in the Python API's names, not run-pipeline's flags (NOTE [ the caller's names ] in api_names.py)
    (lambda: ReaderOptions(count=0), "ReaderOptions.count=0: give 1 to 64"),
    (lambda: ReaderOptions(count=2, dirs=("a",)), "ReaderOptions.dirs given once for ReaderOptions.count=2; give one "
                                                  "per reader"),
    (lambda: ReaderOptions(dirs=("a", "b")), "ReaderOptions.dirs given twice for ReaderOptions.count=1; give one per "
                                             "reader"),
    (lambda: ReaderOptions(threads=0), "ReaderOptions.threads=0: must be a whole number, at least 1"),
    (lambda: CpuOptions(threads=0), "CpuOptions.threads=0: must be a whole number, at least 1"),
    (lambda: CpuOptions(threads="4"), "CpuOptions.threads='4': must be a whole number, at least 1"),  # (TypeError)
    # as run-pipeline's -t: more threads than the CPUs it may use (a container's quota) spin against each other
    (lambda: CpuOptions(threads=10**6), f"CpuOptions.threads=1000000: this machine has {usable_cpus()} cores; give "
                                        f"at most {usable_cpus()}"),
    # checked when made (a policy failed in the compute process once it had started; a size below 0 ran)
    (lambda: ExpertOptions(policy="fifo"), "ExpertOptions.policy='fifo': use lfu or lru"),
    (lambda: ExpertOptions(cache_gb=-1), "ExpertOptions.cache_gb=-1: give GiB as a finite number from 0 to 1048576 "
                                         "(or None: the plan's default)"),
    (lambda: ExpertOptions(moe_dense="x"), "ExpertOptions.moe_dense='x': use resident or stream"),
    (lambda: ExpertOptions(prefetch=-3), "ExpertOptions.prefetch=-3: give a whole number from 0 to 65536 (0: off; "
                                         "None: the plan's default)"),
    (lambda: ExpertOptions(prefetch=10**30), f"ExpertOptions.prefetch={10**30}: give a whole number from 0 to 65536 "
                                             "(0: off; None: the plan's default)"),  # (a probe's: taken)
    (lambda: ProcessOptions(transport="udp"), "transport 'udp': use one of ipc, tcp"),
    (lambda: ProcessOptions(ready_timeout_s=0), "ready_timeout_s 0: must be above 0 seconds"),
    (lambda: ProcessOptions(stall_timeout_s=-1.0), "stall_timeout_s -1.0: must be above 0 seconds"),
    # a probe's: these were taken as they came ("no" as true: the plan put the KV in host memory),
    # or failed later as a TypeError, a ZMQError or a call of an int deep in the pipeline's start
    (lambda: Budget(kv_on_host="no"), "kv_on_host='no': must be True or False (or None: the plan's default)"),
    (lambda: Budget(evaluates=1), "evaluates=1: must be True or False"),
    (lambda: Budget(job=(-1, -1)), "job=(-1, -1): give (prompt tokens, reply tokens), whole numbers from 0 and "
                                   "from 1 (or None: no known job)"),
    (lambda: Budget(job="x"), "job='x': give (prompt tokens, reply tokens), whole numbers from 0 and from 1 (or "
                              "None: no known job)"),
    (lambda: ReaderOptions(direct="no"), "ReaderOptions.direct='no': must be True or False"),
    (lambda: ProcessOptions(trace="no"), "trace='no': must be True or False"),
    (lambda: ProcessOptions(host=""), "host='': give the address the children's links bind to, as a string"),
    (lambda: ProcessOptions(host=None), "host=None: give the address the children's links bind to, as a string"),
    (lambda: ProcessOptions(ready_timeout_s="5"), "ready_timeout_s '5': must be above 0 seconds"),
    (lambda: ProcessOptions(stall_timeout_s=None), "stall_timeout_s None: must be above 0 seconds"),
    (lambda: ProcessOptions(stall_timeout_s=float("inf")), "stall_timeout_s inf: must be above 0 seconds"),
    (lambda: PipelineConfig(on_progress=42), "PipelineConfig on_progress=42: give a function of (done, total, "
                                             "what), or None"),
])
def test_a_bad_option_is_one_line_naming_it(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


def test_good_options_are_taken_as_given():
    assert Budget(kv_on_host=True, evaluates=False, job=(0, 1)).job == (0, 1) and Budget(kv_on_host=None).kv_on_host is None
    assert ReaderOptions(direct=True).direct and ProcessOptions(trace=True, ready_timeout_s=5).ready_timeout_s == 5
    assert PipelineConfig(on_progress=print).on_progress is print


def test_the_cpu_share_is_parsed_once_into_its_group():
    cpu = CpuOptions(share="0.5", split="rows")
    assert (cpu.parsed.split, cpu.parsed.off) == ("rows", False)
    assert CpuOptions().parsed.experts_only and CpuOptions(share="0").parsed.off  # (the default: cpu/config.py)
    with pytest.raises(ConfigError):
        CpuOptions(share="0.5", split="columns")


def test_a_cpu_share_by_batch_size_gives_each_bucket_the_share_of_the_largest_size_named_below_it():
    cpu = CpuOptions(share="2:0.25, 8:0.5").parsed
    assert cpu.fixed() == {1: 0.0, 2: 0.25, 4: 0.25, 8: 0.5}
    assert (str(cpu), cpu.fraction, cpu.pack_max, cpu.off) == ("2:0.25,8:0.5", 0.5, 0.5, False)
    assert CpuOptions(share="1:0,8:0").parsed.off and str(CpuOptions(share="1:0,8:0").parsed) == "0"
    assert CpuOptions(share="0.5").parsed.fixed() == 0.5  # (one share for every batch size, as before)
    for bad in ("8:", ":0.5", "16:0.5", "8:1.5", "8:0.5,4:0.2", "8:0.5,8:0.5", "8:0.5;1:0", "\u00b2:0.5", "8:0.5,"):
        with pytest.raises(ConfigError, match=r"^CpuOptions.share='.*(is not BATCH:FRACTION|give each batch size once)"):
            CpuOptions(share=bad)


def test_the_groups_default_to_the_plan_s_defaults():
    cfg = PipelineConfig(Budget(resident_layers=0))
    assert cfg.budget.resident_layers == 0 and cfg.budget.vram_gb is None and cfg.readers.count == 1
    assert (cfg.procs.transport, cfg.cpu.share, cfg.experts.policy) == ("ipc", "default", "lfu")
    assert PipelineConfig() == PipelineConfig(Budget(), ReaderOptions(), CpuOptions())


def test_the_reader_bound_is_run_pipelines():
    """(one bound, layerstream.bounds', which both read: args.py before torch is imported)"""
    from layerstream.coordinator import args, pipeline_config

    assert pipeline_config.MAX_READERS == args.MAX_READERS
