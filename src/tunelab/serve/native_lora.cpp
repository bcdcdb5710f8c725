// The LoRA update of one layer for a few rows, each row with its own adapter slot, in one call:
//
//     y[n] += (x[n] A[s]^T) B[s]     s = slots[n]; rows with s == 0 (the base model) are not touched
//
// Why by hand (serve/native_lora.py says more): in a decode step the update is a few thousand
// multiply-adds per layer, and done with torch operators it is seven of them (a cast, two products, a
// cast back, an add, their allocations), each a few microseconds of dispatch, in 210 layers per step.
// Here it is one call with no allocation; x is read once per row and converted to fp32 in registers, A
// and B are read in order, the r-wide middle and the sums stay fp32, and y is rounded once.

#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

template <typename T>
void lora_rows(T* y, const T* x, const float* a, const float* b, const int64_t* slots, int64_t rows,
               int64_t in, int64_t out, int64_t rank) {
  std::vector<float> xf(in), h(rank), acc(out);
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t s = slots[n];
    if (s == 0) continue;
    const T* xn = x + n * in;
    for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(xn[i]);
    const float* as = a + s * rank * in;
    for (int64_t r = 0; r < rank; ++r) {
      const float* ar = as + r * in;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < in; ++i) sum += xf[i] * ar[i];
      h[r] = sum;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    const float* bs = b + s * rank * out;
    for (int64_t r = 0; r < rank; ++r) {
      const float hr = h[r];
      if (hr == 0.f) continue;  // a rank padded with zeros (or an adapter that does not target this layer)
      const float* br = bs + r * out;
      float* accp = acc.data();
#pragma omp simd
      for (int64_t o = 0; o < out; ++o) accp[o] += hr * br[o];
    }
    T* yn = y + n * out;
    for (int64_t o = 0; o < out; ++o) yn[o] = static_cast<T>(static_cast<float>(yn[o]) + acc[o]);
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
