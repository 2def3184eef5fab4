import sys

from vtrio.cli import main

sys.exit(main())
