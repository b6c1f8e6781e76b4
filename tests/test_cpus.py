import os

from layerstream.cpus import usable_cpus


def mask() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_without_a_quota_the_affinity_mask_counts(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path / "cpu.max")) == mask()
    assert usable_cpus(str(tmp_path / "absent")) == mask()


def test_a_cgroup_quota_cuts_the_count_rounding_up(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cpus(str(f)) == min(2, mask())
    f.write_text("1000 100000\n")  # a hundredth of one
    assert usable_cpus(str(f)) == 1
    f.write_text("garbage\n")
    assert usable_cpus(str(f)) == mask()
