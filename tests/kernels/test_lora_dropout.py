"""LoRA dropout drawn inside the LoRA matmuls (peftchat.kernels.lora_dropout).

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports triton), in fp32: the interpreter's bf16 arithmetic is
not the GPU's. The GPU measured them once (benchmarks/HISTORY.md: same-mask error and ms per layer).
"""

import pytest
import torch

from peftchat.kernels import frozen_linear, lora_dropout

triton = pytest.importorskip("triton")


def test_threshold_and_scale_keep_the_expectation():
    assert lora_dropout.threshold(0.05) == 3277
    p_eff = 3277 / 65536
    assert lora_dropout.keep_scale(0.05) == pytest.approx(1 / (1 - p_eff))
    assert lora_dropout.threshold(1e-9) == 1 and lora_dropout.threshold(0.999999) == 65535


def test_usable_only_where_the_kernels_apply(monkeypatch):
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    a = torch.zeros(16, 64, dtype=torch.bfloat16)
    assert not lora_dropout.usable(x, a, 0.05)  # CPU
    monkeypatch.setattr(lora_dropout, "available", lambda device: True)
    assert lora_dropout.usable(x, a, 0.05)
    assert not lora_dropout.usable(x, a, 0.0)
    assert not lora_dropout.usable(x.float(), a.float(), 0.05)  # fp32 keeps torch's dropout
    assert not lora_dropout.usable(torch.zeros(4, 60, dtype=torch.bfloat16), a[:, :60], 0.05)  # K % 8
    assert not lora_dropout.usable(x.t().contiguous().t(), a, 0.05)


def _seed(s: int) -> int:
    return lora_dropout.SEED_TAG | s


@pytest.mark.parametrize(
    "m,k,r,tiles",
    [
        (96, 256, 16, None),
        (70, 136, 8, None),
        (40, 64, 16, None),  # ragged M, K off the tile, one row split
        (96, 256, 16, lora_dropout.Tiles(bm=32, bk=64, warps=2, stages=2)),  # kernels tiled unlike the mask
        (70, 200, 16, lora_dropout.Tiles(bm=16, bk=32, warps=4, stages=4)),  # the smallest tiles, K off the tile
    ],
)
def test_kernels_match_a_torch_reference_with_the_same_mask(m, k, r, tiles):
    torch.manual_seed(0)
    x, a, g = torch.randn(m, k), torch.randn(r, k) * 0.1, torch.randn(m, r)
    p, seed = 0.25, _seed(42)
    keep = lora_dropout.keep_mask(seed, m, k, p)
    dropped = x * keep * lora_dropout.keep_scale(p)
    t = dict(tiles=tiles)
    torch.testing.assert_close(lora_dropout.down(x, a, seed, p, **t), dropped @ a.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_dropout.grad_a(x, g, seed, p, **t), g.t() @ dropped, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        lora_dropout.grad_input(g, a, seed, p, **t), (g @ a) * keep * lora_dropout.keep_scale(p), rtol=1e-5, atol=1e-5
    )
    # the LoRA scaling multiplied in by the kernels (frozen_linear passes it; no kernel of its own)
    torch.testing.assert_close(lora_dropout.down(x, a, seed, p, scale=2.5), 2.5 * dropped @ a.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        lora_dropout.grad_a(x, g, seed, p, scale=2.5), 2.5 * g.t() @ dropped, rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(
        lora_dropout.grad_input(g, a, seed, p, scale=2.5),
        2.5 * (g @ a) * keep * lora_dropout.keep_scale(p),
        rtol=1e-5,
        atol=1e-5,
    )


def test_mask_depends_on_seed_and_place_not_on_tiles():
    m, k, p = 64, 256, 0.3
    keep = lora_dropout.keep_mask(_seed(7), m, k, p)
    assert torch.equal(lora_dropout.keep_mask(_seed(7), m, k, p, lora_dropout.Tiles(bm=32, bk=64)), keep)
    assert torch.equal(lora_dropout.keep_mask(_seed(7), m, k, p, joined=True), keep)  # grad_input's way
    other = lora_dropout.keep_mask(_seed(8), m, k, p)
    assert 0.5 < (other == keep).float().mean() < 0.7  # independent draws: 0.3² + 0.7² = 0.58 agree


class _FakeCudaGenerator:
    def __init__(self) -> None:
        self.offset = 8

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset

    def initial_seed(self) -> int:
        return 1234


def test_cuda_seed_comes_from_the_generator_offset_without_device_work(monkeypatch):
    """On CUDA the seed is the generator's initial seed and Philox offset (advanced by 4, as a
    four-number draw would): a restored generator state (checkpoint recompute) gives the same
    seed, every seed is an int64 over 2**32 (one Triton variant), and successive calls differ."""
    gen = _FakeCudaGenerator()
    monkeypatch.setattr(torch.cuda, "default_generators", (gen,))
    dev = torch.device("cuda", 0)
    first, second = lora_dropout.new_seed(dev), lora_dropout.new_seed(dev)
    assert first != second and gen.offset == 16
    assert min(first, second) >= 2**32 and max(first, second) < 2**63
    gen.offset = 8  # what restoring the RNG state before a recompute does
    assert lora_dropout.new_seed(dev) == first


def test_mask_drops_p_of_every_position():
    keep = lora_dropout.keep_mask(_seed(3), 512, 512, 0.05)
    dropped = 1 - keep.float()
    assert dropped.mean().item() == pytest.approx(0.05, abs=0.002)
    for part in range(8):  # each of the eight 16-bit parts of a Philox call
        assert dropped[:, part::8].mean().item() == pytest.approx(0.05, abs=0.004)
    halves = torch.corrcoef(torch.stack([dropped[:, :256].flatten(), dropped[:, 256:].flatten()]))[0, 1]
    assert abs(halves.item()) < 0.02


def test_fused_lora_function_through_the_kernels(monkeypatch):
    """LoraOnFrozenLinear with the kernel dropout (LoRA term first, the base GEMM accumulated onto
    it): output and every gradient equal the same arithmetic in torch with the mask the kernels
    drew, also under checkpointing (recompute draws the same seed from the restored generator)."""
    monkeypatch.setattr(lora_dropout, "usable", lambda x, a, p: p > 0)
    torch.manual_seed(0)
    m, k, n, r, p, s = 48, 64, 40, 8, 0.2, 2.0
    base = torch.nn.Linear(k, n, bias=True).requires_grad_(False)
    x = torch.randn(m, k, requires_grad=True)
    a = (torch.randn(r, k) * 0.1).requires_grad_()
    b = (torch.randn(n, r) * 0.1).requires_grad_()

    def run(checkpointed: bool):
        torch.manual_seed(123)
        fn = lambda x_: frozen_linear.LoraOnFrozenLinear.apply(x_, a, b, base, "dense", s, p, None)  # noqa: E731
        y = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False) if checkpointed else fn(x)
        (y.square().sum()).backward()
        grads = [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        return y.detach(), grads

    torch.manual_seed(123)
    keep = lora_dropout.keep_mask(lora_dropout.new_seed(x.device), m, k, p)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a, b))
    yr = base(xr) + s * ((xr * keep * lora_dropout.keep_scale(p)) @ ar.t()) @ br.t()
    yr.square().sum().backward()
    for checkpointed in (False, True):
        y, grads = run(checkpointed)
        torch.testing.assert_close(y, yr.detach(), rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, (xr.grad, ar.grad, br.grad)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_recipe_training_through_the_kernels(tiny_llama_dir, tmp_path, monkeypatch):
    """The recipe path with the kernel dropout (interpreted, fp32 on CPU: `usable` widened): the run
    reports it among its speed-ups, calls the kernels in forward, recompute and backward, and the
    checkpointed runs (torch's checkpoint, lean's offloaded one) train the very adapter the
    un-checkpointed one does (the recompute drew the same seeds)."""
    import json
    from pathlib import Path

    from peftchat.config import load_recipe
    from peftchat.train import loop

    monkeypatch.setattr(lora_dropout, "available", lambda device: True)
    monkeypatch.setattr(lora_dropout, "usable", lambda x, a, p: 0 < p < 1 and x.shape[1] % lora_dropout.GROUP == 0)
    calls = {"down": 0, "grad_a": 0}
    for name in calls:
        real = getattr(lora_dropout, name)
        monkeypatch.setattr(
            lora_dropout,
            name,
            lambda *a, _real=real, _name=name, **kw: calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **kw),
        )
    recipes = Path(__file__).resolve().parents[2] / "recipes"

    def run(out, checkpointing: bool, offload: bool = False):
        recipe = load_recipe(
            str(recipes / "demo.yaml"),
            [
                f"model.path={tiny_llama_dir}",
                f"training.output_dir={out}",
                "training.device=cpu",
                "training.max_steps=2",
                "training.log_steps=1",
                "training.tensorboard=false",
                "adapter.dropout=0.1",
                "training.batch_size=1",
                "data.max_length=128",
                f"training.gradient_checkpointing={checkpointing}",
                # one LoRA linear per decoder layer, one row: each kernel launch costs ~0.5 s or more in
                # the interpreter (all seven linears at batch 2 took 100-180 s)
                "adapter.target_modules=[q_proj]",
                f"training.checkpoint_offload={offload}",
                "training.fused_lora=true",
            ],
        )
        applied = []
        loop.train(recipe, hooks=loop.TrainHooks(speedups_applied=applied.extend))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], applied

    losses, applied = run(tmp_path / "ckpt", True)
    layers = int(next(a for a in applied if a.startswith("fused_lora:")).split(":")[1].split()[0])
    assert f"lora_dropout:in_matmul {layers} layers" in applied
    assert calls["down"] >= 2 * 2 * layers and calls["grad_a"] >= 2 * layers  # 2 steps: forward + recompute
    plain, _ = run(tmp_path / "plain", False)
    offloaded, applied = run(tmp_path / "offload", True, offload=True)  # lean's checkpoint restores the RNG too
    assert any(
        a.endswith(("(inputs offloaded)", "(checkpoint_offload: no GPU, inputs kept in memory)")) for a in applied
    )
    assert losses == pytest.approx(plain, rel=1e-5) and offloaded == pytest.approx(plain, rel=1e-5)
    # Adam's first steps follow the gradients' signs, so the losses barely feel other masks; the
    # adapters do: equal only where the recompute drew forward's very seeds
    from safetensors.torch import load_file

    ref = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    for run_dir in ("ckpt", "offload"):
        got = load_file(str(tmp_path / run_dir / "adapter_model.safetensors"))
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-7, msg=f"{run_dir}: {key}")


def test_kernel_dropout_reported_only_for_layers_with_dropout(monkeypatch):
    from types import SimpleNamespace

    from lora_helpers import with_lora
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftchat.kernels.frozen_linear import unfuse_lora_layers
    from peftchat.train import speedups as kernels

    monkeypatch.setattr(lora_dropout, "available", lambda device: True)
    cfg = SimpleNamespace(fp8=False, fused_lora=True, compile=False)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    for dropout, expected in ((0.0, None), (0.1, "lora_dropout:in_matmul 7 layers")):
        model = with_lora(LlamaForCausalLM(config), dropout=dropout)
        applied = kernels.apply_fused_lora(model, cfg, kernels.KernelOptions(fused_lora=True, triton=True))
        assert "fused_lora:7 layers" in applied
        assert [a for a in applied if a.startswith("lora_dropout")] == ([expected] if expected else [])
        unfuse_lora_layers(model)
