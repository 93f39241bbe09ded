// The few vector operations the kernels are written in, for the instruction set this translation
// unit is compiled for (kernels_<isa>.cpp sets the flags). Included inside namespace
// gpt2s::<isa>, after <immintrin.h>: every function here must stay in that namespace, because a
// shared inline function compiled with AVX-512 flags could be the copy the linker keeps for the
// scalar path (and crash an older CPU).
//
// Vf: kLanes floats. Vb: 2 * kLanes bf16 values (one bf16 dot-product step).

#if defined(__AVX512F__)

constexpr int kLanes = 16;
struct Vf { __m512 v; };
struct Vb { __m512i v; };

inline Vf vzero() { return {_mm512_setzero_ps()}; }
inline Vf vset1(float a) { return {_mm512_set1_ps(a)}; }
inline Vf vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, Vf a) { _mm512_storeu_ps(p, a.v); }
inline Vf vadd(Vf a, Vf b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vf vsub(Vf a, Vf b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vf vmul(Vf a, Vf b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vf vdiv(Vf a, Vf b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vf vfma(Vf a, Vf b, Vf c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
inline Vf vmax(Vf a, Vf b) { return {_mm512_max_ps(a.v, b.v)}; }  // b where a is NaN
inline Vf vmin(Vf a, Vf b) { return {_mm512_min_ps(a.v, b.v)}; }
inline float vhsum(Vf a) { return _mm512_reduce_add_ps(a.v); }
inline float vhmax(Vf a) { return _mm512_reduce_max_ps(a.v); }
// 2^n * a for integral-valued n.
inline Vf vscale2(Vf a, Vf n) { return {_mm512_scalef_ps(a.v, n.v)}; }
inline Vf vround(Vf a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// Lanes where a < b set to 0.
inline Vf vzero_below(Vf a, Vf x, Vf limit) { return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, limit.v, _CMP_GE_OQ), a.v)}; }

inline Vb vload_bf16(const uint16_t* p) { return {_mm512_loadu_si512(p)}; }
#if defined(__AVX512BF16__)
inline Vf vdot_bf16(Vf acc, Vb x, Vb w) { return {_mm512_dpbf16_ps(acc.v, (__m512bh)x.v, (__m512bh)w.v)}; }
#else
// Without AVX512-BF16: the same pairs, odd element then even, each product exact in fp32.
inline Vf vdot_bf16(Vf acc, Vb x, Vb w) {
  const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  acc.v = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(x.v, hi)), _mm512_castsi512_ps(_mm512_and_si512(w.v, hi)), acc.v);
  return {_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x.v, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(w.v, 16)), acc.v)};
}
#endif
// kLanes bf16 values widened to fp32 (exact).
inline Vf vload_bf16_f32(const uint16_t* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16))};
}

#elif defined(__AVX2__)

constexpr int kLanes = 8;
struct Vf { __m256 v; };
struct Vb { __m256i v; };

inline Vf vzero() { return {_mm256_setzero_ps()}; }
inline Vf vset1(float a) { return {_mm256_set1_ps(a)}; }
inline Vf vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, Vf a) { _mm256_storeu_ps(p, a.v); }
inline Vf vadd(Vf a, Vf b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vf vsub(Vf a, Vf b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vf vmul(Vf a, Vf b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vf vdiv(Vf a, Vf b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vf vfma(Vf a, Vf b, Vf c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vf vmax(Vf a, Vf b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vf vmin(Vf a, Vf b) { return {_mm256_min_ps(a.v, b.v)}; }
inline float vhsum(Vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vhmax(Vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline Vf vscale2(Vf a, Vf n) {
  // Add n to the exponent field; callers keep n within the normal range.
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n.v), 23);
  return {_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a.v), e))};
}
inline Vf vround(Vf a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vf vzero_below(Vf a, Vf x, Vf limit) { return {_mm256_and_ps(a.v, _mm256_cmp_ps(x.v, limit.v, _CMP_GE_OQ))}; }

inline Vb vload_bf16(const uint16_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
inline Vf vdot_bf16(Vf acc, Vb x, Vb w) {
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  acc.v = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(x.v, hi)), _mm256_castsi256_ps(_mm256_and_si256(w.v, hi)), acc.v);
  return {_mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(x.v, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(w.v, 16)), acc.v)};
}
inline Vf vload_bf16_f32(const uint16_t* p) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16))};
}

#else  // portable C++: small fixed-size arrays the compiler may map onto whatever SIMD the target has

constexpr int kLanes = 4;
struct Vf { float v[kLanes]; };
struct Vb { uint16_t v[2 * kLanes]; };

#define GPT2S_LANES(expr) \
  Vf r;                   \
  for (int i = 0; i < kLanes; ++i) r.v[i] = (expr); \
  return r
inline Vf vzero() { GPT2S_LANES(0.0f); }
inline Vf vset1(float a) { GPT2S_LANES(a); }
inline Vf vload(const float* p) { GPT2S_LANES(p[i]); }
inline void vstore(float* p, Vf a) { for (int i = 0; i < kLanes; ++i) p[i] = a.v[i]; }
inline Vf vadd(Vf a, Vf b) { GPT2S_LANES(a.v[i] + b.v[i]); }
inline Vf vsub(Vf a, Vf b) { GPT2S_LANES(a.v[i] - b.v[i]); }
inline Vf vmul(Vf a, Vf b) { GPT2S_LANES(a.v[i] * b.v[i]); }
inline Vf vdiv(Vf a, Vf b) { GPT2S_LANES(a.v[i] / b.v[i]); }
inline Vf vfma(Vf a, Vf b, Vf c) { GPT2S_LANES(a.v[i] * b.v[i] + c.v[i]); }
inline Vf vmax(Vf a, Vf b) { GPT2S_LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline Vf vmin(Vf a, Vf b) { GPT2S_LANES(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
inline float vhsum(Vf a) { return (a.v[0] + a.v[2]) + (a.v[1] + a.v[3]); }
inline float vhmax(Vf a) {
  const float x = a.v[0] > a.v[2] ? a.v[0] : a.v[2], y = a.v[1] > a.v[3] ? a.v[1] : a.v[3];
  return x > y ? x : y;
}
inline Vf vscale2(Vf a, Vf n) { GPT2S_LANES(__builtin_ldexpf(a.v[i], int(n.v[i]))); }
inline Vf vround(Vf a) { GPT2S_LANES(__builtin_nearbyintf(a.v[i])); }
inline Vf vzero_below(Vf a, Vf x, Vf limit) { GPT2S_LANES(x.v[i] >= limit.v[i] ? a.v[i] : 0.0f); }

inline float bf16_bits_to_f32(uint32_t bits) {
  bits <<= 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
inline Vb vload_bf16(const uint16_t* p) {
  Vb r;
  for (int i = 0; i < 2 * kLanes; ++i) r.v[i] = p[i];
  return r;
}
inline Vf vdot_bf16(Vf acc, Vb x, Vb w) {
  for (int i = 0; i < kLanes; ++i) {
    acc.v[i] += bf16_bits_to_f32(x.v[2 * i + 1]) * bf16_bits_to_f32(w.v[2 * i + 1]);
    acc.v[i] += bf16_bits_to_f32(x.v[2 * i]) * bf16_bits_to_f32(w.v[2 * i]);
  }
  return acc;
}
inline Vf vload_bf16_f32(const uint16_t* p) { GPT2S_LANES(bf16_bits_to_f32(p[i])); }
#undef GPT2S_LANES

#endif

// exp(x) for every lane: Cephes' expf (range reduction by ln 2, degree-5 polynomial; about 1 ulp
// on [-87, 88]). Lanes below -87.33 give exactly 0, so a weight of exp(-inf) is 0.
inline Vf vexp(Vf x) {
  const Vf lo = vset1(-87.3365447f);
  const Vf xc = vmin(vmax(x, lo), vset1(88.3762626f));
  const Vf n = vround(vmul(xc, vset1(1.44269504088896341f)));
  Vf r = vfma(n, vset1(-0.693359375f), xc);
  r = vfma(n, vset1(2.12194440e-4f), r);
  Vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  const Vf y = vadd(vfma(vmul(p, r), r, r), vset1(1.0f));
  return vzero_below(vscale2(y, n), x, lo);
}
