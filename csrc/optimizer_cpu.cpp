// CPU kernel of the fused optimizer step: the arithmetic of kernels/optimizer_math.h, as the CUDA kernel runs it,
// over 256-element chunks in parallel (at::parallel_for).
//
// Speed without changing a bit of the result:
// - Each chunk is processed in passes over small float arrays (load, update, reduce, store, quantize), so the
//   compiler vectorises the float math; the hot functions are compiled for AVX-512, AVX2 and baseline x86-64 and
//   picked at load time (target_clones). setup.py passes -ffp-contract=off and -fno-math-errno: no fused
//   multiply-adds (every ISA then rounds the same way as the CUDA kernel and the Python reference) and sqrtf
//   vectorises.
// - The nearest-level search of the 8-bit quantization starts from a table indexed by the value's top float bits,
//   which leaves at most a few midpoints to step over: the same index as the binary search of the CUDA kernel.
#include "optimizer_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>

namespace qlora_kernels {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QK_CPU_CLONES
#endif

// ------------------------------------------------------------------------------------- nearest-level search

// Values are bucketed by their absolute value's float bits >> kBucketShift (the exponent and the top 7 mantissa
// bits): a bucket spans 1/128 of an octave, finer than the spacing of the dynamic maps' levels, so at most one
// midpoint falls inside a bucket of bitsandbytes' maps (a denser map still works, with a longer scan).
constexpr int kBucketShift = 16;
constexpr uint32_t kOneBits = 0x3f800000u;  // 1.0f
constexpr uint32_t kBuckets = (kOneBits >> kBucketShift) + 1;  // buckets up to |x| = 1; larger values clamp

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

struct CodeSearch {
  float code[kCodeSize];
  // midpoints[i] = (code[i] + code[i+1]) / 2 for i < 255, and +inf at 255 so that a forward scan stops there.
  float midpoints[kCodeSize];
  // Per sign and bucket, the number of midpoints below every value of the bucket: [0][key] for x >= 0 (below the
  // bucket's smallest value), [1][key] for x < 0 (below minus its largest). The extra bucket kBuckets holds
  // |x| > 1 (about 1 + 1/128 and above): all 255 midpoints lie below x > 1, none below x < -1.
  uint8_t first[2][kBuckets + 1];

  void build(const float* values) {
    std::memcpy(code, values, sizeof(code));
    for (int i = 0; i + 1 < kCodeSize; ++i) midpoints[i] = (code[i] + code[i + 1]) * 0.5f;
    midpoints[kCodeSize - 1] = std::numeric_limits<float>::infinity();
    const float* begin = midpoints;
    const float* end = midpoints + (kCodeSize - 1);
    const auto below = [&](float x) { return static_cast<int>(std::lower_bound(begin, end, x) - begin); };
    for (uint32_t key = 0; key < kBuckets; ++key) {
      const float lowest = float_from_bits(key << kBucketShift);
      const float highest = float_from_bits(((key + 1) << kBucketShift) - 1);
      first[0][key] = static_cast<uint8_t>(below(lowest));
      first[1][key] = static_cast<uint8_t>(below(-highest));
    }
    first[0][kBuckets] = static_cast<uint8_t>(kCodeSize - 1);
    first[1][kBuckets] = 0;
    // The clamped bucket must need no scan: nothing may lie outside [-1, 1] but the +inf sentinel.
    TORCH_CHECK_VALUE(below(-1.0f) == 0 && below(float_from_bits((kBuckets << kBucketShift) - 1)) == kCodeSize - 1,
                      "quantization map must lie within [-1, 1]");
  }

  // The number of midpoints strictly below x (nearest_code_index of optimizer_math.h), NaN -> 0. The sign picks
  // the table row; one branch-free step covers a bucket holding one midpoint, the loop (not entered with
  // bitsandbytes' maps, so well predicted) any more.
  int index(float x) const {
    if (x != x) return 0;
    const uint32_t key = std::min((bits_of(x) & 0x7fffffffu) >> kBucketShift, kBuckets);
    int i = first[x < 0.0f][key];
    i += midpoints[i] < x;
    while (midpoints[i] < x) ++i;
    return i;
  }

  uint8_t quantize_signed(float x) const {
    int i = index(x);
    i -= (x < 0.0f) & (code[i] >= 0.0f);  // the sign rule of quantize_signed in optimizer_math.h
    return static_cast<uint8_t>(i);
  }

  uint8_t quantize_unsigned(float x) const { return static_cast<uint8_t>(index(x)); }
};

struct CodeTables {
  CodeSearch m;
  CodeSearch v;
};

// Building the bucket tables costs about half a millisecond, as much as stepping a few hundred thousand
// parameters, and the maps are the same at every step: keep the last tables, keyed by the maps' values.
std::shared_ptr<const CodeTables> code_tables_for(const float* signed_code, const float* unsigned_code) {
  static std::mutex mutex;
  static std::shared_ptr<const CodeTables> cached;
  static float cached_key[2 * kCodeSize];
  static bool cached_has_unsigned = false;
  const size_t map_bytes = sizeof(float) * kCodeSize;
  const std::lock_guard<std::mutex> lock(mutex);
  const bool has_unsigned = unsigned_code != nullptr;
  if (cached && cached_has_unsigned == has_unsigned && std::memcmp(cached_key, signed_code, map_bytes) == 0 &&
      (!has_unsigned || std::memcmp(cached_key + kCodeSize, unsigned_code, map_bytes) == 0))
    return cached;
  auto tables = std::make_shared<CodeTables>();  // ~70 KB: off the stack
  tables->m.build(signed_code);
  if (has_unsigned) tables->v.build(unsigned_code);
  std::memcpy(cached_key, signed_code, map_bytes);
  if (has_unsigned) std::memcpy(cached_key + kCodeSize, unsigned_code, map_bytes);
  cached_has_unsigned = has_unsigned;
  cached = tables;
  return cached;
}

// ------------------------------------------------------------------------------------------------ float math

QK_CPU_CLONES void adamw_math(float* m, float* v, float* p, const float* g, int n, float step_size,
                              float bias_correction2_sqrt, GroupHyperParams hyper) {
  for (int j = 0; j < n; ++j) {
    adamw_update_moments(m[j], v[j], g[j], hyper);
    p[j] = adamw_new_param(p[j], m[j], v[j], step_size, bias_correction2_sqrt, hyper);
  }
}

QK_CPU_CLONES void lion_math(float* m, float* p, const float* g, int n, float lr, GroupHyperParams hyper) {
  for (int j = 0; j < n; ++j) p[j] = lion_step(p[j], m[j], g[j], lr, hyper);
}

QK_CPU_CLONES void decode(const uint8_t* codes, const float* code, float absmax, float* out, int n) {
  for (int j = 0; j < n; ++j) out[j] = code[codes[j]] * absmax;
}

// max |value| over the block, NaN if any value is NaN (nan_propagating_max of optimizer_math.h, as the CUDA
// kernel reduces). Eight independent lanes and a separate NaN flag keep it vectorisable; the result is the same.
QK_CPU_CLONES float block_absmax(const float* values, int n) {
  constexpr int kLanes = 8;
  float lane_max[kLanes] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int lane_nan[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float a = absolute(values[j + l]);
      lane_max[l] = a > lane_max[l] ? a : lane_max[l];
      lane_nan[l] |= a != a;
    }
  }
  float result = 0.0f;
  int any_nan = 0;
  for (int l = 0; l < kLanes; ++l) {
    result = lane_max[l] > result ? lane_max[l] : result;
    any_nan |= lane_nan[l];
  }
  for (; j < n; ++j) {
    const float a = absolute(values[j]);
    result = a > result ? a : result;
    any_nan |= a != a;
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : result;
}

QK_CPU_CLONES void scale(const float* values, float factor, float* out, int n) {
  for (int j = 0; j < n; ++j) out[j] = values[j] * factor;
}

// ------------------------------------------------------------------------------------------------ one chunk

template <typename T>
void load_float(const T* source, float* out, int n) {
  for (int j = 0; j < n; ++j) out[j] = static_cast<float>(source[j]);
}

template <typename T>
void store_float(const float* values, T* out, int n) {
  for (int j = 0; j < n; ++j) out[j] = static_cast<T>(values[j]);  // round to nearest even for half / bfloat16
}

template <int ALGORITHM, typename T>
void step_chunk(const TensorEntry& e, int64_t block, const CodeTables& tables, const GroupHyperParams& hyper) {
  constexpr bool kHasSecondMoment = ALGORITHM == kAdamW;
  const int64_t base = block * kChunkSize;
  const int n = static_cast<int>(std::min<int64_t>(kChunkSize, e.numel - base));
  T* param = static_cast<T*>(e.param) + base;
  float p[kChunkSize], g[kChunkSize];
  load_float(param, p, n);
  load_float(static_cast<const T*>(e.grad) + base, g, n);

  if (e.state_kind == kStateFloat32) {
    float* m = static_cast<float*>(e.exp_avg) + base;
    if (kHasSecondMoment)
      adamw_math(m, static_cast<float*>(e.exp_avg_sq) + base, p, g, n, e.step_size, e.bias_correction2_sqrt, hyper);
    else
      lion_math(m, p, g, n, e.step_size, hyper);
    store_float(p, param, n);
    return;
  }

  uint8_t* codes_m = static_cast<uint8_t*>(e.exp_avg) + base;
  float m[kChunkSize], v[kChunkSize], scaled[kChunkSize];
  decode(codes_m, tables.m.code, e.exp_avg_absmax[block], m, n);
  if (kHasSecondMoment) {
    uint8_t* codes_v = static_cast<uint8_t*>(e.exp_avg_sq) + base;
    decode(codes_v, tables.v.code, e.exp_avg_sq_absmax[block], v, n);
    adamw_math(m, v, p, g, n, e.step_size, e.bias_correction2_sqrt, hyper);
    const float absmax_v = block_absmax(v, n);
    e.exp_avg_sq_absmax[block] = absmax_v;
    scale(v, inverse_absmax(absmax_v), scaled, n);
    for (int j = 0; j < n; ++j) codes_v[j] = tables.v.quantize_unsigned(scaled[j]);
  } else {
    lion_math(m, p, g, n, e.step_size, hyper);
  }
  store_float(p, param, n);
  const float absmax_m = block_absmax(m, n);
  e.exp_avg_absmax[block] = absmax_m;
  scale(m, inverse_absmax(absmax_m), scaled, n);
  for (int j = 0; j < n; ++j) codes_m[j] = tables.m.quantize_signed(scaled[j]);
}

template <int ALGORITHM>
void step_chunk_for_dtype(const TensorEntry& e, int64_t block, const CodeTables& tables,
                          const GroupHyperParams& hyper) {
  switch (e.param_dtype) {
    case kParamFloat16:
      step_chunk<ALGORITHM, c10::Half>(e, block, tables, hyper);
      break;
    case kParamBFloat16:
      step_chunk<ALGORITHM, c10::BFloat16>(e, block, tables, hyper);
      break;
    default:
      step_chunk<ALGORITHM, float>(e, block, tables, hyper);
  }
}

// Chunks per parallel task: 32 chunks = 8192 elements, enough work to amortise a task, small enough to balance
// hundreds of LoRA-sized tensors over the threads.
constexpr int64_t kChunksPerTask = 32;

}  // namespace

void run_step_cpu(const StepPlan& plan, const at::Tensor& signed_code, const at::Tensor& unsigned_code) {
  static const CodeTables unused_tables{};  // float32 state only: the maps are never read
  std::shared_ptr<const CodeTables> shared_tables;
  if (plan.has_8bit_state)
    shared_tables = code_tables_for(signed_code.data_ptr<float>(),
                                    plan.algorithm == kAdamW ? unsigned_code.data_ptr<float>() : nullptr);
  const CodeTables& tables = shared_tables ? *shared_tables : unused_tables;
  const std::vector<TensorEntry>& entries = plan.entries;
  at::parallel_for(0, plan.total_chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
    // The entry of chunk `begin`: the last one whose first_chunk <= begin.
    size_t e = static_cast<size_t>(
        std::upper_bound(entries.begin(), entries.end(), begin,
                         [](int64_t chunk, const TensorEntry& entry) { return chunk < entry.first_chunk; }) -
        entries.begin() - 1);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      while (e + 1 < entries.size() && entries[e + 1].first_chunk <= chunk) ++e;
      const int64_t block = chunk - entries[e].first_chunk;
      if (plan.algorithm == kAdamW)
        step_chunk_for_dtype<kAdamW>(entries[e], block, tables, plan.hyper);
      else
        step_chunk_for_dtype<kLion>(entries[e], block, tables, plan.hyper);
    }
  });
}

at::Tensor nearest_code_indices_cpu(const at::Tensor& scaled, const at::Tensor& code, bool keep_sign,
                                    bool binary_search) {
  TORCH_CHECK_VALUE(scaled.device().is_cpu() && scaled.scalar_type() == at::kFloat,
                    "nearest_code_indices: scaled must be a float32 CPU tensor");
  TORCH_CHECK_VALUE(code.device().is_cpu() && code.scalar_type() == at::kFloat && code.numel() == kCodeSize &&
                        code.is_contiguous(),
                    "nearest_code_indices: code must be a contiguous float32[256] CPU tensor");
  const at::Tensor values = scaled.contiguous();
  at::Tensor out = at::empty(values.sizes(), values.options().dtype(at::kByte));
  const auto search = std::make_unique<CodeSearch>();  // ~35 KB: off the stack
  search->build(code.data_ptr<float>());
  const float* in = values.data_ptr<float>();
  uint8_t* result = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    if (binary_search)  // the CUDA kernel's search (optimizer_math.h)
      result[i] = keep_sign ? quantize_signed(search->code, search->midpoints, in[i])
                            : quantize_unsigned(search->midpoints, in[i]);
    else
      result[i] = keep_sign ? search->quantize_signed(in[i]) : search->quantize_unsigned(in[i]);
  }
  return out;
}

}  // namespace qlora_kernels
