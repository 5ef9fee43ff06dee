// Fast CPU kernels for NF4 (issue 14): quantize, dequantize, a fused decode-GEMV for small M, dequantization of
// row tiles that feed the BLAS GEMM for large M, the dropout hash mask, and the fused linear's forward and backward
// as one call each. Registered as torch.ops.qk_cpu.*;
// qlora_kernels/cpu_kernels.py composes them into the reference's four entry points.
//
// Semantics are those of qlora_kernels/reference.py (the executable spec): every value that decides a stored byte
// or a dequantized element is computed in float32 in the same order (one multiply, one cast), so quantize and
// dequantize are bit-identical to the reference. The GEMV accumulates in float32 in its own order.
//
// The extension is compiled for generic x86-64 (setup.py); the hot loops are compiled a second time for AVX2 + FMA
// + F16C through function target attributes and chosen at run time, with a portable scalar path everywhere else.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QK_CPU_X86 1
#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QK_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#else
#define QK_CPU_X86 0
#endif

namespace qk_cpu {
namespace {

// The format's 16 levels (DESIGN.md), as float32.
alignas(32) constexpr float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};
constexpr int kZeroCode = 7;
constexpr float kTiny = 1e-38f;  // the reference's clamp of absmax before 1/absmax

bool cpu_has_avx2() {
#if QK_CPU_X86
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if QK_CPU_X86
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// The widest vector code the kernels may use: 2 = AVX-512 where the CPU has it (the decode-GEMV), 1 = AVX2 at most,
// 0 = the portable scalar code. The tests lower it to run every path (set_simd_level); nothing else changes it.
std::atomic<int> g_simd_level{2};

bool has_avx2() { return cpu_has_avx2() && g_simd_level.load(std::memory_order_relaxed) >= 1; }
bool has_avx512() { return has_avx2() && cpu_has_avx512() && g_simd_level.load(std::memory_order_relaxed) >= 2; }

int log2_exact(int64_t v, const char* what) {
  TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, what, " must be a power of two, got ", v);
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// Nearest level of a sorted code, decided by float32 midpoints, a tie going to the lower level: the number of
// midpoints strictly below v, as torch.bucketize(right=False) counts them. Written as !(v <= mid) so that NaN
// lands on the top level, as bucketize puts it.
template <int L>
inline int nearest_level(float v, const float* mid) {
  int c = 0;
  for (int i = 0; i < L - 1; ++i) c += !(v <= mid[i]);
  return c;
}

// NaN-propagating max of |x| (torch's amax propagates NaN).
inline float absmax_step(float m, float v) {
  float a = std::fabs(v);
  return (a > m || std::isnan(a)) ? a : m;
}

inline float clamp_unit(float v) {  // torch.clamp(v, -1, 1): NaN stays NaN
  v = (v < -1.0f) ? -1.0f : v;
  return (v > 1.0f) ? 1.0f : v;
}

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);  // c10::BFloat16 / c10::Half round to nearest even, as torch's .to() does
}

// ------------------------------------------------------------------------------------------------ quantize

template <typename T>
void quantize_blocks(const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  static float mid[15];
  static bool init = [] {
    for (int i = 0; i < 15; ++i) mid[i] = (kNf4[i] + kNf4[i + 1]) / 2.0f;
    return true;
  }();
  (void)init;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  // A block of odd size never occurs except as the last one (blocksize is even), so a byte never spans blocks
  // except at the very end, where the pad nibble is the zero code.
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> codes(blocksize);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const T* xb = x + start;
      float m = 0.0f;
      for (int64_t i = 0; i < len; ++i) m = absmax_step(m, to_f32(xb[i]));
      absmax[b] = m;
      const float inv = 1.0f / ((m < kTiny) ? kTiny : m);
      for (int64_t i = 0; i < len; ++i) codes[i] = (uint8_t)nearest_level<16>(clamp_unit(to_f32(xb[i]) * inv), mid);
      if (len & 1) codes[len] = kZeroCode;
      uint8_t* out = packed + start / 2;
      for (int64_t i = 0; i < (len + 1) / 2; ++i) out[i] = (uint8_t)((codes[2 * i] << 4) | codes[2 * i + 1]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& weight, int64_t blocksize) {
  TORCH_CHECK(weight.device().is_cpu(), "qk_cpu.quantize_nf4: weight must be a CPU tensor");
  log2_exact(blocksize, "blocksize");
  TORCH_CHECK(blocksize >= 2, "blocksize must be >= 2");
  at::Tensor w = weight.reshape(-1).contiguous();
  const int64_t n = w.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, w.options().dtype(at::kFloat));
  auto* p = packed.data_ptr<uint8_t>();
  auto* a = absmax.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: quantize_blocks(w.data_ptr<float>(), n, blocksize, p, a); break;
    case at::kBFloat16: quantize_blocks(w.data_ptr<c10::BFloat16>(), n, blocksize, p, a); break;
    case at::kHalf: quantize_blocks(w.data_ptr<c10::Half>(), n, blocksize, p, a); break;
    default: TORCH_CHECK(false, "qk_cpu.quantize_nf4: weight must be float32, bfloat16 or float16, got ",
                         w.scalar_type());
  }
  return {packed, absmax};
}

// Blockwise absmax quantization of float32 values onto a sorted 256-level code (double quantization of the NF4
// absmax): (codes uint8 [n], absmax float32 [blocks]); the reference's quantize_blockwise_8bit.
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit(const at::Tensor& values, const at::Tensor& code,
                                                           int64_t blocksize) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && code.scalar_type() == at::kFloat && code.numel() == 256,
              "qk_cpu.quantize_blockwise_8bit: float32 values and a float32[256] code");
  at::Tensor v = values.reshape(-1).contiguous();
  at::Tensor c = code.reshape(-1).contiguous();
  const int64_t n = v.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor codes = at::empty({n}, v.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, v.options());
  float mid[255];
  const float* cp = c.data_ptr<float>();
  for (int i = 0; i < 255; ++i) mid[i] = (cp[i] + cp[i + 1]) / 2.0f;
  const float* vp = v.data_ptr<float>();
  uint8_t* qp = codes.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
      float m = 0.0f;
      for (int64_t i = 0; i < len; ++i) m = absmax_step(m, vp[start + i]);
      ap[b] = m;
      const float inv = 1.0f / ((m < kTiny) ? kTiny : m);
      for (int64_t i = 0; i < len; ++i) {
        const float s = clamp_unit(vp[start + i] * inv);
        // lower_bound over the midpoints (count of midpoints < s); NaN goes to the top level like bucketize.
        int idx = std::isnan(s) ? 255 : int(std::lower_bound(mid, mid + 255, s) - mid);
        qp[start + i] = (uint8_t)idx;
      }
    }
  });
  return {codes, absmax};
}

// ---------------------------------------------------------------------------------------------- dequantize

// The float32 absmax of block b: stored, or decoded from double quantization in the reference's order
// (dyn[q] * nested_absmax[b >> 8], rounded, then + offset), so the kernels read the compressed bytes directly.
struct Absmax {
  const float* f = nullptr;
  const uint8_t* q = nullptr;
  const float* nested = nullptr;
  const float* code = nullptr;
  float offset = 0.0f;
  inline float operator[](int64_t b) const {
    if (f) return f[b];
    const float v = code[q[b]] * nested[b >> 8];
    return v + offset;
  }
};

inline float deq_scalar(const uint8_t* packed, const Absmax& absmax, int shift, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  const int c = (i & 1) ? (byte & 15) : (byte >> 4);
  return kNf4[c] * absmax[i >> shift];
}

template <typename T>
void dequant_range_scalar(const uint8_t* packed, const Absmax& absmax, int shift, int64_t start, int64_t len, T* out) {
  for (int64_t j = 0; j < len; ++j) out[j] = from_f32<T>(deq_scalar(packed, absmax, shift, start + j));
}

#if QK_CPU_X86
// 16-entry float lookup: two 8-entry permutes, bit 3 of the index chooses between them.
QK_AVX2 inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The 16 levels of 8 packed bytes, in element order (high nibble first).
QK_AVX2 inline void decode16(const uint8_t* bytes, __m256 lo, __m256 hi, __m256& a, __m256& b) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i m = _mm_set1_epi8(15);
  const __m128i hn = _mm_and_si128(_mm_srli_epi16(v, 4), m);
  const __m128i ln = _mm_and_si128(v, m);
  const __m128i inter = _mm_unpacklo_epi8(hn, ln);
  a = lookup16(lo, hi, _mm256_cvtepu8_epi32(inter));
  b = lookup16(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128(inter, 8)));
}

QK_AVX2 inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }

QK_AVX2 inline void store8(c10::BFloat16* out, __m256 v) {
  // Round to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion, eight at a time.
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

QK_AVX2 inline void store8(c10::Half* out, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T>
QK_AVX2 void dequant_range_avx2(const uint8_t* packed, const Absmax& absmax, int shift, int64_t start, int64_t len,
                                T* out) {
  int64_t i = start;
  const int64_t end = start + len;
  // Groups of 16 elements starting at a multiple of 16 lie in one block (blocksize >= 16) and in 8 whole bytes.
  const int64_t head = std::min(end, (i + 15) & ~int64_t{15});
  for (; i < head; ++i) *out++ = from_f32<T>(deq_scalar(packed, absmax, shift, i));
  const __m256 lo = _mm256_load_ps(kNf4), hi = _mm256_load_ps(kNf4 + 8);
  while (i + 16 <= end) {
    const int64_t block = i >> shift;
    const int64_t block_end = std::min(end, (block + 1) << shift);
    const __m256 s = _mm256_set1_ps(absmax[block]);
    for (; i + 16 <= block_end; i += 16) {
      __m256 a, b;
      decode16(packed + (i >> 1), lo, hi, a, b);
      store8(out, _mm256_mul_ps(a, s));
      store8(out + 8, _mm256_mul_ps(b, s));
      out += 16;
    }
  }
  for (; i < end; ++i) *out++ = from_f32<T>(deq_scalar(packed, absmax, shift, i));
}
#endif

// Elements [start, start + len) of the flattened weight, as T.
template <typename T>
void dequant_range(const uint8_t* packed, const Absmax& absmax, int shift, int64_t start, int64_t len, T* out) {
#if QK_CPU_X86
  if (has_avx2() && shift >= 4) return dequant_range_avx2<T>(packed, absmax, shift, start, len, out);
#endif
  dequant_range_scalar<T>(packed, absmax, shift, start, len, out);
}

// The absmax operands of an op: float32 [blocks], or (uint8 codes [blocks], nested float32 [ceil(blocks / 256)],
// the 256-level code, the offset) with double quantization. Holds the contiguous tensors the view points into.
struct AbsmaxArgs {
  at::Tensor f, q, nested, code;
  Absmax view;
  AbsmaxArgs(const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
             const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& nested_code,
             int64_t nblocks) {
    TORCH_CHECK(absmax.device().is_cpu(), "qk_cpu: absmax must be a CPU tensor");
    TORCH_CHECK(absmax.numel() >= nblocks, "qk_cpu: absmax has ", absmax.numel(), " entries, ", nblocks, " needed");
    if (!nested_absmax.has_value()) {
      f = absmax.reshape(-1).to(at::kFloat).contiguous();
      view.f = f.data_ptr<float>();
      return;
    }
    TORCH_CHECK(offset.has_value() && nested_code.has_value(), "qk_cpu: double quantization needs offset, nested_code");
    q = absmax.reshape(-1).contiguous();
    TORCH_CHECK(q.scalar_type() == at::kByte, "qk_cpu: a double-quantized absmax must be uint8");
    nested = nested_absmax->reshape(-1).to(at::kFloat).contiguous();
    code = nested_code->reshape(-1).to(at::kFloat).contiguous();
    TORCH_CHECK(code.numel() == 256, "qk_cpu: nested_code must have 256 entries");
    TORCH_CHECK(nested.numel() * 256 >= nblocks, "qk_cpu: nested_absmax is too short for ", nblocks, " blocks");
    TORCH_CHECK(offset->numel() == 1, "qk_cpu: offset must have one element");
    view.q = q.data_ptr<uint8_t>();
    view.nested = nested.data_ptr<float>();
    view.code = code.data_ptr<float>();
    view.offset = offset->reshape(-1).to(at::kFloat).item<float>();
  }
};

const uint8_t* packed_bytes(const at::Tensor& packed, int64_t numel) {
  TORCH_CHECK(packed.device().is_cpu(), "qk_cpu: packed must be a CPU tensor");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "qk_cpu: packed must be contiguous uint8");
  TORCH_CHECK(packed.numel() >= (numel + 1) / 2, "qk_cpu: packed holds ", packed.numel(), " bytes, ", numel,
              " elements need ", (numel + 1) / 2);
  return packed.data_ptr<uint8_t>();
}

int64_t blocks_of(int64_t numel, int64_t blocksize) { return (numel + blocksize - 1) / blocksize; }

// The float32 absmax per block (the reference's decode_absmax).
at::Tensor decode_absmax(const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                         const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& nested_code) {
  const int64_t n = absmax.numel();
  AbsmaxArgs am(absmax, nested_absmax, offset, nested_code, n);
  if (am.view.f) return am.f;
  at::Tensor out = at::empty({n}, absmax.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const Absmax v = am.view;
  at::parallel_for(0, n, 65536, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) op[b] = v[b];
  });
  return out;
}

// A fresh flat output tensor. A large one is backed by transparent huge pages where Linux offers them (madvise
// mode): the first touch of a fresh 4 KiB page costs more than dequantizing it (measured here: writing a new 32 MiB
// buffer 30 ms, an old one 1.8 ms, a new one on huge pages 5.7 ms), and torch's allocator asks for huge pages only
// under THP_MEM_ALLOC_ENABLE=1.
at::Tensor empty_output(int64_t numel, at::ScalarType dtype) {
#if defined(__linux__)
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes >= 2 * kHuge) {
    const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, len) == 0) {
      madvise(ptr, len, MADV_HUGEPAGE);  // advice only: without THP the pages are ordinary ones
      return at::from_blob(ptr, {numel}, [](void* p) { free(p); }, at::TensorOptions().dtype(dtype));
    }
  }
#endif
  return at::empty({numel}, at::TensorOptions().dtype(dtype));
}

// The whole weight, flat [numel], in dtype.
at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& offset,
                          const c10::optional<at::Tensor>& nested_code, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype) {
  const int shift = log2_exact(blocksize, "blocksize");
  const uint8_t* p = packed_bytes(packed, numel);
  AbsmaxArgs am(absmax, nested_absmax, offset, nested_code, blocks_of(numel, blocksize));
  const Absmax a = am.view;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "qk_cpu.dequantize_nf4: dtype must be float32, bfloat16 or float16, got ", dtype);
  at::Tensor out = empty_output(numel, dtype);
  constexpr int64_t kChunk = 8192;  // elements per task, a multiple of 16
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  auto run = [&](auto* o) {
    at::parallel_for(0, nchunks, 8, [&](int64_t c0, int64_t c1) {
      const int64_t s = c0 * kChunk, e = std::min(numel, c1 * kChunk);
      dequant_range(p, a, shift, s, e - s, o + s);
    });
  };
  switch (dtype) {
    case at::kFloat: run(out.data_ptr<float>()); break;
    case at::kBFloat16: run(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "qk_cpu.dequantize_nf4: dtype must be float32, bfloat16 or float16, got ", dtype);
  }
  return out;
}

// Rows [row0, row0 + out.size(0)) of the [N, K] weight into out (float32 [rows, K], contiguous): the tiles that
// feed the BLAS GEMM of the large-M fused linear.
void dequantize_rows_(const at::Tensor& packed, const at::Tensor& absmax,
                      const c10::optional<at::Tensor>& nested_absmax,
                      const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& nested_code,
                      int64_t blocksize, int64_t K, int64_t row0, const at::Tensor& out) {
  const int shift = log2_exact(blocksize, "blocksize");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(1) == K,
              "qk_cpu.dequantize_rows_: out must be contiguous float32 [rows, K]");
  TORCH_CHECK(row0 >= 0, "qk_cpu.dequantize_rows_: row0 must be >= 0");
  const int64_t rows = out.size(0), numel = (row0 + rows) * K;
  const uint8_t* p = packed_bytes(packed, numel);
  AbsmaxArgs am(absmax, nested_absmax, offset, nested_code, blocks_of(numel, blocksize));
  const Absmax a = am.view;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    dequant_range(p, a, shift, (row0 + r0) * K, (r1 - r0) * K, o + r0 * K);
  });
}

// ----------------------------------------------------------------------------------------- fused decode-GEMV
//
// y[m, n] = Σ_k x[m, k] · code[w[n, k]] · absmax[block(n, k)] + (s_scaled[m] · B[n]) + bias[n], for small M: each
// weight byte is read once per call, decoded in registers and never stored; each block's partial sum is multiplied
// by its absmax; the r-wide LoRA term and the bias are added in the same pass (the epilogue of each output
// element), so a decode call is one C++ call and one output allocation.
// Where every row is whole blocks of >= 64 (K % blocksize == 0), 32 bytes decode at once with in-lane byte shuffles:
// the four bytes of each level's float32 come from four 16-entry pshufb tables and are interleaved back into
// floats, in an order that differs from the elements' (high nibbles, then low; lanes interleaved); x is permuted
// once per call into that order, so no shuffle is spent putting the weights back. That decode (24 shuffles per 64
// weights) is what bounds this kernel on AVX2: measured on a 2-core Zen 3, decoding alone takes 90 % of the GEMV's
// time, and the weight bytes stream at well under the memory's bandwidth. Other shapes decode each row into a small
// buffer first.
// Rows are handed out in chunks from a shared counter rather than split once in halves, so that a thread slowed by
// another process on a shared machine does not hold the whole call back.

inline float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Position p of float vector q in decode64's output holds element 2·j + h of the 64, j = 4q' + (p < 4 ? p : 12 + p),
// with h = q / 4 (0: high nibbles) and q' = q % 4.
inline int64_t decode64_element(int q, int p) {
  const int h = q / 4, qq = q % 4;
  const int j = 4 * qq + (p < 4 ? p : 12 + p);
  return 2 * j + h;
}

// The LoRA term and bias of the GEMV's epilogue: y[m, n] = acc + s[m] · b[n] + bias[n] (s: s_scaled [M, r],
// b: lora_B [N, r], both float32; bias float32 [N] or none), in the reference's order (product, + LoRA, + bias).
struct LoraTerm {
  const float* s = nullptr;
  const float* b = nullptr;
  const float* bias = nullptr;
  int64_t r = 0;
};

// Rows handed out in chunks from a shared counter by one parallel region (or all on this thread when `parallel` is
// false or the call is already inside a parallel region): fn(n0, n1) for consecutive row ranges covering [0, N).
template <typename Fn>
void for_row_chunks(int64_t N, int64_t chunk, bool parallel, const Fn& fn) {
  if (N <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t nchunks = (N + chunk - 1) / chunk;
  const int64_t threads = parallel ? std::min<int64_t>(at::get_num_threads(), nchunks) : 1;
  if (threads <= 1 || at::in_parallel_region()) {
    fn(0, N);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    (void)t0;
    (void)t1;
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) fn(c * chunk, std::min(N, (c + 1) * chunk));
  });
}

#if QK_CPU_X86
QK_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four FMA chains: each waits 4 cycles on its previous FMA, so a long dot needs four to stream its operands.
QK_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct Nf4ByteTables {
  __m256i t[4];  // t[i]: byte i of each level's float32 bits, in both 128-bit lanes
};

QK_AVX2 inline Nf4ByteTables nf4_byte_tables() {
  alignas(32) uint8_t bytes[4][32];
  for (int c = 0; c < 16; ++c) {
    uint32_t bits;
    std::memcpy(&bits, &kNf4[c], 4);
    for (int i = 0; i < 4; ++i) bytes[i][c] = bytes[i][16 + c] = static_cast<uint8_t>(bits >> (8 * i));
  }
  Nf4ByteTables tab;
  for (int i = 0; i < 4; ++i) tab.t[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[i]));
  return tab;
}

// The 64 levels of 32 packed bytes, as 8 float vectors in decode64_element's order.
QK_AVX2 inline void decode64(const uint8_t* bytes, const Nf4ByteTables& tab, __m256 f[8]) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i m = _mm256_set1_epi8(15);
  const __m256i nib[2] = {_mm256_and_si256(_mm256_srli_epi16(v, 4), m), _mm256_and_si256(v, m)};
  for (int h = 0; h < 2; ++h) {
    const __m256i p0 = _mm256_shuffle_epi8(tab.t[0], nib[h]);
    const __m256i p1 = _mm256_shuffle_epi8(tab.t[1], nib[h]);
    const __m256i p2 = _mm256_shuffle_epi8(tab.t[2], nib[h]);
    const __m256i p3 = _mm256_shuffle_epi8(tab.t[3], nib[h]);
    const __m256i a = _mm256_unpacklo_epi8(p0, p1), b = _mm256_unpackhi_epi8(p0, p1);
    const __m256i c = _mm256_unpacklo_epi8(p2, p3), d = _mm256_unpackhi_epi8(p2, p3);
    f[4 * h + 0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(a, c));
    f[4 * h + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(a, c));
    f[4 * h + 2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(b, d));
    f[4 * h + 3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(b, d));
  }
}

// Rows [n0, n1) for MB rows of x (xp: [MB, K] permuted per 64 elements, row stride K; y and s from row m0 on),
// K % blocksize == 0, blocksize >= 64. Each block's products go to NP independent partial sums (short FMA chains,
// so that consecutive blocks overlap), which are summed, scaled by the block's absmax and accumulated.
template <int MB, bool BLOCK64, typename T>
QK_AVX2 void gemv_rows_avx2(const uint8_t* packed, const Absmax& absmax, int shift, int64_t K, const float* xp,
                            int64_t n0, int64_t n1, const LoraTerm& lt, int64_t m0, T* y, int64_t ldy) {
  constexpr int NP = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  const Nf4ByteTables tab = nf4_byte_tables();
  const int64_t nblk = K >> shift;
  const int64_t groups = BLOCK64 ? 1 : int64_t{1} << (shift - 6);  // 64-element groups per block
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* g = packed + ((n * K) >> 1);
    const int64_t b0 = (n * K) >> shift;
    const float* xg = xp;
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nblk; ++blk) {
      __m256 p[MB][NP];
      for (int64_t gi = 0; gi < groups; ++gi, g += 32, xg += 64) {
        // One software prefetch per cache line, 1 KiB ahead: a few percent on weights streamed from memory (the row
        // chunks are short streams for the hardware prefetcher). A prefetch never faults, past the end included.
        if ((reinterpret_cast<uintptr_t>(g) & 63) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(g) + 1024, _MM_HINT_T0);
        __m256 f[8];
        decode64(g, tab, f);
        for (int m = 0; m < MB; ++m) {
          const float* xm = xg + m * K;
          for (int q = 0; q < 8; ++q) {
            const __m256 xv = _mm256_loadu_ps(xm + 8 * q);
            if (gi == 0 && q < NP) {
              p[m][q % NP] = _mm256_mul_ps(f[q], xv);
            } else {
              p[m][q % NP] = _mm256_fmadd_ps(f[q], xv, p[m][q % NP]);
            }
          }
        }
      }
      // Decoded here rather than for the whole row first: this scalar work overlaps the vector work (measured: a
      // separate pass over the row's absmax cost 8 % of the GEMV).
      const __m256 s = _mm256_set1_ps(absmax[b0 + blk]);
      for (int m = 0; m < MB; ++m) {
        __m256 q = p[m][0];
        if (NP == 4) {
          q = _mm256_add_ps(_mm256_add_ps(p[m][0], p[m][1]), _mm256_add_ps(p[m][2 % NP], p[m][3 % NP]));
        } else if (NP == 2) {
          q = _mm256_add_ps(p[m][0], p[m][1 % NP]);
        }
        tot[m] = _mm256_fmadd_ps(q, s, tot[m]);
      }
    }
    // Epilogue: the LoRA term joins the accumulator eight products at a time (one horizontal sum per output).
    const float* bn = lt.b + n * lt.r;
    for (int m = 0; m < MB; ++m) {
      const float* sm = lt.s + (m0 + m) * lt.r;
      int64_t j = 0;
      for (; j + 8 <= lt.r; j += 8) tot[m] = _mm256_fmadd_ps(_mm256_loadu_ps(sm + j), _mm256_loadu_ps(bn + j), tot[m]);
      float v = hsum(tot[m]);
      for (; j < lt.r; ++j) v += sm[j] * bn[j];
      if (lt.bias) v += lt.bias[n];
      y[(m0 + m) * ldy + n] = from_f32<T>(v);
    }
  }
}

// AVX-512 (where the CPU has it): one 16-entry permute looks up 16 levels at once, the whole codebook in one register,
// where AVX2 assembles each float from four byte shuffles (decode64). Position p of float vector q in
// decode64_avx512's output holds element 2·(16·(q / 2) + p) + q % 2 of the 64: the 16 bytes of half q / 2, their
// high nibbles (even elements) for even q, their low nibbles (odd elements) for odd q.
inline int64_t decode64_avx512_element(int q, int p) { return 2 * (16 * (q / 2) + p) + q % 2; }

// `table`: the 16 values the codes stand for (the levels, or the levels times a block's absmax).
QK_AVX512 inline void decode64_avx512(const uint8_t* bytes, __m512 table, __m512 f[4]) {
  for (int h = 0; h < 2; ++h) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * h)));
    f[2 * h] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);  // the index's bits 3:0 pick the entry
    f[2 * h + 1] = _mm512_permutexvar_ps(v, table);
  }
}

// One block of the AVX-512 decode-GEMV: its `groups` 64-weight groups (from g, x from xg: both advanced), FMAs into
// accumulators HALF..HALF+3 of each row.
template <int MB, int NA, int HALF>
QK_AVX512 inline void gemv_block_avx512(const uint8_t*& g, const float*& xg, int64_t groups, int64_t K,
                                        __m512 weights, __m512 (&acc)[MB][NA]) {
  for (int64_t gi = 0; gi < groups; ++gi, g += 32, xg += 64) {
    // One software prefetch per cache line, 1 KiB ahead (as in the AVX2 loop).
    if ((reinterpret_cast<uintptr_t>(g) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(g) + 1024, _MM_HINT_T0);
    __m512 f[4];
    decode64_avx512(g, weights, f);
    for (int m = 0; m < MB; ++m) {
      const float* xm = xg + m * K;
      for (int q = 0; q < 4; ++q) acc[m][HALF + q] = _mm512_fmadd_ps(f[q], _mm512_loadu_ps(xm + 16 * q), acc[m][HALF + q]);
    }
  }
}

// The decode-GEMV with decode64_avx512 (xp permuted per 64 elements in decode64_avx512_element's order). Each block's
// absmax scales the 16 levels once (one multiply per block), so the looked-up values are the dequantized weights
// themselves and go straight into the FMAs: per 64 weights 2 byte widenings, 2 shifts, 4 permutes and 4 FMAs per row.
// At M = 1 consecutive blocks alternate between two sets of 4 accumulators (8 FMA chains).
template <int MB, bool BLOCK64, typename T>
QK_AVX512 void gemv_rows_avx512(const uint8_t* packed, const Absmax& absmax, int shift, int64_t K, const float* xp,
                                int64_t n0, int64_t n1, const LoraTerm& lt, int64_t m0, T* y, int64_t ldy) {
  constexpr int NA = MB == 1 ? 8 : 4;  // accumulators per row
  const __m512 levels = _mm512_loadu_ps(kNf4);
  const int64_t nblk = K >> shift;
  const int64_t groups = BLOCK64 ? 1 : int64_t{1} << (shift - 6);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* g = packed + ((n * K) >> 1);
    const int64_t b0 = (n * K) >> shift;
    const float* xg = xp;
    __m512 acc[MB][NA];
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < NA; ++i) acc[m][i] = _mm512_setzero_ps();
    int64_t blk = 0;
    if (NA == 8) {
      for (; blk + 2 <= nblk; blk += 2) {
        gemv_block_avx512<MB, NA, 0>(g, xg, groups, K, _mm512_mul_ps(levels, _mm512_set1_ps(absmax[b0 + blk])), acc);
        gemv_block_avx512<MB, NA, NA - 4>(g, xg, groups, K,
                                          _mm512_mul_ps(levels, _mm512_set1_ps(absmax[b0 + blk + 1])), acc);
      }
    }
    for (; blk < nblk; ++blk)
      gemv_block_avx512<MB, NA, 0>(g, xg, groups, K, _mm512_mul_ps(levels, _mm512_set1_ps(absmax[b0 + blk])), acc);
    const float* bn = lt.b + n * lt.r;
    for (int m = 0; m < MB; ++m) {
      for (int i = NA / 2; i >= 1; i /= 2)
        for (int j = 0; j < i; ++j) acc[m][j] = _mm512_add_ps(acc[m][j], acc[m][j + i]);
      __m512 tot = acc[m][0];
      const float* sm = lt.s + (m0 + m) * lt.r;
      for (int64_t j = 0; j < lt.r; j += 16) {
        const __mmask16 k = lt.r - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (lt.r - j)) - 1);
        tot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sm + j), _mm512_maskz_loadu_ps(k, bn + j), tot);
      }
      float v = _mm512_reduce_add_ps(tot);
      if (lt.bias) v += lt.bias[n];
      y[(m0 + m) * ldy + n] = from_f32<T>(v);
    }
  }
}

// x [M, K] permuted per 64 elements by `element` (element(q, p): the position in the 64 of lane p of vector q).
template <int VECTORS, int LANES, typename Element>
std::vector<float> permuted_x(const float* xf, int64_t M, int64_t K, const Element& element) {
  std::array<uint8_t, 64> perm{};
  for (int q = 0; q < VECTORS; ++q)
    for (int e = 0; e < LANES; ++e) perm[LANES * q + e] = static_cast<uint8_t>(element(q, e));
  std::vector<float> xp(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K; g += 64)
      for (int i = 0; i < 64; ++i) xp[m * K + g + i] = xf[m * K + g + perm[i]];
  return xp;
}

// Rows [n0, n1) for all M rows of xp, four, two, then one at a time (a decoded group serves every row of a pass).
template <template <int, bool, typename> class Rows, typename T>
void gemv_all_rows(const uint8_t* p, const Absmax& a, int shift, int64_t K, const float* xp, int64_t M, int64_t n0,
                   int64_t n1, const LoraTerm& lt, T* y, int64_t N) {
  int64_t m = 0;
  if (shift == 6) {
    for (; m + 4 <= M; m += 4) Rows<4, true, T>::run(p, a, shift, K, xp + m * K, n0, n1, lt, m, y, N);
    for (; m + 2 <= M; m += 2) Rows<2, true, T>::run(p, a, shift, K, xp + m * K, n0, n1, lt, m, y, N);
    for (; m < M; ++m) Rows<1, true, T>::run(p, a, shift, K, xp + m * K, n0, n1, lt, m, y, N);
  } else {
    for (; m + 4 <= M; m += 4) Rows<4, false, T>::run(p, a, shift, K, xp + m * K, n0, n1, lt, m, y, N);
    for (; m + 2 <= M; m += 2) Rows<2, false, T>::run(p, a, shift, K, xp + m * K, n0, n1, lt, m, y, N);
    for (; m < M; ++m) Rows<1, false, T>::run(p, a, shift, K, xp + m * K, n0, n1, lt, m, y, N);
  }
}

template <int MB, bool BLOCK64, typename T>
struct RowsAvx2 {
  static void run(const uint8_t* p, const Absmax& a, int shift, int64_t K, const float* xp, int64_t n0, int64_t n1,
                  const LoraTerm& lt, int64_t m0, T* y, int64_t ldy) {
    gemv_rows_avx2<MB, BLOCK64, T>(p, a, shift, K, xp, n0, n1, lt, m0, y, ldy);
  }
};

template <int MB, bool BLOCK64, typename T>
struct RowsAvx512 {
  static void run(const uint8_t* p, const Absmax& a, int shift, int64_t K, const float* xp, int64_t n0, int64_t n1,
                  const LoraTerm& lt, int64_t m0, T* y, int64_t ldy) {
    gemv_rows_avx512<MB, BLOCK64, T>(p, a, shift, K, xp, n0, n1, lt, m0, y, ldy);
  }
};
#endif

// y [M, N] (T) = xf [M, K] · deq(W)ᵀ + the epilogue's LoRA term and bias.
template <typename T>
void gemv_lora(const float* xf, int64_t M, int64_t K, const uint8_t* p, const Absmax& a, int shift, int64_t N,
               const LoraTerm& lt, T* y) {
  if (M == 0 || N == 0) return;
  // Below ~64K weight·rows a second thread costs more to wake than it saves.
  const bool parallel = N * K * std::min<int64_t>(M, 4) >= (int64_t{1} << 16);
  // Chunks of about 256 KiB of packed bytes (long enough streams for the hardware prefetcher: 9 % faster than 64 KiB
  // at M = 1, 4096x4096, measured interleaved on a 2-core EPYC), at least ~8 per thread so that a slow thread's share
  // can move.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(
      1, std::min((int64_t{1} << 19) / std::max<int64_t>(K, 1), (N + 8 * threads - 1) / (8 * threads)));
#if QK_CPU_X86
  if (has_avx512() && shift >= 6 && K % (int64_t{1} << shift) == 0) {
    const std::vector<float> xp = permuted_x<4, 16>(xf, M, K, decode64_avx512_element);
    for_row_chunks(N, chunk, parallel, [&](int64_t n0, int64_t n1) {
      gemv_all_rows<RowsAvx512, T>(p, a, shift, K, xp.data(), M, n0, n1, lt, y, N);
    });
    return;
  }
  if (has_avx2() && shift >= 6 && K % (int64_t{1} << shift) == 0) {
    const std::vector<float> xp = permuted_x<8, 8>(xf, M, K, decode64_element);
    for_row_chunks(N, chunk, parallel, [&](int64_t n0, int64_t n1) {
      gemv_all_rows<RowsAvx2, T>(p, a, shift, K, xp.data(), M, n0, n1, lt, y, N);
    });
    return;
  }
#endif
  for_row_chunks(N, chunk, parallel, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      dequant_range<float>(p, a, shift, n * K, K, row.data());
      for (int64_t m = 0; m < M; ++m) {
#if QK_CPU_X86
        const bool simd = has_avx2();
        float v = simd ? dot_avx2(xf + m * K, row.data(), K) : dot_scalar(xf + m * K, row.data(), K);
        if (lt.r > 0) {
          const float* sm = lt.s + m * lt.r;
          const float* bn = lt.b + n * lt.r;
          v += simd ? dot_avx2(sm, bn, lt.r) : dot_scalar(sm, bn, lt.r);
        }
#else
        float v = dot_scalar(xf + m * K, row.data(), K);
        if (lt.r > 0) v += dot_scalar(lt.s + m * lt.r, lt.b + n * lt.r, lt.r);
#endif
        if (lt.bias) v += lt.bias[n];
        y[m * N + n] = from_f32<T>(v);
      }
    }
  });
}
// ------------------------------------------------------------------------------------ tiled dequantize + BLAS
//
// For large M. out += a · deq(W)ᵀ (forward: a [M, K], out [M, N]) or out += a · deq(W) (dX: a [M, N], out [M, K]),
// float32. One parallel region: each thread owns a slice of out's columns (rows of W, or columns of W for dX),
// dequantizes its tiles of W into a private cache-sized buffer and runs a single-threaded BLAS GEMM on each. One
// region instead of one per tile and per GEMM keeps the threads from meeting at a barrier for every tile, which
// matters most on a shared, oversubscribed machine.

void nf4_matmul_acc_(const at::Tensor& out, const at::Tensor& a, const at::Tensor& packed, const at::Tensor& absmax,
                     const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& offset,
                     const c10::optional<at::Tensor>& nested_code, int64_t blocksize, int64_t N, int64_t K,
                     bool transpose_w, int64_t tile_elements) {
  const int shift = log2_exact(blocksize, "blocksize");
  TORCH_CHECK(out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && out.dim() == 2 && a.dim() == 2,
              "qk_cpu.nf4_matmul_acc_: float32 2-D out and a");
  const int64_t M = a.size(0);
  TORCH_CHECK(out.size(0) == M && a.size(1) == (transpose_w ? K : N) && out.size(1) == (transpose_w ? N : K),
              "qk_cpu.nf4_matmul_acc_: shapes do not match [N, K] = [", N, ", ", K, "]");
  const uint8_t* p = packed_bytes(packed, N * K);
  AbsmaxArgs am(absmax, nested_absmax, offset, nested_code, blocks_of(N * K, blocksize));
  const Absmax av = am.view;
  if (M == 0 || N == 0 || K == 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cols = transpose_w ? N : K;  // the columns of out the threads split
  const int64_t chunk = std::max<int64_t>(1, (cols + threads - 1) / threads);
  const int64_t nchunks = (cols + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t j0 = c0 * chunk, j1 = std::min(cols, c1 * chunk);
    if (transpose_w) {
      // Rows [j0, j1) of W, tiles of whole rows.
      const int64_t rows = std::max<int64_t>(1, std::min(j1 - j0, tile_elements / std::max<int64_t>(K, 1)));
      at::Tensor buf = at::empty({rows, K}, a.options());
      for (int64_t n0 = j0; n0 < j1; n0 += rows) {
        const int64_t nt = std::min(rows, j1 - n0);
        at::Tensor tile = buf.narrow(0, 0, nt);
        dequant_range(p, av, shift, n0 * K, nt * K, tile.data_ptr<float>());
        at::Tensor dst = out.narrow(1, n0, nt);
        dst.addmm_(a, tile.t());
      }
    } else {
      // Columns [j0, j1) of W, tiles of rows of that slab.
      const int64_t kc = j1 - j0;
      const int64_t rows = std::max<int64_t>(1, std::min(N, tile_elements / std::max<int64_t>(kc, 1)));
      at::Tensor buf = at::empty({rows, kc}, a.options());
      at::Tensor dst = out.narrow(1, j0, kc);
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t nt = std::min(rows, N - n0);
        float* b = buf.data_ptr<float>();
        for (int64_t n = n0; n < n0 + nt; ++n) dequant_range(p, av, shift, n * K + j0, kc, b + (n - n0) * kc);
        dst.addmm_(a.narrow(1, n0, nt), buf.narrow(0, 0, nt));
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------- dropout
//
// The reference's counter-based mask: keep (m, k) iff hash(m·K + k, seed) >> 8 >= threshold, with
// hash = fmix32(fmix32(lo ^ fmix32(seed_lo)) ^ (hi + seed_hi)), (lo, hi) the 32-bit halves of the index.

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

template <typename T>
void dropout_rows(const T* x, T* out, int64_t rows, int64_t cols, int64_t seed, uint32_t threshold, float scale) {
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t key = fmix32(static_cast<uint32_t>(useed));
  const uint32_t seed_hi = static_cast<uint32_t>(useed >> 32);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const uint64_t index = static_cast<uint64_t>(r * cols + c);
        const uint32_t h =
            fmix32(fmix32(static_cast<uint32_t>(index) ^ key) ^ (static_cast<uint32_t>(index >> 32) + seed_hi));
        const float v = to_f32(x[r * cols + c]) * scale;
        out[r * cols + c] = ((h >> 8) >= threshold) ? from_f32<T>(v) : from_f32<T>(0.0f);
      }
    }
  });
}

// Inverted dropout of x [rows, cols] with the hash mask: kept elements times scale (float32), in x's dtype.
at::Tensor lora_dropout(const at::Tensor& x, int64_t seed, int64_t threshold, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "qk_cpu.lora_dropout: x must be a 2-D CPU tensor");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 24), "qk_cpu.lora_dropout: threshold out of range");
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = xc.size(0), cols = xc.size(1);
  const float s = static_cast<float>(scale);
  const uint32_t t = static_cast<uint32_t>(threshold);
  switch (xc.scalar_type()) {
    case at::kFloat: dropout_rows(xc.data_ptr<float>(), out.data_ptr<float>(), rows, cols, seed, t, s); break;
    case at::kBFloat16:
      dropout_rows(xc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, cols, seed, t, s);
      break;
    case at::kHalf: dropout_rows(xc.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, cols, seed, t, s); break;
    default: TORCH_CHECK(false, "qk_cpu.lora_dropout: x must be float32, bfloat16 or float16");
  }
  return out;
}

// ------------------------------------------------------------------------------------- fused linear, whole
//
// The reference's nf4_lora_linear_fwd / _bwd in one C++ call each, so that a layer pays one Python-to-C++ crossing
// per direction instead of a dozen small torch ops (on small layers, M = 512 and N = K = 256, those ops cost as much
// as the GEMMs' difference to a dense layer). Roundings are the reference's: the r-wide intermediates are rounded to
// x's dtype, already scaled, where they feed a product; products accumulate in float32.

inline float round_to(float v, at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return static_cast<float>(c10::BFloat16(v));
    case at::kHalf: return static_cast<float>(c10::Half(v));
    default: return v;
  }
}

// dst = round_to(scale · src) elementwise (float32, the same shape), as the reference's (scale * s).to(dtype).
at::Tensor scaled_rounded(const at::Tensor& src, double scale, at::ScalarType dtype) {
  at::Tensor s = src.contiguous();
  at::Tensor out = at::empty_like(s);
  const float* a = s.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);  // torch multiplies a float32 tensor by a Python float in float32
  for (int64_t i = 0, n = s.numel(); i < n; ++i) o[i] = round_to(sc * a[i], dtype);
  return out;
}

at::Tensor float32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Inverted dropout of the 2-D x with the hash mask, in x's dtype (the reference's lora_dropout).
at::Tensor dropout_of(const at::Tensor& x, bool dropout, int64_t seed, int64_t threshold, double keep_scale) {
  return dropout ? lora_dropout(x, seed, threshold, keep_scale) : x;
}

void check_linear_args(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                       const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1) && lora_A.device().is_cpu(), op,
              ": lora_A must be [r, K] on the CPU");
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(1) == lora_A.size(0) && lora_B.device().is_cpu(), op,
              ": lora_B must be [N, r] on the CPU");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == lora_B.size(0)), op, ": bias must be [N]");
}

// (y [M, N] in x's dtype, s = dropout(x) · Aᵀ [M, r] float32). `gemv`: the fused decode-GEMV (small M); else the
// tiled dequantize + BLAS GEMM of nf4_matmul_acc_, accumulating into bias + s_scaled · Bᵀ.
std::tuple<at::Tensor, at::Tensor> nf4_lora_fwd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& offset,
    const c10::optional<at::Tensor>& nested_code, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, const c10::optional<at::Tensor>& bias, bool dropout, int64_t seed,
    int64_t threshold, double keep_scale, bool gemv, int64_t tile_elements) {
  check_linear_args(x, lora_A, lora_B, bias, "qk_cpu.nf4_lora_fwd");
  const int shift = log2_exact(blocksize, "blocksize");
  const at::ScalarType dtype = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = lora_B.size(0), r = lora_A.size(0);
  const at::Tensor xf = float32_contiguous(x);
  const at::Tensor a32 = float32_contiguous(lora_A), b32 = float32_contiguous(lora_B);
  const c10::optional<at::Tensor> bias32 =
      bias.has_value() ? c10::optional<at::Tensor>(float32_contiguous(*bias)) : c10::nullopt;
  const at::Tensor xd = dropout ? float32_contiguous(dropout_of(x, true, seed, threshold, keep_scale)) : xf;
  if (!gemv) {
    at::Tensor s = at::mm(xd, a32.t());
    const at::Tensor s_scaled = scaled_rounded(s, scale, dtype);
    at::Tensor y = bias32.has_value() ? at::addmm(*bias32, s_scaled, b32.t()) : at::mm(s_scaled, b32.t());
    nf4_matmul_acc_(y, xf, packed, absmax, nested_absmax, offset, nested_code, blocksize, N, K, true, tile_elements);
    return {dtype == at::kFloat ? y : y.to(dtype), s};
  }
  const uint8_t* p = packed_bytes(packed, N * K);
  AbsmaxArgs am(absmax, nested_absmax, offset, nested_code, blocks_of(N * K, blocksize));
  at::Tensor s = at::empty({M, r}, xf.options());
  {
    const float* xdp = xd.data_ptr<float>();
    const float* ap = a32.data_ptr<float>();
    float* sp = s.data_ptr<float>();
    const bool simd = has_avx2();
    // Both threads from 16K multiply-adds on: lora_A is read cold here (the previous call's weights evicted it), so
    // this is a stream of r·K floats from memory, not a few microseconds of arithmetic.
    at::parallel_for(0, M * r, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K, 1)),
                     [&](int64_t i0, int64_t i1) {
                       for (int64_t i = i0; i < i1; ++i) {
                         const float* xm = xdp + (i / r) * K;
                         const float* aj = ap + (i % r) * K;
#if QK_CPU_X86
                         sp[i] = simd ? dot_avx2(xm, aj, K) : dot_scalar(xm, aj, K);
#else
                         (void)simd;
                         sp[i] = dot_scalar(xm, aj, K);
#endif
                       }
                     });
  }
  const at::Tensor s_scaled = scaled_rounded(s, scale, dtype);
  LoraTerm lt;
  lt.s = s_scaled.data_ptr<float>();
  lt.b = b32.data_ptr<float>();
  lt.bias = bias32.has_value() ? bias32->data_ptr<float>() : nullptr;
  lt.r = r;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  switch (dtype) {
    case at::kFloat: gemv_lora(xp, M, K, p, am.view, shift, N, lt, y.data_ptr<float>()); break;
    case at::kBFloat16: gemv_lora(xp, M, K, p, am.view, shift, N, lt, y.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: gemv_lora(xp, M, K, p, am.view, shift, N, lt, y.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return {y, s};
}

// (grad_x [M, K], grad_A [r, K], grad_B [N, r], grad_bias [N]); an undefined tensor (None) where not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& s, const at::Tensor& packed,
    const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& offset,
    const c10::optional<at::Tensor>& nested_code, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, bool dropout, int64_t seed, int64_t threshold, double keep_scale,
    bool need_x, bool need_A, bool need_B, bool need_bias, int64_t tile_elements) {
  check_linear_args(x, lora_A, lora_B, c10::nullopt, "qk_cpu.nf4_lora_bwd");
  const at::ScalarType dtype = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = lora_B.size(0), r = lora_A.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
              "qk_cpu.nf4_lora_bwd: grad_y must be [M, N]");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == M && s.size(1) == r, "qk_cpu.nf4_lora_bwd: s must be [M, r]");
  const at::Tensor dy = float32_contiguous(grad_y);
  at::Tensor grad_x, grad_A, grad_B, grad_bias;
  at::Tensor ds_scaled;
  if (need_x || need_A) ds_scaled = scaled_rounded(at::mm(dy, float32_contiguous(lora_B)), scale, dtype);
  if (need_x) {
    at::Tensor gx = at::mm(ds_scaled, float32_contiguous(lora_A));
    if (dropout) gx = lora_dropout(gx, seed, threshold, keep_scale);
    nf4_matmul_acc_(gx, dy, packed, absmax, nested_absmax, offset, nested_code, blocksize, N, K, false, tile_elements);
    grad_x = dtype == at::kFloat ? gx : gx.to(dtype);
  }
  if (need_A) {
    const at::Tensor xd = float32_contiguous(dropout_of(x, dropout, seed, threshold, keep_scale));
    grad_A = at::mm(ds_scaled.t(), xd).to(lora_A.scalar_type());
  }
  if (need_B) grad_B = at::mm(dy.t(), scaled_rounded(s.to(at::kFloat), scale, dtype)).to(lora_B.scalar_type());
  if (need_bias) grad_bias = dy.sum(0).to(dtype);
  return {grad_x, grad_A, grad_B, grad_bias};
}

bool has_avx2_op() { return has_avx2(); }

// The vector code the decode-GEMV runs now: 2 AVX-512, 1 AVX2, 0 scalar.
int64_t simd_level() { return has_avx512() ? 2 : (has_avx2() ? 1 : 0); }

// Test hook: the widest vector code allowed (2, 1 or 0: see g_simd_level; a path the CPU lacks stays off); returns
// the previous setting.
int64_t set_simd_level(int64_t level) {
  TORCH_CHECK(level >= 0 && level <= 2, "qk_cpu: simd level must be 0, 1 or 2, got ", level);
  return g_simd_level.exchange(static_cast<int>(level));
}

}  // namespace

#ifndef QK_CPU_LIBRARY
#define QK_CPU_LIBRARY qk_cpu  // a development build may register under another name
#endif
TORCH_LIBRARY(QK_CPU_LIBRARY, m) {
  m.def("quantize_nf4(Tensor weight, int blocksize) -> (Tensor, Tensor)", &quantize_nf4);
  m.def("quantize_blockwise_8bit(Tensor values, Tensor code, int blocksize) -> (Tensor, Tensor)",
        &quantize_blockwise_8bit);
  m.def("decode_absmax(Tensor absmax, Tensor? nested_absmax, Tensor? offset, Tensor? nested_code) -> Tensor",
        &decode_absmax);
  m.def("dequantize_nf4(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, Tensor? nested_code, "
        "int blocksize, int numel, ScalarType dtype) -> Tensor",
        &dequantize_nf4);
  m.def("dequantize_rows_(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, Tensor? nested_code, "
        "int blocksize, int K, int row0, Tensor(a!) out) -> ()",
        &dequantize_rows_);
  m.def("nf4_lora_fwd(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
        "Tensor? nested_code, int blocksize, Tensor lora_A, Tensor lora_B, float scale, Tensor? bias, bool dropout, "
        "int seed, int threshold, float keep_scale, bool gemv, int tile_elements) -> (Tensor, Tensor)",
        &nf4_lora_fwd);
  m.def("nf4_lora_bwd(Tensor grad_y, Tensor x, Tensor s, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
        "Tensor? offset, Tensor? nested_code, int blocksize, Tensor lora_A, Tensor lora_B, float scale, bool dropout, "
        "int seed, int threshold, float keep_scale, bool need_x, bool need_A, bool need_B, bool need_bias, "
        "int tile_elements) -> (Tensor, Tensor, Tensor, Tensor)",
        &nf4_lora_bwd);
  m.def("nf4_matmul_acc_(Tensor(a!) out, Tensor a, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
        "Tensor? offset, Tensor? nested_code, int blocksize, int N, int K, bool transpose_w, int tile_elements) -> ()",
        &nf4_matmul_acc_);
  m.def("lora_dropout(Tensor x, int seed, int threshold, float scale) -> Tensor", &lora_dropout);
  m.def("has_avx2() -> bool", &has_avx2_op);
  m.def("set_simd_level(int level) -> int", &set_simd_level);
  m.def("simd_level() -> int", &simd_level);
}

}  // namespace qk_cpu
