"""A fault injected into the compute process of pipeline runs, for tests.

`install` writes a `sitecustomize.py` into a folder put on PYTHONPATH: every process started
after that (the spawned pipeline children, a launcher and its children) imports it at start,
and it patches the compute role's module once that is imported. The patched compute process
raises torch.OutOfMemoryError at layer `layer` of every step whose chunk of some sequence starts
with two `poison` tokens (a prompt chunk; decode steps carry one token a sequence): "before"
layer() is asked for it (its slot not yet taken), or "after" it returned (the layer in use).
Nothing of this is in the product: the hook exists only in the test's processes. `install_patch`
does the same with any `_patch(module)` a test writes (test_pipeline_start.py's deaths).
"""

from __future__ import annotations

import os

_POISON = '''
POISON, LAYER, WHEN = {poison}, {layer}, {when!r}


def _patch(mod):
    import torch

    launch = mod.ComputeWorker.launch

    def faulty(self, msg):
        if not any(s.tokens[:2] == [POISON, POISON] for s in msg.seqs):
            return launch(self, msg)
        src = self.source
        real = src.layer

        def layer(i):
            if i == LAYER and WHEN == "after":
                real(i)
            if i == LAYER:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected at layer {{i}} of step {{msg.step}})")
            return real(i)

        src.layer = layer
        try:
            return launch(self, msg)
        finally:
            del src.layer

    mod.ComputeWorker.launch = faulty
'''

# imports a role's module (_MODULE), then hands it to the `_patch` above it
_HOOK = '''
import importlib.abc
import importlib.util
import sys


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''


def install_patch(folder, monkeypatch, patch: str, module: str = "layerstream.compute.compute_proc") -> None:
    """Put a sitecustomize.py in `folder` that runs `patch` (Python source defining `_patch(module)`)
    on a role's module (the compute role's by default) once it is imported, and `folder` first on
    PYTHONPATH (for the processes started from now on, until the test ends)."""
    (folder / "sitecustomize.py").write_text(patch + f"\n_MODULE = {module!r}\n" + _HOOK)
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def install(folder, monkeypatch, poison: int, layer: int, when: str = "before") -> None:
    """The poisoned-step fault of the module's docstring, through install_patch."""
    if when not in ("before", "after"):
        raise ValueError(f"when={when!r}: 'before' or 'after'")
    install_patch(folder, monkeypatch, _POISON.format(poison=poison, layer=layer, when=when))
