// The LoRA update of one layer for a few rows, each row with its own adapter slot, in one call:
//
//     y[n] += (x[n] A[s]^T) B[s]     s = slots[n]; rows with s == 0 (the base model) are not touched
//
// Why by hand (serve/native_lora.py says more): in a decode step the update is a few thousand
// multiply-adds per layer, and done with torch operators it is seven of them (a cast, two products, a
// cast back, an add, their allocations), each a few microseconds of dispatch, in 210 layers per step.
// Here it is one call: x is read once per row and converted to fp32, A and B are read in order, the
// r-wide middle and the sums stay fp32, and y is rounded once.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Rows in and out of fp32. For bf16 these are written as bit operations so the compiler vectorizes them (c10's
// conversions are per element); the rounding is c10's: to nearest, ties to even, NaN kept a NaN.
inline void to_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

inline void add_into(float* y, const float* acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += acc[i];
}

inline void add_into(c10::BFloat16* y, const float* acc, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(y);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t in = static_cast<uint32_t>(bits[i]) << 16;
    float sum;
    std::memcpy(&sum, &in, sizeof sum);
    sum += acc[i];
    uint32_t u;
    std::memcpy(&u, &sum, sizeof u);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    bits[i] = sum != sum ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
}

template <typename T>
void lora_rows(T* y, const T* x, const float* a, const float* b, const int64_t* slots, int64_t rows,
               int64_t in, int64_t out, int64_t rank) {
  std::vector<float> xf(in), h(rank), acc(out);
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t s = slots[n];
    if (s == 0) continue;
    to_float(x + n * in, xf.data(), in);
    const float* xp = xf.data();
    // The shrink, four ranks at a time: four independent sums per element of x read (one chain would wait on
    // each multiply-add's latency).
    const float* as = a + s * rank * in;
    int64_t r = 0;
    for (; r + 4 <= rank; r += 4) {
      const float *a0 = as + r * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t i = 0; i < in; ++i) {
        const float xv = xp[i];
        s0 += xv * a0[i];
        s1 += xv * a1[i];
        s2 += xv * a2[i];
        s3 += xv * a3[i];
      }
      h[r] = s0, h[r + 1] = s1, h[r + 2] = s2, h[r + 3] = s3;
    }
    for (; r < rank; ++r) {
      const float* ar = as + r * in;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < in; ++i) sum += xp[i] * ar[i];
      h[r] = sum;
    }
    int64_t used = rank;  // ranks past the last non-zero one add nothing (zero padding, or a layer not targeted)
    while (used > 0 && h[used - 1] == 0.f) --used;
    if (used == 0) continue;
    // The expand: rank by rank over the outputs (each pass reads one row of B in order), then added to y.
    const float* bs = b + s * rank * out;
    float* accp = acc.data();
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k = 0; k < used; ++k) {
      const float hk = h[k];
      const float* bk = bs + k * out;
#pragma omp simd
      for (int64_t o = 0; o < out; ++o) accp[o] += hk * bk[o];
    }
    add_into(y + n * out, accp, out);
  }
}

void lora_add_(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor slots) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a.dim() == 3 && b.dim() == 3 && slots.dim() == 1, "lora_add_: shapes");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && a.is_contiguous() && b.is_contiguous() &&
                  slots.is_contiguous(), "lora_add_: contiguous tensors only");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "lora_add_: x and y in one dtype");
  TORCH_CHECK(a.scalar_type() == torch::kFloat && b.scalar_type() == torch::kFloat, "lora_add_: fp32 slots");
  TORCH_CHECK(slots.scalar_type() == torch::kLong, "lora_add_: int64 slots");
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1), rank = a.size(1);
  TORCH_CHECK(y.size(0) == rows && slots.size(0) == rows && a.size(2) == in && b.size(1) == rank &&
                  b.size(2) == out && a.size(0) == b.size(0), "lora_add_: sizes do not match");
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows; ++n) TORCH_CHECK(s[n] >= 0 && s[n] < a.size(0), "lora_add_: slot out of range");
  if (y.scalar_type() == torch::kFloat) {
    lora_rows<float>(y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), s, rows,
                     in, out, rank);
  } else if (y.scalar_type() == torch::kBFloat16) {
    lora_rows<c10::BFloat16>(y.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>(), a.data_ptr<float>(),
                             b.data_ptr<float>(), s, rows, in, out, rank);
  } else {
    TORCH_CHECK(false, "lora_add_: fp32 or bf16 activations only");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_add_", &lora_add_, "y[n] += (x[n] A[s]^T) B[s] for s = slots[n] != 0, in place");
}
