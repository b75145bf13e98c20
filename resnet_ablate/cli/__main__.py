"""`python -m resnet_ablate.cli ...` is the `resnet-ablate` command."""

import sys

from .entry import main

sys.exit(main())
