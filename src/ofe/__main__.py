"""``python -m ofe`` (also what ``torchrun -m ofe`` runs)."""

import sys

from ofe.cli import main

sys.exit(main())
