"""``python -m klip_med``: the ``klip-med`` command."""

import sys

from klip_med.cli import main

sys.exit(main())
