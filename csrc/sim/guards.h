// Guard bands for the CPU layer's launches (binding.cpp, GPTFAST_SIM only). Every tensor a kernel
// reads is copied into a buffer whose surroundings (and, for matrices, the gap after every row)
// are NaN bytes (0xFF: NaN in fp32/fp16/bf16, -1 in integers), so a read outside the tensor
// poisons the result; every output is allocated NaN-filled inside such a buffer, and after the
// launch the bytes around inputs and outputs must be untouched. The copies keep the original's
// 16-byte alignment class (base address and row pitch), so vectorized paths stay the same.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace gf::sim {

class Guards {
 public:
  // A guarded copy of `t` (same sizes; the row pitch of a matrix, or of a contiguous tensor of 3
  // or more dimensions, grows by 16 elements). keep_layout: the same strides as `t` (for arrays a
  // kernel indexes as contiguous).
  at::Tensor input(const at::Tensor& t, const std::string& name, bool keep_layout = false) {
    return place(t, name, true, keep_layout);
  }

  // A NaN-filled contiguous tensor inside guard bands (no gaps: kernels may assume the layout).
  // It is returned as a tensor of its own storage (offset 0, as a fresh allocation would be),
  // which keeps the banded buffer alive.
  at::Tensor output(at::IntArrayRef sizes, const at::TensorOptions& opts, const std::string& name) {
    at::Tensor view = place(at::empty(sizes, opts), name, false, true);
    at::Tensor buf = bands_.back().buf;
    return at::from_blob(view.data_ptr(), view.sizes(), view.strides(),
                         [buf](void*) mutable { buf.reset(); }, view.options());
  }

  // Checks every band; throws naming the tensor whose surroundings changed.
  void check(const char* op) const {
    for (const Band& b : bands_) {
      const at::Tensor bytes = b.buf.view(at::kByte);
      const at::Tensor outside = b.covered.logical_not().repeat_interleave(b.buf.element_size());
      const bool intact = bytes.masked_select(outside).eq(0xFF).all().item<bool>();
      TORCH_CHECK(intact, "CUDA sim: ", op, ": a kernel wrote outside ", b.name,
                  " (the guard bands around it changed)");
    }
  }

 private:
  struct Band {
    at::Tensor buf;
    at::Tensor covered;
    std::string name;
  };

  static constexpr int64_t kGuard = 64;  // elements each side
  static constexpr int64_t kRowPad = 16; // elements after each matrix row

  at::Tensor place(const at::Tensor& t, const std::string& name, bool copy, bool keep_layout) {
    // Dimensions of stride 0 (a broadcast upstream gradient) stay broadcast: one element.
    std::vector<int64_t> strides(t.strides().begin(), t.strides().end());
    std::vector<int64_t> eff(t.sizes().begin(), t.sizes().end());
    at::Tensor src = t;
    for (int64_t d = 0; d < t.dim(); ++d)
      if (strides[d] == 0 && eff[d] > 0) {
        eff[d] = 1;
        src = src.narrow(d, 0, 1);
      }
    // Inputs' rows get NaN gaps (their strides reach the kernels); outputs keep their layout.
    if (!keep_layout && t.dim() == 2 && t.size(0) > 1 && t.stride(1) == 1 && t.stride(0) >= t.size(1))
      strides[0] = t.stride(0) + kRowPad;
    // A contiguous (B, H, S, d)-like input: rows padded the same way, outer strides following
    // (a layout the kernels must take as given). Non-contiguous views keep their own strides.
    if (!keep_layout && t.dim() >= 3 && t.size(-2) > 1 && t.is_contiguous()) {
      const int64_t n = t.dim();
      strides[n - 1] = 1;
      strides[n - 2] = t.size(n - 1) + kRowPad;
      for (int64_t d = n - 3; d >= 0; --d) strides[d] = strides[d + 1] * t.size(d + 1);
    }
    const int64_t numel = t.numel();
    int64_t extent = numel > 0 ? 1 : 0;
    for (int64_t d = 0; d < t.dim(); ++d)
      if (numel > 0) extent += (eff[d] - 1) * strides[d];
    const int64_t elt = t.element_size();
    const int64_t misalign =
        copy && numel > 0 ? int64_t(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) / elt : 0;
    const int64_t offset = kGuard + misalign;
    at::Tensor buf = at::empty({offset + extent + kGuard}, t.options().memory_format(at::MemoryFormat::Contiguous));
    buf.view(at::kByte).fill_(0xFF);
    at::Tensor covered = at::zeros({buf.numel()}, t.options().dtype(at::kBool));
    if (numel > 0) {
      covered.as_strided(eff, strides, offset).fill_(true);
      if (copy) buf.as_strided(eff, strides, offset).copy_(src);
    }
    bands_.push_back(Band{buf, covered, name});
    return buf.as_strided(t.sizes(), strides, offset);
  }

  std::vector<Band> bands_;
};

}  // namespace gf::sim
