/* 4-bit weights x 8-bit activations on AVX-512 VNNI: what llama.cpp does for its Q4 x Q8 dot
 * products, for symmetric GPTQ weights (w = (q - 8) * scale, one scale per group of g inputs).
 *
 * The activations are quantized per row and group to int8 (scale = max|x| / 127), and each
 * group's dot product is integer: vpdpbusd multiplies 4 unsigned weight codes by 4 signed
 * activations and adds them into each of 16 int32 lanes, one lane per output. The codes' offset
 * of 8 comes out once per group as 8 * sum(xq).
 *
 * Weight layout (pack() in service/engine/kernels/__init__.py): for each block of 16 outputs,
 * for each 8 inputs k..k+7, 64 bytes: byte 4*lane + j holds input k+j in its low nibble and
 * k+4+j in its high nibble. Scales: float, [N/16][K/g][16].
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS 4 /* activation rows sharing one load of the weights */

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
}

/* x: [M][K] bfloat16 -> xq: [M][K] int8, xs: [M][K/g] scales, xsum: [M][K/g] sums of xq */
static void quantize(const uint16_t *x, int64_t M, int64_t K, int64_t g, int8_t *xq, float *xs, int32_t *xsum) {
    const int64_t groups = K / g;
#pragma omp parallel for schedule(static) if (M > 4) /* a prefill chunk: 1,024 rows */
    for (int64_t at = 0; at < M * groups; at++) {
        const int64_t m = at / groups, gi = at % groups;
        const uint16_t *src = x + m * K + gi * g;
        float amax = 0.f;
        for (int64_t k = 0; k < g; k++) amax = fmaxf(amax, fabsf(bf16_to_float(src[k])));
        const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int64_t k = 0; k < g; k++) {
            int32_t q = (int32_t)nearbyintf(bf16_to_float(src[k]) * inv);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            xq[m * K + gi * g + k] = (int8_t)q;
            sum += q;
        }
        xs[at] = scale;
        xsum[at] = sum;
    }
}

static inline void store_bf16(uint16_t *dst, __m512 f) {
    /* round to nearest even, as torch does */
    __m512i b = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}

/* out[M][N] (bfloat16) = x[M][K] (bfloat16) times the packed weights; returns 0, or -1 when
 * out of memory. N % 16 == 0, K % g == 0, g % 8 == 0. */
int citadel_w4a8_mm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *s,
                    int64_t N, int64_t g, uint16_t *out) {
    const int64_t groups = K / g;
    int8_t *xq = aligned_alloc(64, (size_t)((M * K + 64) / 64 * 64)); /* never 0 bytes: M may be 0 */
    float *xs = malloc(sizeof(float) * (size_t)(M * groups + 1));
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(M * groups + 1));
    if (!xq || !xs || !xsum) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    quantize(x, M, K, g, xq, xs, xsum);
    const __m512i low = _mm512_set1_epi8(0x0f);
#pragma omp parallel for schedule(dynamic, 8) /* a thread preempted by the gateway or the event loop holds up only its own blocks */
    for (int64_t nb = 0; nb < N / 16; nb++) {
        const uint8_t *wb = w + nb * (K / 8) * 64;
        const float *sb = s + nb * groups * 16;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int rows = M - m0 < ROWS ? (int)(M - m0) : ROWS;
            __m512 facc[ROWS];
            for (int r = 0; r < ROWS; r++) facc[r] = _mm512_setzero_ps();
            for (int64_t gi = 0; gi < groups; gi++) {
                __m512i acc[ROWS];
                for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_si512();
                const uint8_t *wg = wb + gi * (g / 8) * 64;
                for (int64_t ko = 0; ko < g / 8; ko++) {
                    __m512i v = _mm512_loadu_si512((const void *)(wg + ko * 64));
                    __m512i lo = _mm512_and_si512(v, low);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    const int64_t k = gi * g + ko * 8;
                    for (int r = 0; r < rows; r++) {
                        const int8_t *xr = xq + (m0 + r) * K + k;
                        int32_t a, b;
                        __builtin_memcpy(&a, xr, 4);
                        __builtin_memcpy(&b, xr + 4, 4);
                        acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(a));
                        acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(b));
                    }
                }
                const __m512 sc = _mm512_loadu_ps(sb + gi * 16);
                for (int r = 0; r < rows; r++) {
                    const int64_t at = (m0 + r) * groups + gi;
                    __m512i dot = _mm512_sub_epi32(acc[r], _mm512_set1_epi32(8 * xsum[at]));
                    facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, _mm512_set1_ps(xs[at])), facc[r]);
                }
            }
            for (int r = 0; r < rows; r++) store_bf16(out + (m0 + r) * N + nb * 16, facc[r]);
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}
