// The few vector operations the kernels are written in, for the instruction set this translation
// unit is compiled for (kernels_isa.cpp, built once per ISA with its flags). Included inside namespace
// gpt2s::<isa>, after <immintrin.h> or <arm_neon.h>: every function here must stay in that namespace, because a
// shared inline function compiled with AVX-512 flags could be the copy the linker keeps for the
// scalar path (and crash an older CPU).
//
// Vf: kLanes floats. Vb: 2 * kLanes bf16 values, a pair per 32-bit lane (one bf16 dot-product
// step: lane i gains x.pair[i] . w.pair[i], odd element first). bf16 conversions
// round to nearest even exactly like kernels_impl.h's scalar f32_to_bf16, lane for lane, so a value
// converts the same whether it falls in a vector or in a tail. vbf16_odd / vbf16_even: the odd
// (high) or even (low) element of each pair of a Vb, widened to fp32 (exact).
//
// Where the ISA has an int8 dot product (GPT2S_INT8_DOT: the screened head, kernels_impl.h), Vq
// is 4 * kLanes int8 values, a quad per 32-bit lane: vdot_q(acc, x, w) adds to each lane (an int32
// held in a Vf's bits) the four products x.quad[i] . w.quad[i], exactly. w is signed; x is signed,
// or unsigned q + kQuantOffset where the instruction wants it (AVX512-VNNI's vpdpbusd);
// vdot_q_value(acc, sum_w) is then the exact sum of x q . w q as floats (sum_w: each output's
// sum of its w q, which the offset multiplies).
// The other builds (AVX-512 without VNNI, NEON without sdot, portable C++) have the same Vq
// operations, slower, for int8 weights (kernels_impl.h) but not for the screen: GPT2S_INT8_DOT
// stays undefined there.

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
// Bit i set where lane i of a is > t (a NaN lane is not).
inline uint32_t vmask_above(Vf a, Vf t) { return _mm512_cmp_ps_mask(a.v, t.v, _CMP_GT_OQ); }

inline Vb vload_bf16(const uint16_t* p) { return {_mm512_loadu_si512(p)}; }
// The bf16 pair p[0], p[1] in every 32-bit lane.
inline Vb vbcast_pair(const uint16_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return {_mm512_set1_epi32(v)};
}
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
inline Vf vbf16_odd(Vb w) { return {_mm512_castsi512_ps(_mm512_and_si512(w.v, _mm512_set1_epi32(int32_t(0xFFFF0000u))))}; }
inline Vf vbf16_even(Vb w) { return {_mm512_castsi512_ps(_mm512_slli_epi32(w.v, 16))}; }
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define GPT2S_INT8_DOT 1
constexpr int kQuantOffset = 128;  // vpdpbusd multiplies unsigned by signed bytes
struct Vq { __m512i v; };
inline Vq vload_q(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline Vq vbcast_quad(const uint8_t* p) { return {vbcast_pair(reinterpret_cast<const uint16_t*>(p)).v}; }
inline Vf vdot_q(Vf acc, Vq x, Vq w) { return {_mm512_castsi512_ps(_mm512_dpbusd_epi32(_mm512_castps_si512(acc.v), x.v, w.v))}; }
// sum (q_x + 128) q_w - 128 sum q_w = sum q_x q_w, exact in int32 (and in float below 2^24).
inline Vf vdot_q_value(Vf acc, const int32_t* sum_w) {
  return {_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_castps_si512(acc.v), _mm512_slli_epi32(_mm512_loadu_si512(sum_w), 7)))};
}
#else
// Without VNNI: vpmaddubsw on |x| and w carrying x's sign, as AVX2 below (AVX-512 has no vpsignb:
// a masked negation instead; w is never -128, so negating it cannot overflow).
constexpr int kQuantOffset = 0;
struct Vq { __m512i v; };
inline Vq vload_q(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline Vq vbcast_quad(const uint8_t* p) { return {vbcast_pair(reinterpret_cast<const uint16_t*>(p)).v}; }
inline Vf vdot_q(Vf acc, Vq x, Vq w) {
  const __m512i w_signed = _mm512_mask_sub_epi8(w.v, _mm512_movepi8_mask(x.v), _mm512_setzero_si512(), w.v);
  const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(x.v), w_signed);
  const __m512i quads = _mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
  return {_mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(acc.v), quads))};
}
inline Vf vdot_q_value(Vf acc, const int32_t*) { return {_mm512_cvtepi32_ps(_mm512_castps_si512(acc.v))}; }
#endif
// Each lane rounded to bf16, nearest even, NaN kept quiet (the bits in the low half of the lane):
// bit for bit the scalar f32_to_bf16 of kernels_impl.h (not vcvtneps2bf16, which flushes denormals).
inline __m512i bf16_lanes(Vf a) {
  const __m512i bits = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
}
inline void vstore_bf16(uint16_t* p, Vf a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_lanes(a))); }
// Lanes rounded to bf16 as vstore_bf16 rounds them, kept as fp32 (exact), each pair of lanes
// swapped (1 0 3 2 ...): the activations of the widened bf16 matmul (kernels_impl.h).
inline Vf vround_bf16_swapped(Vf a) { return {_mm512_permute_ps(_mm512_castsi512_ps(_mm512_slli_epi32(bf16_lanes(a), 16)), 0xB1)}; }

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
inline uint32_t vmask_above(Vf a, Vf t) { return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a.v, t.v, _CMP_GT_OQ))); }

inline Vb vload_bf16(const uint16_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
inline Vb vbcast_pair(const uint16_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return {_mm256_set1_epi32(v)};
}
inline Vf vdot_bf16(Vf acc, Vb x, Vb w) {
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  acc.v = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(x.v, hi)), _mm256_castsi256_ps(_mm256_and_si256(w.v, hi)), acc.v);
  return {_mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(x.v, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(w.v, 16)), acc.v)};
}
inline Vf vload_bf16_f32(const uint16_t* p) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16))};
}
// One and rather than two shifts (the mask a constant operand): in the widening kernel this and
// its remainder rows took bf16 at batch 20 from 0.98x to 1.03x fp32 (docs/engine.md, bf16 on AVX2).
inline Vf vbf16_odd(Vb w) { return {_mm256_castsi256_ps(_mm256_and_si256(w.v, _mm256_set1_epi32(int32_t(0xFFFF0000u))))}; }
inline Vf vbf16_even(Vb w) { return {_mm256_castsi256_ps(_mm256_slli_epi32(w.v, 16))}; }

#define GPT2S_INT8_DOT 1
constexpr int kQuantOffset = 0;
struct Vq { __m256i v; };
inline Vq vload_q(const uint8_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
inline Vq vbcast_quad(const uint8_t* p) { return {vbcast_pair(reinterpret_cast<const uint16_t*>(p)).v}; }
// vpmaddubsw multiplies unsigned by signed bytes into saturating int16 pair sums: with |x| and
// w carrying x's sign, each pair is at most 2 * 127 * 127 < 2^15 (q is within [-127, 127]), so
// nothing saturates; vpmaddwd by ones then sums the pairs of a quad into int32.
inline Vf vdot_q(Vf acc, Vq x, Vq w) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x.v, x.v), _mm256_sign_epi8(w.v, x.v));
  const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  return {_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(acc.v), quads))};
}
inline Vf vdot_q_value(Vf acc, const int32_t*) { return {_mm256_cvtepi32_ps(_mm256_castps_si256(acc.v))}; }
// Each lane rounded to bf16 (the bits in the low half of the lane), as vstore_bf16 stores it.
inline __m256i bf16_lanes(Vf a) {
  const __m256i bits = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
}
inline void vstore_bf16(uint16_t* p, Vf a) {
  const __m256i r = bf16_lanes(a);
  // u32 lanes (all < 2^16) to u16: pack within 128-bit halves, then gather the halves' low parts.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// Lanes rounded to bf16 as vstore_bf16 rounds them, kept as fp32 (exact), each pair of lanes
// swapped (1 0 3 2 ...): the activations of the widened bf16 matmul (kernels_impl.h).
inline Vf vround_bf16_swapped(Vf a) {
  return {_mm256_permute_ps(_mm256_castsi256_ps(_mm256_slli_epi32(bf16_lanes(a), 16)), 0xB1)};
}

#elif defined(__ARM_NEON) && defined(__aarch64__)

// AArch64 Advanced SIMD (every AArch64 CPU has it): 4 lanes, fused multiply-add, and the same
// integer tricks as AVX2 for bf16 (widening by a 16-bit shift, the products exact in fp32).
constexpr int kLanes = 4;
struct Vf { float32x4_t v; };
struct Vb { uint32x4_t v; };

inline Vf vzero() { return {vdupq_n_f32(0.0f)}; }
inline Vf vset1(float a) { return {vdupq_n_f32(a)}; }
inline Vf vload(const float* p) { return {vld1q_f32(p)}; }
inline void vstore(float* p, Vf a) { vst1q_f32(p, a.v); }
inline Vf vadd(Vf a, Vf b) { return {vaddq_f32(a.v, b.v)}; }
inline Vf vsub(Vf a, Vf b) { return {vsubq_f32(a.v, b.v)}; }
inline Vf vmul(Vf a, Vf b) { return {vmulq_f32(a.v, b.v)}; }
inline Vf vdiv(Vf a, Vf b) { return {vdivq_f32(a.v, b.v)}; }
inline Vf vfma(Vf a, Vf b, Vf c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
// fmax/fmin would return the number of a NaN pair; x86's maxps returns b, and so do these.
inline Vf vmax(Vf a, Vf b) { return {vbslq_f32(vcgtq_f32(a.v, b.v), a.v, b.v)}; }
inline Vf vmin(Vf a, Vf b) { return {vbslq_f32(vcltq_f32(a.v, b.v), a.v, b.v)}; }
inline float vhsum(Vf a) { return vaddvq_f32(a.v); }
inline float vhmax(Vf a) { return vmaxvq_f32(a.v); }
inline Vf vscale2(Vf a, Vf n) {
  // Add n to the exponent field; callers keep n within the normal range.
  return {vreinterpretq_f32_s32(vaddq_s32(vreinterpretq_s32_f32(a.v), vshlq_n_s32(vcvtq_s32_f32(n.v), 23)))};
}
inline Vf vround(Vf a) { return {vrndnq_f32(a.v)}; }  // nearest, ties to even
inline Vf vzero_below(Vf a, Vf x, Vf limit) {
  return {vreinterpretq_f32_u32(vandq_u32(vcgeq_f32(x.v, limit.v), vreinterpretq_u32_f32(a.v)))};
}
inline uint32_t vmask_above(Vf a, Vf t) {
  const uint32x4_t bit = {1, 2, 4, 8};
  return vaddvq_u32(vandq_u32(vcgtq_f32(a.v, t.v), bit));
}

inline Vb vload_bf16(const uint16_t* p) { return {vreinterpretq_u32_u16(vld1q_u16(p))}; }
inline Vb vbcast_pair(const uint16_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return {vdupq_n_u32(v)};
}
inline Vf vdot_bf16(Vf acc, Vb x, Vb w) {
  const uint32x4_t hi = vdupq_n_u32(0xFFFF0000u);
  acc.v = vfmaq_f32(acc.v, vreinterpretq_f32_u32(vandq_u32(x.v, hi)), vreinterpretq_f32_u32(vandq_u32(w.v, hi)));
  return {vfmaq_f32(acc.v, vreinterpretq_f32_u32(vshlq_n_u32(x.v, 16)), vreinterpretq_f32_u32(vshlq_n_u32(w.v, 16)))};
}
inline Vf vload_bf16_f32(const uint16_t* p) { return {vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16))}; }
inline Vf vbf16_odd(Vb w) { return {vreinterpretq_f32_u32(vandq_u32(w.v, vdupq_n_u32(0xFFFF0000u)))}; }
inline Vf vbf16_even(Vb w) { return {vreinterpretq_f32_u32(vshlq_n_u32(w.v, 16))}; }

#if defined(__ARM_FEATURE_DOTPROD)
#define GPT2S_INT8_DOT 1
constexpr int kQuantOffset = 0;  // sdot multiplies signed by signed bytes
struct Vq { int8x16_t v; };
inline Vq vload_q(const uint8_t* p) { return {vreinterpretq_s8_u8(vld1q_u8(p))}; }
inline Vq vbcast_quad(const uint8_t* p) { return {vreinterpretq_s8_u32(vbcast_pair(reinterpret_cast<const uint16_t*>(p)).v)}; }
inline Vf vdot_q(Vf acc, Vq x, Vq w) { return {vreinterpretq_f32_s32(vdotq_s32(vreinterpretq_s32_f32(acc.v), x.v, w.v))}; }
inline Vf vdot_q_value(Vf acc, const int32_t*) { return {vcvtq_f32_s32(vreinterpretq_s32_f32(acc.v))}; }
#else
// Without sdot: widening products, a quad's four summed pairwise in int16 (|pair| <= 2 * 127 *
// 127 < 2^15), the pairs then added into the lane's int32.
constexpr int kQuantOffset = 0;
struct Vq { int8x16_t v; };
inline Vq vload_q(const uint8_t* p) { return {vreinterpretq_s8_u8(vld1q_u8(p))}; }
inline Vq vbcast_quad(const uint8_t* p) { return {vreinterpretq_s8_u32(vbcast_pair(reinterpret_cast<const uint16_t*>(p)).v)}; }
inline Vf vdot_q(Vf acc, Vq x, Vq w) {
  const int16x8_t lo = vmull_s8(vget_low_s8(x.v), vget_low_s8(w.v)), hi = vmull_high_s8(x.v, w.v);
  return {vreinterpretq_f32_s32(vpadalq_s16(vreinterpretq_s32_f32(acc.v), vpaddq_s16(lo, hi)))};
}
inline Vf vdot_q_value(Vf acc, const int32_t*) { return {vcvtq_f32_s32(vreinterpretq_s32_f32(acc.v))}; }
#endif
inline void vstore_bf16(uint16_t* p, Vf a) {
  const uint32x4_t bits = vreinterpretq_u32_f32(a.v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7FFF))), 16);
  const uint32x4_t number = vceqq_f32(a.v, a.v);  // false for NaN
  r = vbslq_u32(number, r, vorrq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(0x40)));
  vst1_u16(p, vmovn_u32(r));
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
inline uint32_t vmask_above(Vf a, Vf t) {
  uint32_t bits = 0;
  for (int i = 0; i < kLanes; ++i) bits |= uint32_t(a.v[i] > t.v[i]) << i;
  return bits;
}

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
inline Vb vbcast_pair(const uint16_t* p) {
  Vb r;
  for (int i = 0; i < kLanes; ++i) {
    r.v[2 * i] = p[0];
    r.v[2 * i + 1] = p[1];
  }
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
inline Vf vbf16_odd(Vb w) { GPT2S_LANES(bf16_bits_to_f32(w.v[2 * i + 1])); }
inline Vf vbf16_even(Vb w) { GPT2S_LANES(bf16_bits_to_f32(w.v[2 * i])); }
inline void vstore_bf16(uint16_t* p, Vf a) {
  for (int i = 0; i < kLanes; ++i) {
    uint32_t bits;
    __builtin_memcpy(&bits, &a.v[i], 4);
    p[i] = (bits & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t((bits >> 16) | 0x40) : uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

// int8 quads (no screen: GPT2S_INT8_DOT undefined), each lane's int32 sum in a float's bits.
constexpr int kQuantOffset = 0;
struct Vq { int8_t v[4 * kLanes]; };
inline Vq vload_q(const uint8_t* p) {
  Vq r;
  __builtin_memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline Vq vbcast_quad(const uint8_t* p) {
  Vq r;
  for (int i = 0; i < 4 * kLanes; ++i) r.v[i] = int8_t(p[i % 4]);
  return r;
}
inline Vf vdot_q(Vf acc, Vq x, Vq w) {
  for (int i = 0; i < kLanes; ++i) {
    int32_t s;
    __builtin_memcpy(&s, &acc.v[i], 4);
    for (int j = 0; j < 4; ++j) s += int32_t(x.v[4 * i + j]) * int32_t(w.v[4 * i + j]);
    __builtin_memcpy(&acc.v[i], &s, 4);
  }
  return acc;
}
inline float lane_int_value(float a) {
  int32_t s;
  __builtin_memcpy(&s, &a, 4);
  return float(s);
}
inline Vf vdot_q_value(Vf acc, const int32_t*) { GPT2S_LANES(lane_int_value(acc.v[i])); }
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
