"""Where a command's table goes: stdout, or a file `-o` names (never over a study's store), with
the table's methods and notes on stderr (and under a table written to a file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def check_output(output: str, force: bool) -> None:
    """Refuse to write over a file unless forced; and ever over recorded results (a study's store,
    saved weights, anything in a study's own folders: storage.holds_results): results are never
    lost to an export."""
    from ..results import ResultsError
    from ..storage import file_in_the_way, refuse_to_lose_results

    path = Path(output)
    if path.is_dir():
        raise ResultsError(f"-o {output}: is a folder; name a file to write")
    refuse_to_lose_results(path, named=f"-o {output}")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise ResultsError(f"-o {output}: {blocking} is a file, not a folder; name a file in a "
                           "folder")
    if path.is_file() and not force:
        raise ResultsError(f"-o {output}: exists; pass --force to replace it")


def emit(frame, args: argparse.Namespace, footer: list[str] | None = None, *,
         footer_on_stdout: bool = False) -> int:
    """The table on stdout, or in the file `-o` names; `footer` (lines) follows it in the file
    where the format is the human one, "table" (CSV and JSON carry such things as columns), and
    on stdout too with `footer_on_stdout` (what the table cannot hold, not notes on it)."""
    from ..results import write_frame

    text = write_frame(frame, getattr(args, "format", "table"))
    output = getattr(args, "output", None)
    if output == "-":  # the usual name for stdout, not a file called "-"
        output = None
    if (output or footer_on_stdout) and footer and getattr(args, "format", "table") == "table":
        text = "\n".join([text.rstrip("\n"), "", *footer])
    if output:
        check_output(output, args.force)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text.rstrip("\n"))
    return 0


def emit_statistics(table, args: argparse.Namespace) -> int:
    """A table of statistics as `emit` writes it, its methods and notes under it: on stderr, and
    in a table written to a file, in the file too (a saved table keeps what its numbers mean)."""
    from ..results import footnotes

    code = emit(table, args, footer=footnotes(table))
    print_footnotes(table)
    return code


def print_footnotes(table) -> None:
    """How the table's intervals were made and what each row's note says, on stderr so that a
    table on stdout stays a table (CSV and JSON carry them as columns)."""
    from ..results import footnotes

    for line in footnotes(table):
        print(line, file=sys.stderr)
