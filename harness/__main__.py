"""``python -m harness`` = the ``lora-harness`` command (for hosts where it isn't installed)."""

import sys

from harness.cli import main

sys.exit(main())
