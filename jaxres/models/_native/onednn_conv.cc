// oneDNN 2-D convolutions (forward, backward-data, backward-weights) as XLA FFI handlers.
//
// Layouts are the model's: activations NHWC, kernels HWIO, float32. Each handler takes the
// window as attributes (stride, padding low/high, rhs dilation in XLA's sense: 1 = none) and
// reads the shapes from its buffers. Primitives are built once per (kind, shapes, window)
// and kept in a process-wide cache; the kernel goes through oneDNN's preferred blocked layout
// (`format_tag::any`) with a cached reorder, so oneDNN picks its direct (brgemm / jit) kernels
// instead of the slower plain-layout ones. Scratch memory is allocated per call
// (`scratchpad_mode::user`), so two XLA CPU devices may run the same primitive at once.
//
// Built by setup.py (build_ext) against the `onednn-devel` headers and jaxlib's FFI headers;
// libdnnl is resolved at load time (jaxres/models/onednn.py preloads it from the `onednn`
// wheel), so the build needs neither the library nor its SYCL runtime.

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// GNU OpenMP (libdnnl's threading runtime, loaded with it).
extern "C" void omp_set_num_threads(int);

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// kind, N, H, W, Ci, KH, KW, Co, OH, OW, stride h/w, pad t/b/l/r, dilation h/w, threads.
using Key = std::array<int64_t, 19>;

// OpenMP threads per call (0: OpenMP's default, all cores). Each XLA CPU device calls from its
// own thread and each such call starts its own OpenMP team, so with one device per core this
// is 1; oneDNN sizes a primitive's work split for the thread count it is created with, hence
// part of the key.
std::atomic<int> g_threads{0};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

// One cached convolution: the primitive, and a reorder between the user's HWIO kernel and the
// primitive's kernel layout when they differ (to it for forward / backward-data, from it for
// backward-weights).
struct Entry {
  dnnl::primitive conv;
  memory::desc weights_md;  // the primitive's (possibly blocked) kernel layout
  memory::desc scratch_md;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  // Streams are cheap but not free; one per calling thread (each XLA device runs its own).
  thread_local dnnl::stream stream(Engine());
  return stream;
}

struct Shapes {
  memory::dims src, weights, dst, strides, dilates, pad_l, pad_r;
};

Shapes MakeShapes(const Key& k) {
  // oneDNN dims are logical NCHW / OIHW whatever the memory layout; dilation 0 = none.
  return Shapes{{k[1], k[4], k[2], k[3]}, {k[7], k[4], k[5], k[6]}, {k[1], k[7], k[8], k[9]},
                {k[10], k[11]},           {k[16] - 1, k[17] - 1},   {k[12], k[14]},
                {k[13], k[15]}};
}

// The backward-data / backward-weights descriptor (same arguments; the forward one as the hint).
template <typename Prim>
typename Prim::primitive_desc BackwardPd(const Shapes& s, const memory::desc& src,
                                         const memory::desc& weights, const memory::desc& dst,
                                         const dnnl::convolution_forward::primitive_desc& hint,
                                         const dnnl::primitive_attr& attr) {
  return typename Prim::primitive_desc(Engine(), dnnl::algorithm::convolution_direct, src, weights,
                                       dst, s.strides, s.dilates, s.pad_l, s.pad_r, hint, attr);
}

std::shared_ptr<Entry> Build(const Key& k) {
  auto& eng = Engine();
  Shapes s = MakeShapes(k);
  memory::desc src_md(s.src, dt::f32, tag::nhwc), dst_md(s.dst, dt::f32, tag::nhwc);
  memory::desc user_w_md(s.weights, dt::f32, tag::hwio);
  memory::desc any_w_md(s.weights, dt::f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc fwd_pd(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src_md,
      any_w_md, dst_md, s.strides, s.dilates, s.pad_l, s.pad_r, attr);
  auto entry = std::make_shared<Entry>();
  if (k[0] == kForward) {
    entry->conv = dnnl::convolution_forward(fwd_pd);
    entry->weights_md = fwd_pd.weights_desc();
    entry->scratch_md = fwd_pd.scratchpad_desc();
  } else if (k[0] == kBackwardData) {
    auto pd = BackwardPd<dnnl::convolution_backward_data>(s, src_md, any_w_md, dst_md, fwd_pd, attr);
    entry->conv = dnnl::convolution_backward_data(pd);
    entry->weights_md = pd.weights_desc();
    entry->scratch_md = pd.scratchpad_desc();
  } else {
    auto pd = BackwardPd<dnnl::convolution_backward_weights>(s, src_md, any_w_md, dst_md, fwd_pd, attr);
    entry->conv = dnnl::convolution_backward_weights(pd);
    entry->weights_md = pd.diff_weights_desc();
    entry->scratch_md = pd.scratchpad_desc();
  }
  entry->reorder_weights = entry->weights_md != user_w_md;
  if (entry->reorder_weights) {
    entry->weights_reorder =
        k[0] == kBackwardWeights
            ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, entry->weights_md, eng, user_w_md))
            : dnnl::reorder(dnnl::reorder::primitive_desc(eng, user_w_md, eng, entry->weights_md));
  }
  return entry;
}

std::shared_ptr<Entry> Lookup(const Key& k) {
  static std::mutex mu;
  static std::unordered_map<Key, std::shared_ptr<Entry>, KeyHash> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(k);
  if (it != cache.end()) return it->second;
  auto entry = Build(k);  // under the lock: primitive creation happens once per shape
  cache.emplace(k, entry);
  return entry;
}

// A 64-byte aligned host buffer (oneDNN's kernels want aligned blocked weights and scratch).
struct Aligned {
  explicit Aligned(size_t bytes) : ptr(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr) {}
  ~Aligned() { std::free(ptr); }
  void* ptr;
};

ffi::Error Run(Kind kind, ffi::AnyBuffer::Dimensions x_dims, ffi::AnyBuffer::Dimensions w_dims,
               ffi::AnyBuffer::Dimensions y_dims, float* x, float* w, float* y,
               std::array<int64_t, 8> window) {
  if (x_dims.size() != 4 || w_dims.size() != 4 || y_dims.size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: operands must be rank 4 (NHWC, HWIO)");
  }
  const int threads = g_threads.load();
  if (threads > 0) omp_set_num_threads(threads);  // this thread's teams, creation and execution
  Key k{kind,      x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[0], w_dims[1], w_dims[3],
        y_dims[1], y_dims[2], window[0], window[1], window[2], window[3], window[4], window[5],
        window[6], window[7], threads};
  // XLA's executor runs independent ops at once (e.g. a conv's two gradients). Calls that use
  // more than one thread each would then run more OpenMP threads than cores, so they take
  // turns; one thread per call (one device per core) needs no lock. Measured, ResNet-18 @112
  // / ResNet-50 @224 train step, interleaved: 423 vs 431 ms and 3.76 vs 3.88 s (medians).
  static std::mutex run_mu;
  std::unique_lock<std::mutex> turn(run_mu, std::defer_lock);
  if (threads != 1) turn.lock();
  try {
    auto entry = Lookup(k);
    auto& eng = Engine();
    auto& stream = Stream();
    Shapes s = MakeShapes(k);
    memory src(memory::desc(s.src, dt::f32, tag::nhwc), eng, x);
    memory dst(memory::desc(s.dst, dt::f32, tag::nhwc), eng, y);
    memory user_w(memory::desc(s.weights, dt::f32, tag::hwio), eng, w);
    Aligned w_buf(entry->reorder_weights ? entry->weights_md.get_size() : 0);
    memory prim_w = entry->reorder_weights ? memory(entry->weights_md, eng, w_buf.ptr) : user_w;
    Aligned scratch_buf(entry->scratch_md.get_size());
    memory scratch(entry->scratch_md, eng, scratch_buf.ptr);
    if (kind != kBackwardWeights && entry->reorder_weights) {
      entry->weights_reorder.execute(stream, user_w, prim_w);
    }
    if (kind == kForward) {
      entry->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w},
                                   {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == kBackwardData) {
      // x is the input gradient (written), y the output gradient (read).
      entry->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w},
                                   {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      entry->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, prim_w},
                                   {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (entry->reorder_weights) entry->weights_reorder.execute(stream, prim_w, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

std::array<int64_t, 8> Window(int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                              int64_t pr, int64_t dh, int64_t dw) {
  return {sh, sw, pt, pb, pl, pr, dh, dw};
}

ffi::Error Forward(F32 x, F32 w, ffi::Result<F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  return Run(kForward, x.dimensions(), w.dimensions(), y->dimensions(), x.typed_data(),
             w.typed_data(), y->typed_data(), Window(sh, sw, pt, pb, pl, pr, dh, dw));
}

ffi::Error BackwardData(F32 g, F32 w, ffi::Result<F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  return Run(kBackwardData, dx->dimensions(), w.dimensions(), g.dimensions(), dx->typed_data(),
             w.typed_data(), g.typed_data(), Window(sh, sw, pt, pb, pl, pr, dh, dw));
}

ffi::Error BackwardWeights(F32 x, F32 g, ffi::Result<F32> dw_out, int64_t sh, int64_t sw,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh,
                           int64_t dw) {
  return Run(kBackwardWeights, x.dimensions(), dw_out->dimensions(), g.dimensions(),
             x.typed_data(), dw_out->typed_data(), g.typed_data(),
             Window(sh, sw, pt, pb, pl, pr, dh, dw));
}

}  // namespace

#define JAXRES_WINDOW_ATTRS                                                                 \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")            \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")    \
      .Attr<int64_t>("dilation_h").Attr<int64_t>("dilation_w")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  JAXRES_WINDOW_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvBackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  JAXRES_WINDOW_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  JAXRES_WINDOW_ATTRS);

// Sets the OpenMP threads each convolution call uses (0: OpenMP's default).
extern "C" void JaxresOnednnSetThreads(int threads) { g_threads.store(threads); }

// The linked oneDNN's version, so Python can say which library it runs on.
extern "C" int64_t JaxresOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
