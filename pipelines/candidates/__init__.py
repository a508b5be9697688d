"""``python -m pipelines.candidates``: K candidates per scenario from the stage-1 model.

scenarios.py reads and checks the scenarios JSON; cli.py plans, draws (GSA from each
scenario's reference cache) and writes the candidate set a person labels in the studio.
"""
from pipelines.candidates.cli import main
from pipelines.candidates.scenarios import Scenario, ScenarioError, load_scenarios

__all__ = ["main", "Scenario", "ScenarioError", "load_scenarios"]
