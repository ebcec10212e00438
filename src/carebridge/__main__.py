"""Run the command line with ``python -m carebridge``."""

from carebridge.cli import main

main()
