"""`python -m resnet_ablate ...` is the `resnet-ablate` command."""

import sys

from .cli import main

sys.exit(main())
