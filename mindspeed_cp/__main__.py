"""``python -m mindspeed_cp`` = the ``mindspeed-cp`` command."""

import sys

from .tools.cli import main

sys.exit(main())
