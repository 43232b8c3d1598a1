"""`python -m irmiddleware` is the `irmiddleware` command."""

import sys

from irmiddleware._cli import main

sys.exit(main())
