"""``python -m loraprune_jax.cli``: the ``loraprune-jax`` command."""

import sys

from . import main

sys.exit(main())
