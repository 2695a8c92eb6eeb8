import sys

from jei_edge.cli import main

sys.exit(main())
