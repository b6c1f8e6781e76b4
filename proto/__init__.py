"""layerstream.proto: message types, the codec, socket addresses and socket helpers.

Imports nothing else of the project, so every process role can depend on it.
"""

from .addresses import (
    ENDPOINT_NAMES,
    IPC_PATH_MAX,
    RUN_DIR_PREFIX,
    AddressError,
    Endpoints,
    bind,
    check_connectable,
    cleanup_run_dir,
    ipc_address,
    make_endpoints,
    make_run_dir,
    tcp_address,
    temporary_run_dir,
)
from .codec import (
    BadMessageCounter,
    Decoded,
    EncodeError,
    MalformedMessage,
    ProtocolError,
    UnknownTag,
    VersionMismatch,
    decode,
    decode_extra,
    encode,
    from_wire,
    peek_tag,
    to_wire,
)
from .messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    WANT_LOGITS,
    ArenaDesc,
    AttachArena,
    ByteRange,
    Failed,
    Forward,
    ForwardDone,
    ForwardSeq,
    LayerDone,
    LayerReady,
    LayerSlot,
    LayerStaged,
    LoadLayer,
    Message,
    ReadFailed,
    Ready,
    SamplerStart,
    Shutdown,
    StatsReply,
    StatsRequest,
    StepFailed,
    Struct,
    message,
    struct,
)
from .sockets import (
    Envelope,
    make_dealer,
    make_router,
    recv_envelope,
    recv_msg,
    send_msg,
)

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("addresses", "codec", "messages", "sockets")]
