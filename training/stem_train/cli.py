"""``stem-train``: the command line of napari-stem's training toolkit.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (its options and
help) and ``run(args) -> int``; this file only assembles them and turns the project's errors into
one clear line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = (
    "demo",
    "make_demo_data",
    "prepare",
    "fit",
    "predict",
    "evaluate",
    "baseline",
    "import_reference",
    "download",
    "push",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stem-train",
        description=(
            "Train, run and evaluate Stem (conditional diffusion for spatial gene expression from H&E) "
            "on HEST-1k-layout data. Run 'stem-train COMMAND --help' for each command's options."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from napari_stem import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"stem_train.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from napari_stem.errors import StemError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except StemError as exc:
        print(f"stem-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stem-train {args.command}: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only filesystem, permissions, vanished files mid-run
        print(
            f"stem-train {args.command}: error: {describe_os_error(exc)}; nothing half-written was kept.",
            file=sys.stderr,
        )
        return 2
    except MemoryError:
        print(
            f"stem-train {args.command}: error: out of memory; use smaller --batch-size / --sample-batch-size, "
            "fewer spots or a machine with more memory. Nothing half-written was kept.",
            file=sys.stderr,
        )
        return 2


def describe_os_error(exc: OSError) -> str:
    """One line for an OS error: what failed, on which file, and the fix when there is an obvious one."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    fixes = {
        errno.ENOSPC: "free some space or write to another disk",
        errno.EROFS: "write to another filesystem",
        errno.EACCES: "check the permissions or choose another path",
        errno.EDQUOT: "free some of your quota",
    }
    fix = fixes.get(exc.errno or 0)
    return f"{exc.strerror or exc}{where}" + (f": {fix}" if fix else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
