"""`python -m niftidrop` is the `niftidrop` command."""

import sys

from niftidrop.cli import main

sys.exit(main())
