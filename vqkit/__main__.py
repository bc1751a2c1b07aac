import sys

from vqkit.cli.main import main

sys.exit(main())
