import sys

from pipelines.candidates.cli import main

sys.exit(main())
