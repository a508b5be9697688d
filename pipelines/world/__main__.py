"""``python -m pipelines.world build|story`` (see :mod:`pipelines.world.cli`)."""
from .cli import main

raise SystemExit(main())
