"""`python -m mvtec_seg.report folder=<runs> [out=<folder>]`."""

import sys

from mvtec_seg.report.build import main

sys.exit(main())
