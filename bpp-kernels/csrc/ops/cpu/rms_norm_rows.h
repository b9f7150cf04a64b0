// The row loops of rms_norm_cpu.cpp, which includes this file twice (no include guard): once for
// the baseline ISA of the extension (x86-64-v2: 4 lanes, one SSE register) and once under
// `#pragma GCC target("avx2,f16c")` (8 lanes; fp16 converted by F16C), picked at run time.
// Before each include it defines BPP_RMS_NS (the namespace of that copy) and BPP_RMS_AVX2 (0 or 1).
//
// Lanes are GCC's vector extensions: c10::Half / c10::BFloat16 converted element by element
// measured 5x (bf16) and 40x (fp16) slower than fp32 on the baseline ISA, and GCC turns wider
// generic vectors than the ISA's into lane-by-lane compares. Every element takes the same lane
// arithmetic in both copies (the last, partial group of a row goes through a zero-padded copy), and
// a row sum gives element e to partial sum e % 8, the eight added in order at the end: the two
// copies give the same bits (but for the payload of NaNs: F16C keeps it, c10's conversion does not).
namespace bpp {
namespace BPP_RMS_NS {

#if BPP_RMS_AVX2
constexpr int64_t kWidth = 8;
#else
constexpr int64_t kWidth = 4;
#endif
constexpr int64_t kSumLanes = 8;  // partial sums of a row, whatever kWidth
typedef float f32v __attribute__((vector_size(kWidth * 4)));
typedef uint32_t u32v __attribute__((vector_size(kWidth * 4)));
typedef int32_t i32v __attribute__((vector_size(kWidth * 4)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

// Forced inline: GCC otherwise outlines the conversions in some of the many instantiations.
#define BPP_LANES inline __attribute__((always_inline))

BPP_LANES f32v splat(float v) { return f32v{} + v; }
// the same bytes read as another lane type (a vector cast reinterprets, it does not convert)
BPP_LANES f32v as_f32(u32v v) { return (f32v)v; }
BPP_LANES u32v as_u32(f32v v) { return (u32v)v; }
BPP_LANES u32v as_u32(i32v v) { return (u32v)v; }
BPP_LANES i32v as_i32(u32v v) { return (i32v)v; }
// lanes of a where mask (all ones or all zeros per lane), else of b. The compares below are
// signed, on values below 2^31: SSE has no unsigned compare, and a ?: on lanes is lowered lane by
// lane.
BPP_LANES u32v select(i32v mask, u32v a, u32v b) { return b ^ ((a ^ b) & as_u32(mask)); }
BPP_LANES i32v is_nan(u32v bits) { return as_i32(bits & 0x7FFFFFFFu) > 0x7F800000; }

// Element types: storage, bits (what load returns and store takes), encode (fp32 lanes -> bits,
// rounded to nearest even, NaN to a quiet NaN, as ATen's conversions) and decode (exact).
struct F32 {
  using storage = float;
  using bits = f32v;
  static BPP_LANES bits load(const storage* p) {
    bits v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static BPP_LANES void store(storage* p, bits v) { std::memcpy(p, &v, sizeof(v)); }
  static BPP_LANES bits encode(f32v v) { return v; }
  static BPP_LANES f32v decode(bits v) { return v; }
};

// 16-bit types: the bits zero-extended into u32 lanes
struct Bits16 {
  using storage = uint16_t;
  using bits = u32v;
  static BPP_LANES bits load(const storage* p) {
    u16x8 v = {};
    std::memcpy(&v, p, kWidth * sizeof(storage));
#if BPP_RMS_AVX2
    return __builtin_convertvector(v, u32v);
#else
    return (u32v)__builtin_shufflevector(v, u16x8{}, 0, 8, 1, 9, 2, 10, 3, 11);
#endif
  }
  static BPP_LANES void store(storage* p, bits v) {
#if BPP_RMS_AVX2
    const u16x8 narrow = __builtin_convertvector(v, u16x8);
#else
    const u16x8 halves = (u16x8)v;
    const u16x8 narrow = __builtin_shufflevector(halves, halves, 0, 2, 4, 6, 0, 2, 4, 6);
#endif
    std::memcpy(p, &narrow, kWidth * sizeof(storage));
  }
};

struct BF16 : Bits16 {
  static BPP_LANES bits encode(f32v v) {  // c10::detail::round_to_nearest_even
    const u32v u = as_u32(v);
    const u32v rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return select(is_nan(u), u32v{} + 0x7FC0u, rounded);
  }
  static BPP_LANES f32v decode(bits v) { return as_f32(v << 16); }
};

#if BPP_RMS_AVX2
struct F16 {  // F16C: one instruction each way
  using storage = uint16_t;
  using bits = __m128i;
  static BPP_LANES bits load(const storage* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static BPP_LANES void store(storage* p, bits v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
  static BPP_LANES bits encode(f32v v) { return _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT); }
  static BPP_LANES f32v decode(bits v) { return (f32v)_mm256_cvtph_ps(v); }
};
#else
struct F16 : Bits16 {  // c10's branch-free software conversions, on lanes
  static BPP_LANES bits encode(f32v f) {  // c10::detail::fp16_ieee_from_fp32_value
    const u32v w = as_u32(f);
    const u32v abs_w = w & 0x7FFFFFFFu;
    f32v base = (as_f32(abs_w) * splat(0x1.0p+112f)) * splat(0x1.0p-110f);
    const u32v sign = w & 0x80000000u;
    const u32v half_bias = abs_w & 0x7F800000u;  // c10's (2 w & 0xFF000000) >> 1, below 2^31
    const u32v bias = select(as_i32(half_bias) < 0x38800000, u32v{} + 0x38800000u, half_bias);
    base = as_f32(bias + 0x07800000u) + base;
    const u32v b = as_u32(base);
    const u32v nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
    return (sign >> 16) | select(is_nan(w), u32v{} + 0x7E00u, nonsign);
  }
  static BPP_LANES f32v decode(bits h) {  // c10::detail::fp16_ieee_to_fp32_value
    const u32v w = h << 16;
    const u32v sign = w & 0x80000000u;
    const u32v two_w = w + w;
    const f32v normalized = as_f32((two_w >> 4) + (0xE0u << 23)) * splat(0x1.0p-112f);
    const f32v denormalized = as_f32((two_w >> 17) | (126u << 23)) - splat(0.5f);
    const i32v is_denormal = as_i32(h & 0x7FFFu) < 0x400;  // c10's two_w < 2^27
    return as_f32(sign | select(is_denormal, as_u32(denormalized), as_u32(normalized)));
  }
};
#endif

// v rounded to T's precision, in fp32
template <typename T>
BPP_LANES f32v round_as(f32v v) {
  if constexpr (std::is_same_v<T, F32>) {
    return v;
  } else {
    return T::decode(T::encode(v));
  }
}

// elements [e, e + n) of a row, n <= kWidth (n < kWidth only for the last group of a row)
template <typename T>
BPP_LANES f32v load(const typename T::storage* row, int64_t e, int64_t n) {
  if (n == kWidth) return T::decode(T::load(row + e));
  typename T::storage buf[kWidth] = {};
  std::memcpy(buf, row + e, n * sizeof(buf[0]));
  return T::decode(T::load(buf));
}

template <typename T>
BPP_LANES void store(typename T::storage* row, int64_t e, int64_t n, typename T::bits v) {
  if (n == kWidth) return T::store(row + e, v);
  typename T::storage buf[kWidth];
  T::store(buf, v);
  std::memcpy(row + e, buf, n * sizeof(buf[0]));
}

// A row sum: element e goes to partial sum e % kSumLanes, the partial sums added in order at the end.
struct RowSum {
  f32v part[kSumLanes / kWidth] = {};
  BPP_LANES void add(int64_t part_index, f32v v) { part[part_index] += v; }
  BPP_LANES float total() const {
    float sum = 0.f;
    for (int64_t k = 0; k < kSumLanes; ++k) sum += part[k / kWidth][k % kWidth];
    return sum;
  }
};

// f(e, n, part): the row's groups of kWidth elements in order (the last one partial), with the
// RowSum part their lanes belong to.
template <typename F>
BPP_LANES void for_each_group(int64_t d, F f) {
  int64_t e = 0;
  for (; e + kSumLanes <= d; e += kSumLanes) {
    f(e, kWidth, 0);
    if constexpr (kWidth < kSumLanes) f(e + kWidth, kWidth, 1);
  }
  for (int64_t part = 0; e < d; e += kWidth, ++part) f(e, std::min(kWidth, d - e), part);
}

BPP_LANES float inv_rms(const RowSum& sum_squares, int64_t d, float eps) {
  return 1.f / std::sqrt(sum_squares.total() / static_cast<float>(d) + eps);
}

template <typename T>
const typename T::storage* ptr(const at::Tensor& t) {
  return static_cast<const typename T::storage*>(t.const_data_ptr());
}

template <typename T>
typename T::storage* mutable_ptr(at::Tensor& t) {
  return static_cast<typename T::storage*>(t.mutable_data_ptr());
}

// f(element type tag) for a float32 / float16 / bfloat16 dtype (checked by the caller)
template <typename F>
void with_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kHalf:
      return f(F16{});
    case at::kBFloat16:
      return f(BF16{});
    default:
      return f(F32{});
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Rows of add_rms_norm (kAdd: x converted to H, plus the residual, h written) or of rms_norm
// (x is h). kProductInH: weight and h share a dtype, so weight * normed is rounded to it before
// the conversion to Out.
template <typename H, typename X, typename Out, bool kAdd, bool kProductInH>
void forward_rows(const typename X::storage* x, const typename H::storage* residual, const float* w,
                  typename H::storage* h, typename Out::storage* y, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const typename H::storage* hr;
      RowSum sum_squares;
      if constexpr (kAdd) {
        const auto* xr = x + r * d;
        const auto* rr = residual + r * d;
        auto* out_h = h + r * d;
        for_each_group(d, [&](int64_t e, int64_t n, int64_t part) {
          f32v xv = load<X>(xr, e, n);
          if constexpr (!std::is_same_v<X, H>) xv = round_as<H>(xv);  // x.to(residual.dtype)
          const auto bits = H::encode(xv + load<H>(rr, e, n));
          store<H>(out_h, e, n, bits);
          const f32v hv = H::decode(bits);
          sum_squares.add(part, hv * hv);
        });
        hr = out_h;
      } else {
        static_assert(std::is_same_v<X, H>, "rms_norm: x is h");
        hr = x + r * d;
        for_each_group(d, [&](int64_t e, int64_t n, int64_t part) {
          const f32v hv = load<H>(hr, e, n);
          sum_squares.add(part, hv * hv);
        });
      }
      const float rstd = inv_rms(sum_squares, d, eps);
      auto* yr = y + r * d;
      for_each_group(d, [&](int64_t e, int64_t n, int64_t) {
        const f32v v = load<F32>(w, e, n) * round_as<H>(load<H>(hr, e, n) * rstd);
        if constexpr (kProductInH && std::is_same_v<Out, H>) {
          store<Out>(yr, e, n, Out::encode(v));  // rounding again to the same type changes nothing
        } else if constexpr (kProductInH) {
          store<Out>(yr, e, n, Out::encode(round_as<H>(v)));
        } else {
          store<Out>(yr, e, n, Out::encode(v));
        }
      });
    }
  });
}

// dh for every row (grad_h added when not null); dw_part (or null): (blocks, d) partial sums
template <typename H, typename G>
void backward_rows(const typename H::storage* h, const float* w, const typename G::storage* dy,
                   const typename H::storage* grad_h, typename H::storage* dh, float* dw_part, int64_t rows, int64_t d,
                   float eps) {
  at::parallel_for(0, row_blocks(rows), grain_for(kRowsPerBlock * d), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      float* dw = dw_part != nullptr ? dw_part + blk * d : nullptr;
      const int64_t last = std::min(rows, (blk + 1) * kRowsPerBlock);
      for (int64_t r = blk * kRowsPerBlock; r < last; ++r) {
        const auto* hr = h + r * d;
        const auto* gr = dy + r * d;
        RowSum sum_squares;
        for_each_group(d, [&](int64_t e, int64_t n, int64_t part) {
          const f32v hv = load<H>(hr, e, n);
          sum_squares.add(part, hv * hv);
        });
        const float rstd = inv_rms(sum_squares, d, eps);
        RowSum dn_xhat;
        for_each_group(d, [&](int64_t e, int64_t n, int64_t part) {
          const f32v xhat = load<H>(hr, e, n) * rstd;
          const f32v g = load<G>(gr, e, n);
          dn_xhat.add(part, g * load<F32>(w, e, n) * xhat);
          if (dw != nullptr) store<F32>(dw, e, n, load<F32>(dw, e, n) + g * round_as<H>(xhat));
        });
        const float mean_dn_xhat = dn_xhat.total() / static_cast<float>(d);
        const auto* ghr = grad_h != nullptr ? grad_h + r * d : nullptr;
        auto* dhr = dh + r * d;
        for_each_group(d, [&](int64_t e, int64_t n, int64_t) {
          const f32v xhat = load<H>(hr, e, n) * rstd;
          f32v v = rstd * (load<G>(gr, e, n) * load<F32>(w, e, n) - xhat * mean_dn_xhat);
          if (ghr != nullptr) v += load<H>(ghr, e, n);
          store<H>(dhr, e, n, H::encode(v));
        });
      }
    }
  });
}

// y (and h when residual is given) from contiguous x, residual, w (fp32) of the dtypes they hold
void forward(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& w, at::Tensor* h, at::Tensor& y,
             int64_t rows, int64_t d, float eps, bool product_in_h) {
  const auto h_type = residual != nullptr ? residual->scalar_type() : x.scalar_type();
  with_type(h_type, [&](auto h_tag) {
    using H = decltype(h_tag);
    with_type(y.scalar_type(), [&](auto out_tag) {
      using Out = decltype(out_tag);
      with_bool(product_in_h, [&](auto product) {
        constexpr bool kProductInH = decltype(product)::value;
        if (residual == nullptr) {
          forward_rows<H, H, Out, false, kProductInH>(ptr<H>(x), nullptr, ptr<F32>(w), nullptr, mutable_ptr<Out>(y),
                                                      rows, d, eps);
          return;
        }
        with_type(x.scalar_type(), [&](auto x_tag) {
          using X = decltype(x_tag);
          forward_rows<H, X, Out, true, kProductInH>(ptr<X>(x), ptr<H>(*residual), ptr<F32>(w), mutable_ptr<H>(*h),
                                                     mutable_ptr<Out>(y), rows, d, eps);
        });
      });
    });
  });
}

// dh (and dw_part, when not null) from contiguous h, w (fp32), grad_out and grad_h (or null)
void backward(const at::Tensor& h, const at::Tensor& w, const at::Tensor& grad_out, const at::Tensor* grad_h,
              at::Tensor& dh, float* dw_part, int64_t rows, int64_t d, float eps) {
  with_type(h.scalar_type(), [&](auto h_tag) {
    using H = decltype(h_tag);
    with_type(grad_out.scalar_type(), [&](auto g_tag) {
      using G = decltype(g_tag);
      backward_rows<H, G>(ptr<H>(h), ptr<F32>(w), ptr<G>(grad_out), grad_h != nullptr ? ptr<H>(*grad_h) : nullptr,
                          mutable_ptr<H>(dh), dw_part, rows, d, eps);
    });
  });
}

#undef BPP_LANES

}  // namespace BPP_RMS_NS
}  // namespace bpp
