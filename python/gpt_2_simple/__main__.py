"""``python -m gpt_2_simple`` is the ``gpt_2_simple`` command."""

import sys

from .cli import main

sys.exit(main())
