"""The ``cellkit`` command: a thin layer over the package. Bad input ends with a one-line reason.

Examples
--------
cellkit data list
cellkit data fetch pbc
cellkit run-notebooks --profile smoke --only 01
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_BAD_INPUT = 2


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in epilogs on their own lines."""


def _add_command(subparsers: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
                 help_text: str, example: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}", formatter_class=_Formatter
    )
    parser.set_defaults(handler=handler)
    return parser


# --- cellkit data ------------------------------------------------------------------------------------


def _data_list(args: argparse.Namespace) -> int:
    from cellkit import datasets

    for entry in datasets.REGISTRY.values():
        folder = datasets.locate(entry.name)
        where = str(folder) if folder else f"not found (get it with: cellkit data fetch {entry.fetch_name})"
        print(f"{entry.name}: {entry.title}")
        print(f"  found:    {where}")
        print(f"  licence:  {entry.licence}")
        print(f"  source:   {entry.source_url}")
        print(f"  cite:     {entry.citation}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from cellkit import datasets

    missing = [entry for entry in datasets.REGISTRY.values() if datasets.locate(entry.name) is None]
    for entry in datasets.REGISTRY.values():
        print(f"{entry.name}: {datasets.locate(entry.name) or 'MISSING'}")
    if missing:
        names = " ".join(sorted({e.fetch_name for e in missing}))
        print(
            f"error: real data missing ({', '.join(e.name for e in missing)}); set CELLKIT_DATA_DIR to a folder "
            f"that holds them or run `cellkit data fetch {names}`",
            file=sys.stderr,
        )
        return 1
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cellkit.datasets import fetch

    dest = Path(args.dest) if args.dest else None
    for name in args.names:
        for folder in fetch.fetch(name, dest_dir=dest, progress=not args.quiet, mirror=args.mirror):
            print(f"{name}: built {folder}")
    return 0


# --- cellkit run-notebooks ---------------------------------------------------------------------------


def _run_notebooks(args: argparse.Namespace) -> int:
    from cellkit import notebooks

    paths = notebooks.notebook_paths(args.only)
    print(f"running {len(paths)} notebook(s) in the {args.profile!r} profile")
    results = []
    for path in paths:
        print(f"--> {path.name}", flush=True)
        result = notebooks.run_notebook(path, args.profile, progress=not args.quiet, timeout=args.cell_timeout)
        status = "ok" if result.ok else f"FAILED ({result.error})"
        print(f"<-- {path.name}: {status} in {result.seconds:.1f} s; executed copy: {result.output}", flush=True)
        results.append(result)
    print("\nnotebook                                   seconds  status")
    for result in results:
        print(f"{result.notebook:<42} {result.seconds:>7.1f}  {'ok' if result.ok else 'FAILED'}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"error: {len(failed)} notebook(s) failed: {', '.join(r.notebook for r in failed)}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from cellkit import notebooks

    if args.write:
        print(f"wrote the results table into {notebooks.write_results_table()}")
    else:
        print(notebooks.results_table())
    return 0


# --- the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from cellkit import __version__
    from cellkit.notebooks import PROFILES

    parser = argparse.ArgumentParser(
        prog="cellkit",
        description="Deep learning for cell microscopy images: data, notebooks, models on your own images.",
        epilog=(
            "examples:\n  cellkit data list\n  cellkit data fetch pbc\n"
            "  cellkit run-notebooks --profile smoke --only 01"
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"cellkit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    data = commands.add_parser(
        "data", help="list, check and fetch the datasets", description="List, check and fetch the datasets.",
        epilog="examples:\n  cellkit data list\n  cellkit data fetch pbc dsb2018", formatter_class=_Formatter,
    )
    data_commands = data.add_subparsers(title="data commands", metavar="ACTION", required=True)
    _add_command(data_commands, "list", _data_list, "show each dataset, where it was found, its licence and citation",
                 "cellkit data list")
    _add_command(data_commands, "check", _data_check, "exit non-zero unless every dataset is found",
                 "CELLKIT_DATA_DIR=/path/to/data cellkit data check")
    fetch = _add_command(data_commands, "fetch", _data_fetch,
                         "download the public originals and build the project's layout (checksums, resumable)",
                         "cellkit data fetch pbc dsb2018")
    fetch.add_argument("names", nargs="+", choices=["pbc", "dsb2018"], help="what to fetch")
    fetch.add_argument("--dest", help="folder to build into (default: the project's data/ folder)")
    fetch.add_argument("--mirror", help="base URL of a mirror that serves the same file names")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")

    run = _add_command(commands, "run-notebooks", _run_notebooks,
                       "execute the numbered notebooks with papermill; writes figures/ and metrics.json",
                       "cellkit run-notebooks --profile smoke --only 01 02")
    run.add_argument("--profile", choices=PROFILES, default="default", help="parameter profile (default: default)")
    run.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers or stems to run (default: all)")
    run.add_argument("--cell-timeout", type=int, default=None, help="seconds one cell may take (default: no limit)")
    run.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    report = _add_command(commands, "report", _report,
                          "the README results table from figures/*/metrics.json and notebooks/results.yml",
                          "cellkit report --write")
    report.add_argument("--write", action="store_true", help="replace the table in README.md (default: print it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellkit`` console script; returns the exit status."""
    from cellkit.datasets import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
