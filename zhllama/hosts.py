"""Is a host name this machine? Used to decide what may travel in clear text. And a free local port.

`zhllama serve` warns when it binds a non-loopback address without an API key, and the API client
sends a key from the environment over plain http only to a loopback address. Names are not resolved
(DNS could say anything): "localhost" and loopback IP literals count, nothing else. `free_port` picks a
port on the loopback address for a process group's MASTER_PORT (a world of one, tests).
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
    """A TCP port free on 127.0.0.1 right now (the OS picks it), e.g. for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
