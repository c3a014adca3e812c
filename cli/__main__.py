import sys

from clipguard.cli.main import main

sys.exit(main())
