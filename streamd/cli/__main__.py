"""``python -m streamd.cli ...``: the ``streamd`` command without its installed script."""

import sys

from . import main

sys.exit(main())
