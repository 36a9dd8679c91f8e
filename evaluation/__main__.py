"""``python -m evaluation ...``: see ``evaluation/cli.py`` (run, merge, report, score)."""

import sys

from evaluation import pack_module

if __name__ == "__main__":
    sys.exit(pack_module("evaluation.cli").main())
