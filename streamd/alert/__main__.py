import sys

from ..cli.alert import main

sys.exit(main())
