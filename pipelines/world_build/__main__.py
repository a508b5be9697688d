"""``python -m pipelines.world_build build|label`` (see :mod:`pipelines.world_build.cli`)."""
from .cli import main

raise SystemExit(main())
