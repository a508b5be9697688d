"""The world build's profiles: ``auto`` picks by device, the chosen profile is recorded and a
build folder refuses to be resumed under another one, the ``cpu`` profile is ``full`` with
only the documented cuts (docs/world.md), and the command line rejects an unknown profile."""
import json
import subprocess
import sys

import pytest

from pipelines.world_build.build import SETTINGS, resolve_profile, run_build


def test_auto_is_full_on_a_gpu_and_cpu_without_one():
    assert resolve_profile("auto", "cpu") == "cpu"
    assert resolve_profile("auto", "cuda") == "full"
    assert resolve_profile("auto", "cuda:1") == "full"
    assert resolve_profile("quick", "cuda") == "quick"
    with pytest.raises(SystemExit, match="--profile huge: unknown; profiles: auto, full, cpu"):
        resolve_profile("huge", "cpu")


def test_cpu_profile_cuts_only_the_flux_batches_and_base_steps():
    full, cpu = SETTINGS["full"], SETTINGS["cpu"]
    assert set(full) == set(cpu) == set(SETTINGS["quick"])
    changed = {k for k in full if full[k] != cpu[k]}
    assert changed == {"vae_batch", "base_batch", "base_steps"}
    for k in ("vae_batch", "base_batch"):   # halved
        assert cpu[k] * 2 == full[k], k
    # the base takes 1.5x the steps at half the batch: it sees 3/4 of the full profile's frames
    assert cpu["base_steps"] * cpu["base_batch"] * 4 == full["base_steps"] * full["base_batch"] * 3
    # the SDXL stages are not cut (fewer steps cost the told looks and the adapter's identity)
    assert all(cpu[k] == full[k] for k in full if k.startswith("sdxl_"))


def test_profile_is_recorded_and_a_build_is_not_resumed_under_another(tmp_path, capsys):
    state = run_build(tmp_path / "b", tmp_path / "w", seed=3, device="cpu", mode="auto",
                      only=["gsa_data"], overrides={"gsa_groups": 2})
    assert state["mode"] == "cpu" and "gsa_data" in state["stages"]
    assert "[world] profile cpu on cpu" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "b" / "build.json").read_text())
    assert on_disk["mode"] == "cpu"
    with pytest.raises(SystemExit, match="profile cpu; this one is seed 3 profile quick"):
        run_build(tmp_path / "b", tmp_path / "w", seed=3, device="cpu", mode="quick",
                  only=["gsa_data"])
    # the same profile resumes: the finished stage is skipped
    run_build(tmp_path / "b", tmp_path / "w", seed=3, device="cpu", mode="cpu",
              only=["gsa_data"], overrides={"gsa_groups": 2})
    assert "stage gsa_data: done" in capsys.readouterr().out


def test_cli_refuses_an_unknown_profile_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.world_build", "build", "--out",
                        str(tmp_path), "--profile", "huge"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --profile: invalid choice: 'huge'" in r.stderr


def test_quick_is_the_quick_profile_and_not_combined_with_another(capsys):
    from pipelines.world_build.cli import build_parser

    assert build_parser().parse_args(["build", "--quick"]).profile == "quick"
    assert build_parser().parse_args(["build"]).profile == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "--quick", "--profile", "cpu"])
    assert "argument --profile: not allowed with argument --quick" in capsys.readouterr().err
