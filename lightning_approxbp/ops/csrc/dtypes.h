/* Loads and stores of the floating dtypes the native CPU kernels take, computed in fp32.
 *
 * Stores round to nearest, ties to even, as torch's conversions do; NaN stays NaN (its payload
 * may differ from torch's, its value does not).
 */
#ifndef APPROXBP_DTYPES_H
#define APPROXBP_DTYPES_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }

static inline float bf16_load(uint16_t bits) {
    const uint32_t word = (uint32_t)bits << 16;
    float v;
    memcpy(&v, &word, sizeof v);
    return v;
}

static inline uint16_t bf16_store(float v) {
    uint32_t word;
    memcpy(&word, &v, sizeof word);
    const uint32_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
    /* A NaN could round into an infinity's pattern: keep it quiet instead. */
    const uint32_t quiet_nan = (word >> 16) | 0x40u;
    return (uint16_t)((word & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

static inline float f16_load(uint16_t bits) {
    _Float16 h;
    memcpy(&h, &bits, sizeof h);
    return (float)h;
}

static inline uint16_t f16_store(float v) {
    const _Float16 h = (_Float16)v;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

#endif
