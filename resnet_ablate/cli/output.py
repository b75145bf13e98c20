"""Where a command's table goes: stdout, or a file `-o` names (never over a study's store), with
the table's methods and notes on stderr (and under a table written to a file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SQLITE_MAGIC = b"SQLite format 3\x00"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a trial's kept weights, a checkpoint


def check_output(output: str, force: bool) -> None:
    """Refuse to write over a file unless forced; and ever over a SQLite database (a study's store,
    whatever the path that names it), saved weights, or into a study's own folders (kept weights,
    checkpoints): results are never lost to an export."""
    from ..results import ResultsError
    from ..storage import file_in_the_way, study_folder_holding

    path = Path(output)
    if path.is_dir():
        raise ResultsError(f"-o {output}: is a folder; name a file to write")
    study_folder = study_folder_holding(path)
    if study_folder is not None:
        raise ResultsError(f"-o {output}: lies in {study_folder}, a study's own folder (kept "
                           "weights, checkpoints); name a file outside it")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise ResultsError(f"-o {output}: {blocking} is a file, not a folder; name a file in a "
                           "folder")
    if not path.is_file():
        return  # nothing there yet, or a device such as /dev/null
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise ResultsError(f"-o {output}: cannot read it to check what it is ({error.strerror})") \
            from None
    if head == SQLITE_MAGIC:
        raise ResultsError(f"-o {output}: is a SQLite database (a study's store?); "
                           "refusing to write over it, --force or not")
    if head.startswith(ZIP_MAGIC):
        raise ResultsError(f"-o {output}: is a zip archive (saved weights?); refusing to write "
                           "over it, --force or not")
    if not force:
        raise ResultsError(f"-o {output}: exists; pass --force to replace it")


def emit(frame, args: argparse.Namespace, footer: list[str] | None = None) -> int:
    """The table on stdout, or in the file `-o` names; `footer` (lines) follows it in the file
    where the format is the human one, "table" (CSV and JSON carry such things as columns)."""
    from ..results import write_frame

    text = write_frame(frame, getattr(args, "format", "table"))
    output = getattr(args, "output", None)
    if output and footer and getattr(args, "format", "table") == "table":
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
