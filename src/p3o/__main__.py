import sys

from p3o.cli import main

sys.exit(main())
