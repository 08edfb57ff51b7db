"""Is a host this machine? Used to decide what may travel in clear text. And a free local port.

`zhllama serve` warns when it listens on a non-loopback address without an API key, and the API client
sends a key from the environment over plain http only to a loopback address. A name is resolved, and
counts as this machine only when every address it resolves to is a loopback address: "localhost" is
usually 127.0.0.1, but a name ending in ".localhost" is whatever the resolver says (RFC 6761 asks
resolvers to keep such names on this machine; not every resolver does). `loopback_addresses` returns
the addresses, so a caller can connect to exactly the address it checked (the name is not resolved a
second time, when DNS could answer otherwise). `free_port` picks a port on the loopback address for a
process group's MASTER_PORT (a world of one, tests).
"""

import ipaddress
import socket


def _loopback_ip(text: str) -> bool:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)          # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def loopback_addresses(host: str, resolve=None) -> list:
    """The addresses `host` (a name or an IP literal, with or without [brackets]) stands for, when all
    of them are loopback addresses (127.0.0.0/8, ::1); [] when any is not, or the name does not
    resolve. `resolve` has `socket.getaddrinfo`'s signature (the default: that, looked up when called)."""
    host = (host or "").strip().strip("[]").rstrip(".").lower()
    if not host:
        return []
    try:
        return [host] if _loopback_ip(host) else []
    except ValueError:
        pass                                             # a name, not an IP literal
    try:
        infos = (resolve or socket.getaddrinfo)(host, None, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError):                      # gaierror, or a name IDNA cannot encode
        return []
    addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
    try:
        return addrs if addrs and all(_loopback_ip(a) for a in addrs) else []
    except ValueError:
        return []


def is_loopback_host(host: str, resolve=None) -> bool:
    """True when `host` is this machine: every address it resolves to is a loopback address."""
    return bool(loopback_addresses(host, resolve))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it), e.g. for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
