"""The trace's summary of where the compute stream waits (proto/timeline.py)."""

from layerstream.proto.timeline import Timeline, device_gaps

US = 1000  # ns


def _trace(steps: int) -> list[dict]:
    """A compute process's snapshot: each step a graph of layers 0-1 (2000 us), then layers 2 to 4
    (400 us each) with 50 us before layer 3 and 10 us before layer 4, and 1000 us between steps;
    a reader's events, which the summary leaves out."""
    tl = Timeline("compute", "0", trace=True)
    t = 0
    for _ in range(steps):
        tl.add("compute", "compute L0", t, 2000 * US, layer=0)
        t += 2000 * US
        for layer, gap in ((2, 0), (3, 50), (4, 10)):
            t += gap * US
            if layer == 2:  # (a dequantized layer: its dequant, then its compute, the same layer)
                tl.add("dequant", "dequant L2", t, 100 * US, layer=2)
                t += 100 * US
                tl.add("compute", "compute L2", t, 300 * US, layer=2)
            else:
                tl.add("compute", f"compute L{layer}", t, 400 * US, layer=layer)
            t += 300 * US if layer == 2 else 400 * US
        tl.add("step_tail", "tail", t, 300 * US)
        tl.add("step_setup", "set-up", t + 300 * US, 500 * US)
        t += 1000 * US
    reader = Timeline("reader", "0", trace=True)
    reader.add("compute", "not the device's", 0, 10**9, layer=9)
    return [tl.snapshot(), reader.snapshot()]


def test_the_median_step_says_how_long_the_stream_waits_between_layers_and_before_the_step():
    line = device_gaps(_trace(5))
    assert line.startswith("device stream, medians over 5 steps")
    assert "a step's layers 3.26 ms from the first's start to the last's end" in line
    assert "nothing queued 0.06 ms between them and 1.00 ms before the first" in line
    assert "the first's interval 2.00 ms" in line and "another's 0.40 ms" in line
    assert "the longest wait before L3 (0.05 ms)" in line
    assert line.endswith("; on the host, a step's set-up 0.50 ms before its first launch, its tail 0.30 ms after "
                         "its last layer's release")


def test_a_trace_of_one_step_or_none_says_nothing():
    assert device_gaps(_trace(1)) is None
    assert device_gaps([Timeline("compute", "0", trace=True).snapshot()]) is None


def test_a_trace_that_cannot_be_written_is_an_error_naming_trace_and_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """A disk that fills while the trace is written (after arg_files.check_trace's check): one line
    naming --trace, its file and why, a ConfigError (bin/bench and run-pipeline print it as their
    error); the trace written before stays whole and no part file is left. Through a symbolic
    link the trace goes to the file it names."""
    import errno
    import json

    import pytest

    from layerstream.errors import ConfigError
    from layerstream.proto import timeline

    path = tmp_path / "t.json"
    assert timeline.trace_report(str(path), _trace(3)).startswith(f"trace: 24 events written to {path}")
    before = path.read_bytes()
    assert len(json.loads(before)["traceEvents"]) == 24
    dump = json.dump

    def full(obj, f):  # half the trace written, then the disk is full
        f.write(json.dumps(obj)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(ConfigError) as e:
        timeline.trace_report(str(path), _trace(5))
    assert str(e.value) == f"--trace {path}: cannot write it (No space left on device)"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    monkeypatch.setattr(json, "dump", dump)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    timeline.trace_report(str(link), _trace(5))
    assert link.is_symlink() and len(json.loads(path.read_bytes())["traceEvents"]) == 38
