"""`python -m mvtec_seg.report <folder> [--out DIR]`."""

import sys

from mvtec_seg.report.build import main

sys.exit(main())
