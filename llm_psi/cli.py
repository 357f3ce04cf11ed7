"""The shared argparse helpers of every command: one-line errors with exit status 2, and checked numbers."""
import argparse
import math
import sys


class UsageError(Exception):
    """Bad input found after argument parsing: one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")



def finite_number(kind=float, gt=None, ge=None, le=None):
    """argparse type: a finite `kind` (float or int), > gt, >= ge, <= le where given; no nan, inf."""
    bounds = " and ".join(f"{op} {v}" for op, v in ((">", gt), (">=", ge), ("<=", le)) if v is not None)

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (gt is None or x > gt) and (ge is None or x >= ge)
                and (le is None or x <= le)):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} {bounds}, got {text!r}")
        return x
    return parse



def checked_by(check):
    """argparse type: the stripped text, once ``check(text)`` accepted it (its ValueError is the error)."""
    def parse(text):
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text.strip()
    return parse

