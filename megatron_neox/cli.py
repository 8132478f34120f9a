"""Argument types shared by the command-line tools."""
import argparse
import math


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (float() accepts 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    return value
