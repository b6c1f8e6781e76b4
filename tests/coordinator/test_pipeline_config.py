"""PipelineConfig's groups: each checks its own options at once, with the flag's one-line error."""

import pytest

from layerstream.coordinator.pipeline_config import (
    Budget,
    CpuOptions,
    PipelineConfig,
    ProcessOptions,
    ReaderOptions,
)
from layerstream.errors import ConfigError


@pytest.mark.parametrize("make,message", [
    (lambda: ReaderOptions(count=0), "--readers 0: give 1 to 64"),
    (lambda: ReaderOptions(count=2, dirs=("a",)), "--reader-dir given 1 times for --readers 2; give one per reader"),
    (lambda: ReaderOptions(threads=0), "--read-threads 0: must be at least 1"),
    (lambda: CpuOptions(threads=0), "--cpu-threads 0: must be at least 1"),
    (lambda: ProcessOptions(transport="udp"), "transport 'udp': use one of ipc, tcp"),
    (lambda: ProcessOptions(ready_timeout_s=0), "ready_timeout_s 0: must be above 0 seconds"),
    (lambda: ProcessOptions(stall_timeout_s=-1.0), "stall_timeout_s -1.0: must be above 0 seconds"),
])
def test_a_bad_option_is_one_line_naming_it(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


def test_the_cpu_share_is_parsed_once_into_its_group():
    cpu = CpuOptions(share="0.5", split="rows")
    assert (cpu.parsed.split, cpu.parsed.off) == ("rows", False)
    assert CpuOptions().parsed.off
    with pytest.raises(ConfigError):
        CpuOptions(share="0.5", split="columns")


def test_the_groups_default_to_the_plan_s_defaults():
    cfg = PipelineConfig(Budget(resident_layers=0))
    assert cfg.budget.resident_layers == 0 and cfg.budget.vram_gb is None and cfg.readers.count == 1
    assert (cfg.procs.transport, cfg.cpu.share, cfg.experts.policy) == ("ipc", "0", "lfu")
    assert PipelineConfig() == PipelineConfig(Budget(), ReaderOptions(), CpuOptions())


def test_the_reader_bound_is_run_pipelines():
    """(one bound, layerstream.bounds', which both read: args.py before torch is imported)"""
    from layerstream.coordinator import args, pipeline_config

    assert pipeline_config.MAX_READERS == args.MAX_READERS
