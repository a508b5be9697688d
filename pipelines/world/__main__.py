"""``python -m pipelines.world story|scenarios`` (see :mod:`pipelines.world.cli`)."""
from .cli import main

raise SystemExit(main())
