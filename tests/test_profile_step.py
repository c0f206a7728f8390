"""benchmarks/profile_step.py: kernel classification and the per-category summary (the CUDA run
itself is the coordinator's; names below are real kernel/op names of such traces)."""

import pytest

from benchmarks.profile_step import CATEGORIES, busy_ms, classify, markdown, summarize

MM = "aten::mm"


@pytest.mark.parametrize("kernel,ops,shapes,expected", [
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", [MM, "aten::matmul", "aten::linear"], [[8192, 4096], [4096, 14336]], "matmul"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", [MM, "aten::matmul"], [[8192, 4096], [4096, 16]], "lora"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, ...)", ["bitsandbytes::dequantize_4bit"], [], "dequant"),
    ("_rms_norm_forward_kernel", ["LigerRMSNormFunction"], [], "norm/rope/swiglu"),
    ("_swiglu_backward_kernel", ["autograd::engine::evaluate_function: LigerSiLUMulFunctionBackward"], [], "norm/rope/swiglu"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", ["aten::_flash_attention_forward",
                                                                                   "aten::scaled_dot_product_attention"], [], "attention"),
    ("liger_cross_entropy_kernel", ["aten::empty"], [], "loss"),
    ("Memcpy HtoD (Pinned -> Device)", ["aten::copy_", "aten::_to_copy"], [], "copies"),
    ("void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float>", ["aten::native_dropout"], [], "lora"),
    ("lora_grad_input_kernel", ["LoraOnFrozenLinearBackward"], [], "lora"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...FusedAdamMathFunctor...>",
     ["aten::_fused_adamw_", "Optimizer.step#AdamW.step"], [], "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", ["aten::add"], [], "other"),
])
def test_kernels_land_in_their_category(kernel, ops, shapes, expected):
    assert classify(kernel, ops, shapes, lora_r=16) == expected


def test_summary_per_step_and_shares():
    records = [("nvjet_a", [MM], [[8192, 4096], [4096, 4096]], 3000.0), ("nvjet_b", [MM], [[8192, 16], [16, 4096]], 1000.0),
               ("Memcpy DtoH (Device -> Pinned)", ["aten::copy_"], [], 1000.0)]
    s = summarize(records, steps=2, wall_s_per_step=0.004)
    assert set(s["categories"]) == set(CATEGORIES)
    assert s["categories"]["matmul"] == {"ms_per_step": 1.5, "share": 0.6}
    assert s["categories"]["lora"]["ms_per_step"] == 0.5 and s["kernel_ms_per_step"] == 2.5
    assert s["top_kernels"][0]["kernel"] == "nvjet_a"
    assert "| matmul | 1.5 | 60.0 % |" in markdown(s, "t")


def test_gpu_busy_is_the_union_of_activity_intervals():
    # a copy overlapping two kernels, a gap, a kernel inside another
    assert busy_ms([(0, 4), (3, 6), (1, 2), (10, 12), (10.5, 11)]) == 8
    assert busy_ms([]) == 0
    s = summarize([("nvjet_a", [MM], [], 1000.0)], steps=1, wall_s_per_step=0.010)
    s["gpu_busy_ms_per_step"] = 6.0
    assert "GPU busy 6.0 ms/step (60 % of wall)" in markdown(s, "t")
