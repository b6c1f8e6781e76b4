"""The pipeline's start: every child spawned at once, the arena sent once each is Ready (NOTE [ the
arena after Ready ] in pipeline.py), and a child that dies before or after it came named in one line."""

from __future__ import annotations

import faults
import pytest

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline_config import Budget, PipelineConfig, ReaderOptions
from layerstream.coordinator.supervisor import Supervisor
from layerstream.errors import PipelineError
from layerstream.loader.gguf_index import open_model

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_leftovers")]

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [5, 17, 33, 80, 81, 90, 100]
PCFG = PipelineConfig(budget=Budget(resident_layers=0), readers=ReaderOptions(count=2))


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


def _engine(path, pcfg=None):
    return Engine.open(EngineConfig(device="cpu", ctx=64, max_seqs=2), pcfg, index=open_model(path))


def test_readers_and_compute_are_spawned_before_staging_is_ready_and_the_run_gives_the_one_process_text(
        model, monkeypatch):
    """Their start (imports, the device) overlaps staging's (old: spawned once staging's Ready came,
    as their configs carried its arena); both readers map the arena that comes after their Ready."""
    with _engine(model) as e:
        want = "".join(e.generate(list(PROMPT), GREEDY))
    spawned = []
    real = Supervisor.start

    def start(self, role, ident, target, cfg):
        st = self.children.get("staging")
        spawned.append((ident, st is not None and st.ready is not None))
        return real(self, role, ident, target, cfg)

    monkeypatch.setattr(Supervisor, "start", start)
    with _engine(model, PCFG) as e:
        assert spawned == [("staging", False), ("reader-0", False), ("reader-1", False), ("compute", False)]
        assert e.backend.arena is not None
        assert "".join(e.generate(list(PROMPT), GREEDY)) == want
        reads = {s["ident"]: s["count"].get("read", 0) for s in e.backend.collect_stats() if s.get("role") == "reader"}
    assert set(reads) == {"reader-0", "reader-1"} and all(n > 0 for n in reads.values()), reads


_COMPUTE_STARTS_LATE = """
import time


def _patch(mod):
    init = mod.ComputeWorker.__init__

    def late(self, *a, **kw):
        time.sleep(1.5)  # (as torch's import and the CUDA context hold a real compute process up)
        init(self, *a, **kw)

    mod.ComputeWorker.__init__ = late
"""


def test_the_readers_fill_the_free_slots_while_compute_still_starts_and_the_run_gives_the_one_process_text(
        model, monkeypatch, tmp_path):
    """The readers start on the first pass's layers once they and staging are Ready, not once compute
    is (it starts last, torch's import and the device taking seconds): layers are read before
    compute's Ready, as far as the free slots go, and the text is the one process's."""
    with _engine(model) as e:
        want = "".join(e.generate(list(PROMPT), GREEDY))
    faults.install_patch(tmp_path, monkeypatch, _COMPUTE_STARTS_LATE)
    seen = []
    pcfg = PipelineConfig(budget=Budget(resident_layers=0), readers=ReaderOptions(count=2),
                          on_progress=lambda d, t, w: seen.append((w, d)))
    with _engine(model, pcfg) as e:
        ready = seen.index(("processes", 4))
        assert ("layers", 1) in seen[:ready], seen  # read before compute was Ready
        assert "".join(e.generate(list(PROMPT), GREEDY)) == want


_COMPUTE_DIES = """
import os

WHEN, CODE = {when!r}, {code}


def _patch(module):
    W = module.ComputeWorker
    if WHEN == "before":  # in its own start: before its Ready, so before the arena
        W.__init__ = lambda self, cfg, links: os._exit(CODE)
    else:  # once it mapped the arena
        attach = W.attach

        def dies(self, arena):
            attach(self, arena)
            os._exit(CODE)

        W.attach = dies
"""


@pytest.mark.parametrize("when, code", [("before", 3), ("after", 4)])
def test_a_compute_process_that_dies_before_or_after_the_arena_came_is_one_line_and_leaves_nothing(
        model, tmp_path, monkeypatch, when, code):
    """The line names the compute process and its exit code; no child and no segment is left (the
    fixture), staging's included."""
    faults.install_patch(tmp_path, monkeypatch, _COMPUTE_DIES.format(when=when, code=code))  # the children's
    with pytest.raises(PipelineError) as err:
        with _engine(model, PCFG) as e:  # (after: its death may be seen at the start or at the first step)
            "".join(e.generate(list(PROMPT), GREEDY))
    assert str(err.value) == f"the compute process died (exit code {code})"


_STAGING_DIES = """
import os
import signal


def _patch(module):
    create = module.Arena.create

    def dies(*a, **kw):  # its segment made, then killed before its Ready names it
        arena = create(*a, **kw)
        if os.path.exists("/dev/shm/" + arena.name):  # (else its plain exit fails the test's line)
            os.kill(os.getpid(), signal.SIGKILL)

    module.Arena.create = staticmethod(dies)
"""


def test_a_staging_killed_before_it_named_its_arena_is_one_line_and_its_segment_is_removed(model, tmp_path,
                                                                                          monkeypatch):
    """The run removes the segment by the names that carry staging's pid and its own (its Ready,
    which names the arena, never came); the fixture finds none left."""
    faults.install_patch(tmp_path, monkeypatch, _STAGING_DIES, module="layerstream.loader.staging_proc")
    with pytest.raises(PipelineError) as err:
        with _engine(model, PCFG) as e:
            "".join(e.generate(list(PROMPT), GREEDY))
    assert str(err.value) == "the staging process died (exit code -9)"
