import sys

from tvlang.faces.cli import main

sys.exit(main())
