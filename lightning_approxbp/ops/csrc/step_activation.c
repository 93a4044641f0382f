/* Step-derivative activation on CPU: codes, packing and the non-finite count in one pass over
 * the input; the backward's level lookup and product in one pass over the gradient.
 *
 * Same results as the PyTorch path in step_activation.py: codes count the fp32 thresholds
 * strictly below each element compared in fp32 (NaN: 0), packed 8 / bits per byte, lowest bits
 * first, zero-padded; gradients are the fp32 product rounded once to the gradient's dtype.
 */
#include "dtypes.h"

/* Elements per chunk: one chunk of codes (4 KiB) stays in L1 between computing and packing. */
#define CODE_CHUNK 4096
/* Below this many elements a parallel region costs more than it saves. */
#define PARALLEL_MIN 65536

/* Padded threshold counts: unused slots hold +inf, which no value (and no NaN) exceeds, so the
 * compare loops have constant trip counts and vectorise. */
#define DEFINE_CODES(NAME, T, LOAD, BITS, SLOTS)                                                       \
    int64_t NAME(const T *x, int64_t n, const float *thresholds, uint8_t *packed, int threads) {    \
        enum { PER_BYTE = 8 / (BITS) };                                                             \
        float bound[SLOTS];                                                                         \
        for (int t = 0; t < (SLOTS); t++) bound[t] = thresholds[t];                                 \
        const int64_t chunks = (n + CODE_CHUNK - 1) / CODE_CHUNK;                                  \
        int64_t non_finite = 0;                                                                     \
        _Pragma("omp parallel for schedule(static) reduction(+ : non_finite) num_threads(threads) if (n >= PARALLEL_MIN)") \
        for (int64_t chunk = 0; chunk < chunks; chunk++) {                                          \
            const int64_t start = chunk * CODE_CHUNK;                                               \
            const int64_t count = n - start < CODE_CHUNK ? n - start : CODE_CHUNK;                 \
            const int64_t bytes = (count + PER_BYTE - 1) / PER_BYTE;                                \
            uint8_t codes[CODE_CHUNK];                                                              \
            int64_t bad = 0;                                                                        \
            for (int64_t i = 0; i < count; i++) {                                                   \
                const float v = LOAD(x[start + i]);                                                 \
                uint8_t code = 0;                                                                   \
                for (int t = 0; t < (SLOTS); t++) code += v > bound[t];                             \
                codes[i] = code;                                                                    \
                bad += !(fabsf(v) <= FLT_MAX);                                                      \
            }                                                                                       \
            for (int64_t i = count; i < bytes * PER_BYTE; i++) codes[i] = 0;                        \
            uint8_t *out = packed + start / PER_BYTE;                                               \
            for (int64_t b = 0; b < bytes; b++) {                                                   \
                uint8_t byte = 0;                                                                   \
                for (int j = 0; j < PER_BYTE; j++) byte |= (uint8_t)(codes[b * PER_BYTE + j] << ((BITS) * j)); \
                out[b] = byte;                                                                      \
            }                                                                                       \
            non_finite += bad;                                                                      \
        }                                                                                           \
        return non_finite;                                                                          \
    }

#define DEFINE_BACKWARD(NAME, T, LOAD, STORE, BITS)                                                     \
    void NAME(const T *grad, const uint8_t *packed, int64_t n, const float *levels, T *out, int threads) { \
        enum { PER_BYTE = 8 / (BITS), MASK = (1 << (BITS)) - 1 };                                   \
        float level[1 << (BITS)];                                                                   \
        for (int c = 0; c < (1 << (BITS)); c++) level[c] = levels[c];                               \
        const int64_t whole = n / PER_BYTE;                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (n >= PARALLEL_MIN)")    \
        for (int64_t b = 0; b < whole; b++) {                                                       \
            const unsigned byte = packed[b];                                                        \
            for (int j = 0; j < PER_BYTE; j++) {                                                    \
                const int64_t i = b * PER_BYTE + j;                                                 \
                out[i] = STORE(LOAD(grad[i]) * level[(byte >> ((BITS) * j)) & MASK]);              \
            }                                                                                       \
        }                                                                                           \
        for (int64_t i = whole * PER_BYTE; i < n; i++)                                              \
            out[i] = STORE(LOAD(grad[i]) * level[(packed[i / PER_BYTE] >> ((BITS) * (i % PER_BYTE))) & MASK]); \
    }

#define DEFINE_FOR_DTYPE(SUFFIX, T, LOAD, STORE)                                     \
    DEFINE_CODES(step_codes1_##SUFFIX, T, LOAD, 1, 1)                                \
    DEFINE_CODES(step_codes2_##SUFFIX, T, LOAD, 2, 3)                                \
    DEFINE_CODES(step_codes4_##SUFFIX, T, LOAD, 4, 15)                               \
    DEFINE_BACKWARD(step_backward1_##SUFFIX, T, LOAD, STORE, 1)                      \
    DEFINE_BACKWARD(step_backward2_##SUFFIX, T, LOAD, STORE, 2)                      \
    DEFINE_BACKWARD(step_backward4_##SUFFIX, T, LOAD, STORE, 4)

DEFINE_FOR_DTYPE(f32, float, f32_load, f32_store)
DEFINE_FOR_DTYPE(bf16, uint16_t, bf16_load, bf16_store)
DEFINE_FOR_DTYPE(f16, uint16_t, f16_load, f16_store)
