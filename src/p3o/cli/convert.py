"""`p3o convert`: turn the TL;DR or HH-RLHF schema into a standard preference JSONL file."""
from __future__ import annotations

import json
from pathlib import Path

from p3o.data.converters import CONVERTERS, convert_rows
from p3o.data.files import read_rows
from p3o.errors import UsageError
from p3o.utils.io import atomic_write_text


def add_arguments(parser) -> None:
    parser.add_argument("--format", required=True, choices=sorted(CONVERTERS),
                        help="Input schema: tldr (openai/summarize_from_feedback comparisons), hh (Anthropic/hh-rlhf, as chat "
                             "messages) or hh-text (the same in HH's plain-text layout, for models without a chat "
                             "template).")
    parser.add_argument("--input", required=True, help="A local .jsonl/.json/.parquet/.csv file or a `datasets` name.")
    parser.add_argument("--split", default="train", help="Split to read from a `datasets` source.")
    parser.add_argument("--config", default=None, help="`datasets` configuration (e.g. comparisons).")
    parser.add_argument("--output", required=True, help="The JSONL file to write (prompt, chosen, rejected).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")


def run(args) -> None:
    out = Path(args.output)
    # Checked before reading: a large dataset should not be read only to be refused.
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory; give a .jsonl file name")
    if out.exists() and Path(args.input).exists() and out.resolve() == Path(args.input).resolve():
        raise UsageError(f"--output {out} is the input file; write the converted rows to a new file")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--output {out} exists; pass --overwrite to replace it, or choose a new file name")
    rows, skipped = convert_rows(args.format, read_rows(args.input, args.split, args.config), args.input)
    if not rows:
        raise UsageError(f"no rows of {args.input} could be converted ({_describe(skipped)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False keeps non-English text readable in the file; JSONL is UTF-8 either way.
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {out}" + (f"; skipped {_describe(skipped)}" if skipped else ""))


def _describe(skipped: dict[str, list[int]]) -> str:
    """ "2 rows (empty final assistant turn: rows 3, 9)" """
    total = sum(len(numbers) for numbers in skipped.values())
    reasons = "; ".join(f"{reason}: rows {', '.join(map(str, numbers[:5]))}{', ...' if len(numbers) > 5 else ''}"
                        for reason, numbers in skipped.items())
    return f"{total} rows ({reasons})"
