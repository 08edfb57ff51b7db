"""Is a host name this machine? Used to decide what may travel in clear text. And a free local port.

`zhllama serve` warns when it binds a non-loopback address without an API key, and the API client
sends a key from the environment over plain http only to a loopback address. Names are not resolved
(DNS could say anything): "localhost" and loopback IP literals count, nothing else.
"""

import ipaddress
import socket


def is_loopback_host(host: str) -> bool:
    """True for "localhost" (and *.localhost), 127.0.0.0/8 and ::1, with or without [brackets]."""
    host = (host or "").strip().strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous or a test server; it may be taken later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
