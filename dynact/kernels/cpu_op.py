"""C++ source of dynact's PyTorch operators, built by :mod:`dynact.kernels.dispatch` in the
background on first use: ``dynact_op::spline`` (the fused CPU spline with its autograd in C++,
for eager calls), the custom ops of compiled CPU graphs (``spline_forward``, ...) and
``dynact_op::sample``, the training plugin's draw and gather of a float32 CPU input in one call.

The kernels of :mod:`dynact.kernels.cpu` are called through :mod:`ctypes` from a Python
``torch.autograd.Function``. Around each call that costs Python work in both directions: the
Function's ``apply``, the ctypes arguments, and above all the autograd engine calling back into
Python for the backward. At the sizes of a deep, narrow model's layers that work is a visible
part of a training step (about 20 us per layer per step on a 2-core Zen 3). This file appends
to the kernels' source an operator whose forward and backward are C++ from end to end: the
engine runs its backward without Python.

It includes PyTorch's headers, so it builds in 40-60 s on 2 cores (the kernels alone in 2-4 s);
the build runs in a background thread and the Python Function serves every call until it is
done. Both call the same kernels with the same arguments, so the numbers are the same bit for
bit; only the time around them differs.
"""

GLUE = r"""
// ----------------------------------------------------------------------------- PyTorch operator
// dynact_op::spline(x, eps, pairs, a, b, base): base(x) + eps * s(x) for a float32 CPU input,
// base 1 (ReLU) or 3 (GELU), computed by the kernels above; see dynact/kernels/cpu_op.py.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <mutex>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace dynact_op {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Every call passes torch's thread count: the kernels keep a tensor of fewer than four chunks on
// the calling thread themselves (threads_for).
//
// The kernels run over the tensor's memory as one flat array: any dense layout (contiguous,
// channels_last) is used as it lies, and empty_like keeps it for the result.
at::Tensor dense(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

struct Spline : public torch::autograd::Function<Spline> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& eps,
                            const at::Tensor& pairs, const at::Tensor& a, const at::Tensor& b, int64_t base) {
    at::Tensor x = dense(x_in);
    at::Tensor out = at::empty_like(x);
    const int64_t n = x.numel();
    const int last = int(pairs.size(0) - 2);
    int rc = dynact_eafo_forward(0, int(base), x.data_ptr(), nullptr, out.data_ptr(), n, pairs.data_ptr(),
                                 double(*a.data_ptr<float>()), double(*b.data_ptr<float>()), last,
                                 eps.data_ptr(), 0, at::get_num_threads());
    TORCH_CHECK(rc == 0, "dynact_op::spline: the kernel rejected its arguments");
    // The input as given (not a dense copy made here): under create_graph=True the backward's
    // formulas then differentiate through the input itself.
    ctx->save_for_backward({x_in, eps, pairs, a, b});
    ctx->saved_data["base"] = base;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &eps = saved[1], &pairs = saved[2], &a = saved[3], &b = saved[4];
    at::Tensor x = saved[0];
    const int64_t base = ctx->saved_data["base"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_eps = ctx->needs_input_grad(1);
    at::Tensor grad = grads[0], gx, geps;
    if (!(need_x || need_eps) || !grad.defined()) return {gx, geps, {}, {}, {}, {}};
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the differentiable operator dynact::spline_backward (registered in
      // Python, with its own backward), as the Python Function's path does; GELU's part by ATen.
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("dynact::spline_backward", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&)>();
      std::tie(gx, geps) = op.call(grad, x, base == 1, pairs, a, b, eps);
      if (base == 3) gx = at::gelu_backward(grad, x) + gx;
      return {need_x ? gx : at::Tensor(), need_eps ? geps : at::Tensor(), {}, {}, {}, {}};
    }
    x = dense(x);
    if (grad.scalar_type() != x.scalar_type() || grad.strides() != x.strides()) {
      grad = at::empty_like(x).copy_(grad);
    }
    if (need_x) gx = at::empty_like(x);
    if (need_eps) geps = at::empty_like(eps, at::MemoryFormat::Contiguous);
    const int64_t n = x.numel();
    int rc = dynact_eafo_backward(0, int(base), grad.data_ptr(), x.data_ptr(), need_x ? gx.data_ptr() : nullptr,
                                  need_eps ? geps.data_ptr() : nullptr, 0, n, pairs.data_ptr(),
                                  double(*a.data_ptr<float>()), double(*b.data_ptr<float>()),
                                  int(pairs.size(0) - 2), eps.data_ptr(), 0, at::get_num_threads());
    TORCH_CHECK(rc == 0, "dynact_op::spline: the kernel rejected its arguments");
    return {gx, geps, {}, {}, {}, {}};
  }
};

at::Tensor spline(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& pairs, const at::Tensor& a,
                  const at::Tensor& b, int64_t base) {
  return Spline::apply(x, eps, pairs, a, b, base);
}

// ---- The operators of compiled graphs: the CPU kernels of the torch.library custom ops of
// dispatch.py (dynact::spline_forward, ...) in C++, with the same results; the spline's also
// take the base code (0: y0 given, 1: ReLU, 3: GELU in the kernel, float32 only) and, instead of
// the tables, the module's knot values s and grid ends lo, hi (see Tables below). Their fake
// tensors are registered from Python (dispatch._register_compiled); the forward operators'
// autograd is C++ (SplineForward, CRReLUForward below).
int code_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: TORCH_CHECK(false, "dynact_op: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

// t (shaped as x) in x's dtype and layout, copied only if it is not already (dispatch._like).
at::Tensor like(const at::Tensor& t, const at::Tensor& x) {
  if (t.scalar_type() == x.scalar_type() && t.strides() == x.strides()) return t;
  return at::empty_like(x).copy_(t);
}

void check(int rc) { TORCH_CHECK(rc == 0, "dynact_op: the kernel rejected its arguments"); }

// The kernels' tables of a spline, built from its knot values s (K of them) and grid ends in the
// compute dtype C (double for double inputs, else float), with the floating-point operations of
// dynact.kernels.reference._tables and dispatch.pack, in their order, so that they are the eager
// path's bit for bit: value = [0, 0, s[1 .. K-2], 0, 0, 0], pairs[j] = (value[j],
// value[j+1] - value[j]) with a last slope of 0; a = reciprocal(hi - lo) * (K - 1) (Python's
// int / tensor) and b = 1 - lo * a. Built at each call: a compiled graph that computed them
// spent more on the dozen tensors and calls around it than on the tables (260 pairs here, well
// under a microsecond).
template <class C>
struct Tables {
  std::vector<C> pairs;
  double a = 0, b = 0;
  int last = 0;

  // A grid end (one number on the CPU) as Tensor.to(C) would give it, read in place.
  static C scalar(const at::Tensor& t) {
    TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "dynact_op: a grid end must be one number on the CPU");
    switch (t.scalar_type()) {
      case at::kFloat: return C(*t.data_ptr<float>());
      case at::kDouble: return C(*t.data_ptr<double>());
      default: return C(t.item<double>());
    }
  }

  Tables(const at::Tensor& s, const at::Tensor& lo, const at::Tensor& hi) {
    const auto cdt = c10::CppTypeToScalarType<C>::value;
    const at::Tensor sc = s.to(cdt).contiguous();
    const int64_t k = sc.numel();
    TORCH_CHECK(k >= 3, "dynact_op: a spline needs at least 3 knots, got ", k);
    const C* v = sc.template data_ptr<C>();
    auto value = [&](int64_t j) { return (j >= 2 && j <= k - 1) ? v[j - 1] : C(0); };
    pairs.resize(2 * (k + 3));
    for (int64_t j = 0; j < k + 3; ++j) {
      pairs[2 * j] = value(j);
      pairs[2 * j + 1] = j < k + 2 ? C(value(j + 1) - value(j)) : C(0);
    }
    const C l = scalar(lo), h = scalar(hi);
    const C r = C(1) / C(h - l);
    const C ca = C(r * C(k - 1));
    const C p = C(l * ca);
    a = double(ca);
    b = double(C(C(1) - p));
    last = int(k + 1);
  }
};

// Runs body(pairs pointer, a, b, last) on the tables in the compute dtype of x.
template <class Body>
void with_tables(const at::Tensor& x, const at::Tensor& s, const at::Tensor& lo, const at::Tensor& hi, Body body) {
  if (x.scalar_type() == at::kDouble) {
    Tables<double> t(s, lo, hi);
    body(static_cast<const void*>(t.pairs.data()), t.a, t.b, t.last);
  } else {
    Tables<float> t(s, lo, hi);
    body(static_cast<const void*>(t.pairs.data()), t.a, t.b, t.last);
  }
}

at::Tensor spline_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& y0_in, const at::Tensor& s,
                          const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& eps, int64_t base) {
  at::Tensor x = dense(x_in), y0;
  at::Tensor out = at::empty_like(x);
  TORCH_CHECK(y0_in.has_value() == (base == 0), "dynact_op::spline_forward: y0 goes with base 0 only");
  if (y0_in.has_value()) y0 = like(*y0_in, x);
  const int64_t n = x.numel();
  with_tables(x, s, lo, hi, [&](const void* pairs, double a, double b, int last) {
    check(dynact_eafo_forward(code_of(x), int(base), x.data_ptr(), y0.defined() ? y0.data_ptr() : nullptr,
                              out.data_ptr(), n, pairs, a, b, last, eps.data_ptr(), code_of(eps),
                              at::get_num_threads()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> spline_backward(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t base,
                                                   const at::Tensor& s, const at::Tensor& lo, const at::Tensor& hi,
                                                   const at::Tensor& eps) {
  at::Tensor x = dense(x_in);
  at::Tensor grad = like(grad_in, x), gx = at::empty_like(x), geps = at::empty_like(eps, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  with_tables(x, s, lo, hi, [&](const void* pairs, double a, double b, int last) {
    check(dynact_eafo_backward(code_of(x), int(base), grad.data_ptr(), x.data_ptr(), gx.data_ptr(), geps.data_ptr(),
                               code_of(eps), n, pairs, a, b, last, eps.data_ptr(), code_of(eps),
                               at::get_num_threads()));
  });
  return {gx, geps};
}

at::Tensor crrelu_forward(const at::Tensor& x_in, const at::Tensor& eps) {
  at::Tensor x = dense(x_in), out = at::empty_like(x);
  const int64_t n = x.numel();
  check(dynact_crrelu_forward(code_of(x), x.data_ptr(), out.data_ptr(), n, eps.data_ptr(), code_of(eps),
                              at::get_num_threads()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> crrelu_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                   const at::Tensor& eps) {
  at::Tensor x = dense(x_in), grad = like(grad_in, x);
  at::Tensor gx = at::empty_like(x), geps = at::empty_like(eps, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  check(dynact_crrelu_backward(code_of(x), grad.data_ptr(), x.data_ptr(), gx.data_ptr(), geps.data_ptr(),
                               code_of(eps), n, eps.data_ptr(), code_of(eps), at::get_num_threads()));
  return {gx, geps};
}

// Autograd of the two forward operators, in C++ as dynact_op::spline's: registered from Python
// (torch.library.register_autograd) it ran a Python function around every call of a compiled
// graph's forward, 6-14 us per layer and step on a 2-core Zen 3. Same formulas: the backward
// operators' results, the incoming gradient for a given base output y0. AOTAutograd traces
// both directions through it (the operators' fake tensors are registered from Python).
struct SplineForward : public torch::autograd::Function<SplineForward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& y0,
                            const at::Tensor& s, const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& eps,
                            int64_t base) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dynact_op::spline_forward", "")
                         .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    ctx->save_for_backward({x, s, lo, hi, eps});
    ctx->saved_data["base"] = base;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, y0, s, lo, hi, eps, base);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dynact_op::spline_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                  const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&)>();
    auto saved = ctx->get_saved_variables();
    const int64_t base = ctx->saved_data["base"].toInt();
    auto [gx, geps] = op.call(grads[0], saved[0], base, saved[1], saved[2], saved[3], saved[4]);
    return {gx, base == 0 ? grads[0] : at::Tensor(), {}, {}, {}, geps, {}};
  }
};

struct CRReLUForward : public torch::autograd::Function<CRReLUForward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dynact_op::crrelu_forward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    ctx->save_for_backward({x, eps});
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dynact_op::crrelu_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&)>();
    auto saved = ctx->get_saved_variables();
    auto [gx, geps] = op.call(grads[0], saved[0], saved[1]);
    return {gx, geps};
  }
};

at::Tensor spline_forward_autograd(const at::Tensor& x, const std::optional<at::Tensor>& y0, const at::Tensor& s,
                                   const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& eps, int64_t base) {
  return SplineForward::apply(x, y0, s, lo, hi, eps, base);
}

at::Tensor crrelu_forward_autograd(const at::Tensor& x, const at::Tensor& eps) { return CRReLUForward::apply(x, eps); }

// dynact_op::sample(x, out, start, count, generator): out.flatten()[start + i] = x.flatten()[p_i]
// for i < count (x in any layout), where p is what torch.randint(x.numel(), (count,),
// generator=generator) draws (writing at an offset spares the caller a slice of its buffer per
// call): the draws of ATen's uniform_int_from_to_distribution over the same CPU generator,
// under its lock, one position after another (below 2^28 positions its arithmetic repeated
// inline, see below). So the values and the generator's state afterwards are those of randint
// then index_select, bit for bit, without the index tensor (written, then read back) and two
// operator calls: the training plugin's sample of a float32 CPU input
// (dynact.sampling.SampleBank.write).
void sample(const at::Tensor& x, const at::Tensor& dest, int64_t start, int64_t m,
            const std::optional<at::Generator>& generator) {
  TORCH_CHECK(x.device().is_cpu() && dest.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  dest.scalar_type() == at::kFloat && dest.is_contiguous() && x.numel() > 0,
              "dynact_op::sample: takes a non-empty float32 CPU input and a contiguous float32 CPU destination");
  TORCH_CHECK(start >= 0 && m >= 0 && start + m <= dest.numel(), "dynact_op::sample: [", start, ", ", start + m,
              ") is not inside the destination's ", dest.numel(), " elements");
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  const at::uniform_int_from_to_distribution<int64_t> position(uint64_t(x.numel()), 0);
  const float* src = x.data_ptr<float>();
  float* out = dest.data_ptr<float>() + start;
  // Positions are logical, as x.flatten()[p] (x[unravel_index(p, x.shape)]): a strided input
  // (channels_last, a view) is read at the position's coordinates, innermost first, times the strides.
  const bool flat = x.is_contiguous();
  const std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end()), strides(x.strides().begin(), x.strides().end());
  auto offset_of = [&](int64_t p) {
    if (flat) return p;
    int64_t offset = 0;
    for (int64_t d = int64_t(sizes.size()) - 1; d >= 0; --d) {
      offset += (p % sizes[d]) * strides[d];
      p /= sizes[d];
    }
    return offset;
  };
  // The input is usually out of cache by the time a hook samples it, and a load after every draw
  // waited for its miss. Positions are drawn a block at a time and prefetched; a block's values
  // are gathered after the next block is drawn, when they have arrived.
  constexpr int64_t kBlock = 256;
  int64_t at[2][kBlock];
  std::lock_guard<std::mutex> lock(gen->mutex_);
  auto gather = [&](auto&& draw) {
    int64_t prev_first = 0, prev_count = 0;
    for (int64_t first = 0;; first += kBlock) {
      const int64_t count = std::max(int64_t(0), std::min(kBlock, m - first));
      int64_t* block = at[(first / kBlock) & 1];
      for (int64_t k = 0; k < count; ++k) {
        block[k] = offset_of(draw());
        __builtin_prefetch(src + block[k]);
      }
      const int64_t* ready = at[((first / kBlock) & 1) ^ 1];
      for (int64_t k = 0; k < prev_count; ++k) out[prev_first + k] = src[ready[k]];
      if (count == 0) break;
      prev_first = first;
      prev_count = count;
    }
  };
  const uint64_t range = uint64_t(x.numel());
  if (range >= (uint64_t(1) << 28)) {  // the distribution takes 64 bits (two draws) per position
    gather([&] { return int64_t(position(gen)); });
    return;
  }
  // Below 2^28 the distribution takes one 32-bit draw v per position, and v % range. The same
  // engine runs here inline on a copy of the generator's state (written back afterwards: the
  // generator's own random() is an out-of-line call per draw), and v % range comes from
  // Lemire's multiply (exact for 32-bit operands) instead of a 64-bit division.
  at::mt19937 engine = gen->engine();
  const uint64_t magic = ~uint64_t(0) / range + 1;  // 0 for range 1, where every remainder is 0
  gather([&] {
    const uint64_t low = magic * uint64_t(engine());
    return int64_t((static_cast<unsigned __int128>(low) * range) >> 64);
  });
  gen->set_engine(engine);
}

}  // namespace dynact_op

TORCH_LIBRARY(dynact_op, m) {
  m.def("spline(Tensor x, Tensor eps, Tensor pairs, Tensor a, Tensor b, int base) -> Tensor");
  m.def("spline_forward(Tensor x, Tensor? y0, Tensor s, Tensor lo, Tensor hi, Tensor eps, int base) -> Tensor");
  m.def("spline_backward(Tensor grad, Tensor x, int base, Tensor s, Tensor lo, Tensor hi, Tensor eps) "
        "-> (Tensor, Tensor)");
  m.def("crrelu_forward(Tensor x, Tensor eps) -> Tensor");
  m.def("crrelu_backward(Tensor grad, Tensor x, Tensor eps) -> (Tensor, Tensor)");
  m.def("sample(Tensor x, Tensor(a!) dest, int start, int count, Generator? generator) -> ()");
}

TORCH_LIBRARY_IMPL(dynact_op, CompositeImplicitAutograd, m) { m.impl("spline", &dynact_op::spline); }

TORCH_LIBRARY_IMPL(dynact_op, Autograd, m) {
  m.impl("spline_forward", &dynact_op::spline_forward_autograd);
  m.impl("crrelu_forward", &dynact_op::crrelu_forward_autograd);
}

TORCH_LIBRARY_IMPL(dynact_op, CPU, m) {
  m.impl("spline_forward", &dynact_op::spline_forward);
  m.impl("spline_backward", &dynact_op::spline_backward);
  m.impl("crrelu_forward", &dynact_op::crrelu_forward);
  m.impl("crrelu_backward", &dynact_op::crrelu_backward);
  m.impl("sample", &dynact_op::sample);
}
"""
