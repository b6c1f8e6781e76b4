"""NOTE [ warm starts ]: the children are spawned once the options are checked, before numpy's
import and the model's header, and a model the header refuses, or an option, lets them go or
spawns none."""

import io
import sys

import pytest

import ggufgen
from layerstream.coordinator import cli, supervisor
from layerstream.loader import gguf_index


def _record(monkeypatch):
    """Warm starts on whatever the cores; returns (events, the warm processes spawned)."""
    monkeypatch.setattr(supervisor, "WARM_MIN_CPUS", 1)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO()))  # (run() reconfigures it)
    events, procs = [], []
    real_init, real_open = supervisor.WarmStarts.__init__, gguf_index.open_model

    def init(self, roles, **kw):
        events.append("spawned")
        real_init(self, roles, **kw)
        procs.extend(p for waiting in self.waiting.values() for p, _ in waiting)

    def open_model(path):
        events.append("header")
        return real_open(path)

    def pools(*a, **kw):
        events.append("numpy")
        return real_pools(*a, **kw)

    real_pools = cli.start_thread_pools
    monkeypatch.setattr(supervisor.WarmStarts, "__init__", init)
    monkeypatch.setattr(gguf_index, "open_model", open_model)
    monkeypatch.setattr(cli, "start_thread_pools", pools)
    return events, procs


def test_the_children_are_spawned_before_the_header_is_parsed(tmp_path, monkeypatch, capsys):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    events, procs = _record(monkeypatch)
    assert cli.main(["-m", path, "-n", "2", "--temperature", "0", "--device", "cpu", "hello"]) == 0
    # spawned once the options are checked, before numpy's import and its threads (cli.run), then the header
    assert events[:3] == ["spawned", "numpy", "header"] and capsys.readouterr().out.strip()
    assert len(procs) == 3 and all(p.exitcode is not None for p in procs)


def test_a_refused_option_or_a_port_in_use_spawns_nothing(tmp_path, monkeypatch, capsys):
    """The options are checked and --serve's port bound before any child is spawned: --readers 5000
    spawned 5000 processes before its refusal once the spawn came first."""
    import socket

    path = ggufgen.write_model(tmp_path / "m.gguf")
    events, procs = _record(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["-m", path, "--readers", "5000", "--device", "cpu", "hello"])
    assert e.value.code == 2 and events == [] and "--readers" in capsys.readouterr().err
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(SystemExit) as e:
            cli.main(["-m", path, "--serve", "--port", str(held.getsockname()[1]), "--device", "cpu"])
    assert e.value.code == 1 and events == [] and "--port" in capsys.readouterr().err


def test_a_corrupt_model_lets_the_warm_children_go(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    events, procs = _record(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["-m", str(bad), "--device", "cpu", "hello"])
    assert e.value.code == 1 and events == ["spawned", "numpy", "header"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"run-pipeline: error: {bad}") and "GGUF" in err[0]
    assert procs and all(p.exitcode is not None for p in procs)
