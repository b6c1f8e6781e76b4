"""The server's listening socket, bound before the model loads or any process starts: a port in use
is one line at once. Standard library only, so that the launcher binds it before its children are
spawned (NOTE [ warm starts ] in supervisor.py) and before torch's import."""

from __future__ import annotations

import socket

from layerstream.errors import ConfigError


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn to listen on, made before the model loads: a port in use
    or a host that does not resolve is one line at once (ConfigError), and --port 0 gets its port."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"--host {host}: cannot listen there ({getattr(e, 'strerror', None) or e}); "
                          "give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                          "stop what holds it or give another --port") from None
    return sock
