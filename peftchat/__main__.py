"""`python -m peftchat`: the same command as the `peftchat` script."""

import sys

from peftchat.cli import main

sys.exit(main())
