/* Dropout with a 1-bit mask on CPU: from torch's 0/1 noise, the output and the packed mask in
 * one pass; backward applies the packed mask to the gradient in one pass.
 *
 * The same values as stock CPU dropout: a kept element is multiplied by `kept` (the scaled mask
 * value as stock dropout rounds it in the tensor's dtype), a dropped one by 0, the product taken
 * in fp32 and rounded once. Bits are packed 8 per byte, lowest first, zero-padded: the layout of
 * pack_codes(mask, 1).
 */
#include "dtypes.h"

#define PARALLEL_MIN 65536

/* The noise is exactly 0.0 or 1.0: any nonzero bit pattern is a kept element. */
#define DEFINE_DROPOUT(SUFFIX, T, LOAD, STORE)                                                        \
    void dropout_forward_##SUFFIX(const T *x, const T *noise, int64_t n, float kept, T *out, uint8_t *bits, \
                                  int threads) {                                                       \
        const int64_t whole = n / 8;                                                                   \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (n >= PARALLEL_MIN)")       \
        for (int64_t b = 0; b < whole; b++) {                                                          \
            unsigned byte = 0;                                                                         \
            for (int j = 0; j < 8; j++) {                                                              \
                const int64_t i = b * 8 + j;                                                           \
                const int keep = noise[i] != 0;                                                        \
                byte |= (unsigned)keep << j;                                                           \
                out[i] = STORE(LOAD(x[i]) * (keep ? kept : 0.0f));                                     \
            }                                                                                          \
            bits[b] = (uint8_t)byte;                                                                   \
        }                                                                                              \
        if (whole * 8 < n) {                                                                           \
            unsigned byte = 0;                                                                         \
            for (int64_t i = whole * 8; i < n; i++) {                                                  \
                const int keep = noise[i] != 0;                                                        \
                byte |= (unsigned)keep << (i - whole * 8);                                             \
                out[i] = STORE(LOAD(x[i]) * (keep ? kept : 0.0f));                                     \
            }                                                                                          \
            bits[whole] = (uint8_t)byte;                                                               \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    void dropout_backward_##SUFFIX(const T *grad, const uint8_t *bits, int64_t n, float kept, T *out,   \
                                   int threads) {                                                      \
        const int64_t whole = n / 8;                                                                   \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (n >= PARALLEL_MIN)")       \
        for (int64_t b = 0; b < whole; b++) {                                                          \
            const unsigned byte = bits[b];                                                             \
            for (int j = 0; j < 8; j++) {                                                              \
                const int64_t i = b * 8 + j;                                                           \
                out[i] = STORE(LOAD(grad[i]) * ((byte >> j) & 1u ? kept : 0.0f));                      \
            }                                                                                          \
        }                                                                                              \
        for (int64_t i = whole * 8; i < n; i++)                                                        \
            out[i] = STORE(LOAD(grad[i]) * ((bits[i / 8] >> (i % 8)) & 1u ? kept : 0.0f));             \
    }

/* 16-bit noise is read as its integer bits: bernoulli draws +0.0, never -0.0. */
DEFINE_DROPOUT(f32, float, f32_load, f32_store)
DEFINE_DROPOUT(bf16, uint16_t, bf16_load, bf16_store)
DEFINE_DROPOUT(f16, uint16_t, f16_load, f16_store)
