"""Checks of the flags every demo task shares. Standard library only, like the parsers that call them."""

import argparse
import math

from .files import output_dir_problem


def common_problem(args: argparse.Namespace) -> str | None:
    """Why --lr, --seed or --threads cannot be used, or None. (--output-dir is checked where a run starts:
    ``output_problem``, so that parsing never depends on the working folder.)"""
    if not (math.isfinite(args.lr) and args.lr > 0):
        return f"--lr must be a finite number > 0, got {args.lr}"
    if not 0 <= args.seed < 2**32:
        return f"--seed must be from 0 to 2**32 - 1 = {2**32 - 1}, got {args.seed}"
    if args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    return None


def output_problem(args: argparse.Namespace) -> str | None:
    """Why the run may not write into --output-dir (see ``files.output_dir_problem``), or None."""
    return output_dir_problem(args.output_dir, args.overwrite)
