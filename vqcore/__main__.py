import sys

from vqcore.cli import main

sys.exit(main())
