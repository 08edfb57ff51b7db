"""argparse `type=` functions for values every command checks the same way.

A bad value is then an argparse error (usage line, one error line naming the option, exit 2) before
any model is loaded or socket opened, instead of a traceback from deep inside.
"""

import argparse


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (0..65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535)")
    return port
