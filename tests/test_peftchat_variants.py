"""benchmarks.peftchat_variants.apply_options: a setting's `+options` as the bench and the quality
check apply them; kernel variants as `KernelOptions`."""

import pytest

from benchmarks import peftchat_variants


def test_options_become_recipe_overrides_and_spec_fields():
    spec = peftchat_variants.apply_options({"batch": 4, "overrides": {"training.lr": 1e-4}}, "skip13+mem16+mb2")
    assert spec["overrides"] == {
        "training.lr": 1e-4,
        "training.checkpoint_skip_layers": 13,
        "training.max_memory_gib": 16.0,
    }
    assert spec["micro_batch"] == 2
    assert peftchat_variants.apply_options({"batch": 4}, "") == {"batch": 4, "overrides": {}}


def test_a_kernel_variant_is_other_kernel_options_not_a_flag():
    from peftchat.kernels.fp8 import Fp8Passes
    from peftchat.kernels.options import KernelOptions

    spec = peftchat_variants.apply_options({}, "fp8rec")
    assert spec["overrides"] == {"training.fp8": True}
    variant = peftchat_variants.kernel_variant(spec)
    got = variant(KernelOptions(fused_lora=False, fp8=Fp8Passes(), triton=True))
    assert got == KernelOptions(fused_lora=True, fp8=Fp8Passes(recompute=True, grad_input=False), triton=True)
    assert peftchat_variants.kernel_variant(peftchat_variants.apply_options({}, "skip2")) is None


@pytest.mark.parametrize("lost", ["torchdropout", "basefirst", "bnbdq", "fp8elem", "keepw", "noprefetch", "fp8mlp"])
def test_variants_whose_paths_lost_are_gone(lost):
    with pytest.raises(ValueError, match="unknown peftchat option"):
        peftchat_variants.apply_options({}, lost)


def test_an_unknown_option_is_refused():
    with pytest.raises(ValueError, match="unknown peftchat option 'nosuch'"):
        peftchat_variants.apply_options({}, "skip2+nosuch")


def test_the_reference_keeps_sdpa_by_recipe_not_by_patch():
    """The loss gate's reference and `novarlen` pick `sdpa_masked` through the recipe; nothing in
    peftchat.model.load is replaced at run time."""
    from peftchat.model import load

    before = load.flash_varlen_available
    assert peftchat_variants.setting_overrides("ref", "8b", "nf4")["model.attn_implementation"] == "sdpa_masked"
    spec = peftchat_variants.apply_options({}, "novarlen")
    assert spec["overrides"] == {"model.attn_implementation": "sdpa_masked"}
    assert load.flash_varlen_available is before
