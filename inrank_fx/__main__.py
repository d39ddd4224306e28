import sys

from inrank_fx.cli import main

sys.exit(main())
