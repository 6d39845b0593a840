/* y = x @ W^T (+ b) for a few rows of x, reading each weight once (see kernels.py).
 *
 * W is stored in tiles of TW outputs: tile i is [K, TW], the weights of outputs i*TW .. i*TW+TW-1,
 * input by input, so a tile is one contiguous stream. Each tile is read once for up to RB rows of
 * x, whose TW outputs stay in vector registers; more rows take the tile again, from the caches.
 * Threads (OpenMP, torch's own runtime) take the tiles in contiguous runs. */
#include <stddef.h>

#ifdef __AVX512F__
#define TW 32 /* two 16-float vectors */
#define RB 8  /* 16 accumulators of 32 */
#else
#define TW 16 /* two 8-float vectors (AVX2), or four 4-float ones */
#define RB 6  /* 12 accumulators of 8 (AVX2 has 16 registers) */
#endif
#define AHEAD 1024 /* floats prefetched ahead within a tile: 32 inputs of a 32-wide tile */

int rowmm_tile_width(void) { return TW; }

#define BLOCK(R)                                                                                       \
    static void block##R(const float *x, long k_in, const float *tile, const float *bias, float *y,    \
                         long n_out, long cols) {                                                      \
        float acc[R][TW];                                                                              \
        for (int r = 0; r < R; r++)                                                                    \
            for (int j = 0; j < TW; j++) acc[r][j] = bias ? (j < cols ? bias[j] : 0.f) : 0.f;          \
        for (long k = 0; k < k_in; k++) {                                                              \
            const float *w = tile + k * TW;                                                            \
            __builtin_prefetch(w + AHEAD);                                                             \
            __builtin_prefetch(w + AHEAD + 16);                                                        \
            for (int r = 0; r < R; r++) {                                                              \
                const float a = x[r * k_in + k];                                                       \
                _Pragma("omp simd") for (int j = 0; j < TW; j++) acc[r][j] += a * w[j];                \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; r++)                                                                    \
            for (long j = 0; j < cols; j++) y[r * n_out + j] = acc[r][j];                              \
    }

BLOCK(1)
BLOCK(2)
BLOCK(3)
BLOCK(4)
BLOCK(5)
BLOCK(6)
BLOCK(7)
BLOCK(8)

typedef void (*block_fn)(const float *, long, const float *, const float *, float *, long, long);
static const block_fn BLOCKS[] = {0, block1, block2, block3, block4, block5, block6, block7, block8}; /* by rows, <= RB */

/* x: [m, k] contiguous; tiles: [ceil(n / TW), k, TW] (outputs past n are zeros); bias: [n] or NULL;
 * y: [m, n] contiguous; threads: torch's count for the calling thread. */
void rowmm(const float *x, long m, long k, const float *tiles, const float *bias, long n, float *y, int threads) {
    const long count = (n + TW - 1) / TW;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < count; i++) {
        const long col = i * TW, cols = n - col < TW ? n - col : TW;
        for (long r = 0; r < m; r += RB) {
            const long rows = m - r < RB ? m - r : RB;
            BLOCKS[rows](x + r * k, k, tiles + i * k * TW, bias ? bias + col : 0, y + r * n + col, n, cols);
        }
    }
}
