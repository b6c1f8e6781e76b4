"""layerstream.proto: message types, the codec, socket addresses and socket helpers.

Imports nothing else of the project, so every process role can depend on it. Its names load with
their module on first use (PEP 562): `proto.signals`, which the launchers import first of all,
must not wait for zmq and the codec (NOTE [ stopped while it starts ] in coordinator/early_signals.py).
"""

from __future__ import annotations

import importlib

_NAMES = {
    "addresses": ("ENDPOINT_NAMES", "IPC_PATH_MAX", "RUN_DIR_PREFIX", "AddressError", "Endpoints", "bind",
                  "check_connectable", "cleanup_run_dir", "ipc_address", "make_endpoints", "make_run_dir",
                  "tcp_address", "temporary_run_dir"),
    "codec": ("BadMessageCounter", "Decoded", "EncodeError", "MalformedMessage", "ProtocolError", "UnknownTag",
              "VersionMismatch", "decode", "decode_extra", "encode", "from_wire", "peek_tag", "to_wire"),
    "messages": ("MESSAGE_TYPES", "PROTOCOL_VERSION", "WANT_LOGITS", "ArenaDesc", "AttachArena", "ByteRange",
                 "Failed", "Forward", "ForwardDone", "ForwardSeq", "LayerDone", "LayerReady", "LayerSlot",
                 "LayerStaged", "LoadLayer", "Message", "ReadFailed", "Ready", "SamplerStart", "Shutdown",
                 "StatsReply", "StatsRequest", "StepFailed", "Struct", "message", "struct"),
    "sockets": ("Envelope", "make_dealer", "make_router", "recv_envelope", "recv_msg", "send_msg"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # (found directly from now on)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
