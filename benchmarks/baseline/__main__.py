import sys

from benchmarks.baseline.server import main

sys.exit(main())
