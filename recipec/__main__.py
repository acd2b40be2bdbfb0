import sys

from recipec.cli.main import main

sys.exit(main())
