"""argparse `type=` functions for values every command checks the same way.

A bad value is then an argparse error (usage line, one error line naming the option, exit 2) before
any model is loaded or socket opened, instead of a traceback from deep inside, a NaN that silently
disables a check (`nan > 0` is False, `nan < 1` too) or a size that allocates until the machine stops.
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


def int_range(low: int, high: int):
    """A `type=` for a whole number in low..high (a limit: neither negative nor absurd)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number ({low}..{high})") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value}: expected a whole number at least {low} and at most {high}")
        return value
    return parse


def float_range(low: float, high: float, *, above_low: bool = False):
    """A `type=` for a finite number in low..high (more than `low` with `above_low`): nan and inf are
    refused, so `--timeout nan` cannot slip past a `<= 0` check."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        inside = (low < value if above_low else low <= value) and value <= high     # false for nan
        if not inside:
            lower = f"more than {low:g}" if above_low else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"{text}: expected a number {lower} and at most {high:g}")
        return value
    return parse


SEED = int_range(0, 2 ** 32 - 1)  # numpy and torch both take it
