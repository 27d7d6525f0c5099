"""``python -m kontext_train``: the same as the ``kontext-train`` command."""

import sys

from .app.cli import main

sys.exit(main())
