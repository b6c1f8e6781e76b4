"""Every process of a run is named in ps, top and pgrep: `layerstream` and `layerstream-<child>`, not python."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline_config import PipelineConfig, ReaderOptions
from layerstream.coordinator.supervisor import WarmStarts
from layerstream.loader.gguf_index import open_model
from procs import ends_with_the_test

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_leftovers")]

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"


def _names(pid: int) -> tuple[str, str]:
    """(comm, command line) of a process, as top/pgrep and ps -f read them."""
    comm = Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return comm, cmdline


def _named(pid: int, name: str, timeout: float = 60.0) -> tuple[str, str]:
    """The process's names once its comm is `name` cut to the kernel's 15 bytes (it names itself first
    thing, but a spawned process starts as python), or what it has at the deadline."""
    deadline = time.monotonic() + timeout
    while (got := _names(pid))[0] != name[:15] and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_the_pipelines_children_are_named_by_their_role(tiny_llama):
    pcfg = PipelineConfig(readers=ReaderOptions(count=2))
    with Engine.open(EngineConfig(device="cpu", ctx=64, max_seqs=1), pcfg, index=open_model(tiny_llama)) as e:
        children = {i: c.proc.pid for i, c in e.backend.sup.children.items()}
        names = {i: _names(pid) for i, pid in children.items()}
    assert names == {
        "staging": ("layerstream-sta", "layerstream-staging"),
        "reader-0": ("layerstream-rea", "layerstream-reader-0"),
        "reader-1": ("layerstream-rea", "layerstream-reader-1"),
        "compute": ("layerstream-com", "layerstream-compute"),
    }


def test_a_warm_start_is_named_by_its_role_while_it_waits():
    with WarmStarts({"reader": 1}) as warm:
        (proc, _), = warm.waiting["reader"]
        assert _named(proc.pid, "layerstream-reader") == ("layerstream-rea", "layerstream-reader")


def test_the_launcher_is_named_layerstream_with_its_options(tmp_path):
    import ggufgen

    path = ggufgen.write_model(tmp_path / "m.gguf")
    p = subprocess.Popen([str(LAUNCHER), "--single-process", "--serve", "-m", path, "--device", "cpu", "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=ends_with_the_test)
    try:
        assert select.select([p.stderr], [], [], 60)[0], "nothing on stderr in 60 s"
        assert _named(p.pid, "layerstream") == (
            "layerstream", f"layerstream --single-process --serve -m {path} --device cpu --port 0")
        pgrep = subprocess.run(["pgrep", "-x", "layerstream"], capture_output=True, text=True).stdout.split()
        assert str(p.pid) in pgrep
    finally:
        p.terminate()
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # (a SIGTERM it lost: never left running after the test)
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail("SIGTERM did not stop the launcher in 30 s")
