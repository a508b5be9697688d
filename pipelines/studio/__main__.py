import sys

from pipelines.studio.cli import main

sys.exit(main())
