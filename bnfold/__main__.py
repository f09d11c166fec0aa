"""``python -m bnfold`` runs the CLI."""

import sys

from bnfold.cli import main

sys.exit(main())
