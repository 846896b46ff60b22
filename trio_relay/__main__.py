"""``python -m trio_relay`` runs the ``trio-relay`` command."""

import sys

from ._cli import main

sys.exit(main())
