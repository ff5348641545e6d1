"""C++ source of the fused CPU kernels, compiled by :mod:`dynact.kernels.dispatch` on first use.

Kept as a string in a Python module so that it ships inside the package with no packaging
configuration; ``python -c "from dynact.kernels.cpu import SOURCE; print(SOURCE, end='')" > k.cpp``
writes it out for reading or editing.
"""

SOURCE = r"""// Fused CPU kernels of dynact's activations: one pass over the tensor per direction.
//
// Plain C++ without PyTorch headers, so that building it takes about a second; dynact/kernels/dispatch.py
// compiles it once per machine, caches the shared library and calls it through ctypes.
//
// Element types (code): 0 float32, 1 float64, 2 bfloat16, 3 float16. Half types are computed in
// float32 (the segment index of a 257-knot spline needs more than 8 mantissa bits), float64 in
// float64. Every element is independent, except the eps gradient, a sum: it is split into fixed
// chunks of CHUNK elements (whatever the thread count), each summed in double in a fixed order,
// and the chunk sums are added in order, so the result is the same bit for bit on every call.
// (Inside a chunk, runs of SUB elements are summed in the compute type first, which keeps the
// loops vectorised; the order is still fixed, and for float32 with AVX2 written out: lanes_sum.)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DYNACT_AVX2 1
#endif

namespace {

// The small helpers of the element loops are always inlined: in a larger translation unit
// (dynact/kernels/cpu_op.py appends PyTorch's headers and an operator) GCC's growth limits left
// segment8 as a call inside the loops, 10-15% slower, and a call in an "omp simd" loop keeps
// it scalar.
#define DYNACT_INLINE inline __attribute__((always_inline))

constexpr int64_t CHUNK = 16384;  // elements per parallel task and per partial sum of the eps gradient
constexpr int64_t SUB = 512;       // elements per short sum inside a chunk

struct bf16 { uint16_t v; };
struct f16 { uint16_t v; };

DYNACT_INLINE float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
DYNACT_INLINE uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

template <class T> struct Type;
template <> struct Type<float> {
  using C = float;
  DYNACT_INLINE static C load(float v) { return v; }
  DYNACT_INLINE static float store(C v) { return v; }
};
template <> struct Type<double> {
  using C = double;
  DYNACT_INLINE static C load(double v) { return v; }
  DYNACT_INLINE static double store(C v) { return v; }
};
template <> struct Type<bf16> {
  using C = float;
  DYNACT_INLINE static C load(bf16 h) { return as_float(uint32_t(h.v) << 16); }
  DYNACT_INLINE static bf16 store(float f) {  // round to nearest even; NaN stays a (quiet) NaN
    uint32_t u = as_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return bf16{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
  }
};
template <> struct Type<f16> {
  using C = float;
  // IEEE half <-> float by bit arithmetic (subnormals, infinities and NaN included), written
  // without branches so that loops over it vectorise.
  DYNACT_INLINE static C load(f16 h) {
    const uint32_t exp_mask = 0x7c00u << 13;
    uint32_t o = (uint32_t(h.v) & 0x7fffu) << 13;
    uint32_t e = o & exp_mask;
    o += (127u - 15u) << 23;
    uint32_t inf_nan = o + ((128u - 16u) << 23);
    uint32_t subnormal = as_bits(as_float(o + (1u << 23)) - as_float(113u << 23));
    o = e == exp_mask ? inf_nan : (e == 0 ? subnormal : o);
    return as_float(o | ((uint32_t(h.v) & 0x8000u) << 16));
  }
  DYNACT_INLINE static f16 store(float f) {  // round to nearest even
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u = as_bits(f);
    uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
    uint32_t sub = as_bits(as_float(u) + as_float(denorm_magic)) - denorm_magic;
    uint32_t norm = (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    uint32_t o = u >= ((127u + 16u) << 23) ? big : (u < (113u << 23) ? sub : norm);
    return f16{uint16_t(o | (sign >> 16))};
  }
};

// exp(t) for t <= 0 (or NaN), float: Cephes' polynomial, within 2 ulp; 0 below -87.
DYNACT_INLINE float exp_nonpositive(float t) {
  float tc = t < -87.0f ? -87.0f : t;
  float fx = std::floor(tc * 1.44269504088896341f + 0.5f);
  fx = fx == fx ? fx : 0.0f;
  float r = tc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  float scale = as_float(uint32_t(int32_t(fx) + 127) << 23);
  return t < -87.0f ? 0.0f : y * scale;
}
DYNACT_INLINE double exp_nonpositive(double t) { return std::exp(t); }

template <class C> DYNACT_INLINE C relu(C x) { return x < C(0) ? C(0) : x; }  // NaN passes through

// Segment j and position in it: u = a x + b clamped to [0, last] (NaN stays NaN, j = 0).
template <class C> DYNACT_INLINE C mul_add(C x, C a, C b) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  // As ATen's vectorised addcmul: the reference path's segments and values, bit for bit.
  return std::fma(x, a, b);
#else
  return b + x * a;
#endif
}

template <class C> DYNACT_INLINE int segment(C x, C a, C b, C last, C* frac) {
  C u = mul_add(x, a, b);
  u = u < C(0) ? C(0) : u;
  u = u > last ? last : u;
  int j = int(u == u ? u : C(0));
  *frac = u - C(j);
  return j;
}

// The knot table holds (value, slope) pairs: one 64-bit load fetches both for float, half the
// loads of two separate tables (the loads dominate these loops).
typedef uint64_t __attribute__((may_alias)) u64_alias;
DYNACT_INLINE void lookup(const float* __restrict pairs, int j, float* value, float* slope) {
  uint64_t e = reinterpret_cast<const u64_alias*>(pairs)[j];
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  *value = as_float(uint32_t(e));
  *slope = as_float(uint32_t(e >> 32));
#else
  *value = as_float(uint32_t(e >> 32));
  *slope = as_float(uint32_t(e));
#endif
}
DYNACT_INLINE void lookup(const double* __restrict pairs, int j, double* value, double* slope) {
  *value = pairs[2 * j];
  *slope = pairs[2 * j + 1];
}

inline int threads_for(int64_t n, int threads) { return n < 4 * CHUNK ? 1 : threads; }

// The loops over elements live in small functions with restrict-qualified pointers, called per
// chunk from the parallel loop: written inline in the OpenMP region, GCC left some of them
// scalar (and branchy), several times slower.

// Runs body(start, stop) over fixed chunks in parallel; with a sum, body returns the partial
// sum of its chunk and the chunk sums are added in chunk order.
// A tensor of a few chunks runs on the calling thread without entering an OpenMP region (whose
// setup is a measurable part of a call at the sizes of a small model's layers).
template <class Body> void for_chunks(int64_t n, int threads, Body body) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  if (threads_for(n, threads) == 1) {
    for (int64_t c = 0; c < chunks; ++c) body(c * CHUNK, c * CHUNK + CHUNK < n ? c * CHUNK + CHUNK : n);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) body(c * CHUNK, c * CHUNK + CHUNK < n ? c * CHUNK + CHUNK : n);
}
template <class Body> double chunk_sum(int64_t c, int64_t n, Body& body) {
  const int64_t end = c * CHUNK + CHUNK < n ? c * CHUNK + CHUNK : n;
  double acc = 0.0;
  // Runs of SUB elements are summed in the compute type (keeps the loop vectorised).
  for (int64_t s = c * CHUNK; s < end; s += SUB) acc += double(body(s, s + SUB < end ? s + SUB : end));
  return acc;
}
template <class Body> double sum_chunks(int64_t n, int threads, Body body) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  double total = 0.0;
  if (threads_for(n, threads) == 1) {  // the same chunk sums, added in the same order
    for (int64_t c = 0; c < chunks; ++c) total += chunk_sum(c, n, body);
    return total;
  }
  std::vector<double> partial(chunks);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) partial[c] = chunk_sum(c, n, body);
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  return total;
}

// ----------------------------------------------------------------------------- EAFO spline

#ifdef DYNACT_AVX2
// float32 with AVX2: eight elements per step, the (value, slope) pairs fetched by eight 64-bit
// loads, where GCC's own vector code assembled each pair from two 32-bit loads (four times
// slower on Zen 3). Every operation is the scalar code's, in its order, so the results are bit for bit
// those of the loops below (which finish the last elements of each range). max(0, u) and
// min(last, u) keep NaN and -0 as the scalar comparisons do.
struct Seg8 { __m256 frac, value, slope; };

DYNACT_INLINE Seg8 segment8(__m256 xv, __m256 a, __m256 b, __m256 last, const float* pairs) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 u = _mm256_min_ps(last, _mm256_max_ps(zero, _mm256_fmadd_ps(xv, a, b)));
  __m256i j = _mm256_and_si256(_mm256_cvttps_epi32(u), _mm256_castps_si256(_mm256_cmp_ps(u, u, _CMP_ORD_Q)));
  // Eight scalar 64-bit loads of the pairs, in the order (0 1 4 5)(2 3 6 7) so that one shuffle
  // gives values and slopes in order: on Zen 3 they took 3/4 the time of two vpgatherdq. The
  // indices (whole numbers in [0, last]) reach the loads two at a time through 64-bit
  // registers, not through a store to the stack and eight reloads: the lookup alone went from
  // 19.7 to 15.7 us per 32768 values (a standalone loop on Zen 3), the results unchanged.
  const double* table = reinterpret_cast<const double*>(pairs);
  const __m128i jl = _mm256_castsi256_si128(j), jh = _mm256_extracti128_si256(j, 1);
  const uint64_t q0 = uint64_t(_mm_cvtsi128_si64(jl)), q1 = uint64_t(_mm_extract_epi64(jl, 1));
  const uint64_t q2 = uint64_t(_mm_cvtsi128_si64(jh)), q3 = uint64_t(_mm_extract_epi64(jh, 1));
  __m256 lo = _mm256_castpd_ps(
      _mm256_setr_pd(table[uint32_t(q0)], table[q0 >> 32], table[uint32_t(q2)], table[q2 >> 32]));
  __m256 hi = _mm256_castpd_ps(
      _mm256_setr_pd(table[uint32_t(q1)], table[q1 >> 32], table[uint32_t(q3)], table[q3 >> 32]));
  return {_mm256_sub_ps(u, _mm256_cvtepi32_ps(j)), _mm256_shuffle_ps(lo, hi, 0x88), _mm256_shuffle_ps(lo, hi, 0xDD)};
}


// GELU (erf form) computed in the kernel, float32, for BASE 3: x * Phi(x), derivative
// Phi(x) + x * phi(x). With z = |x| / sqrt(2) and t = 1 / (1 + z / 2), erfc(z) = t * h(t) * exp(-x^2/2),
// where h is a degree-8 polynomial fitted (for dynact: weighted least squares in a Chebyshev
// basis, reweighted toward equal ripple) to erfcx(z) / t over t in [1/5.7, 1], i.e. |x| <= 13.3
// (beyond, exp(-x^2/2) is 0 in float32), relative error 4.3e-8; Phi(x) is 1 - erfc(z)/2 for
// x >= 0 and erfc(z)/2 below. The one exponential serves phi(x) too. x^2 is split into hi + lo
// exactly (an FMA) and exp(-(hi + lo)/2) = exp(-hi/2) (1 - lo/2), so the tails keep their
// relative accuracy. Against x Phi(x) and Phi(x) + x phi(x) in float64 on [-13, 14]: at most 8 ulp,
// and 3.9e-7 absolute everywhere (nn.GELU of torch 2.14: up to 9 ulp on [-1, 1], thousands of
// ulp below -1, 3.8e-7 absolute); below x = -13.2 (|x Phi(x)| < 1e-37) the result is 0.
// NaN gives NaN; +inf gives inf; -inf gives NaN (as nn.GELU).
constexpr float kErfcxPoly[9] = {0.2820879817008972f, 0.2823481857776642f, 0.24329844117164612f,
                                 0.2019263207912445f, -0.024848973378539085f, 0.2755158245563507f,
                                 -0.48499223589897156f, 0.28351888060569763f, -0.05885445326566696f};

// exp(t) for t <= 0, eight lanes: exp_nonpositive above with FMAs (so not bit for bit the
// same), about 2 ulp; 0 below -87 and for -inf; a NaN t gives a finite number (callers multiply
// by x, which carries the NaN).
DYNACT_INLINE __m256 exp8_nonpositive(__m256 t) {
  const __m256 tc = _mm256_max_ps(t, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(tc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), tc);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 q = _mm256_set1_ps(1.9875691500e-4f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  __m256 keep = _mm256_cmp_ps(t, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

struct Gelu8 { __m256 cdf, gauss; };  // Phi(x) and exp(-x^2/2)

DYNACT_INLINE Gelu8 gelu8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  __m256 hi = _mm256_mul_ps(x, x);
  // lo = x*x - hi exactly; 0 where x*x is huge (or inf, where the FMA would give NaN).
  __m256 lo = _mm256_and_ps(_mm256_fmsub_ps(x, x, hi), _mm256_cmp_ps(hi, _mm256_set1_ps(1e4f), _CMP_LT_OQ));
  __m256 g = exp8_nonpositive(_mm256_mul_ps(hi, _mm256_set1_ps(-0.5f)));
  g = _mm256_fnmadd_ps(_mm256_mul_ps(g, half), lo, g);
  __m256 z = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(0.70710678118654752f));
  __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(z, half, one));
  // h(t) by Estrin's scheme: a dependency chain of 4 multiply-adds instead of Horner's 8.
  const __m256 t2 = _mm256_mul_ps(t, t), t4 = _mm256_mul_ps(t2, t2), t8 = _mm256_mul_ps(t4, t4);
  auto c = [](int k) { return _mm256_set1_ps(kErfcxPoly[k]); };
  __m256 p01 = _mm256_fmadd_ps(c(1), t, c(0)), p23 = _mm256_fmadd_ps(c(3), t, c(2));
  __m256 p45 = _mm256_fmadd_ps(c(5), t, c(4)), p67 = _mm256_fmadd_ps(c(7), t, c(6));
  __m256 p03 = _mm256_fmadd_ps(p23, t2, p01), p47 = _mm256_fmadd_ps(p67, t2, p45);
  __m256 h = _mm256_fmadd_ps(c(8), t8, _mm256_fmadd_ps(p47, t4, p03));
  __m256 tail = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, t), h), g);  // erfc(z) / 2
  __m256 upper = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  return {_mm256_blendv_ps(tail, _mm256_sub_ps(one, tail), upper), g};
}

// Returns the first index it left to the scalar loop.
template <int BASE>
int64_t eafo_forward8(const float* __restrict x, const float* __restrict y0, float* __restrict out, int64_t start,
                      int64_t stop, const float* __restrict pairs, float a, float b, float last, float eps) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vl = _mm256_set1_ps(last), ve = _mm256_set1_ps(eps);
  int64_t i = start;
  for (; i + 8 <= stop; i += 8) {
    __m256 xv = _mm256_loadu_ps(x + i);
    Seg8 seg = segment8(xv, va, vb, vl, pairs);
    __m256 s = _mm256_fmadd_ps(seg.frac, seg.slope, seg.value);
    __m256 base = BASE == 1   ? _mm256_max_ps(_mm256_setzero_ps(), xv)
                  : BASE == 3 ? _mm256_mul_ps(xv, gelu8(xv).cdf)
                              : _mm256_loadu_ps(y0 + i);
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(s, ve, base));
  }
  return i;
}

// With GE, the products grad * s(x) are added to the eight lanes of *acc, eight at a time from
// the first element on; lanes_sum below finishes the sum.
template <int BASE, bool GX, bool GE>
int64_t eafo_backward8(const float* __restrict grad, const float* __restrict x, float* __restrict gx, int64_t start,
                       int64_t stop, const float* __restrict pairs, float a, float b, float last, float a_eps,
                       __m256* acc) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vl = _mm256_set1_ps(last);
  const __m256 vae = _mm256_set1_ps(a_eps);
  __m256 sum = *acc;
  int64_t i = start;
  for (; i + 8 <= stop; i += 8) {
    __m256 xv = _mm256_loadu_ps(x + i);
    __m256 g = _mm256_loadu_ps(grad + i);
    Seg8 seg = segment8(xv, va, vb, vl, pairs);
    if (GE) sum = _mm256_add_ps(sum, _mm256_mul_ps(g, _mm256_fmadd_ps(seg.frac, seg.slope, seg.value)));
    if (GX) {
      __m256 spline = _mm256_mul_ps(g, _mm256_mul_ps(seg.slope, vae));
      __m256 total = spline;
      if (BASE == 1) {
        __m256 positive = _mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_GT_OQ);
        total = _mm256_blendv_ps(spline, _mm256_add_ps(g, spline), positive);
      } else if (BASE == 2) {
        total = _mm256_add_ps(_mm256_loadu_ps(gx + i), spline);
      } else if (BASE == 3) {
        Gelu8 gl = gelu8(xv);
        __m256 slope_base = _mm256_fmadd_ps(_mm256_mul_ps(xv, gl.gauss), _mm256_set1_ps(0.3989422804014327f), gl.cdf);
        total = _mm256_fmadd_ps(g, slope_base, spline);
      }
      _mm256_storeu_ps(gx + i, total);
    }
  }
  *acc = sum;
  return i;
}

// The eps gradient's sum over one run (at most SUB elements): the eight lanes of acc, the first
// of them with the run's last m (< 8) products added one by one, then the lanes added in order.
// That is the order of the loop it replaces (the products stored, then summed by GCC's
// vectorised reduction: one accumulator, the tail in its first lane), so the sums are the same
// bit for bit (checked against the old loop on 4800 cases); kept in a register, the products
// cost no store and no second pass: a 128x256 float32 backward went from 76.6 to 72.8 us with a
// GELU base and from 35.5 to 33.6 us with ReLU (medians, interleaved, one thread, 2-core Zen 3).
DYNACT_INLINE float lanes_sum(__m256 acc, const float* tail, int64_t m) {
  alignas(32) float lane[8];
  _mm256_store_ps(lane, acc);
  for (int64_t k = 0; k < m; ++k) lane[0] += tail[k];
  float sum = 0.0f;
  for (int k = 0; k < 8; ++k) sum += lane[k];
  return sum;
}

// BASE 3 (GELU in the kernel), float32 with AVX2 only: the vector loops, and the last (< 8)
// elements of a range through the same loop on a zero-padded copy, so every element gets the
// same arithmetic wherever it lies.
void eafo_gelu_forward_run(const float* __restrict x, float* __restrict out, int64_t start, int64_t stop,
                           const float* __restrict pairs, float a, float b, float last, float eps) {
  int64_t i = eafo_forward8<3>(x, nullptr, out, start, stop, pairs, a, b, last, eps);
  if (i < stop) {
    alignas(32) float xb[8] = {0}, ob[8];
    const int64_t m = stop - i;
    std::memcpy(xb, x + i, m * sizeof(float));
    eafo_forward8<3>(xb, nullptr, ob, 0, 8, pairs, a, b, last, eps);
    std::memcpy(out + i, ob, m * sizeof(float));
  }
}

template <bool GX, bool GE>
float eafo_gelu_backward_run(const float* __restrict grad, const float* __restrict x, float* __restrict gx,
                             int64_t start, int64_t stop, const float* __restrict pairs, float a, float b,
                             float last, float a_eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = eafo_backward8<3, GX, GE>(grad, x, gx, start, stop, pairs, a, b, last, a_eps, &acc);
  const int64_t m = stop - i;
  alignas(32) float tail[8];
  if (m > 0) {
    alignas(32) float xb[8] = {0}, gb[8] = {0}, ob[8];
    std::memcpy(xb, x + i, m * sizeof(float));
    std::memcpy(gb, grad + i, m * sizeof(float));
    __m256 t = _mm256_setzero_ps();
    eafo_backward8<3, GX, GE>(gb, xb, ob, 0, 8, pairs, a, b, last, a_eps, &t);
    if (GX) std::memcpy(gx + i, ob, m * sizeof(float));
    _mm256_store_ps(tail, t);  // the products, one per lane
  }
  return GE ? lanes_sum(acc, tail, m) : 0.0f;
}

void eafo_gelu_forward(const float* x, float* out, int64_t n, const float* pairs, double a, double b, int last,
                       double eps, int threads) {
  for_chunks(n, threads, [&](int64_t start, int64_t stop) {
    eafo_gelu_forward_run(x, out, start, stop, pairs, float(a), float(b), float(last), float(eps));
  });
}

template <bool GX, bool GE>
void eafo_gelu_backward(const float* grad, const float* x, float* gx, double* geps, int64_t n, const float* pairs,
                        double a_, double b_, int last_, double eps_, int threads) {
  const float a = float(a_), b = float(b_), last = float(last_), a_eps = float(a_) * float(eps_);
  auto run = [&](int64_t start, int64_t stop) {
    return eafo_gelu_backward_run<GX, GE>(grad, x, gx, start, stop, pairs, a, b, last, a_eps);
  };
  if (GE) *geps = sum_chunks(n, threads, run);
  else for_chunks(n, threads, run);
}
#endif


// y = base(x) + eps * s(x), s(x) = value[j] + frac * slope[j] with (value, slope) = pairs[j].
// BASE 0: base(x) given as y0; BASE 1: ReLU computed here.
template <class T, int BASE, class C = typename Type<T>::C>
void eafo_forward_run(const T* __restrict x, const T* __restrict y0, T* __restrict out, int64_t start,
                      int64_t stop, const C* __restrict pairs, C a, C b, C last, C eps) {
  int64_t first = start;
#ifdef DYNACT_AVX2
  if constexpr (std::is_same<T, float>::value) {
    first = eafo_forward8<BASE>(x, y0, out, start, stop, pairs, a, b, last, eps);
  }
#endif
#pragma omp simd
  for (int64_t i = first; i < stop; ++i) {
    C xv = Type<T>::load(x[i]);
    C frac, value, slope;
    int j = segment(xv, a, b, last, &frac);
    lookup(pairs, j, &value, &slope);
    C s = mul_add(frac, slope, value);
    C base = BASE == 1 ? relu(xv) : Type<T>::load(y0[i]);
    out[i] = Type<T>::store(mul_add(s, eps, base));
  }
}

template <class T, int BASE>
void eafo_forward(const T* x, const T* y0, T* out, int64_t n, const typename Type<T>::C* pairs, double a,
                  double b, int last, double eps, int threads) {
  using C = typename Type<T>::C;
  for_chunks(n, threads, [&](int64_t start, int64_t stop) {
    eafo_forward_run<T, BASE>(x, y0, out, start, stop, pairs, C(a), C(b), C(last), C(eps));
  });
}

// grad_x = grad * base'(x) + grad * slope[j] * (a * eps): BASE 0 the spline's part only, BASE 1
// with ReLU's, BASE 2 added to the base's part already in gx;
// returns sum(grad * s(x)) over [start, stop) (at most SUB elements) if GE.
template <class T, int BASE, bool GX, bool GE, class C = typename Type<T>::C>
C eafo_backward_run(const T* __restrict grad, const T* __restrict x, T* __restrict gx, int64_t start,
                    int64_t stop, const C* __restrict pairs, C a, C b, C last, C a_eps) {
  // The products are stored and summed in a second loop: with the sum in the main loop GCC
  // left it scalar (5x slower).
  C terms[GE ? SUB : 1];
  int64_t first = start;
#ifdef DYNACT_AVX2
  __m256 acc = _mm256_setzero_ps();
  if constexpr (std::is_same<T, float>::value) {
    first = eafo_backward8<BASE, GX, GE>(grad, x, gx, start, stop, pairs, a, b, last, a_eps, &acc);
  }
#endif
#pragma omp simd
  for (int64_t i = first; i < stop; ++i) {
    C xv = Type<T>::load(x[i]);
    C g = Type<T>::load(grad[i]);
    C frac, value, slope;
    int j = segment(xv, a, b, last, &frac);
    lookup(pairs, j, &value, &slope);
    if (GE) terms[i - start] = g * mul_add(frac, slope, value);
    if (GX) {
      C spline = g * (slope * a_eps);
      // BASE 2: gx holds the base's part already; the spline's is rounded to T and added, as
      // autograd adds the gradients of two branches.
      C total = BASE == 1 ? (xv > C(0) ? g + spline : spline)
                          : (BASE == 2 ? Type<T>::load(gx[i]) + Type<T>::load(Type<T>::store(spline)) : spline);
      gx[i] = Type<T>::store(total);
    }
  }
  C sum = C(0);
  if (GE) {
#ifdef DYNACT_AVX2
    // float: the products up to `first` were summed in the eight-lane loop, the rest are in terms.
    if constexpr (std::is_same<T, float>::value) return lanes_sum(acc, terms + (first - start), stop - first);
#endif
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < stop - start; ++i) sum += terms[i];
  }
  return sum;
}

template <class T, int BASE, bool GX, bool GE>
void eafo_backward(const T* grad, const T* x, T* gx, double* geps, int64_t n, const typename Type<T>::C* pairs,
                   double a_, double b_, int last_, double eps_, int threads) {
  using C = typename Type<T>::C;
  const C a = C(a_), b = C(b_), last = C(last_), a_eps = C(a_) * C(eps_);
  auto run = [&](int64_t start, int64_t stop) {
    return eafo_backward_run<T, BASE, GX, GE>(grad, x, gx, start, stop, pairs, a, b, last, a_eps);
  };
  if (GE) *geps = sum_chunks(n, threads, run);
  else for_chunks(n, threads, run);
}

// ----------------------------------------------------------------------------- CRReLU
// y = relu(x) + eps * x * exp(-x^2/2)
template <class T, class C = typename Type<T>::C>
void crrelu_forward_run(const T* __restrict x, T* __restrict out, int64_t start, int64_t stop, C eps) {
#pragma omp simd
  for (int64_t i = start; i < stop; ++i) {
    C xv = Type<T>::load(x[i]);
    C gauss = exp_nonpositive(xv * xv * C(-0.5));
    out[i] = Type<T>::store(relu(xv) + gauss * xv * eps);
  }
}

template <class T>
void crrelu_forward(const T* x, T* out, int64_t n, double eps, int threads) {
  using C = typename Type<T>::C;
  for_chunks(n, threads, [&](int64_t start, int64_t stop) { crrelu_forward_run<T>(x, out, start, stop, C(eps)); });
}

// grad_x = grad * (1[x > 0] + eps * (1 - x^2) * exp(-x^2/2)); returns sum(grad * x * exp(-x^2/2)) if GE.
template <class T, bool GX, bool GE, class C = typename Type<T>::C>
C crrelu_backward_run(const T* __restrict grad, const T* __restrict x, T* __restrict gx, int64_t start,
                      int64_t stop, C eps) {
  C terms[GE ? SUB : 1];
#pragma omp simd
  for (int64_t i = start; i < stop; ++i) {
    C xv = Type<T>::load(x[i]);
    C g = Type<T>::load(grad[i]);
    C x2 = xv * xv;
    x2 = x2 > C(1e4) ? C(1e4) : x2;  // the Gaussian is 0 beyond; keeps (1 - x2) * 0 from being -inf * 0 (NaN passes)
    C gauss = exp_nonpositive(x2 * C(-0.5));
    if (GE) terms[i - start] = g * xv * gauss;
    if (GX) {
      C slope = (C(1) - x2) * gauss * eps + (xv > C(0) ? C(1) : C(0));
      gx[i] = Type<T>::store(slope * g);
    }
  }
  C sum = C(0);
  if (GE) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < stop - start; ++i) sum += terms[i];
  }
  return sum;
}

template <class T, bool GX, bool GE>
void crrelu_backward(const T* grad, const T* x, T* gx, double* geps, int64_t n, double eps, int threads) {
  using C = typename Type<T>::C;
  auto run = [&](int64_t start, int64_t stop) {
    return crrelu_backward_run<T, GX, GE>(grad, x, gx, start, stop, C(eps));
  };
  if (GE) *geps = sum_chunks(n, threads, run);
  else for_chunks(n, threads, run);
}

// ----------------------------------------------------------------------------- density binning
// dynact.density.rows.bin_rows in one pass per row: what its tensor ops compute (dynact.density.
// kernels._locate, then _kde_nodes or _hist_nodes), element by element. Every step of those ops
// on a value that is binned is one float32 rounding done here in the same order ((x - lo) * scale,
// + 0.5, the fraction rounded to 1/65536); the masks (outside, non-finite) are exact there and
// are branches here; the float64 sums are added in element order, as index_add_ does on one
// thread. So the state is the same bit for bit, in about a tenth of the time (no temporaries).
// kind 0: KDE (linear binning onto bins + 2 nodes), 1: histogram. out: rows x (nodes + 3),
// the nodes then the counts [below, above, non-finite] of the first filled[r] values of row r.
// ends (if not NULL): [-min, max] of the finite values (-inf where there is none), as
// dynact.sampling.extremes.
//
// The sums are exact in any order: counts are whole numbers and every fraction a multiple of
// 2^-16, so a row's sums (at most 2^31 values) need fewer than 53 bits. The AVX2 loop therefore
// computes eight values' bins at once and adds them into LANES interleaved copies of the counts
// (no store-to-load chain when neighbours share a bin), summed at the end: the same state bit
// for bit, in about a third of the time. count and fraction hold LANES * (nodes + 1) doubles.
constexpr int LANES = 4;

#ifdef DYNACT_AVX2
// Values [0, m8) of a row, m8 a multiple of 8: the scalar loop's arithmetic, eight at a time
// (compare, clamp, subtract, multiply, add, truncate, round: no contraction into FMAs).
// Returns the counts of values below, above and non-finite through the pointers.
DYNACT_INLINE void bin_row8(int kind, const float* __restrict v, int64_t m8, float lo_f, float hi_f, float low,
                            float high, float scale, float top, int stride, double* __restrict count,
                            double* __restrict fraction, int64_t* below, int64_t* above, int64_t* bad,
                            float* least, float* most) {
  const __m256 vlo = _mm256_set1_ps(lo_f), vhi = _mm256_set1_ps(hi_f), vlow = _mm256_set1_ps(low);
  const __m256 vhigh = _mm256_set1_ps(high), vscale = _mm256_set1_ps(scale), vtop = _mm256_set1_ps(top);
  const __m256 zero = _mm256_setzero_ps(), half = _mm256_set1_ps(0.5f);
  const __m256 vcap = _mm256_set1_ps(top - 0.5f), q = _mm256_set1_ps(65536.0f), inv_q = _mm256_set1_ps(1.0f / 65536.0f);
  const __m256 inf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
  __m256 vleast = inf, vmost = ninf;
  int64_t nb = 0, na = 0, nbad = 0;
  alignas(32) int32_t jj[8];
  alignas(32) float ff[8];
  for (int64_t i = 0; i < m8; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    const __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(x, x), zero, _CMP_EQ_OQ);
    vleast = _mm256_min_ps(vleast, _mm256_blendv_ps(inf, x, finite));
    vmost = _mm256_max_ps(vmost, _mm256_blendv_ps(ninf, x, finite));
    // x < low ? low : (x > high ? high : x), for finite x
    const __m256 xc = _mm256_blendv_ps(_mm256_blendv_ps(x, vhigh, _mm256_cmp_ps(x, vhigh, _CMP_GT_OQ)), vlow,
                                       _mm256_cmp_ps(x, vlow, _CMP_LT_OQ));
    const __m256 lt = _mm256_and_ps(finite, _mm256_cmp_ps(xc, vlo, _CMP_LT_OQ));
    const __m256 gt = _mm256_and_ps(finite, _mm256_andnot_ps(lt, _mm256_cmp_ps(xc, vhi, _CMP_GT_OQ)));
    const int fin = _mm256_movemask_ps(finite), lo_bits = _mm256_movemask_ps(lt), hi_bits = _mm256_movemask_ps(gt);
    nbad += 8 - __builtin_popcount(fin);
    nb += __builtin_popcount(lo_bits);
    na += __builtin_popcount(hi_bits);
    int binned = fin & ~lo_bits & ~hi_bits;
    if (binned == 0) continue;
    __m256 s = _mm256_mul_ps(_mm256_sub_ps(xc, vlo), vscale);
    s = _mm256_blendv_ps(s, zero, _mm256_cmp_ps(s, zero, _CMP_LT_OQ));
    s = _mm256_blendv_ps(s, vtop, _mm256_cmp_ps(s, vtop, _CMP_GT_OQ));
    if (kind == 0) {
      const __m256 t = _mm256_add_ps(s, half);
      const __m256 whole = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m256 frac = _mm256_mul_ps(
          _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t, whole), q), _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC),
          inv_q);
      _mm256_store_si256(reinterpret_cast<__m256i*>(jj), _mm256_cvttps_epi32(t));
      _mm256_store_ps(ff, frac);
      while (binned) {
        const int k = __builtin_ctz(binned);
        binned &= binned - 1;
        const int at = (k & (LANES - 1)) * stride + jj[k];
        count[at] += 1.0;
        fraction[at] += double(ff[k]);
      }
    } else {
      s = _mm256_blendv_ps(s, vcap, _mm256_cmp_ps(s, vcap, _CMP_GT_OQ));
      _mm256_store_si256(reinterpret_cast<__m256i*>(jj), _mm256_cvttps_epi32(s));
      while (binned) {
        const int k = __builtin_ctz(binned);
        binned &= binned - 1;
        count[(k & (LANES - 1)) * stride + jj[k]] += 1.0;
      }
    }
  }
  alignas(32) float lv[8], mv[8];
  _mm256_store_ps(lv, vleast);
  _mm256_store_ps(mv, vmost);
  for (int k = 0; k < 8; ++k) {
    *least = lv[k] < *least ? lv[k] : *least;
    *most = mv[k] > *most ? mv[k] : *most;
  }
  *below += nb;
  *above += na;
  *bad += nbad;
}
#endif

void bin_row(int kind, int bins, const float* __restrict v, int64_t m, double lo, double hi, double* __restrict out,
             double* __restrict count, double* __restrict fraction, float* __restrict ends) {
  const double span = hi - lo;
  const float lo_f = float(lo), hi_f = float(hi), low = float(lo - span), high = float(hi + span);
  const float scale = float(bins / span), top = float(bins);
  const int nodes = kind == 0 ? bins + 2 : bins;
  const int stride = nodes + 1;
  for (int k = 0; k < LANES * stride; ++k) count[k] = fraction[k] = 0.0;
  int64_t below = 0, above = 0, bad = 0;
  float least = INFINITY, most = -INFINITY;
  int64_t first = 0;
#ifdef DYNACT_AVX2
  first = m - m % 8;
  bin_row8(kind, v, first, lo_f, hi_f, low, high, scale, top, stride, count, fraction, &below, &above, &bad, &least,
           &most);
  for (int lane = 1; lane < LANES; ++lane) {
    for (int k = 0; k < stride; ++k) {
      count[k] += count[lane * stride + k];
      fraction[k] += fraction[lane * stride + k];
    }
  }
#endif
  for (int64_t i = first; i < m; ++i) {
    const float x = v[i];
    if (!(x - x == 0.0f)) { ++bad; continue; }  // NaN or +-inf
    least = x < least ? x : least;
    most = x > most ? x : most;
    const float xc = x < low ? low : (x > high ? high : x);
    if (xc < lo_f) { ++below; continue; }
    if (xc > hi_f) { ++above; continue; }
    float s = (xc - lo_f) * scale;
    s = s < 0.0f ? 0.0f : (s > top ? top : s);
    if (kind == 0) {
      const float t = s + 0.5f;
      const int j = int(t);
      const float frac = std::nearbyint((t - std::trunc(t)) * 65536.0f) / 65536.0f;
      count[j] += 1.0;
      fraction[j] += double(frac);
    } else {
      const float c = s > top - 0.5f ? top - 0.5f : s;
      count[int(c)] += 1.0;
    }
  }
  if (kind == 0) {
    out[0] = count[0] - fraction[0];
    for (int k = 1; k < nodes; ++k) out[k] = (count[k] - fraction[k]) + fraction[k - 1];
  } else {
    for (int k = 0; k < nodes; ++k) out[k] = count[k];
  }
  out[nodes] = double(below);
  out[nodes + 1] = double(above);
  out[nodes + 2] = double(bad);
  if (ends != nullptr) {
    ends[0] = -least;
    ends[1] = most;
  }
}

// ----------------------------------------------------------------------------- dispatch
template <class F> int by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); return 0;
    case 1: f(double{}); return 0;
    case 2: f(bf16{}); return 0;
    case 3: f(f16{}); return 0;
    default: return 1;
  }
}

// One number of a given element type, read as double / written from a double (rounded once to
// float first for half types, as torch's double-to-half casts do).
inline int read_scalar(const void* p, int dtype, double* out) {
  switch (dtype) {
    case 0: *out = *static_cast<const float*>(p); return 0;
    case 1: *out = *static_cast<const double*>(p); return 0;
    case 2: *out = Type<bf16>::load(*static_cast<const bf16*>(p)); return 0;
    case 3: *out = Type<f16>::load(*static_cast<const f16*>(p)); return 0;
    default: return 1;
  }
}
inline int write_scalar(void* p, int dtype, double v) {
  switch (dtype) {
    case 0: *static_cast<float*>(p) = float(v); return 0;
    case 1: *static_cast<double*>(p) = v; return 0;
    case 2: *static_cast<bf16*>(p) = Type<bf16>::store(float(v)); return 0;
    case 3: *static_cast<f16*>(p) = Type<f16>::store(float(v)); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

int dynact_abi_version() { return 6; }

// Whether base 3 (GELU computed in the kernel, float32) is built in: it needs AVX2 and FMA.
int dynact_gelu_in_kernel() {
#ifdef DYNACT_AVX2
  return 1;
#else
  return 0;
#endif
}

// eps: one number of element type eps_dtype, read here (a parameter's own memory: no host copy
// per call). geps: where the eps gradient goes, one number of type geps_dtype (the double sum
// rounded once, via float for half types as torch's casts do). pairs: (value, slope) per
// segment, 2 * (last + 1) numbers of the compute type.
int dynact_eafo_forward(int dtype, int base, const void* x, const void* y0, void* out, int64_t n,
                        const void* pairs, double a, double b, int last, const void* eps, int eps_dtype,
                        int threads) {
  if (base < 0 || base > 3 || base == 2) return 1;
  double e;
  if (read_scalar(eps, eps_dtype, &e)) return 1;
  if (base == 3) {
#ifdef DYNACT_AVX2
    if (dtype != 0) return 1;
    eafo_gelu_forward(static_cast<const float*>(x), static_cast<float*>(out), n, static_cast<const float*>(pairs),
                      a, b, last, e, threads);
    return 0;
#else
    return 1;
#endif
  }
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = typename Type<T>::C;
    auto f = base == 1 ? eafo_forward<T, 1> : eafo_forward<T, 0>;
    f(static_cast<const T*>(x), static_cast<const T*>(y0), static_cast<T*>(out), n, static_cast<const C*>(pairs),
      a, b, last, e, threads);
  });
}

int dynact_eafo_backward(int dtype, int base, const void* grad, const void* x, void* gx, void* geps,
                         int geps_dtype, int64_t n, const void* pairs, double a, double b, int last,
                         const void* eps, int eps_dtype, int threads) {
  if (base < 0 || base > 3 || (gx == nullptr && geps == nullptr)) return 1;
  double e, sum = 0.0;
  if (read_scalar(eps, eps_dtype, &e)) return 1;
  if (base == 3) {
#ifdef DYNACT_AVX2
    if (dtype != 0) return 1;
    auto f = gx == nullptr ? eafo_gelu_backward<false, true>
                           : (geps == nullptr ? eafo_gelu_backward<true, false> : eafo_gelu_backward<true, true>);
    f(static_cast<const float*>(grad), static_cast<const float*>(x), static_cast<float*>(gx), &sum, n,
      static_cast<const float*>(pairs), a, b, last, e, threads);
    return geps == nullptr ? 0 : write_scalar(geps, geps_dtype, sum);
#else
    return 1;
#endif
  }
  int rc = by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = typename Type<T>::C;
    using Fn = void (*)(const T*, const T*, T*, double*, int64_t, const C*, double, double, int, double, int);
    Fn table[3][3] = {{eafo_backward<T, 0, true, true>, eafo_backward<T, 0, true, false>,
                       eafo_backward<T, 0, false, true>},
                      {eafo_backward<T, 1, true, true>, eafo_backward<T, 1, true, false>,
                       eafo_backward<T, 1, false, true>},
                      {eafo_backward<T, 2, true, true>, eafo_backward<T, 2, true, false>,
                       eafo_backward<T, 2, false, true>}};
    int which = gx == nullptr ? 2 : (geps == nullptr ? 1 : 0);
    table[base][which](static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(gx), &sum, n,
                       static_cast<const C*>(pairs), a, b, last, e, threads);
  });
  return rc ? rc : (geps == nullptr ? 0 : write_scalar(geps, geps_dtype, sum));
}

// values: rows x n float32 (row stride n); filled: per row how many leading values count (NULL:
// all); lo, hi: per row float64 grid ends; out: rows x (nodes + 3) float64; ends (NULL: not
// wanted): rows x 2 float32, [-min, max] of each row's finite values. Rows run in parallel.
int dynact_bin_rows(int kind, int bins, const float* values, int64_t rows, int64_t n, const int64_t* filled,
                    const double* lo, const double* hi, double* out, float* ends, int threads) {
  if ((kind != 0 && kind != 1) || bins < 1) return 1;
  const int64_t width = (kind == 0 ? bins + 2 : bins) + 3;
#pragma omp parallel num_threads(rows > 1 ? threads : 1)
  {
    std::vector<double> count(LANES * (bins + 3)), fraction(LANES * (bins + 3));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      int64_t m = filled == nullptr ? n : filled[r];
      m = m < 0 ? 0 : (m > n ? n : m);
      bin_row(kind, bins, values + r * n, m, lo[r], hi[r], out + r * width, count.data(), fraction.data(),
              ends == nullptr ? nullptr : ends + 2 * r);
    }
  }
  return 0;
}

int dynact_crrelu_forward(int dtype, const void* x, void* out, int64_t n, const void* eps, int eps_dtype,
                          int threads) {
  double e;
  if (read_scalar(eps, eps_dtype, &e)) return 1;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    crrelu_forward<T>(static_cast<const T*>(x), static_cast<T*>(out), n, e, threads);
  });
}

int dynact_crrelu_backward(int dtype, const void* grad, const void* x, void* gx, void* geps, int geps_dtype,
                           int64_t n, const void* eps, int eps_dtype, int threads) {
  if (gx == nullptr && geps == nullptr) return 1;
  double e, sum = 0.0;
  if (read_scalar(eps, eps_dtype, &e)) return 1;
  int rc = by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto f = gx == nullptr ? crrelu_backward<T, false, true>
                           : (geps == nullptr ? crrelu_backward<T, true, false> : crrelu_backward<T, true, true>);
    f(static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(gx), &sum, n, e, threads);
  });
  return rc ? rc : (geps == nullptr ? 0 : write_scalar(geps, geps_dtype, sum));
}

}  // extern "C"
"""
