#!/usr/bin/env python3
"""Write the model zoo table (tools/zoo.py): every registered model's params and GMACs beside the published numbers,
as docs/model_zoo.md and docs/model_zoo.csv.

Usage:
    python scripts/model_zoo.py                 # regenerate docs/model_zoo.md and docs/model_zoo.csv
    python scripts/model_zoo.py --check         # exit 1 if the committed files differ from a regeneration
"""
import argparse
import logging
import os
import sys
from pathlib import Path

from tools.zoo import DEFAULT_REFERENCE, DOC_CSV, DOC_MD, to_csv, to_markdown, zoo_rows

_logger = logging.getLogger(__name__)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    parser = argparse.ArgumentParser(description='Write the model zoo table (docs/model_zoo.md and .csv)')
    parser.add_argument('--reference', type=Path, default=DEFAULT_REFERENCE, help='paper_tables.yaml')
    parser.add_argument('--output-md', type=Path, default=DOC_MD, help='markdown output')
    parser.add_argument('--output-csv', type=Path, default=DOC_CSV, help='CSV output')
    parser.add_argument('--check', action='store_true', help='only compare with the existing files; exit 1 if stale')
    args = parser.parse_args(argv)
    if not args.reference.is_file():
        parser.error(f'--reference {args.reference} does not exist: pass the paper_tables.yaml of the reference facts')
    rows = zoo_rows(args.reference)
    outputs = {args.output_md: to_markdown(rows), args.output_csv: to_csv(rows)}
    if args.check:
        stale = [str(p) for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f'stale: {", ".join(stale)}; run python scripts/model_zoo.py', file=sys.stderr)
            return 1
        return 0
    for path, text in outputs.items():
        os.makedirs(path.parent, exist_ok=True)
        path.write_text(text)
        _logger.info(f'Wrote {path} ({len(rows)} rows)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
