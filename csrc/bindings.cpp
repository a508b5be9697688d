// torch bindings of the storyattn CUDA kernels (module storyattn._C).
//
// Everything torch-specific lives here: argument checks with messages that
// name the argument and its shape, output allocation, the current CUDA stream
// and a device guard.  The kernels themselves (csrc/*.cu) take raw pointers
// and strides (csrc/storyattn_kernels.h), so they compile with plain nvcc.
//
// No op here synchronises with the host or allocates inside merge_states_ /
// qk_norm_rope (outputs are passed in), so both can be captured in a CUDA
// graph; segment_attn_fwd allocates its outputs through torch's caching
// allocator, which is graph-safe as well.
//
// With -DSTORYATTN_EMULATE_CUDA (tests only: tests/_cuda_emu.py) the same glue
// is built against the host emulation of tests/cuda_emu: tensors are CPU
// tensors, the device is reported as sm_90, and a fault the emulator recorded
// (misaligned ldmatrix/cp.async, partial-warp collective) is raised here.
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#ifndef STORYATTN_EMULATE_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <sstream>
#include <string>

#include "storyattn_kernels.h"

namespace storyattn {
namespace {

using at::Tensor;
using c10::optional;

std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
#ifdef STORYATTN_EMULATE_CUDA
  TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor in the host emulation, got device ",
              t.device());
#else
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
#endif
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the other inputs are on ",
              ref.device());
}

void check_layout4(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be [batch, tokens, heads, head_dim], got shape ",
              shape_str(t));
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name,
              " must have a contiguous head_dim (stride 1), got strides ", t.strides());
}

// qk_norm_rope moves the RoPE pair (x[2i], x[2i+1]) as one 2-element access.
void check_pairs_aligned(const Tensor& t, const char* name) {
  const int64_t pair_bytes = 2 * static_cast<int64_t>(t.element_size());
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % pair_bytes == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 2 == 0;
  TORCH_CHECK(ok, name, " must have even strides and an address aligned to a pair of elements "
              "(RoPE pairs are read together), got strides ", t.strides(), "; pass a contiguous "
              "tensor");
}

#ifdef STORYATTN_EMULATE_CUDA
void check_launch(const char* err) {
  TORCH_CHECK(err == nullptr, err);
  const std::string fault = storyattn_emu::take_error();
  TORCH_CHECK(fault.empty(), "kernel fault (host emulation): ", fault);
}

int compute_capability_major(int) { return 9; }

// Device guard and current stream of the launch (nothing to guard on the host).
struct LaunchContext {
  explicit LaunchContext(const Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};
#else
void check_launch(const char* err) {
  TORCH_CHECK(err == nullptr, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int compute_capability_major(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

// Device guard and current stream of the launch.
struct LaunchContext {
  explicit LaunchContext(const Tensor& t)
      : guard(t.device()), current(c10::cuda::getCurrentCUDAStream(t.get_device())) {}
  cudaStream_t stream() const { return current.stream(); }
  c10::cuda::CUDAGuard guard;
  c10::cuda::CUDAStream current;
};
#endif

// ---------------------------------------------------------------------------
void merge_states_(Tensor out_a, Tensor lse_a, const Tensor& out_b, const Tensor& lse_b,
                   const optional<Tensor>& mask) {
  check_cuda(out_a, "out_a", out_a);
  check_cuda(lse_a, "lse_a", out_a);
  check_cuda(out_b, "out_b", out_a);
  check_cuda(lse_b, "lse_b", out_a);
  check_layout4(out_a, "out_a");
  check_layout4(out_b, "out_b");
  TORCH_CHECK(out_a.sizes() == out_b.sizes(), "out_a and out_b must have the same shape, got ",
              shape_str(out_a), " and ", shape_str(out_b));
  TORCH_CHECK(out_a.scalar_type() == out_b.scalar_type(), "out_a dtype ", out_a.scalar_type(),
              " differs from out_b dtype ", out_b.scalar_type());
  const int64_t B = out_a.size(0), L = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  for (auto pr : {std::make_pair(static_cast<const Tensor*>(&lse_a), "lse_a"),
                  std::make_pair(&lse_b, "lse_b")}) {
    const Tensor& l = *pr.first;
    TORCH_CHECK(l.scalar_type() == at::kFloat, pr.second, " must be float32, got ",
                l.scalar_type());
    TORCH_CHECK(l.dim() == 3 && l.size(0) == B && l.size(1) == H && l.size(2) == L, pr.second,
                " must be [B=", B, ", H=", H, ", L=", L, "] to match out_a ", shape_str(out_a),
                ", got ", shape_str(l));
  }
  TORCH_CHECK(D <= 1024, "merge_states_: head_dim must be <= 1024, got ", D);
  // written in place: a broadcast (stride-0) view would race with itself
  at::assert_no_internal_overlap(out_a);
  at::assert_no_internal_overlap(lse_a);

  MergeParams p{};
  p.dtype = to_dtype(out_a, "out_a");
  p.out_a = out_a.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.out_b = out_b.data_ptr();
  p.lse_b = lse_b.data_ptr<float>();
  p.B = B; p.L = L; p.H = H; p.D = D;
  p.oa_sb = out_a.stride(0); p.oa_sl = out_a.stride(1); p.oa_sh = out_a.stride(2);
  p.ob_sb = out_b.stride(0); p.ob_sl = out_b.stride(1); p.ob_sh = out_b.stride(2);
  p.la_sb = lse_a.stride(0); p.la_sh = lse_a.stride(1); p.la_sl = lse_a.stride(2);
  p.lb_sb = lse_b.stride(0); p.lb_sh = lse_b.stride(1); p.lb_sl = lse_b.stride(2);
  p.mask = nullptr;
  if (mask.has_value()) {
    const Tensor& m = *mask;
    check_cuda(m, "mask", out_a);
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte,
                "mask must be bool or uint8, got ", m.scalar_type());
    TORCH_CHECK((m.dim() == 1 && m.size(0) == B) ||
                    (m.dim() == 2 && m.size(0) == B && m.size(1) == L),
                "mask must be [B=", B, "] (per batch row) or [B=", B, ", L=", L,
                "] (per query row), got ", shape_str(m));
    // bool and uint8 are both one byte with 0 = false
    p.mask = static_cast<const uint8_t*>(m.data_ptr());
    p.mask_sb = m.stride(0);
    p.mask_sl = m.dim() == 2 ? m.stride(1) : 0;
  }
  const LaunchContext ctx(out_a);
  check_launch(launch_merge_states(p, ctx.stream()));
}

// ---------------------------------------------------------------------------
void qk_norm_rope(const optional<Tensor>& q, const optional<Tensor>& k,
                  const optional<Tensor>& q_weight, const optional<Tensor>& k_weight,
                  const Tensor& cos, const Tensor& sin, double eps,
                  const optional<Tensor>& q_out, const optional<Tensor>& k_out,
                  const optional<Tensor>& v, const optional<Tensor>& pool_k,
                  const optional<Tensor>& pool_v, const optional<Tensor>& entry_ids,
                  int64_t img_start, const optional<Tensor>& extra_cos,
                  const optional<Tensor>& extra_sin, bool round_norm,
                  bool q_round_before_weight, bool k_round_before_weight) {
  TORCH_CHECK(q.has_value() || k.has_value(), "qk_norm_rope: give q, k or both");
  const Tensor& ref = q.has_value() ? *q : *k;
  check_cuda(ref, q.has_value() ? "q" : "k", ref);
  check_layout4(ref, q.has_value() ? "q" : "k");
  const int64_t B = ref.size(0), L = ref.size(1), H = ref.size(2), D = ref.size(3);
  TORCH_CHECK(D % 2 == 0 && D <= 256 && D > 0,
              "qk_norm_rope: head_dim must be even and at most 256, got ", D);

  auto check_act = [&](const Tensor& t, const char* name) {
    check_cuda(t, name, ref);
    check_layout4(t, name);
    TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have shape ", shape_str(ref), ", got ",
                shape_str(t));
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " dtype ", t.scalar_type(),
                " differs from ", ref.scalar_type());
    check_pairs_aligned(t, name);
  };
  auto check_weight = [&](const optional<Tensor>& w, const char* name) {
    if (!w.has_value()) return;
    check_cuda(*w, name, ref);
    TORCH_CHECK(w->dim() == 1 && w->size(0) == D && w->is_contiguous(), name,
                " must be a contiguous [D=", D, "] tensor, got shape ", shape_str(*w));
    to_dtype(*w, name);
    check_pairs_aligned(*w, name);
  };

  QKNormRopeParams p{};
  p.dtype = to_dtype(ref, q.has_value() ? "q" : "k");
  p.B = B; p.L = L; p.H = H; p.D = D;
  p.eps = static_cast<float>(eps);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  p.round_norm = round_norm ? 1 : 0;
  p.q_round_before_weight = q_round_before_weight ? 1 : 0;
  p.k_round_before_weight = k_round_before_weight ? 1 : 0;
  if (q.has_value()) {
    const Tensor& qo = q_out.has_value() ? *q_out : *q;
    check_act(*q, "q");
    check_act(qo, "q_out");
    check_weight(q_weight, "q_weight");
    p.q = q->data_ptr(); p.q_out = qo.data_ptr();
    p.q_sb = q->stride(0); p.q_sl = q->stride(1); p.q_sh = q->stride(2);
    p.qo_sb = qo.stride(0); p.qo_sl = qo.stride(1); p.qo_sh = qo.stride(2);
    p.q_weight = q_weight.has_value() ? q_weight->data_ptr() : nullptr;
    p.q_weight_dtype = q_weight.has_value() ? to_dtype(*q_weight, "q_weight") : DType::kFloat32;
  }
  if (k.has_value()) {
    const Tensor& ko = k_out.has_value() ? *k_out : *k;
    check_act(*k, "k");
    check_act(ko, "k_out");
    check_weight(k_weight, "k_weight");
    p.k = k->data_ptr(); p.k_out = ko.data_ptr();
    p.k_sb = k->stride(0); p.k_sl = k->stride(1); p.k_sh = k->stride(2);
    p.ko_sb = ko.stride(0); p.ko_sl = ko.stride(1); p.ko_sh = ko.stride(2);
    p.k_weight = k_weight.has_value() ? k_weight->data_ptr() : nullptr;
    p.k_weight_dtype = k_weight.has_value() ? to_dtype(*k_weight, "k_weight") : DType::kFloat32;
  }
  for (auto pr : {std::make_pair(&cos, "cos"), std::make_pair(&sin, "sin")}) {
    const Tensor& c = *pr.first;
    check_cuda(c, pr.second, ref);
    TORCH_CHECK(c.scalar_type() == at::kFloat, pr.second, " must be float32, got ",
                c.scalar_type());
    TORCH_CHECK(c.dim() == 2 && c.size(0) == L && c.size(1) == D, pr.second, " must be [L=", L,
                ", D=", D, "] (repeat-interleaved rotary table), got ", shape_str(c));
    TORCH_CHECK(c.stride(1) == 1, pr.second, " must have a contiguous last dim, got strides ",
                c.strides());
    check_pairs_aligned(c, pr.second);
  }
  TORCH_CHECK(cos.stride(0) == sin.stride(0), "cos and sin must have the same strides, got ",
              cos.strides(), " and ", sin.strides());
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.cs_sl = cos.stride(0);

  if (pool_k.has_value() || pool_v.has_value()) {
    TORCH_CHECK(k.has_value() && pool_k.has_value() && pool_v.has_value() && v.has_value() &&
                    entry_ids.has_value(),
                "qk_norm_rope: a pool write needs k, v, pool_k, pool_v and entry_ids");
    check_act(*v, "v");
    for (auto pr : {std::make_pair(&*pool_k, "pool_k"), std::make_pair(&*pool_v, "pool_v")}) {
      const Tensor& t = *pr.first;
      check_cuda(t, pr.second, ref);
      check_layout4(t, pr.second);
      TORCH_CHECK(t.size(2) == H && t.size(3) == D, pr.second, " must be [P, Lr, H=", H, ", D=",
                  D, "], got ", shape_str(t));
      TORCH_CHECK(t.scalar_type() == ref.scalar_type(), pr.second, " dtype ", t.scalar_type(),
                  " differs from the activations' ", ref.scalar_type());
      check_pairs_aligned(t, pr.second);
    }
    TORCH_CHECK(pool_k->sizes() == pool_v->sizes(), "pool_k and pool_v must have the same shape, got ",
                shape_str(*pool_k), " and ", shape_str(*pool_v));
    const int64_t Lr = pool_k->size(1);
    TORCH_CHECK(img_start >= 0 && img_start + Lr <= L, "img_start=", img_start, " + Lr=", Lr,
                " must lie within the L=", L, " tokens of k");
    const Tensor& ids = *entry_ids;
    check_cuda(ids, "entry_ids", ref);
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == B &&
                    ids.is_contiguous(),
                "entry_ids must be a contiguous int64 [B=", B, "] tensor (-1 = do not write), got ",
                ids.scalar_type(), " ", shape_str(ids));
    p.v = v->data_ptr();
    p.v_sb = v->stride(0); p.v_sl = v->stride(1); p.v_sh = v->stride(2);
    p.pool_k = pool_k->data_ptr(); p.pool_v = pool_v->data_ptr();
    p.P = pool_k->size(0); p.Lr = Lr;
    p.pk_sp = pool_k->stride(0); p.pk_sl = pool_k->stride(1); p.pk_sh = pool_k->stride(2);
    p.pv_sp = pool_v->stride(0); p.pv_sl = pool_v->stride(1); p.pv_sh = pool_v->stride(2);
    p.entry_ids = ids.data_ptr<int64_t>();
    p.img_start = img_start;
    TORCH_CHECK(extra_cos.has_value() == extra_sin.has_value(),
                "extra_cos and extra_sin must be given together");
    if (extra_cos.has_value()) {
      for (auto pr : {std::make_pair(&*extra_cos, "extra_cos"),
                      std::make_pair(&*extra_sin, "extra_sin")}) {
        const Tensor& c = *pr.first;
        check_cuda(c, pr.second, ref);
        TORCH_CHECK(c.scalar_type() == at::kFloat && c.dim() == 2 && c.size(0) == B &&
                        c.size(1) == D && c.stride(1) == 1 && c.stride(0) % 2 == 0,
                    pr.second, " must be float32 [B=", B, ", D=", D,
                    "] with a contiguous last dim, got ", c.scalar_type(), " ", shape_str(c));
        check_pairs_aligned(c, pr.second);
      }
      TORCH_CHECK(extra_cos->stride(0) == extra_sin->stride(0),
                  "extra_cos and extra_sin must have the same strides");
      p.extra_cos = extra_cos->data_ptr<float>();
      p.extra_sin = extra_sin->data_ptr<float>();
      p.ex_sb = extra_cos->stride(0);
    }
  } else {
    TORCH_CHECK(!entry_ids.has_value() && !extra_cos.has_value() && !extra_sin.has_value(),
                "entry_ids / extra_cos / extra_sin only make sense with pool_k and pool_v");
  }
  const LaunchContext ctx(ref);
  check_launch(launch_qk_norm_rope(p, ctx.stream()));
}

// ---------------------------------------------------------------------------
std::vector<Tensor> segment_attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                     double scale, const optional<Tensor>& ref_k,
                                     const optional<Tensor>& ref_v,
                                     const optional<Tensor>& ref_index) {
  check_cuda(q, "q", q);
  check_layout4(q, "q");
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "segment_attn_fwd: q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(D == 64 || D == 128, "segment_attn_fwd: head_dim must be 64 or 128, got ", D);
  for (auto pr : {std::make_pair(&k, "k"), std::make_pair(&v, "v")}) {
    const Tensor& t = *pr.first;
    check_cuda(t, pr.second, q);
    check_layout4(t, pr.second);
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), pr.second, " dtype ", t.scalar_type(),
                " differs from q dtype ", q.scalar_type());
    TORCH_CHECK(t.size(0) == B && t.size(2) == H && t.size(3) == D, pr.second, " must be [B=", B,
                ", Lk, H=", H, ", D=", D, "] to match q ", shape_str(q), ", got ", shape_str(t));
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", shape_str(k),
              " and ", shape_str(v));
  const int cap = compute_capability_major(q.get_device());
  TORCH_CHECK(cap >= 8, "segment_attn_fwd needs compute capability >= 8.0 (mma.sync bf16), got ",
              cap, ".x");

  SegmentAttnParams p{};
  p.dtype = to_dtype(q, "q");
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.B = B; p.Lq = Lq; p.Lk = k.size(1); p.H = H; p.D = D;
  p.q_sb = q.stride(0); p.q_sl = q.stride(1); p.q_sh = q.stride(2);
  p.k_sb = k.stride(0); p.k_sl = k.stride(1); p.k_sh = k.stride(2);
  p.v_sb = v.stride(0); p.v_sl = v.stride(1); p.v_sh = v.stride(2);
  TORCH_CHECK(ref_k.has_value() == ref_v.has_value(), "ref_k and ref_v must be given together");
  if (ref_k.has_value()) {
    for (auto pr : {std::make_pair(&*ref_k, "ref_k"), std::make_pair(&*ref_v, "ref_v")}) {
      const Tensor& t = *pr.first;
      check_cuda(t, pr.second, q);
      check_layout4(t, pr.second);
      TORCH_CHECK(t.scalar_type() == q.scalar_type(), pr.second, " dtype ", t.scalar_type(),
                  " differs from q dtype ", q.scalar_type());
      TORCH_CHECK(t.size(2) == H && t.size(3) == D, pr.second, " must be [P, Lr, H=", H, ", D=",
                  D, "], got ", shape_str(t));
    }
    TORCH_CHECK(ref_k->sizes() == ref_v->sizes(), "ref_k and ref_v must have the same shape, got ",
                shape_str(*ref_k), " and ", shape_str(*ref_v));
    p.ref_k = ref_k->data_ptr(); p.ref_v = ref_v->data_ptr();
    p.P = ref_k->size(0); p.Lr = ref_k->size(1);
    p.rk_sp = ref_k->stride(0); p.rk_sl = ref_k->stride(1); p.rk_sh = ref_k->stride(2);
    p.rv_sp = ref_v->stride(0); p.rv_sl = ref_v->stride(1); p.rv_sh = ref_v->stride(2);
  }
  if (ref_index.has_value()) {
    const Tensor& ri = *ref_index;
    TORCH_CHECK(ref_k.has_value(), "ref_index was given but there is no reference pool");
    check_cuda(ri, "ref_index", q);
    TORCH_CHECK(ri.scalar_type() == at::kLong && ri.dim() == 2 && ri.size(0) == B,
                "ref_index must be int64 [B=", B, ", R], got ", ri.scalar_type(), " ",
                shape_str(ri));
    p.ref_index = ri.data_ptr<int64_t>();
    p.R = ri.size(1);
    p.ri_sb = ri.stride(0); p.ri_sr = ri.stride(1);
  }
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  p.scale = static_cast<float>(scale);

  Tensor out = at::empty({B, Lq, H, D}, q.options());
  Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_sb = out.stride(0); p.o_sl = out.stride(1); p.o_sh = out.stride(2);
  p.lse_sb = lse.stride(0); p.lse_sh = lse.stride(1); p.lse_sl = lse.stride(2);

  const LaunchContext ctx(q);
  check_launch(launch_segment_attn_fwd(p, ctx.stream()));
  return {out, lse};
}

}  // namespace
}  // namespace storyattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "storyattn CUDA kernels (inference): merge of attention states, fused q/k "
            "RMSNorm + RoPE with reference-pool write, segment attention forward.";
  m.def("merge_states_", &storyattn::merge_states_,
        "In place: (out_a, lse_a) <- merge((out_a, lse_a), (out_b, lse_b)); optional bool/uint8 "
        "mask [B] or [B, L] selects the rows that take segment b.",
        py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"),
        py::arg("mask") = py::none());
  m.def("qk_norm_rope", &storyattn::qk_norm_rope,
        "Fused RMSNorm + FLUX RoPE of q and/or k [B, L, H, D] (outputs default to in place), "
        "optionally writing k/v rows [img_start, img_start + Lr) into a reference pool. "
        "round_norm rounds the norm output to the io dtype before RoPE (diffusers' chain); "
        "*_round_before_weight reproduces diffusers' RMSNorm with a half-precision weight.",
        py::arg("q"), py::arg("k"), py::arg("q_weight"), py::arg("k_weight"), py::arg("cos"),
        py::arg("sin"), py::arg("eps"), py::arg("q_out") = py::none(),
        py::arg("k_out") = py::none(), py::arg("v") = py::none(), py::arg("pool_k") = py::none(),
        py::arg("pool_v") = py::none(), py::arg("entry_ids") = py::none(),
        py::arg("img_start") = 0, py::arg("extra_cos") = py::none(),
        py::arg("extra_sin") = py::none(), py::arg("round_norm") = true,
        py::arg("q_round_before_weight") = false, py::arg("k_round_before_weight") = false);
  m.def("segment_attn_fwd", &storyattn::segment_attn_fwd,
        "Segment attention forward (fp16/bf16, head_dim 64/128, sm_80+): returns (out "
        "[B, Lq, H, D], lse [B, H, Lq] float32 natural log).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("ref_k") = py::none(),
        py::arg("ref_v") = py::none(), py::arg("ref_index") = py::none());
  m.attr("segment_attn_head_dims") = py::make_tuple(64, 128);
#ifdef STORYATTN_EMULATE_CUDA
  m.attr("device_type") = "cpu";  // the host emulation takes CPU tensors
#else
  m.attr("device_type") = "cuda";
#endif
}
