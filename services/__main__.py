"""`python -m services ...` is the same as the `tuneserve` command."""

import sys

from services.cli import main

sys.exit(main())
