import sys

from qtune.cli import main

sys.exit(main())
