"""KV caches of the model's layers: on the device, in pinned host memory streamed in with their
layer, or the first layers on the device and the rest on the host."""

from __future__ import annotations

from typing import Iterable

import torch

from layerstream.compute.step_meta import StepMeta
from layerstream.loader.gguf_index import HParams


class DeviceKV:
    """KV caches in device memory: [rows, ctx, n_head_kv, head_dim] for each of `layers`."""

    def __init__(self, hp: HParams, rows: int, ctx: int, device, dtype, layers: Iterable[int] | None = None,
                 pin: bool = False):
        shape = (rows, ctx, hp.attn.n_head_kv, hp.attn.head_dim)
        ids = list(range(hp.n_layer) if layers is None else layers)
        if pin:  # host memory pinned for the copies: a tensor a layer, made pinned (no pageable copy first)
            self.k = {i: torch.zeros(shape, dtype=dtype, pin_memory=True) for i in ids}
            self.v = {i: torch.zeros(shape, dtype=dtype, pin_memory=True) for i in ids}
            return
        # one allocation (the caching allocator rounds it once; a tensor per K and V of 8 MiB took
        # 10 MiB each in its shared 20 MiB segments); each layer's K and V a contiguous view of it
        kv = torch.zeros((len(ids), 2, *shape), dtype=dtype, device=device)
        self.k = {i: kv[j, 0] for j, i in enumerate(ids)}
        self.v = {i: kv[j, 1] for j, i in enumerate(ids)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k.values(), *self.v.values()])

    def on_device(self, i: int) -> bool:
        return True

    def layer(self, i: int, meta: StepMeta):
        return self.k[i], self.v[i], meta

    def write_back(self, i: int, meta: StepMeta, k, v) -> None:
        pass

    def clear_row(self, row: int) -> None:
        """Zero a row's K and V in every layer (stepper.py, NOTE [ a row left non-finite ])."""
        for i in self.k:
            self.k[i][row].zero_()
            self.v[i][row].zero_()


class HostKV(DeviceKV):
    """KV caches in (pinned) host memory, streamed in with their layer; new entries written back.

    NOTE [ host KV on CUDA ]
    A layer's rows [:, :kv_len] are copied on a side stream into one of two device buffers, the
    next host layer's while this one computes (its buffer is reused once the attention that read
    it has run: the side stream waits on that event). New entries go back through pinned memory
    without a host synchronisation: the device-to-host copy is queued on the compute stream and
    scattered into the host cache when the layer is next needed, a step later, by which time the
    step's end (logits to the host) has waited for it.
    """

    def __init__(self, hp: HParams, rows: int, ctx: int, device, dtype, layers: Iterable[int] | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        super().__init__(hp, rows, ctx, "cpu", dtype, layers, pin=self.cuda)
        order = sorted(self.k)
        self.next_layer = dict(zip(order, order[1:]))  # host layer -> the next one (fetched ahead)
        self._meta_key = None
        if self.cuda:
            shape = (rows, ctx, hp.attn.n_head_kv, hp.attn.head_dim)
            bufs = torch.empty((2, 2, *shape), dtype=dtype, device=device)  # one allocation, as DeviceKV's
            self.bufs = [(bufs[b, 0], bufs[b, 1]) for b in range(2)]
            self.buf_free: list = [None, None]  # event: the attention that read buffer b has run
            self.next_buf = 0
            self.stream = torch.cuda.Stream(self.device)
            self.inflight: dict[int, tuple[int, object]] = {}  # layer -> (buffer, copy-done event)
            self.used: dict[int, int] = {}  # layer -> buffer it computes from this step
            self.pending: dict[int, tuple] = {}  # layer -> (event, new K, new V, rows, slots) to scatter

    def on_device(self, i: int) -> bool:
        return False

    def _local(self, meta: StepMeta):
        """The step's meta re-indexed onto a gathered [U, kv_len] cache of its U distinct rows: rows
        become 0..U-1, in order of first appearance. Sequences that share a row (the decode rows of a
        verified chunk, runner.py NOTE [ drafts verified as decode rows ]) share its gathered copy,
        so each sees the K and V the others write there."""
        if self._meta_key is not meta:
            self._meta_key = meta
            rows = meta.on_host(meta.q.rows).tolist()  # (from the step's host buffer: .cpu() waited for the device)
            self._row_list = list(dict.fromkeys(rows))
            self._rows = torch.tensor(self._row_list, dtype=torch.long)
            self._tok_row, self._tok_slot = meta.on_host(meta.tok.row), meta.on_host(meta.tok.slot)
            dev = meta.q.rows.device
            if len(self._row_list) == len(rows):
                local, tok_local = torch.arange(len(rows), device=dev), meta.tok.b
            else:
                at = {r: j for j, r in enumerate(self._row_list)}
                local = torch.tensor([at[r] for r in rows], dtype=torch.long).to(dev, non_blocking=True)
                tok_local = local.index_select(0, meta.tok.b)
            self._local_meta = meta.with_tensors({"q.rows": local, "tok.row": tok_local})
        return self._local_meta

    def _apply_pending(self, i: int) -> None:
        p = self.pending.pop(i, None)
        if p is not None:
            ev, kn, vn, rows, slots = p
            ev.synchronize()  # queued a step ago: long done
            self.k[i][rows, slots] = kn
            self.v[i][rows, slots] = vn

    def _fetch(self, i: int, L: int) -> None:
        """Queue the copy of layer i's rows [:, :L] into the next device buffer (side stream)."""
        self._apply_pending(i)
        b = self.next_buf
        self.next_buf ^= 1
        kb, vb = self.bufs[b]
        with torch.cuda.stream(self.stream):
            if self.buf_free[b] is not None:
                self.stream.wait_event(self.buf_free[b])
            for j, r in enumerate(self._row_list):  # each row's [:L] is contiguous in the host cache
                kb[j, :L].copy_(self.k[i][r, :L], non_blocking=True)
                vb[j, :L].copy_(self.v[i][r, :L], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.inflight[i] = (b, ev)

    def layer(self, i: int, meta: StepMeta):
        local = self._local(meta)
        L, B = meta.q.kv_len, len(self._row_list)
        if not self.cuda:
            return self.k[i][self._rows, :L].clone(), self.v[i][self._rows, :L].clone(), local
        if i not in self.inflight:
            self._fetch(i, L)
        b, ev = self.inflight.pop(i)
        torch.cuda.current_stream(self.device).wait_event(ev)
        self.used[i] = b
        nxt = self.next_layer.get(i)
        if nxt is not None:
            self._fetch(nxt, L)  # the next host layer's KV crosses while this one computes
        kb, vb = self.bufs[b]
        return kb[:B, :L], vb[:B, :L], local

    def write_back(self, i: int, meta: StepMeta, k, v) -> None:
        tb, ts = meta.tok.row, meta.tok.slot  # (meta is the local one: tok.row indexes the gathered rows)
        if not self.cuda:
            self.k[i][self._tok_row, self._tok_slot] = k[tb, ts]
            self.v[i][self._tok_row, self._tok_slot] = v[tb, ts]
            return
        kn = torch.empty((len(self._tok_row), *k.shape[2:]), dtype=k.dtype, pin_memory=True)
        vn = torch.empty_like(kn, pin_memory=True)
        kn.copy_(k[tb, ts], non_blocking=True)
        vn.copy_(v[tb, ts], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.pending[i] = (ev, kn, vn, self._tok_row, self._tok_slot)
        self.buf_free[self.used.pop(i)] = ev

    def clear_row(self, row: int) -> None:
        if self.cuda:
            for i in list(self.pending):  # (the last step's entries land first, then the row is zeroed)
                self._apply_pending(i)
        super().clear_row(row)


class SplitKV:
    """The first `device_layers` layers' KV on the device, the others' in host memory."""

    def __init__(self, hp: HParams, rows: int, ctx: int, device, dtype, device_layers: int):
        self.n_dev = device_layers
        self.dev = DeviceKV(hp, rows, ctx, device, dtype, range(device_layers))
        self.host = HostKV(hp, rows, ctx, device, dtype, range(device_layers, hp.n_layer))

    def nbytes(self) -> int:
        return self.dev.nbytes() + self.host.nbytes()

    def on_device(self, i: int) -> bool:
        return i < self.n_dev

    def layer(self, i: int, meta: StepMeta):
        return (self.dev if i < self.n_dev else self.host).layer(i, meta)

    def write_back(self, i: int, meta: StepMeta, k, v) -> None:
        (self.dev if i < self.n_dev else self.host).write_back(i, meta, k, v)

    def clear_row(self, row: int) -> None:
        self.dev.clear_row(row)
        self.host.clear_row(row)


def make_kv(hp: HParams, rows: int, ctx: int, device, dtype, device_layers: int):
    """KV stores for `device_layers` of the model's layers on the device, the rest on the host."""
    device_layers = max(0, min(hp.n_layer, device_layers))
    if device_layers == hp.n_layer:
        return DeviceKV(hp, rows, ctx, device, dtype)
    if device_layers == 0:
        return HostKV(hp, rows, ctx, device, dtype)
    return SplitKV(hp, rows, ctx, device, dtype, device_layers)
