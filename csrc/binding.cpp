// The one file that sees torch: tensors in, checked, turned into the kernels' plain parameter
// structs, launched on the current stream. Compiled twice:
//   - into gptfast._C by setup.py (nvcc build of the kernels, CUDA dispatch key);
//   - into the CPU execution layer's module with -DGPTFAST_SIM (gptfast/cuda_sim.py, CPU
//     dispatch key), where every launch runs the same kernel sources on CPU tensors, inputs get
//     NaN guard bands and the memory around outputs is checked untouched (sim/guards.h).
// Op schemas are declared once, in Python (gptfast/ops); this file registers implementations.
#include <torch/extension.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention/attention.h"
#include "common/launch.h"
#include "cross_entropy/configs.h"
#include "cross_entropy/cross_entropy.h"
#include "tests/primitives.h"

#ifdef GPTFAST_SIM
#include "sim/checks.h"
#include "sim/guards.h"
#include "sim/runtime.h"
#define GF_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#define GF_DISPATCH_KEY CUDA
#endif

namespace {

using at::Tensor;

#ifdef GPTFAST_SIM
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
constexpr const char* kDeviceWord = "CPU (the CUDA sim layer runs CPU tensors)";
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
constexpr const char* kDeviceWord = "CUDA";
#endif

#ifndef GPTFAST_SIM
gf::DeviceInfo cuda_device_info(int index) {
  static std::mutex mu;
  static std::map<int, gf::DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(index);
  if (it != cache.end()) return it->second;
  int major = 0, minor = 0, sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  gf::DeviceInfo d;
  d.arch = major * 10 + minor;
  d.num_sms = sms;
  d.smem_optin = size_t(optin);
  cache[index] = d;
  return d;
}
#endif

// Calls per op since the module loaded (`launch_counts()`): proof, e.g. for gpu-check's training
// probe, that a model's loss ran on these kernels.
std::mutex g_count_mu;
std::map<std::string, int64_t> g_counts;
void count_call(const char* op) {
  std::lock_guard<std::mutex> lock(g_count_mu);
  ++g_counts[op];
}

py::dict launch_counts() {
  std::lock_guard<std::mutex> lock(g_count_mu);
  py::dict d;
  for (const auto& kv : g_counts) d[kv.first.c_str()] = kv.second;
  return d;
}

// Checks that `t` lives where this module's kernels run, then the device and stream to launch on.
void check_device(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.device().type() == kDevice, op, ": ", arg, ": expected a ", kDeviceWord,
              " tensor, got one on ", t.device());
}

#ifdef GPTFAST_SIM
struct LaunchCtx {
  explicit LaunchCtx(const Tensor&) {}
  gf::DeviceInfo dev = gf::sim::device_info();
  gf::Stream stream = nullptr;
};
#else
struct LaunchCtx {
  explicit LaunchCtx(const Tensor& t)
      : guard(t.device()),
        dev(cuda_device_info(t.device().index())),
        stream(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()) {}
  c10::cuda::CUDAGuard guard;
  gf::DeviceInfo dev;
  gf::Stream stream;
};
#endif

// Inputs and outputs of one op call. On the CPU layer inputs are copied into NaN guard bands,
// outputs allocated NaN-filled inside them, and done() checks the bands; on the GPU these are
// the tensors themselves and fresh empty outputs.
struct Io {
#ifdef GPTFAST_SIM
  gf::sim::Guards guards;
  Tensor in(const Tensor& t, const char* name) { return guards.input(t, name); }
  // An input the kernels index as contiguous: guarded without gaps.
  Tensor in_dense(const Tensor& t, const char* name) { return guards.input(t, name, true); }
  Tensor out(at::IntArrayRef sizes, const at::TensorOptions& o, const char* name) {
    return guards.output(sizes, o, name);
  }
  void done(const char* op) { guards.check(op); }
#else
  Tensor in(const Tensor& t, const char*) { return t; }
  Tensor in_dense(const Tensor& t, const char*) { return t; }
  Tensor out(at::IntArrayRef sizes, const at::TensorOptions& o, const char*) {
    return at::empty(sizes, o);
  }
  void done(const char*) {}
#endif
};

gf::DType dtype_of(const char* op, const char* arg, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return gf::DType::kF32;
    case at::kHalf: return gf::DType::kF16;
    case at::kBFloat16: return gf::DType::kBF16;
    default:
      TORCH_CHECK(false, op, ": ", arg, ": expected float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

void check_options(const char* op, double label_smoothing, double z_loss,
                   const std::optional<double>& softcap) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing: expected a value in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss: expected a value >= 0, got ", z_loss);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, op,
              ": softcap: expected None or a value > 0, got ", softcap.value_or(0.0));
}

// Class ids (N,) int64 on the kernels' device.
Tensor checked_targets(const char* op, const Tensor& targets, int64_t n) {
  check_device(op, "targets", targets);
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets: expected int64 class ids, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, op, ": targets: expected shape (", n,
              ",), got ", targets.sizes());
  return targets.contiguous();
}

// An upstream gradient of per-row values: None, a scalar or (N,), any float dtype, any stride
// (0 for a broadcast). Returned as fp32 of shape (N,), strides kept where possible.
Tensor checked_rows_grad(const char* op, const char* arg, const std::optional<Tensor>& g, int64_t n) {
  if (!g.has_value() || !g->defined()) return Tensor();
  check_device(op, arg, *g);
  TORCH_CHECK(at::isFloatingType(g->scalar_type()), op, ": ", arg,
              ": expected a floating-point tensor, got ", g->scalar_type());
  Tensor r = g->dim() == 0 ? g->expand({n}) : *g;
  TORCH_CHECK(r.dim() == 1 && r.size(0) == n, op, ": ", arg, ": expected shape (", n, ",), got ",
              g->sizes());
  if (r.scalar_type() != at::kFloat) r = r.to(at::kFloat);
  return r;
}

void check_logits(const char* op, const Tensor& logits) {
  check_device(op, "logits", logits);
  dtype_of(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op,
              ": logits: expected shape (N, V) with V >= 1, got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 && logits.stride(0) >= 0, op,
              ": logits: expected the vocabulary (last) dimension contiguous, got strides ",
              logits.strides());
}

gf::ce::RowParams row_params(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                             double label_smoothing, double z_loss,
                             const std::optional<double>& softcap) {
  gf::ce::RowParams p;
  p.logits = logits.data_ptr();
  p.targets = targets.data_ptr<int64_t>();
  p.n_rows = logits.size(0);
  p.V = logits.size(1);
  p.stride_x = logits.stride(0);
  p.ignore_index = ignore_index;
  p.label_smoothing = float(label_smoothing);
  p.z_loss = float(z_loss);
  p.softcap = softcap.has_value() ? float(*softcap) : 0.0f;
  return p;
}

// gptfast::cuda_cross_entropy_fwd: (loss_rows (N,) fp32, lse (N,) fp32).
std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& targets,
                                             int64_t ignore_index, double label_smoothing,
                                             double z_loss, std::optional<double> softcap) {
  const char* op = "cuda_cross_entropy_fwd";
  count_call(op);
  check_logits(op, logits);
  check_options(op, label_smoothing, z_loss, softcap);
  const int64_t n = logits.size(0);
  Tensor t = checked_targets(op, targets, n);
  LaunchCtx ctx(logits);
  Io io;
  Tensor x = io.in(logits, "logits");
  t = io.in(t, "targets");
  const auto f32 = logits.options().dtype(at::kFloat);
  Tensor loss = io.out({n}, f32, "loss_rows");
  Tensor lse = io.out({n}, f32, "lse");
  gf::ce::RowParams p = row_params(x, t, ignore_index, label_smoothing, z_loss, softcap);
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  gf::ce::row_forward(dtype_of(op, "logits", logits), p, ctx.dev, ctx.stream);
  io.done(op);
  return {loss, lse};
}

// The backward into `dlogits` (a fresh tensor, or the logits themselves).
void cross_entropy_bwd_into(const char* op, Io& io, const std::optional<Tensor>& grad_rows,
                            const std::optional<Tensor>& grad_lse, const Tensor& logits_in,
                            const Tensor& dlogits, const Tensor& targets, const Tensor& lse,
                            int64_t ignore_index, double label_smoothing, double z_loss,
                            const std::optional<double>& softcap, const LaunchCtx& ctx) {
  const int64_t n = logits_in.size(0);
  Tensor t = io.in(checked_targets(op, targets, n), "targets");
  check_device(op, "lse", lse);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == n, op,
              ": lse: expected fp32 of shape (", n, ",), got ", lse.scalar_type(), " ", lse.sizes());
  Tensor l = io.in(lse.contiguous(), "lse");
  Tensor gr = checked_rows_grad(op, "grad_rows", grad_rows, n);
  Tensor gl = checked_rows_grad(op, "grad_lse", grad_lse, n);
  if (gr.defined()) gr = io.in(gr, "grad_rows");
  if (gl.defined()) gl = io.in(gl, "grad_lse");
  gf::ce::RowParams p = row_params(logits_in, t, ignore_index, label_smoothing, z_loss, softcap);
  p.dlogits = dlogits.data_ptr();
  p.stride_dx = dlogits.stride(0);
  p.lse = l.data_ptr<float>();
  if (gr.defined()) {
    p.grad_rows = gr.data_ptr<float>();
    p.stride_g = gr.stride(0);
  }
  if (gl.defined()) {
    p.grad_lse = gl.data_ptr<float>();
    p.stride_gl = gl.stride(0);
  }
  gf::ce::row_backward(dtype_of(op, "logits", logits_in), p, ctx.dev, ctx.stream);
}

// gptfast::cuda_cross_entropy_bwd: dlogits (N, V) in the logits' dtype.
Tensor cross_entropy_bwd(const std::optional<Tensor>& grad_rows,
                         const std::optional<Tensor>& grad_lse, const Tensor& logits,
                         const Tensor& targets, const Tensor& lse, int64_t ignore_index,
                         double label_smoothing, double z_loss, std::optional<double> softcap) {
  const char* op = "cuda_cross_entropy_bwd";
  count_call(op);
  check_logits(op, logits);
  check_options(op, label_smoothing, z_loss, softcap);
  LaunchCtx ctx(logits);
  Io io;
  Tensor x = io.in(logits, "logits");
  Tensor dx = io.out(logits.sizes(), logits.options(), "dlogits");
  cross_entropy_bwd_into(op, io, grad_rows, grad_lse, x, dx, targets, lse, ignore_index,
                         label_smoothing, z_loss, softcap, ctx);
  io.done(op);
  return dx;
}

// gptfast::cuda_cross_entropy_bwd_: the same, overwriting the logits with their gradient.
void cross_entropy_bwd_inplace(const std::optional<Tensor>& grad_rows,
                               const std::optional<Tensor>& grad_lse, const Tensor& logits,
                               const Tensor& targets, const Tensor& lse, int64_t ignore_index,
                               double label_smoothing, double z_loss,
                               std::optional<double> softcap) {
  const char* op = "cuda_cross_entropy_bwd_";
  count_call(op);
  check_logits(op, logits);
  check_options(op, label_smoothing, z_loss, softcap);
  LaunchCtx ctx(logits);
  Io io;
  Tensor x = io.in(logits, "logits");  // on the GPU: the logits themselves
  cross_entropy_bwd_into(op, io, grad_rows, grad_lse, x, x, targets, lse, ignore_index,
                         label_smoothing, z_loss, softcap, ctx);
  io.done(op);
  if (!x.is_same(logits)) logits.copy_(x);  // CPU layer: back from the guarded copy
}

// ---- linear cross-entropy ---------------------------------------------------------------------

// fp32 scratch the lean backward may use (kLinearScratchBytes; tests shrink it to exercise the
// windowed schedules on small shapes).
int64_t g_linear_scratch_bytes = gf::ce::kLinearScratchBytes;

int64_t set_linear_scratch_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 1024, "_set_linear_scratch_bytes: expected >= 1024 bytes, got ", bytes);
  const int64_t before = g_linear_scratch_bytes;
  g_linear_scratch_bytes = bytes;
  return before;
}

struct LinearInputs {
  Tensor h, w, b, t, order, n_valid;
  gf::DType dtype;
};

// Checks the operands of a linear cross-entropy op and puts them where the kernels read them.
// `order` lists the rows with the non-ignored ones first and `n_valid` counts them, both computed
// on the device (no host sync).
LinearInputs linear_inputs(const char* op, Io& io, const Tensor& hidden, const Tensor& weight,
                           const Tensor& targets, const std::optional<Tensor>& bias,
                           int64_t ignore_index) {
  check_device(op, "hidden", hidden);
  check_device(op, "weight", weight);
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden: expected shape (N, D), got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op,
              ": weight: expected shape (V, ", hidden.size(1), ") to match hidden (N, D), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1 && hidden.size(1) >= 1, op,
              ": expected V >= 1 and D >= 1, got V = ", weight.size(0), ", D = ", hidden.size(1));
  TORCH_CHECK(hidden.scalar_type() != at::kFloat, op,
              ": float32 is not supported by the CUDA backend (its kernels are built on mma.sync, "
              "which has no fp32 form, and gptfast does not silently use TF32): use fp16/bf16, "
              "or backend='triton' / 'torch'");
  const gf::DType dt = dtype_of(op, "hidden", hidden);
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight: expected dtype ",
              hidden.scalar_type(), " (that of hidden), got ", weight.scalar_type());
  TORCH_CHECK(hidden.stride(1) == 1 && weight.stride(1) == 1, op,
              ": hidden and weight: expected the last dimension contiguous, got strides ",
              hidden.strides(), " and ", weight.strides());
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_device(op, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias: expected shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), op, ": bias: expected dtype ",
                hidden.scalar_type(), ", got ", bias->scalar_type());
    b = io.in(bias->contiguous(), "bias");
  }
  Tensor t = checked_targets(op, targets, hidden.size(0));
  const Tensor ignored = t.eq(ignore_index);
  Tensor order = at::argsort(ignored.to(at::kByte), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  Tensor n_valid = ignored.logical_not().sum(at::kInt).reshape({1});
  return LinearInputs{io.in(hidden, "hidden"), io.in(weight, "weight"), b, io.in(t, "targets"),
                      io.in(order, "order"), io.in(n_valid, "n_valid"), dt};
}

gf::ce::LinearParams linear_params(const LinearInputs& in, int64_t ignore_index,
                                   double label_smoothing, double z_loss,
                                   const std::optional<double>& softcap) {
  gf::ce::LinearParams p;
  p.hidden = in.h.data_ptr();
  p.weight = in.w.data_ptr();
  p.bias = in.b.defined() ? in.b.data_ptr() : nullptr;
  p.targets = in.t.data_ptr<int64_t>();
  p.order = in.order.data_ptr<int64_t>();
  p.n_valid = in.n_valid.data_ptr<int32_t>();
  p.N = in.h.size(0);
  p.D = in.h.size(1);
  p.V = in.w.size(0);
  p.stride_h = in.h.stride(0);
  p.stride_w = in.w.stride(0);
  p.ignore_index = ignore_index;
  p.label_smoothing = float(label_smoothing);
  p.z_loss = float(z_loss);
  p.softcap = softcap.has_value() ? float(*softcap) : 0.0f;
  return p;
}

// gptfast::cuda_linear_cross_entropy_fwd: (loss_rows (N,) fp32, lse (N,) fp32).
std::tuple<Tensor, Tensor> linear_cross_entropy_fwd(const Tensor& hidden, const Tensor& weight,
                                                    const Tensor& targets,
                                                    const std::optional<Tensor>& bias,
                                                    int64_t ignore_index, double label_smoothing,
                                                    double z_loss, std::optional<double> softcap) {
  const char* op = "cuda_linear_cross_entropy_fwd";
  count_call(op);
  check_options(op, label_smoothing, z_loss, softcap);
  Io io;
  LinearInputs in = linear_inputs(op, io, hidden, weight, targets, bias, ignore_index);
  LaunchCtx ctx(hidden);
  gf::ce::LinearParams p = linear_params(in, ignore_index, label_smoothing, z_loss, softcap);
  gf::ce::linear_plan_forward(p, ctx.dev);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t n = p.N;
  Tensor partials = io.out({4, p.splits, n}, f32, "partials");
  Tensor loss = io.out({n}, f32, "loss_rows");
  Tensor lse = io.out({n}, f32, "lse");
  p.partials = partials.data_ptr<float>();
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  gf::ce::linear_forward(in.dtype, p, ctx.dev, ctx.stream);
  io.done(op);
  return {loss, lse};
}

// The lean backward into dh (N, D), dw (V, D), db (V,) or undefined, through fp32 accumulator
// windows of at most g_linear_scratch_bytes:
//   both accumulators fit                   -> one launch;
//   dhidden fits in half                    -> vocabulary windows, dhidden accumulated across;
//   dweight (+ dbias) fits in half          -> row windows, dweight accumulated across;
//   neither                                 -> a dhidden pass over row windows, then a dweight
//                                              pass over vocabulary windows (logits recomputed
//                                              twice: 8 N D V FLOPs instead of 6).
void linear_backward_windows(Io& io, const LinearInputs& in, gf::ce::LinearParams p,
                             const Tensor& dh, const Tensor& dw, const Tensor& db,
                             const LaunchCtx& ctx) {
  const int64_t N = p.N, V = p.V, D = p.D;
  const int64_t BN = gf::ce::kLinearTile.block_n, BV = gf::ce::kLinearTile.block_v;
  const int64_t budget = g_linear_scratch_bytes;
  const int64_t row_bytes = D * 4, v_bytes = D * 4 + (db.defined() ? 4 : 0);
  auto round_down = [](int64_t x, int64_t m) { return std::max(m, x / m * m); };
  const auto f32 = dh.options().dtype(at::kFloat);

  struct Window { int64_t start, count; };
  auto split = [](int64_t total, int64_t step) {
    std::vector<Window> w;
    for (int64_t s = 0; s < total; s += step) w.push_back({s, std::min(step, total - s)});
    return w;
  };
  const bool both_fit = N * row_bytes + V * v_bytes <= budget;
  const bool h_fits = N * row_bytes <= budget / 2, w_fits = V * v_bytes <= budget / 2;
  std::vector<Window> rows_w, vocab_w;
  bool fused = true;
  if (both_fit) {
    rows_w = {{0, N}};
    vocab_w = {{0, V}};
  } else if (h_fits) {
    rows_w = {{0, N}};
    vocab_w = split(V, round_down((budget - N * row_bytes) / v_bytes, BV));
  } else if (w_fits) {
    vocab_w = {{0, V}};
    rows_w = split(N, round_down((budget - V * v_bytes) / row_bytes, BN));
  } else {
    fused = false;
    rows_w = split(N, round_down(budget / 2 / row_bytes, BN));
    vocab_w = split(V, round_down(budget / 2 / v_bytes, BV));
  }
  const int64_t max_rows = std::max_element(rows_w.begin(), rows_w.end(), [](auto a, auto b) { return a.count < b.count; })->count;
  const int64_t max_vocab = std::max_element(vocab_w.begin(), vocab_w.end(), [](auto a, auto b) { return a.count < b.count; })->count;
  Tensor dh32 = io.out({max_rows, D}, f32, "dhidden accumulator");
  Tensor dw32 = io.out({max_vocab, D}, f32, "dweight accumulator");
  Tensor db32 = db.defined() ? io.out({max_vocab}, f32, "dbias accumulator") : Tensor();

  // Rows in `order` positions -> dh rows, in slices: the 16-bit temporary index_copy_ needs stays
  // within 4 MiB, so the peak is the accumulators plus that (dw's copy_ converts in place).
  // (An eighth of the scratch budget when that is smaller: the tests' tiny budgets use slices.)
  const int64_t slice_bytes = std::min<int64_t>(int64_t(4) << 20, budget / 8);
  const int64_t slice = std::max<int64_t>(1, slice_bytes / (D * int64_t(dh.element_size())));
  auto flush_rows = [&](const Window& r) {
    for (int64_t s = 0; s < r.count; s += slice) {
      const int64_t n = std::min(slice, r.count - s);
      dh.index_copy_(0, in.order.narrow(0, r.start + s, n),
                     dh32.narrow(0, s, n).to(dh.scalar_type()));
    }
  };
  auto flush_vocab = [&](const Window& v) {
    dw.narrow(0, v.start, v.count).copy_(dw32.narrow(0, 0, v.count));
    if (db.defined()) db.narrow(0, v.start, v.count).copy_(db32.narrow(0, 0, v.count));
  };
  auto run = [&](const Window& r, const Window& v, bool want_h, bool want_w) {
    p.slot0 = r.start;
    p.slots = r.count;
    p.v0 = v.start;
    p.vcount = v.count;
    p.dh = want_h ? dh32.data_ptr<float>() : nullptr;
    p.dw = want_w ? dw32.data_ptr<float>() : nullptr;
    p.db = want_w && db32.defined() ? db32.data_ptr<float>() : nullptr;
    gf::ce::linear_backward(in.dtype, p, ctx.dev, ctx.stream);
  };
  if (fused && rows_w.size() == 1) {  // dhidden accumulates across vocabulary windows
    dh32.zero_();
    for (const Window& v : vocab_w) {
      dw32.zero_();
      if (db32.defined()) db32.zero_();
      run(rows_w[0], v, true, true);
      flush_vocab(v);
    }
    flush_rows(rows_w[0]);
  } else if (fused) {  // one vocabulary window; dweight accumulates across row windows
    dw32.zero_();
    if (db32.defined()) db32.zero_();
    for (const Window& r : rows_w) {
      dh32.zero_();
      run(r, vocab_w[0], true, true);
      flush_rows(r);
    }
    flush_vocab(vocab_w[0]);
  } else {
    for (const Window& r : rows_w) {
      dh32.zero_();
      run(r, Window{0, V}, true, false);
      flush_rows(r);
    }
    for (const Window& v : vocab_w) {
      dw32.zero_();
      if (db32.defined()) db32.zero_();
      run(Window{0, N}, v, false, true);
      flush_vocab(v);
    }
  }
}

// gptfast::cuda_linear_cross_entropy_bwd: (dhidden, dweight, dbias or an empty tensor).
std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd(
    const std::optional<Tensor>& grad_rows, const std::optional<Tensor>& grad_lse,
    const Tensor& hidden, const Tensor& weight, const Tensor& targets,
    const std::optional<Tensor>& bias, const Tensor& lse, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap,
    std::optional<double> filter_eps) {
  // filter_eps permits skipping negligible tiles; these kernels compute every tile (exact).
  (void)filter_eps;
  const char* op = "cuda_linear_cross_entropy_bwd";
  count_call(op);
  check_options(op, label_smoothing, z_loss, softcap);
  Io io;
  LinearInputs in = linear_inputs(op, io, hidden, weight, targets, bias, ignore_index);
  LaunchCtx ctx(hidden);
  const int64_t n = hidden.size(0);
  check_device(op, "lse", lse);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == n, op,
              ": lse: expected fp32 of shape (", n, ",), got ", lse.scalar_type(), " ", lse.sizes());
  Tensor l = io.in(lse.contiguous(), "lse");
  Tensor gr = checked_rows_grad(op, "grad_rows", grad_rows, n);
  Tensor gl = checked_rows_grad(op, "grad_lse", grad_lse, n);
  if (gr.defined()) gr = io.in(gr, "grad_rows");
  if (gl.defined()) gl = io.in(gl, "grad_lse");
  gf::ce::LinearParams p = linear_params(in, ignore_index, label_smoothing, z_loss, softcap);
  p.lse = l.data_ptr<float>();
  if (gr.defined()) {
    p.grad_rows = gr.data_ptr<float>();
    p.stride_g = gr.stride(0);
  }
  if (gl.defined()) {
    p.grad_lse = gl.data_ptr<float>();
    p.stride_gl = gl.stride(0);
  }
  Tensor dh = io.out(hidden.sizes(), hidden.options(), "dhidden");
  Tensor dw = io.out(weight.sizes(), weight.options(), "dweight");
  Tensor db = in.b.defined() ? io.out(in.b.sizes(), in.b.options(), "dbias") : Tensor();
  if (n > 0) {
    linear_backward_windows(io, in, p, dh, dw, db, ctx);
  } else {
    dw.zero_();
    if (db.defined()) db.zero_();
  }
  io.done(op);
  return {dh, dw, db.defined() ? db : hidden.new_empty({0})};
}

// gptfast::cuda_linear_cross_entropy_fwd_grad (the budgeted schedule's op): (reduced loss, lse,
// dhidden, dweight, dbias) for a unit upstream gradient of the reduced loss. The CUDA backend
// computes it with the lean kernels (forward, then backward with the uniform row gradient
// 1 or 1 / n_valid, kept on the device); memory_budget does not change its memory.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_fwd_grad(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets,
    const std::optional<Tensor>& bias, int64_t ignore_index, double label_smoothing,
    double z_loss, std::optional<double> softcap, int64_t reduction, int64_t memory_budget) {
  const char* op = "cuda_linear_cross_entropy_fwd_grad";
  count_call(op);
  // at::Reduction: 1 mean, 2 sum (0, none, has no single upstream gradient to compute for).
  TORCH_CHECK(reduction == 1 || reduction == 2, op,
              ": reduction: expected 1 (mean) or 2 (sum), got ", reduction);
  const bool mean = reduction == 1;
  TORCH_CHECK(memory_budget >= 0, op, ": memory_budget: expected >= 0, got ", memory_budget);
  auto [loss_rows, lse] = linear_cross_entropy_fwd(hidden, weight, targets, bias, ignore_index,
                                                   label_smoothing, z_loss, softcap);
  const int64_t n = hidden.size(0);
  Tensor valid = targets.ne(ignore_index).sum(at::kFloat);
  Tensor loss = mean ? loss_rows.sum() / valid : loss_rows.sum();
  Tensor unit = mean ? valid.clamp_min(1.0).reciprocal() : at::ones({}, loss.options());
  auto [dh, dw, db] = linear_cross_entropy_bwd(unit.expand({n}), std::nullopt, hidden, weight,
                                               targets, bias, lse, ignore_index, label_smoothing,
                                               z_loss, softcap, std::nullopt);
  return {loss, lse, dh, dw, db};
}

// ---- attention ----------------------------------------------------------------------------------

constexpr int64_t kMaxSeq = int64_t(1) << 29;  // 32-bit position arithmetic in the kernels

constexpr const char* kNoFp32 =
    ": float32 is not supported by the CUDA backend (its kernels are built on mma.sync, which has "
    "no fp32 form, and gptfast does not silently use TF32): use fp16/bf16, or backend='triton' / "
    "'torch'";

std::string head_dims_str() {
  int n = 0;
  const int* dims = gf::attn::head_dims(&n);
  std::string s;
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s;
}

// A (B, H, S, d) tensor of the kernels' dtype whose last dimension is contiguous.
void check_bhsd(const char* op, const char* arg, const Tensor& t, const char* what) {
  check_device(op, arg, t);
  TORCH_CHECK(t.dim() == 4, op, ": ", arg, ": expected shape ", what, ", got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, op, ": ", arg,
              ": expected the last (head) dimension contiguous, got strides ", t.strides());
}

gf::attn::Strides strides_of(const Tensor& t) {
  return gf::attn::Strides{t.stride(0), t.stride(1), t.stride(2)};
}

// Everything both attention ops check and pass: q, k, v and the options, guarded (CPU layer).
struct AttnInputs {
  Tensor q, k, v, slopes, kpm, seed;
  gf::DType dtype;
  gf::attn::Params p;
};

AttnInputs attention_inputs(const char* op, Io& io, const Tensor& q, const Tensor& k,
                            const Tensor& v, const std::optional<Tensor>& alibi_slopes,
                            const std::optional<Tensor>& key_padding_mask,
                            const std::optional<Tensor>& seed, bool causal, double softmax_scale,
                            const std::optional<int64_t>& window, double dropout_p) {
  check_bhsd(op, "q", q, "(B, Hq, Sq, d)");
  check_bhsd(op, "k", k, "(B, Hkv, Sk, d)");
  check_bhsd(op, "v", v, "(B, Hkv, Sk, d)");
  TORCH_CHECK(q.scalar_type() != at::kFloat, op, kNoFp32);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q: expected float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), d = q.size(3);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v: expected the same shape (B, Hkv, Sk, d), got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(3) == d, op, ": k: expected shape (", B, ", Hkv, Sk, ", d,
              ") to match q ", q.sizes(), ", got ", k.sizes());
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": k: the number of key/value heads (", Hkv,
              ") must divide the number of query heads (", Hq, ")");
  TORCH_CHECK(gf::attn::supported_head_dim(int(d)), op, ": head dim ", d,
              " has no CUDA kernel (supported: ", head_dims_str(), ")");
  TORCH_CHECK(B <= INT_MAX && Hq <= INT_MAX && Sq <= kMaxSeq && Sk <= kMaxSeq, op,
              ": sequence lengths up to 2^29 (and batch, heads up to 2^31 - 1), got q ", q.sizes(),
              ", k ", k.sizes());
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale: expected a finite float, got ",
              softmax_scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p: expected a value in [0, 1), got ",
              dropout_p);
  if (window.has_value()) {
    TORCH_CHECK(*window >= 1, op, ": window: expected a positive int or None, got ", *window);
    TORCH_CHECK(causal, op, ": window: local attention is defined for causal=True only");
  }
  AttnInputs in;
  in.dtype = dtype_of(op, "q", q);
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    check_device(op, "alibi_slopes", *alibi_slopes);
    TORCH_CHECK(alibi_slopes->dim() == 1 && alibi_slopes->size(0) == Hq &&
                    at::isFloatingType(alibi_slopes->scalar_type()),
                op, ": alibi_slopes: expected a float tensor of shape (", Hq, ",), got ",
                alibi_slopes->scalar_type(), " ", alibi_slopes->sizes());
    in.slopes = io.in(alibi_slopes->to(at::kFloat).contiguous(), "alibi_slopes");
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    check_device(op, "key_padding_mask", *key_padding_mask);
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == B && key_padding_mask->size(1) == Sk,
                op, ": key_padding_mask: expected bool of shape (", B, ", ", Sk, "), got ",
                key_padding_mask->scalar_type(), " ", key_padding_mask->sizes());
    in.kpm = io.in(*key_padding_mask, "key_padding_mask");
  }
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined(), op,
                ": seed: dropout_p > 0 needs a seed tensor (int64, one element, on the device)");
    check_device(op, "seed", *seed);
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                ": seed: expected one int64 element, got ", seed->scalar_type(), " ", seed->sizes());
    in.seed = io.in(seed->reshape({1}).contiguous(), "seed");
  }
  in.q = io.in(q, "q");
  in.k = io.in(k, "k");
  in.v = io.in(v, "v");
  gf::attn::Params& p = in.p;
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.sq = strides_of(in.q);
  p.sk = strides_of(in.k);
  p.sv = strides_of(in.v);
  p.B = int(B);
  p.Hq = int(Hq);
  p.Hkv = int(Hkv);
  p.Sq = int(Sq);
  p.Sk = int(Sk);
  p.head_dim = int(d);
  p.scale = float(softmax_scale);
  p.causal = causal;
  // A window wider than any distance (Sq + Sk) is no window: clamped, it stays a small int.
  p.window = window.has_value() ? int(std::min<int64_t>(*window, Sq + Sk + 1)) : 0;
  if (in.slopes.defined()) p.slopes = in.slopes.data_ptr<float>();
  if (in.kpm.defined()) {
    p.kpm = reinterpret_cast<const uint8_t*>(in.kpm.data_ptr());
    p.kpm_b = in.kpm.stride(0);
    p.kpm_n = in.kpm.stride(1);
  }
  if (in.seed.defined()) p.seed = in.seed.data_ptr<int64_t>();
  p.dropout_p = float(dropout_p);
  return in;
}

// gptfast::cuda_attention_fwd: out (B, Hq, Sq, d) in q's dtype, lse (B, Hq, Sq) fp32.
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& alibi_slopes,
                                         const std::optional<Tensor>& key_padding_mask,
                                         const std::optional<Tensor>& seed, bool causal,
                                         double softmax_scale, std::optional<int64_t> window,
                                         double dropout_p) {
  const char* op = "cuda_attention_fwd";
  count_call(op);
  Io io;
  AttnInputs in = attention_inputs(op, io, q, k, v, alibi_slopes, key_padding_mask, seed, causal,
                                   softmax_scale, window, dropout_p);
  LaunchCtx ctx(q);
  gf::attn::Params& p = in.p;
  Tensor out = io.out(q.sizes(), q.options(), "out");
  Tensor lse = io.out({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat), "lse");
  if (p.Sk == 0) {  // no key at all: every row is dead
    out.zero_();
    lse.fill_(-INFINITY);
  } else {
    p.out = out.data_ptr();
    p.so = strides_of(out);
    p.lse = lse.data_ptr<float>();
    gf::attn::forward(in.dtype, p, ctx.dev, ctx.stream);
  }
  io.done(op);
  return {out, lse};
}

// The backward; `accum`, when given, receives the fp32 dQ accumulator of the atomic backward.
std::tuple<Tensor, Tensor, Tensor> attention_bwd_impl(
    const char* op, const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q,
    const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& seed, bool causal, double softmax_scale,
    std::optional<int64_t> window, double dropout_p, bool deterministic, Tensor* accum) {
  Io io;
  AttnInputs in = attention_inputs(op, io, q, k, v, alibi_slopes, key_padding_mask, seed, causal,
                                   softmax_scale, window, dropout_p);
  LaunchCtx ctx(q);
  gf::attn::Params& p = in.p;
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2);
  check_device(op, "dout", dout);
  TORCH_CHECK(dout.sizes() == q.sizes() && at::isFloatingType(dout.scalar_type()), op,
              ": dout: expected a float tensor of q's shape ", q.sizes(), ", got ",
              dout.scalar_type(), " ", dout.sizes());
  check_device(op, "out", out);
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), op,
              ": out: expected the forward's output (", q.scalar_type(), ", shape ", q.sizes(),
              "), got ", out.scalar_type(), " ", out.sizes());
  check_device(op, "lse", lse);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == B &&
                  lse.size(1) == Hq && lse.size(2) == Sq,
              op, ": lse: expected fp32 of shape (", B, ", ", Hq, ", ", Sq, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  // dout may have any strides (an expanded scalar from out.sum().backward() has all zero): the
  // kernels read rows with a contiguous last dimension, in q's dtype.
  Tensor d = dout.scalar_type() == q.scalar_type() ? dout : dout.to(q.scalar_type());
  if (d.stride(3) != 1) d = d.contiguous();
  Tensor o = out.stride(3) == 1 ? out : out.contiguous();
  Tensor dq = io.out(q.sizes(), q.options(), "dq");
  Tensor dk = io.out(k.sizes(), k.options(), "dk");
  Tensor dv = io.out(v.sizes(), v.options(), "dv");
  if (p.Sk == 0 || B * Hq * Sq == 0) {  // no key, or no query: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    io.done(op);
    return {dq, dk, dv};
  }
  d = io.in(d, "dout");
  o = io.in(o, "out");
  Tensor l = io.in_dense(lse.contiguous(), "lse");
  Tensor dl;
  if (dlse.has_value() && dlse->defined()) {
    check_device(op, "dlse", *dlse);
    TORCH_CHECK(dlse->sizes() == lse.sizes() && at::isFloatingType(dlse->scalar_type()), op,
                ": dlse: expected a float tensor of lse's shape ", lse.sizes(), ", got ",
                dlse->scalar_type(), " ", dlse->sizes());
    dl = io.in_dense(dlse->to(at::kFloat).contiguous(), "dlse");
  }
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor delta = io.out({B, Hq, Sq}, f32, "delta");
  Tensor dq_acc = deterministic ? Tensor() : io.out(q.sizes(), f32, "dq accumulator");
  p.out = o.data_ptr();
  p.so = strides_of(o);
  p.lse = l.data_ptr<float>();
  p.dout = d.data_ptr();
  p.sdo = strides_of(d);
  p.dlse = dl.defined() ? dl.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = deterministic ? nullptr : dq_acc.data_ptr<float>();
  gf::attn::backward(in.dtype, p, ctx.dev, ctx.stream);
  if (!deterministic) dq.copy_(dq_acc);  // fp32 accumulator -> q's dtype
  io.done(op);
  if (accum) *accum = dq_acc;
  return {dq, dk, dv};
}

// gptfast::cuda_attention_bwd: dq, dk, dv (dk / dv summed over each query-head group).
std::tuple<Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const std::optional<Tensor>& alibi_slopes,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& seed, bool causal,
    double softmax_scale, std::optional<int64_t> window, double dropout_p, bool deterministic) {
  const char* op = "cuda_attention_bwd";
  count_call(op);
  return attention_bwd_impl(op, dout, dlse, q, k, v, out, lse, alibi_slopes, key_padding_mask,
                            seed, causal, softmax_scale, window, dropout_p, deterministic, nullptr);
}

// The registered ops take the schema's softcap, which these kernels do not implement: a capped
// call is refused by name (gptfast.attention's support check refuses it before it gets here).
void refuse_softcap(const char* op, const std::optional<double>& softcap) {
  TORCH_CHECK(!softcap.has_value(), op, ": softcap: not supported by the CUDA kernels, got ",
              softcap.value_or(0.0), " (backend='triton' or 'torch' has it)");
}

std::tuple<Tensor, Tensor> attention_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const std::optional<Tensor>& alibi_slopes,
                                            const std::optional<Tensor>& key_padding_mask,
                                            const std::optional<Tensor>& seed, bool causal,
                                            double softmax_scale, std::optional<int64_t> window,
                                            double dropout_p, std::optional<double> softcap) {
  refuse_softcap("cuda_attention_fwd", softcap);
  return attention_fwd(q, k, v, alibi_slopes, key_padding_mask, seed, causal, softmax_scale,
                       window, dropout_p);
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_op(
    const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const std::optional<Tensor>& alibi_slopes,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& seed, bool causal,
    double softmax_scale, std::optional<int64_t> window, double dropout_p, bool deterministic,
    std::optional<double> softcap) {
  refuse_softcap("cuda_attention_bwd", softcap);
  return attention_bwd(dout, dlse, q, k, v, out, lse, alibi_slopes, key_padding_mask, seed,
                       causal, softmax_scale, window, dropout_p, deterministic);
}

// The atomic backward's fp32 dQ accumulator (before it is rounded to q's dtype), for the tests
// that show its additions follow the block order.
Tensor attention_dq_accum(const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          const std::optional<Tensor>& alibi_slopes,
                          const std::optional<Tensor>& key_padding_mask,
                          const std::optional<Tensor>& seed, bool causal, double softmax_scale,
                          std::optional<int64_t> window, double dropout_p) {
  Tensor accum;
  attention_bwd_impl("_attention_dq_accum", dout, dlse, q, k, v, out, lse, alibi_slopes,
                     key_padding_mask, seed, causal, softmax_scale, window, dropout_p, false, &accum);
  return accum;
}

// The dropout keep-mask (B, H, Sq, Sk) bool the attention kernels draw for `seed` (tests).
Tensor attention_dropout_keep_mask(const Tensor& seed, int64_t B, int64_t H, int64_t Sq,
                                   int64_t Sk, double dropout_p) {
  const char* op = "attention_dropout_keep_mask";
  check_device(op, "seed", seed);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed: expected one int64 element, got ", seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK(B >= 0 && H >= 0 && Sq >= 0 && Sk >= 0 && B <= INT_MAX && H <= INT_MAX &&
                  Sq <= kMaxSeq && Sk <= kMaxSeq,
              op, ": sizes out of range (B, H <= 2^31 - 1; Sq, Sk <= 2^29)");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p: expected [0, 1), got ", dropout_p);
  LaunchCtx ctx(seed);
  Io io;
  Tensor s = io.in(seed.reshape({1}).contiguous(), "seed");
  Tensor mask = io.out({B, H, Sq, Sk}, seed.options().dtype(at::kByte), "mask");
  gf::attn::Params p;
  p.B = int(B);
  p.Hq = int(H);
  p.Sq = int(Sq);
  p.Sk = int(Sk);
  p.seed = s.data_ptr<int64_t>();
  p.dropout_p = float(dropout_p);
  gf::attn::dropout_mask(p, mask.data_ptr<uint8_t>(), ctx.dev, ctx.stream);
  io.done(op);
  return mask.to(at::kBool);
}

std::vector<int64_t> attention_head_dims() {
  int n = 0;
  const int* dims = gf::attn::head_dims(&n);
  return std::vector<int64_t>(dims, dims + n);
}

// ---- primitive test kernels (tests/test_cuda_sim_primitives.py, tests/test_cuda_gpu.py) --------

Tensor test_shuffles(const Tensor& in) {
  check_device("_test_shuffles", "in", in);
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.dim() == 1 && in.is_contiguous() &&
                  in.numel() % 32 == 0 && in.numel() <= 1024,
              "_test_shuffles: in: expected a contiguous fp32 vector of 32k <= 1024 elements");
  LaunchCtx ctx(in);
  Tensor out = at::full({5, in.numel()}, NAN, in.options());
  gf::tests::run_shuffles(in.data_ptr<float>(), out.data_ptr<float>(), int(in.numel()), ctx.dev,
                      ctx.stream);
  return out;
}

Tensor test_ldmatrix(const Tensor& src, int64_t variant, int64_t pitch) {
  check_device("_test_ldmatrix", "src", src);
  TORCH_CHECK(src.scalar_type() == at::kShort && src.is_contiguous() && src.numel() == 256,
              "_test_ldmatrix: src: expected 32 x 8 contiguous int16 values");
  TORCH_CHECK(variant >= 0 && variant < 6 && pitch >= 8 && pitch % 8 == 0,
              "_test_ldmatrix: variant in [0, 6), pitch a multiple of 8");
  LaunchCtx ctx(src);
  Tensor out = at::zeros({32, 4}, src.options().dtype(at::kInt));
  gf::tests::run_ldmatrix(reinterpret_cast<const uint16_t*>(src.data_ptr()),
                      reinterpret_cast<uint32_t*>(out.data_ptr()), int(variant), int(pitch),
                      ctx.dev, ctx.stream);
  return out;
}

Tensor test_mma(const Tensor& a, const Tensor& b, const Tensor& c, bool bf16) {
  check_device("_test_mma", "a", a);
  TORCH_CHECK(a.scalar_type() == at::kInt && a.is_contiguous() && a.numel() == 128 &&
                  b.scalar_type() == at::kInt && b.is_contiguous() && b.numel() == 64 &&
                  c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == 128,
              "_test_mma: a (32, 4) int32, b (32, 2) int32, c (32, 4) fp32 fragments");
  LaunchCtx ctx(a);
  Tensor d = at::full({32, 4}, NAN, c.options());
  gf::tests::run_mma(reinterpret_cast<const uint32_t*>(a.data_ptr()),
                 reinterpret_cast<const uint32_t*>(b.data_ptr()), c.data_ptr<float>(),
                 d.data_ptr<float>(), bf16, ctx.dev, ctx.stream);
  return d;
}

Tensor test_cp_async(const Tensor& src, int64_t bytes, int64_t src_bytes) {
  check_device("_test_cp_async", "src", src);
  TORCH_CHECK(bytes == 4 || bytes == 8 || bytes == 16, "_test_cp_async: bytes in {4, 8, 16}");
  TORCH_CHECK(src.scalar_type() == at::kByte && src.is_contiguous() && src.numel() == 64 * bytes,
              "_test_cp_async: src: expected 64 * bytes uint8 values");
  LaunchCtx ctx(src);
  Tensor out = at::full({src.numel()}, 0xAB, src.options());
  gf::tests::run_cp_async(src.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), int(bytes),
                      int(src_bytes), ctx.dev, ctx.stream);
  return out;
}

Tensor test_exp2(const Tensor& x) {
  check_device("_test_exp2", "x", x);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "_test_exp2: fp32 contiguous");
  LaunchCtx ctx(x);
  Tensor y = at::full_like(x, NAN);
  if (x.numel() > 0)
    gf::tests::run_exp2(x.data_ptr<float>(), y.data_ptr<float>(), int(x.numel()), ctx.dev, ctx.stream);
  return y;
}

Tensor test_philox(const Tensor& seeds, const Tensor& offsets) {
  check_device("_test_philox", "seeds", seeds);
  TORCH_CHECK(seeds.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong &&
                  seeds.dim() == 1 && seeds.sizes() == offsets.sizes() && seeds.is_contiguous() &&
                  offsets.is_contiguous() && seeds.numel() < INT_MAX,
              "_test_philox: seeds and offsets: contiguous int64 vectors of one length");
  LaunchCtx ctx(seeds);
  Tensor out = at::full({seeds.numel()}, NAN, seeds.options().dtype(at::kFloat));
  if (seeds.numel() > 0)
    gf::tests::run_philox(seeds.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                          out.data_ptr<float>(), int(seeds.numel()), ctx.dev, ctx.stream);
  return out;
}

Tensor test_atomics(const Tensor& vals, int64_t m) {
  check_device("_test_atomics", "vals", vals);
  TORCH_CHECK(vals.scalar_type() == at::kFloat && vals.is_contiguous() && vals.numel() > 0 && m > 0,
              "_test_atomics: fp32 contiguous values, m > 0");
  LaunchCtx ctx(vals);
  Tensor acc = at::zeros({m}, vals.options());
  gf::tests::run_atomics(vals.data_ptr<float>(), acc.data_ptr<float>(), int(vals.numel()), int(m),
                     ctx.dev, ctx.stream);
  return acc;
}

Tensor test_reductions(const Tensor& in) {
  check_device("_test_reductions", "in", in);
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.dim() == 2 && in.is_contiguous() &&
                  in.size(1) % 32 == 0 && in.size(1) <= 1024,
              "_test_reductions: (blocks, threads) fp32, threads a multiple of 32 <= 1024");
  LaunchCtx ctx(in);
  Tensor out = at::full({in.size(0), 2}, NAN, in.options());
  gf::tests::run_reductions(in.data_ptr<float>(), out.data_ptr<float>(), int(in.size(0)),
                        int(in.size(1)), ctx.dev, ctx.stream);
  return out;
}

// ---- the build's resource table (scripts/cuda_resources.py) ----------------------------------------

// Per kernel function: its launch name, dynamic shared memory and block size, which ptxas -v
// cannot see (it reports registers, spills and static shared memory).
py::list kernel_launches() {
  py::list out;
  auto add = [&](const char* fn, const char* launch, size_t smem, int threads, int head_dim = 0) {
    py::dict d;
    d["function"] = fn;
    d["launch"] = launch;
    d["dynamic_smem"] = smem;
    d["threads"] = threads;
    if (head_dim) d["head_dim"] = head_dim;
    out.append(d);
  };
  add("row_fwd_kernel", "ce_row_fwd", 3 * 32 * sizeof(float), gf::ce::row_threads(INT64_MAX));
  add("row_bwd_kernel", "ce_row_bwd", 0, gf::ce::row_threads(INT64_MAX));
  add("linear_fwd_kernel", "lce_fwd", gf::ce::linear_forward_smem(), 32 * gf::ce::kLinearTile.warps);
  add("linear_combine_kernel", "lce_combine", 0, 128);
  add("linear_bwd_kernel", "lce_bwd", gf::ce::linear_backward_smem(), 32 * gf::ce::kLinearTile.warps);
  namespace A = gf::attn;
  for (int64_t d : attention_head_dims()) {
    const int hd = int(d);
    add("attn_fwd_kernel", "attn_fwd", A::forward_shape(hd).smem, A::forward_shape(hd).threads, hd);
    add("attn_bwd_preprocess_kernel", "attn_bwd_preprocess", 0, A::bwd_preprocess_shape(hd).threads, hd);
    add("attn_bwd_kv_kernel", "attn_bwd_kv", A::bwd_kv_shape(hd).smem, A::bwd_kv_shape(hd).threads, hd);
    add("attn_bwd_q_kernel", "attn_bwd_q", A::bwd_q_shape(hd).smem, A::bwd_q_shape(hd).threads, hd);
  }
  add("dropout_mask_kernel", "attn_dropout_mask", 0, A::dropout_mask_shape().threads);
  return out;
}

#ifdef GPTFAST_SIM
// ---- the CPU layer's own controls ------------------------------------------------------------------

gf::sim::Order parse_order(const std::string& s) {
  if (s == "forward") return gf::sim::Order::kForward;
  if (s == "reverse") return gf::sim::Order::kReverse;
  if (s == "random") return gf::sim::Order::kRandom;
  TORCH_CHECK(false, "order: expected 'forward', 'reverse' or 'random', got '", s, "'");
}

const char* order_name(gf::sim::Order o) {
  return o == gf::sim::Order::kForward ? "forward" : o == gf::sim::Order::kReverse ? "reverse" : "random";
}

void set_settings(const std::string& thread_order, const std::string& block_order, int64_t seed,
                  int64_t workers, int64_t arch, int64_t num_sms, bool check_races) {
  TORCH_CHECK(workers >= 1 && workers <= 64, "workers: expected 1..64, got ", workers);
  TORCH_CHECK(arch == 80 || arch == 90, "arch: expected 80 or 90, got ", arch);
  TORCH_CHECK(num_sms >= 1, "num_sms: expected >= 1, got ", num_sms);
  auto& s = gf::sim::settings();
  s.thread_order = parse_order(thread_order);
  s.block_order = parse_order(block_order);
  s.seed = uint64_t(seed);
  s.workers = int(workers);
  s.arch = int(arch);
  s.num_sms = int(num_sms);
  s.check_races = check_races;
}

py::dict get_settings() {
  const auto& s = gf::sim::settings();
  py::dict d;
  d["thread_order"] = order_name(s.thread_order);
  d["block_order"] = order_name(s.block_order);
  d["seed"] = s.seed;
  d["workers"] = s.workers;
  d["arch"] = s.arch;
  d["num_sms"] = s.num_sms;
  d["check_races"] = s.check_races;
  return d;
}

py::dict get_stats() {
  const auto s = gf::sim::stats();
  py::dict d;
  d["launches"] = s.launches;
  d["blocks"] = s.blocks;
  d["barriers"] = s.barriers;
  d["collectives"] = s.collectives;
  d["cp_async"] = s.cp_async;
  return d;
}

// Runs one of sim/checks.cu's kernels on a guarded input (arange) and a guarded NaN-filled
// output of max(arg, 1) * 64 floats, then checks the guard bands.
Tensor run_check(const std::string& name, int64_t arg) {
  Io io;
  Tensor src = io.in(at::arange(4 * 64 + 8, at::kFloat), "src");
  Tensor out = io.out({std::max<int64_t>(arg, 1) * 64}, at::TensorOptions().dtype(at::kFloat), "out");
  gf::sim_checks::run(name, src.data_ptr<float>(), out.data_ptr<float>(), int(arg),
                      gf::sim::device_info());
  io.done("run_check");
  return out;
}

void check_launch_config(std::vector<int64_t> grid, std::vector<int64_t> block, int64_t smem,
                         bool opt_in) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid and block: 3 dimensions each");
  for (auto v : grid) TORCH_CHECK(v >= 0 && v <= 0xffffffffLL, "grid dims fit 32 bits");
  for (auto v : block) TORCH_CHECK(v >= 0 && v <= 0xffffffffLL, "block dims fit 32 bits");
  gf::sim_checks::launch_with(unsigned(grid[0]), unsigned(grid[1]), unsigned(grid[2]),
                              unsigned(block[0]), unsigned(block[1]), unsigned(block[2]),
                              size_t(smem), opt_in, gf::sim::device_info());
}
#endif

}  // namespace

// The implementations of the gptfast::cuda_* ops, whose schemas gptfast/ops/_library.py declares
// (torch.library.define: one place for every backend). GPU build: CUDA tensors; CPU layer: CPU
// tensors. Registering implementations before Python defines the schemas is fine: the dispatcher
// checks each function's signature against its schema when both are known.
TORCH_LIBRARY_IMPL(gptfast, GF_DISPATCH_KEY, m) {
  m.impl("cuda_cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cuda_cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cuda_cross_entropy_bwd_", &cross_entropy_bwd_inplace);
  m.impl("cuda_linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("cuda_linear_cross_entropy_bwd", &linear_cross_entropy_bwd);
  m.impl("cuda_linear_cross_entropy_fwd_grad", &linear_cross_entropy_fwd_grad);
  m.impl("cuda_attention_fwd", &attention_fwd_op);
  m.impl("cuda_attention_bwd", &attention_bwd_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gptfast CUDA C++ kernels"
#ifdef GPTFAST_SIM
            " on the CPU execution layer"
#endif
      ;
  // Direct entry points (the same functions the op registrations use).
  m.def("cross_entropy_fwd", &cross_entropy_fwd);
  m.def("cross_entropy_bwd", &cross_entropy_bwd);
  m.def("cross_entropy_bwd_", &cross_entropy_bwd_inplace);
  m.def("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.def("linear_cross_entropy_bwd", &linear_cross_entropy_bwd, py::arg("grad_rows"),
        py::arg("grad_lse"), py::arg("hidden"), py::arg("weight"), py::arg("targets"),
        py::arg("bias"), py::arg("lse"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("softcap"), py::arg("filter_eps") = py::none());
  m.def("linear_cross_entropy_fwd_grad", &linear_cross_entropy_fwd_grad);
  m.def("attention_fwd", &attention_fwd);
  m.def("attention_bwd", &attention_bwd);
  m.def("attention_dropout_keep_mask", &attention_dropout_keep_mask);
  m.def("_attention_dq_accum", &attention_dq_accum);
  m.def("attention_head_dims", &attention_head_dims);
  m.def("_set_linear_scratch_bytes", &set_linear_scratch_bytes);
  m.def("kernel_launches", &kernel_launches);
  m.def("launch_counts", &launch_counts);
  m.def("_test_shuffles", &test_shuffles);
  m.def("_test_ldmatrix", &test_ldmatrix);
  m.def("_test_mma", &test_mma);
  m.def("_test_cp_async", &test_cp_async);
  m.def("_test_exp2", &test_exp2);
  m.def("_test_philox", &test_philox);
  m.def("_test_atomics", &test_atomics);
  m.def("_test_reductions", &test_reductions);
#ifdef GPTFAST_SIM
  m.attr("SIM") = true;
  m.def("set_settings", &set_settings, py::arg("thread_order"), py::arg("block_order"),
        py::arg("seed"), py::arg("workers"), py::arg("arch"), py::arg("num_sms"),
        py::arg("check_races"));
  m.def("get_settings", &get_settings);
  m.def("stats", &get_stats);
  m.def("reset_stats", &gf::sim::reset_stats);
  m.def("check_names", &gf::sim_checks::names);
  m.def("run_check", &run_check);
  m.def("check_launch_config", &check_launch_config);
#else
  m.attr("SIM") = false;
#endif
}
