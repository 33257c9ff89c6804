import sys

from trb.cli import main

sys.exit(main())
