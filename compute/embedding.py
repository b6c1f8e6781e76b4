"""The token embedding gathered where the step runs, from ids that may never have left the device.

NOTE [ the embedding on the device ]
The pipeline keeps the token embedding in host memory: on the device it would take the bytes of
two 8B layers from the plan. It used to be a host gather, so a decode step whose token is the
id the last step sampled (NOTE [ ids one step behind ] in stepper.py) could not be launched
before that id was read back, and the GPU idled between steps. Here the table's blocks are
copied once into pinned memory, which a CUDA device addresses directly (unified addressing): a
device kernel gathers the step's rows by ids on the device and only those rows' bytes cross
PCIe (a few KB a token); the rows are then dequantized on the device. On the CPU the table is
the file's own rows, gathered by the same call. Where the device cannot read the pinned table
(the check at start gives other bytes, or mapping is refused), `mapped_embedding` returns None
and the caller keeps the host gather.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from layerstream.compute.dequant import dequantize

log = logging.getLogger("layerstream.compute")


class _Mapped:
    """A CUDA array interface over pinned host memory, so torch.as_tensor makes a device tensor
    that reads it in place."""

    def __init__(self, host: torch.Tensor):
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "strides": None, "version": 2}


class DeviceEmbedding:
    """Rows of the token embedding for ids on the device: gathered there from `table` [V, row
    bytes] (a device view of pinned host memory on CUDA, the file's rows on the CPU), dequantized
    into the compute dtype."""

    def __init__(self, table: torch.Tensor, host: torch.Tensor | None, qtype: int, n_embd: int, name: str,
                 device: torch.device, dtype: torch.dtype):
        self.table, self.host = table, host  # (host: the pinned memory the table reads, kept alive)
        self.qtype, self.n_embd, self.name = qtype, n_embd, name
        self.device, self.dtype = device, dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] long on the device -> [T, E] in the compute dtype on the device (no host sync)."""
        raw = self.table.index_select(0, ids)  # [T, row bytes]: on CUDA read over PCIe
        # on CUDA into the compute dtype at once, as the in-VRAM engine's embedding; on the CPU
        # through float32, as the host gather did
        x = dequantize(raw.reshape(-1), self.qtype, (ids.shape[0], self.n_embd), self.name,
                       self.dtype if self.device.type == "cuda" else torch.float32)
        return x.to(self.dtype)


def mapped_embedding(glob, device: torch.device, dtype: torch.dtype) -> DeviceEmbedding | None:
    """The embedding of GlobalWeights `glob` gathered on `device` (NOTE [ the embedding on the
    device ]), or None where the device cannot read the host table."""
    info, rows = glob.embd_info, glob.embd_rows  # rows: [V, row bytes] uint8, the file's
    if device.type != "cuda":
        table = torch.from_numpy(np.asarray(rows))
        return DeviceEmbedding(table, None, info.qtype, info.shape[1], info.name, device, dtype)
    try:
        host = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=True)
        host.numpy()[:] = rows
        table = torch.as_tensor(_Mapped(host))  # (no device given: torch never copies it there)
        if table.device != device or table.data_ptr() != host.data_ptr():
            raise RuntimeError(f"the pinned table maps to {table.device}, not {device}")
        probe = torch.tensor([0, rows.shape[0] // 2, rows.shape[0] - 1], dtype=torch.long)
        if not torch.equal(table.index_select(0, probe.to(device)).cpu(), host[probe]):
            raise RuntimeError("the device read other bytes than the host table holds")
    except (RuntimeError, TypeError, ValueError) as e:
        log.warning("the token embedding stays a host gather (decode steps wait for the last ids): %s", e)
        return None
    return DeviceEmbedding(table, host, info.qtype, info.shape[1], info.name, device, dtype)
