"""argparse `type=` functions for values every command checks the same way.

A bad value is then an argparse error (usage line, one error line naming the option, exit 2) before
any model is loaded or socket opened, instead of a traceback from deep inside, a NaN that silently
disables a check (`nan > 0` is False, `nan < 1` too) or a size that allocates until the machine stops.
"""

import argparse
import math


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (0..65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535)")
    return port


def int_in(lo: int, hi: int, what: str = "an integer"):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what} ({lo:,}..{hi:,})") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range for {what} ({lo:,}..{hi:,})")
        return value
    parse.__name__ = what  # argparse names the type in "invalid <name> value" messages
    return parse


def float_in(lo: float, hi: float, what: str = "a number", *, open_lo: bool = False, open_hi: bool = False):
    """An argparse type: a finite number in [lo, hi] (open at either end when asked); nan and inf never."""
    bounds = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what} in {bounds}") from None
        above = value > lo if open_lo else value >= lo
        below = value < hi if open_hi else value <= hi
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text} is out of range for {what} {bounds}")
        return value
    parse.__name__ = what
    return parse


SEED = int_in(0, 2 ** 32 - 1, "a seed")  # numpy and torch both take it
