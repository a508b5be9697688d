"""Tests of ``python -m pipelines.train`` on the tiny offline FLUX (CPU, fp32).

What they show: overfitting a fixed batch lowers the loss; LoRA weights get gradient
through the references' path (GSA in-batch); DPO starts at exactly log 2 and never
moves the stage-1 LoRA; resuming reproduces an uninterrupted run; a 2-process gloo
run trains and saves; the saved LoRA loads with diffusers and changes the output.
Bad inputs are in tests/test_train_inputs.py.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import flow_matching as L
from pipelines.train import cli as T
from pipelines.train import model as M
from pipelines.tiny import get_tiny_flux

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return get_tiny_flux(os.environ.get("STORYATTN_TINY_DIR") or tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def stage1(tiny_flux, tmp_path_factory):
    """A short stage gsa run shared by the DPO / loading tests."""
    out = tmp_path_factory.mktemp("stage1")
    tr = run_trainer(["--stage", "gsa", "--model", tiny_flux, "--data", "synthetic",
                      "--output-dir", str(out),
                      "--max-steps", "3", "--checkpoint-every", "0", "--learning-rate", "1e-3"])
    return out, tr


def run_trainer(argv):
    args = T.resolve_args(T.build_parser().parse_args(argv))
    tr = T.Trainer(args)
    tr.result = tr.run()
    return tr


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _tiny_transformer(tiny_flux, adapter="gsa", rank=4):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    tr.requires_grad_(False)
    M.add_trainable_lora(tr, adapter, rank)
    M.activate_adapters(tr, [adapter], trainable=adapter)
    return tr


def _group_batch(G, seed=0, L_img=64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(G, L_img, 64, generator=g)
    noise = torch.randn(1, L_img, 64, generator=g)
    text = torch.randn(G, 32, 32, generator=g)
    pooled = torch.randn(G, 32, generator=g)
    return x0, noise, text, pooled


def _gsa_loss(tr, gsa, x0, noise, text, pooled, sigma_t, G):
    ids = M.image_ids(16, 16, "cpu", torch.float32)
    packed = x0.clone()
    packed[0:1] = L.add_noise(x0[0:1], noise, sigma_t)
    sigma = torch.zeros(G)
    sigma[0] = sigma_t[0]
    ctx = gsa.in_batch(group_size=G, num_targets=1) if gsa is not None else _null()
    with ctx:
        pred = M.flux_forward(tr, packed, text, pooled, sigma, ids, 1.0)
    return L.flow_matching_errors(pred[0:1], x0[0:1], noise).mean()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_lora_targets_exact_modules(tiny_flux):
    tr = _tiny_transformer(tiny_flux)
    names = set(M.lora_module_names(tr, "gsa"))
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
              "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2"]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
    want = {f"transformer_blocks.{i}.{n}" for i in range(2) for n in double}
    want |= {f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in single}
    assert names == want
    assert "proj_out" not in names and not any("norm" in n for n in names)
    # B zero-initialised: the adapter starts as the identity
    assert all(float(p.detach().abs().max()) == 0 for n, p in M.adapter_params(tr, "gsa").items()
               if "lora_B" in n)
    assert all(p.dtype == torch.float32 and p.requires_grad
               for p in M.adapter_params(tr, "gsa").values())
    assert not any(p.requires_grad for n, p in tr.named_parameters() if ".gsa." not in n)


def test_overfit_fixed_batch(tiny_flux):
    """One fixed group (target + 2 references), fixed noise and sigma: the loss must
    fall a lot.  The tiny model's output layer (not LoRA-trained) maps 32 features to
    64 channels, so latents and noise are drawn inside its range to make the batch
    fittable at all."""
    from storyattn import GroupSharedAttention

    torch.manual_seed(0)
    tr = _tiny_transformer(tiny_flux, rank=8)
    gsa = GroupSharedAttention(tr)
    G = 3
    g = torch.Generator().manual_seed(0)
    W, b = tr.proj_out.weight.detach(), tr.proj_out.bias.detach()

    def latents(n):
        z = torch.randn(n, 64, 32, generator=g) @ W.T
        return z / z.std()

    x0, noise = latents(G), latents(1) + b
    text, pooled = torch.randn(G, 32, 32, generator=g), torch.randn(G, 32, generator=g)
    sigma_t = torch.tensor([0.6])
    opt = torch.optim.AdamW(M.trainable_parameters(tr), lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = _gsa_loss(tr, gsa, x0, noise, text, pooled, sigma_t, G)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gsa.remove()
    assert losses[-1] < 0.5 * losses[0], losses


def test_lora_gradient_through_references(tiny_flux):
    """The LoRA delta is masked to zero on the target row, so the target's loss can
    only reach the LoRA weights through the references' keys/values.  In GSA
    in-batch mode they get gradient; with the stock processor (no sharing) none."""
    from storyattn import GroupSharedAttention

    torch.manual_seed(0)
    tr = _tiny_transformer(tiny_flux)
    with torch.no_grad():                      # non-zero B so every LoRA path is live
        for n, p in M.adapter_params(tr, "gsa").items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    G = 3
    mask = torch.tensor([0.0, 1.0, 1.0]).view(G, 1, 1)   # row 0 = target
    hooks = []
    for name in M.lora_module_names(tr, "gsa"):
        lora_b = tr.get_submodule(name).lora_B["gsa"]
        hooks.append(lora_b.register_forward_hook(lambda m, i, o: o * mask.to(o.dtype)))
    x0, noise, text, pooled = _group_batch(G, seed=1)
    sigma_t = torch.tensor([0.5])
    params = M.adapter_params(tr, "gsa")

    def grads(gsa):
        for p in params.values():
            p.grad = None
        _gsa_loss(tr, gsa, x0, noise, text, pooled, sigma_t, G).backward()
        return {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
                for n, p in params.items()}

    no_share = grads(None)
    assert sum(no_share.values()) == 0.0
    gsa = GroupSharedAttention(tr)
    shared = grads(gsa)
    gsa.remove()
    # the references' own k/v projections (image stream) carry gradient to the target
    for blk in ("transformer_blocks.0", "single_transformer_blocks.1"):
        for proj in ("to_k", "to_v"):
            key = f"{blk}.attn.{proj}.lora_B.gsa.weight"
            assert shared[key] > 0, key
    assert sum(1 for v in shared.values() if v > 0) > len(shared) // 2
    for h in hooks:
        h.remove()


def test_gsa_cli_trains_and_lora_loads(tiny_flux, stage1):
    from diffusers import FluxPipeline

    out, tr = stage1
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and "lr" in r for r in rows)
    lora = out / "pytorch_lora_weights.safetensors"
    assert lora.is_file()

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 64, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(1, 32, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
              img_ids=M.image_ids(16, 16, "cpu", torch.float32), txt_ids=torch.zeros(32, 3),
              guidance=torch.tensor([1.0]), return_dict=False)
    with torch.no_grad():
        base = t(hidden_states=x, **kw)[0]
        pipe.load_lora_weights(str(out), adapter_name="gsa")
        assert len(M.lora_module_names(t, "gsa")) == 34
        with_lora = t(hidden_states=x, **kw)[0]
    assert (with_lora - base).abs().max() > 1e-4
    # the saved weights are the trained ones
    trained = M.lora_state_dict(tr.acc.unwrap_model(tr.model), "gsa")
    loaded = M.lora_state_dict(t, "gsa")
    assert set(trained) == set(loaded)
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)


# the test's own pipe loads both adapters (gsa + dpo) on purpose; the trainer's do not warn
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_dpo_starts_at_log2_and_stage1_stays_frozen(tiny_flux, stage1, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    s1_out, _ = stage1
    out = tmp_path / "dpo"
    tr = run_trainer(["--stage", "dpo", "--model", tiny_flux, "--data", "synthetic",
                      "--stage1-lora", str(s1_out),
                      "--output-dir", str(out), "--max-steps", "3", "--checkpoint-every", "0",
                      "--learning-rate", "1e-3", "--beta", "500"])
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-9)
    assert rows[0]["err_w"] == rows[0]["err_w_ref"] and rows[0]["err_l"] == rows[0]["err_l_ref"]
    for key in ("implicit_acc", "err_w", "err_l", "err_w_ref", "err_l_ref"):
        assert key in rows[0]
    assert rows[-1]["loss"] != rows[0]["loss"]

    model = tr.acc.unwrap_model(tr.model)
    # stage-1 weights: bit-identical to the file, frozen, no grad
    file_sd = {k[len("transformer."):]: v for k, v in
               load_file(str(s1_out / "pytorch_lora_weights.safetensors")).items()}
    now = M.lora_state_dict(model, "gsa")
    assert set(now) == set(file_sd)
    assert all(torch.equal(now[k], file_sd[k].to(now[k].dtype)) for k in now)
    assert not any(p.requires_grad for p in M.adapter_params(model, "gsa").values())
    assert all(p.requires_grad for p in M.adapter_params(model, "dpo").values())
    # the DPO adapter moved
    dpo_b = [p for n, p in M.adapter_params(model, "dpo").items() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in dpo_b) > 0

    # both adapters load together with diffusers
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(str(s1_out), adapter_name="gsa")
    pipe.load_lora_weights(str(out), adapter_name="dpo")
    pipe.set_adapters(["gsa", "dpo"], adapter_weights=[1.0, 1.0])
    assert len(M.lora_module_names(pipe.transformer, "dpo")) == 34


def test_resume_reproduces_uninterrupted_run(tiny_flux, tmp_path):
    common = ["--stage", "gsa", "--model", tiny_flux, "--data", "synthetic", "--num-refs", "2",
              "--batch-size", "2",
              "--learning-rate", "1e-3", "--checkpoint-every", "2", "--seed", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_trainer(common + ["--output-dir", str(full), "--max-steps", "4"])
    run_trainer(common + ["--output-dir", str(part), "--max-steps", "2"])
    tr = run_trainer(common + ["--output-dir", str(part), "--max-steps", "4", "--resume", "latest"])
    assert tr.result["start"] == 2
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    from safetensors.torch import load_file

    fa = load_file(str(full / "pytorch_lora_weights.safetensors"))
    fb = load_file(str(part / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run(tiny_flux, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "pipelines.train", "--stage", "gsa", "--cpu",
           "--model", tiny_flux, "--data", "synthetic", "--output-dir", str(out),
           "--max-steps", "2", "--checkpoint-every", "0"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 processes" in res.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["processes_in_sync"] is True
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()


def test_dpo_loss_formula():
    e_w, e_l = torch.tensor([0.5, 0.2], dtype=torch.float64), torch.tensor([0.4, 0.3],
                                                                              dtype=torch.float64)
    loss, stats = L.dpo_loss(e_w, e_l, e_w.clone(), e_l.clone(), beta=100.0)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-12)
    e_w_ref, e_l_ref = torch.tensor([0.6, 0.2]), torch.tensor([0.4, 0.35])
    loss, stats = L.dpo_loss(e_w, e_l, e_w_ref.double(), e_l_ref.double(), beta=10.0)
    m = (e_w - e_w_ref.double()) - (e_l - e_l_ref.double())
    want = -torch.nn.functional.logsigmoid(-5.0 * m).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    assert stats["implicit_acc"] == 0.5


def test_cached_latents_match_on_the_fly(tiny_flux, tmp_path):
    common = ["--stage", "gsa", "--model", tiny_flux, "--data", "synthetic", "--max-steps", "2",
              "--checkpoint-every", "0"]
    run_trainer(common + ["--output-dir", str(tmp_path / "a")])
    tr = run_trainer(common + ["--output-dir", str(tmp_path / "b"), "--cache-latents"])
    assert len(tr.latent_cache) == 12 and tr.vae is None
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


def test_tiny_preset_runs_say_synthetic(tmp_path):
    """``python -m pipelines.train --stage dpo --model tiny`` with nothing else: the random
    tiny model, synthetic data, a short stage-1 run first, all announced; LoRAs land in
    outputs/.  (Without --model the committed world model is the default:
    tests/test_train_defaults.py.)"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "pipelines.train", "--stage", "dpo", "--model",
                          "tiny", "--max-steps", "2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for msg in ("--model tiny: the tiny FLUX built offline with random weights",
                "no --data given: a synthetic dpo dataset",
                "no --stage1-lora given: training a short stage gsa",
                "--data synthetic: a synthetic gsa dataset", "CPU -> fp32"):
        assert msg in res.stdout, msg
    out = tmp_path / "outputs" / "train_dpo"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "stage1" / "pytorch_lora_weights.safetensors").is_file()
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(math.log(2))


def _layout_data(root, with_regions=True):
    """Two characters (red / blue squares) and their reference images; frames of one or both,
    each naming its characters' references, with their boxes when ``with_regions``."""
    from PIL import Image

    def img(name, spots):
        a = np.full((32, 32, 3), 200, np.uint8)
        for x0, colour in spots:
            a[8:28, x0:x0 + 12] = colour
        Image.fromarray(a).save(root / name)

    red, blue = (220, 30, 30), (30, 60, 230)
    root.mkdir(parents=True, exist_ok=True)
    img("ref_r.png", [(10, red)])
    img("ref_b.png", [(10, blue)])
    img("duo.png", [(2, red), (18, blue)])
    img("solo.png", [(18, blue)])
    left, right = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]
    lines = [{"file_name": "ref_r.png", "text": "Rex", "group": "g"},
             {"file_name": "ref_b.png", "text": "Bo", "group": "g"},
             {"file_name": "duo.png", "text": "Rex left and Bo right", "group": "g",
              "references": ["ref_r.png", "ref_b.png"], "regions": [left, right]},
             {"file_name": "solo.png", "text": "Bo right", "group": "g",
              "references": ["ref_b.png"], "regions": [right]}]
    for l in lines:
        if not with_regions:
            l.pop("regions", None)
    (root / "metadata.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return root


def test_gsa_training_with_regions(tiny_flux, tmp_path):
    """Lines with ``regions`` train through regional in-batch GSA: a line naming one
    reference under --num-refs 2 reads just it (the second slot is absent: no token reads it),
    a two-character line reads each reference inside its box, and the regions change the
    loss (they reach the forward)."""
    from pipelines.train.steps import ABSENT

    def train(data, out):
        return run_trainer(["--stage", "gsa", "--model", tiny_flux, "--data", str(data),
                            "--output-dir", str(out), "--num-refs", "2", "--batch-size", "4",
                            "--max-steps", "2", "--checkpoint-every", "0", "--resolution", "32",
                            "--caption-dropout", "0"])

    tr = train(_layout_data(tmp_path / "layout"), tmp_path / "out")
    losses = [r["loss"] for r in metrics(tmp_path / "out")]
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    ds = tr.ds
    names = {p.name: i for i, p in enumerate(ds.paths)}
    rows, _, layouts = tr._gsa_batch(0)
    seen = set()
    for t in range(len(layouts)):
        target, refs, lay = rows[3 * t], rows[3 * t + 1:3 * t + 3], layouts[t]
        if ds.paths[target].name == "solo.png":
            assert refs == [names["ref_b.png"]] * 2 and lay == [(0.5, 0.0, 1.0, 1.0), ABSENT]
        elif ds.paths[target].name == "duo.png":
            assert refs == [names["ref_r.png"], names["ref_b.png"]]
            assert lay == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
        else:
            assert lay is None
        seen.add(ds.paths[target].name)
    masks = tr._ref_regions(layouts, 16)                       # a 4 x 4 token grid
    for t, lay in enumerate(layouts):
        if lay is not None and lay[1] is ABSENT:
            assert not masks[t, 1].any() and masks[t, 0].all()
        elif lay is not None:
            assert masks[t, 0].view(4, 4)[:, :2].all() and not masks[t, 0].view(4, 4)[:, 2:].any()
        else:
            assert masks[t].all()
    tr2 = train(_layout_data(tmp_path / "plain", with_regions=False), tmp_path / "out2")
    assert tr2._gsa_batch(0)[2] is None
    assert abs(metrics(tmp_path / "out2")[0]["loss"] - losses[0]) > 1e-7


def test_regions_in_training_data_are_checked(tmp_path):
    from pipelines.train import data as D

    root = _layout_data(tmp_path / "d")
    lines = [json.loads(l) for l in (root / "metadata.jsonl").read_text().splitlines()]
    lines[2]["regions"] = [[0.0, 0.0, 0.5, 1.0]]
    (root / "metadata.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    with pytest.raises(D.DataError, match="'regions' must be a list of 2 entries"):
        D.load_story_groups(root)
    lines[2]["regions"] = [[0.0, 0.0, 0.5, 1.0], [0.7, 0.0, 0.5, 1.0]]
    (root / "metadata.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    with pytest.raises(D.DataError, match=r"region \[0.7, 0.0, 0.5, 1.0\] is not"):
        D.load_story_groups(root)
    lines[0]["regions"] = [None]
    lines[2].pop("regions")
    (root / "metadata.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    with pytest.raises(D.DataError, match="'regions' needs 'references'"):
        D.load_story_groups(root)


def test_dpo_training_with_regions(tiny_flux, stage1, tmp_path):
    """Pools with ``regions`` (the layout candidates were drawn with): winner and loser read
    each reference inside its box, a one-reference pool under --num-refs 2 reads just it (the
    second slot absent), and the boxes reach the forward (the first loss differs from the same
    pools without them)."""
    from pipelines.train.steps import ABSENT

    root = _layout_data(tmp_path / "d")
    left, right = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]
    pools = [{"scenario": "duo", "prompt": "Rex left and Bo right",
              "references": ["ref_r.png", "ref_b.png"], "regions": [left, right],
              "winners": ["duo.png"], "losers": ["solo.png"]},
             {"scenario": "solo", "prompt": "Bo right", "references": ["ref_b.png"],
              "regions": [right], "winners": ["solo.png"], "losers": ["duo.png"]}]

    def train(lines, out):
        (root / "pairs.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
        return run_trainer(["--stage", "dpo", "--model", tiny_flux, "--data", str(root),
                            "--stage1-lora", str(stage1[0]), "--output-dir", str(out),
                            "--num-refs", "2", "--batch-size", "2", "--max-steps", "2",
                            "--checkpoint-every", "0", "--resolution", "32"])

    tr = train(pools, tmp_path / "out")
    rows, _, layouts = tr._dpo_batch(0)
    names = {p: p.name for p in tr.path_index}
    by_name = {v: k for k, v in names.items()}
    assert len(layouts) == 4                                # 2 pairs x (winner, loser)
    for g in range(2):
        w, l, *refs = rows[4 * g:4 * g + 4]
        assert layouts[2 * g] == layouts[2 * g + 1]
        if tr.path_index[by_name["duo.png"]] == w:
            assert refs == [tr.path_index[by_name["ref_r.png"]], tr.path_index[by_name["ref_b.png"]]]
            assert layouts[2 * g] == [tuple(left), tuple(right)]
        else:
            assert refs == [tr.path_index[by_name["ref_b.png"]]] * 2
            assert layouts[2 * g] == [tuple(right), ABSENT]
    masks = tr._ref_regions(layouts, 4)                      # a 2 x 2 token grid
    assert masks.shape == (4, 2, 4)
    first = [r["loss"] for r in metrics(tmp_path / "out")]
    assert all(math.isfinite(x) for x in first)
    plain = [{k: v for k, v in p.items() if k != "regions"} for p in pools]
    tr2 = train(plain, tmp_path / "out2")
    assert tr2._dpo_batch(0)[2] is None
    assert metrics(tmp_path / "out2")[0]["implicit_acc"] is not None
    # same pairs, noise and weights: only the boxes differ, so the reference model's errors do
    a, b = metrics(tmp_path / "out")[0], metrics(tmp_path / "out2")[0]
    assert abs(a["err_w_ref"] - b["err_w_ref"]) > 1e-9
