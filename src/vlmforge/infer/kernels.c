/* The engine's CPU kernels (see kernels.py): float32 throughout, threads from OpenMP in torch's own
 * runtime, vectorised by gcc for the CPU that builds them. decode_layers (at the end) runs a decode
 * step's whole layer stack with the others.
 *
 * rowmm: y = x @ W^T (+ b) for a few rows of x, reading each weight once. W is stored in tiles of TW outputs: tile i is [K, TW], the weights of outputs i*TW .. i*TW+TW-1,
 * input by input, so a tile is one contiguous stream. Each tile is read once for up to RB rows of
 * x, whose TW outputs stay in vector registers; more rows take the tile again, from the caches.
 * Threads (OpenMP, torch's own runtime) take the tiles in contiguous runs. The hardware prefetches
 * the stream; a block of 2 rows or more also prefetches it in software `ahead` floats on where
 * `set_prefetch` says so: on the AMD machine 4 KB ahead made 8 rows slower, on an Intel one 1.4x
 * faster (docs/engine.md), so kernels.py measures which on the machine it runs on. */
#include <math.h>
#include <omp.h>
#include <stddef.h>

#ifdef __AVX512F__
#define TW 32 /* two 16-float vectors */
#define RB 8  /* 16 accumulators of 32 */
#else
#define TW 16 /* two 8-float vectors (AVX2), or four 4-float ones */
#define RB 6  /* 12 accumulators of 8 (AVX2 has 16 registers) */
#endif

int rowmm_tile_width(void) { return TW; }

static long ahead = 0; /* floats of a tile's stream a block of 2 rows or more prefetches ahead (0: none) */
void set_prefetch(long floats) { ahead = floats; }

#define BLOCK(R)                                                                                       \
    static void block##R(const float *x, long k_in, const float *tile, long ld, const float *bias,             \
                         const float *res, float *y, long n_out, long cols) {                                  \
        float acc[R][TW];                                                                              \
        for (int r = 0; r < R; r++)                                                                    \
            for (int j = 0; j < TW; j++) acc[r][j] = bias ? (j < cols ? bias[j] : 0.f) : 0.f;          \
        const long pf = R > 1 && ld == TW ? ahead : 0;                                                 \
        for (long k = 0; k < k_in; k++) {                                                              \
            const float *w = tile + k * ld;                                                            \
            if (pf) {                                                                                  \
                __builtin_prefetch(w + pf, 0, 3);                                                      \
                __builtin_prefetch(w + pf + 16, 0, 3);                                                 \
            }                                                                                          \
            for (int r = 0; r < R; r++) {                                                              \
                const float a = x[r * k_in + k];                                                       \
                _Pragma("omp simd") for (int j = 0; j < TW; j++) acc[r][j] += a * w[j];                \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; r++)                                                                    \
            for (long j = 0; j < cols; j++) y[r * n_out + j] = acc[r][j] + (res ? res[r * n_out + j] : 0.f); \
    }

BLOCK(1)
BLOCK(2)
BLOCK(3)
BLOCK(4)
BLOCK(5)
BLOCK(6)
BLOCK(7)
BLOCK(8)

typedef void (*block_fn)(const float *, long, const float *, long, const float *, const float *, float *, long,
                         long);
static const block_fn BLOCKS[] = {0, block1, block2, block3, block4, block5, block6, block7, block8}; /* by rows, <= RB */

/* the last cols < TW outputs of a transposed weight [k, ld] (w: their first column), for m rows: a
 * tile's loads would read past the weight's last row */
static void tail(const float *x, long m, long k, const float *w, long ld, const float *bias, const float *res,
                 float *y, long n, long cols) {
    for (long r = 0; r < m; r++) {
        float acc[TW];
        for (long j = 0; j < cols; j++) acc[j] = bias ? bias[j] : 0.f;
        for (long kk = 0; kk < k; kk++)
            for (long j = 0; j < cols; j++) acc[j] += x[r * k + kk] * w[kk * ld + j];
        for (long j = 0; j < cols; j++) y[r * n + j] = acc[j] + (res ? res[r * n + j] : 0.f);
    }
}

/* y = x @ W^T (+ b) (+ residual), W's tile i (outputs i*TW ..) from w + i * tile_step, input k of it
 * at + k * ld: tiles [ceil(n / TW), k, TW] (tile_step k * TW, ld TW), or a transposed weight [k, ld]
 * whose first n columns are read (tile_step TW). residual may be y itself. The tiles are shared out
 * among the threads of the parallel region it is called in (an orphaned `omp for`, whose end waits
 * for all), or all run by the caller outside one; `mm` opens a region of its own. */
static void mm_for(const float *x, long m, long k, const float *w, long tile_step, long ld, const float *bias,
                   const float *residual, long n, float *y) {
    const long count = (n + TW - 1) / TW;
#pragma omp for schedule(static)
    for (long i = 0; i < count; i++) {
        const long col = i * TW, cols = n - col < TW ? n - col : TW;
        if (cols < TW && tile_step == TW) {
            tail(x, m, k, w + col, ld, bias ? bias + col : 0, residual ? residual + col : 0, y + col, n, cols);
            continue;
        }
        for (long r = 0; r < m; r += RB) {
            const long rows = m - r < RB ? m - r : RB;
            BLOCKS[rows](x + r * k, k, w + i * tile_step, ld, bias ? bias + col : 0,
                         residual ? residual + r * n + col : 0, y + r * n + col, n, cols);
        }
    }
}

static void mm(const float *x, long m, long k, const float *w, long tile_step, long ld, const float *bias,
               const float *residual, long n, float *y, int threads) {
#pragma omp parallel num_threads(threads)
    mm_for(x, m, k, w, tile_step, ld, bias, residual, n, y);
}

/* x: [m, k] contiguous; tiles: [ceil(n / TW), k, TW] (outputs past n are zeros); bias: [n] or NULL;
 * residual: [m, n] contiguous, added to the product, or NULL; y: [m, n] contiguous; threads: torch's
 * count for the calling thread. */
void rowmm(const float *x, long m, long k, const float *tiles, const float *bias, const float *residual, long n,
           float *y, int threads) {
    mm(x, m, k, tiles, k * TW, TW, bias, residual, n, y, threads);
}

/* rms_norm: y = x / sqrt(mean(x^2) + eps) * w, row by row; x, y: [m, d] contiguous. Rows shared out
 * among the threads of an enclosing parallel region (as `mm_for`). */
static void norm_row(const float *x, long d, const float *w, float eps, float *y) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (long j = 0; j < d; j++) s += x[j] * x[j];
    const float inv = 1.f / sqrtf(s / d + eps);
#pragma omp simd
    for (long j = 0; j < d; j++) y[j] = x[j] * inv * w[j];
}

void rms_norm(const float *x, long m, long d, const float *w, float eps, float *y) {
#pragma omp for schedule(static)
    for (long r = 0; r < m; r++) norm_row(x + r * d, d, w, eps, y + r * d);
}

/* x rotated by the position whose angles' cosines and sines are c and s (Llama's rotate_half: the
 * first half of x pairs with the second) → out */
static inline void rotate(const float *x, const float *c, const float *s, long half, float *out) {
#pragma omp simd
    for (long j = 0; j < half; j++) out[j] = x[j] * c[j] - x[j + half] * s[j];
#pragma omp simd
    for (long j = 0; j < half; j++) out[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
}

/* rope_store: a decode step's projected q, k, v (y: [b, (h * g + 2 * h) * d] contiguous: the h * g
 * query heads, the h key heads, the h value heads), each row at its position pos[i] (cos, sin:
 * [positions, d] tables): q and k rotated, k and v written to the cache (rows of d floats from
 * k_cache + i * seq + j * head, row pos[i]; v_cache alike), q to q_out [b, h, g, d]. The (sequence,
 * key head) pairs shared out as `rms_norm`'s rows: rope_pair does one, its g query heads, its key and
 * its value. */
static void rope_pair(const float *y, long i, long j, long h, long g, long d, const float *cos, const float *sin,
                      const long *pos, float *k_cache, float *v_cache, long seq, long head, long slot, float *q_out) {
    const float *row = y + i * (h * g + 2 * h) * d, *c = cos + pos[i] * d, *s = sin + pos[i] * d;
    const long at = slot * seq + j * head + pos[i] * d;
    for (long r = j * g; r < j * g + g; r++) rotate(row + r * d, c, s, d / 2, q_out + (i * h * g + r) * d);
    rotate(row + (h * g + j) * d, c, s, d / 2, k_cache + at);
    for (long e = 0; e < d; e++) v_cache[at + e] = row[(h * g + h + j) * d + e];
}

void rope_store(const float *y, long b, long h, long g, long d, const float *cos, const float *sin, const long *pos,
                float *k_cache, float *v_cache, long seq, long head, float *q_out) {
#pragma omp for schedule(static)
    for (long p = 0; p < b * h; p++)
        rope_pair(y, p / h, p % h, h, g, d, cos, sin, pos, k_cache, v_cache, seq, head, p / h, q_out);
}

/* attend: one new query token per sequence over its cached keys and values (a decode step), the g
 * query heads that share a key/value head together, so each key and value row is read from memory
 * once for all g. Two passes over a (sequence, head) pair: scores of 16 keys at a time (their dot
 * products summed across vector lanes in one tree), an exact softmax over them, then the values.
 * The rows are not prefetched in software: on the AMD machine the hardware's prefetch alone read
 * them faster (docs/engine.md). */
typedef float vf __attribute__((vector_size(64), aligned(4))); /* 16 floats; loads need not be aligned */
typedef int vi __attribute__((vector_size(64), aligned(4)));
#define SHUF __builtin_shufflevector

/* the levels of a tree that sums 16 vectors' lanes into lanes 0 .. 15 of one vector: each merges two
 * vectors into one, every input's lanes summed down to half as many. Sixteen dot products go through
 * it as they come, four at a time (in `pair`): gcc kept an array of all sixteen in memory, and the
 * attention from memory took 0.92x the time on the AMD machine (docs/engine.md). */
static inline vf merge1(vf x, vf y) {
    return SHUF(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline vf merge2(vf x, vf y) {
    return SHUF(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUF(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
static inline vf merge3(vf x, vf y) {
    return SHUF(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUF(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
static inline vf merge4(vf x, vf y) {
    return SHUF(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUF(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static inline vf pick(vi keep, vf a, vf b) { return (vf)(((vi)a & keep) | ((vi)b & ~keep)); }

/* e^x of 16 lanes x <= 0 (shifted scores; below -87, 0), as Cephes' expf: x = n ln2 + r, a degree-5
 * polynomial in r, times 2^n built in the exponent's bits */
static inline vf exp16(vf x) {
    const vi live = x >= -87.f;
    x = pick(live, x, (vf){0} - 87.f);
    const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f; /* rounded to the nearest integer */
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const vi two_n = (__builtin_convertvector(n, vi) + 127) << 23;
    return pick(live, p * (vf)two_n, (vf){0});
}

/* one (sequence, head) pair: q [g, D]; keys and values [len, D] (rows D apart); s: [g, len rounded
 * up to 16] scratch; out [g, D]. D, a multiple of 16, is a constant where inlined for 64 and 128.
 * Both passes go 16 keys at a time, all g query rows over a block before the next block, so its keys
 * (then its values) come from memory once and from L1 for the other rows. A row's value sums stay in
 * registers over a block (MAXC vectors, no array of variable length, which gcc keeps in memory) and
 * in out between blocks: 1.4-2x faster from the caches than summing each row over all its values
 * (docs/engine.md). */
#define MAXC 8 /* 16-float vectors of a value row summed in registers at once: head dims to 128 */

static inline __attribute__((always_inline)) void pair(const float *q, long g, const long D, const float *k,
                                                        const float *v, long len, float scale, float *s, float *out) {
    const long padded = (len + 15) & ~15L, chunks = D / 16;
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (long t0 = 0; t0 < padded; t0 += 16) {
        const long count = len - t0 < 16 ? len - t0 : 16;
        const float *kb = k + t0 * D;
        for (long r = 0; r < g; r++) {
            const float *qr = q + r * D;
            vf quads[4];
            for (long u = 0; u < 4; u++) {
                vf dots[4];
                for (long j = 0; j < 4; j++) {
                    const long t = 4 * u + j;
                    vf a = {0};
                    if (t < count) {
                        a = *(const vf *)qr * *(const vf *)(kb + t * D);
                        for (long c = 1; c < chunks; c++) a += *(const vf *)(qr + 16 * c) * *(const vf *)(kb + t * D + 16 * c);
                    }
                    dots[j] = a;
                }
                quads[u] = merge2(merge1(dots[0], dots[1]), merge1(dots[2], dots[3]));
            }
            const vf sums = merge4(merge3(quads[0], quads[1]), merge3(quads[2], quads[3]));
            *(vf *)(s + r * padded + t0) = pick(lane < (int)count, sums * scale, (vf){0} - INFINITY);
        }
    }
    float z[g];
    for (long r = 0; r < g; r++) {
        float *sr = s + r * padded, top = -INFINITY;
        vf m = *(const vf *)sr, sum = {0};
        for (long t = 16; t < padded; t += 16) {
            const vf x = *(const vf *)(sr + t);
            m = pick(m >= x, m, x);
        }
        for (int l = 0; l < 16; l++) top = m[l] > top ? m[l] : top;
        for (long t = 0; t < padded; t += 16) {
            const vf e = exp16(*(const vf *)(sr + t) - top);
            *(vf *)(sr + t) = e;
            sum += e;
        }
        z[r] = 0.f;
        for (int l = 0; l < 16; l++) z[r] += sum[l];
    }
    for (long t0 = 0; t0 < len; t0 += 16) {
        const long count = len - t0 < 16 ? len - t0 : 16;
        const float *vb = v + t0 * D;
        for (long r = 0; r < g; r++) {
            const float *p = s + r * padded + t0;
            for (long c0 = 0; c0 < chunks; c0 += MAXC) {
                const long cc = chunks - c0 < MAXC ? chunks - c0 : MAXC;
                float *o = out + r * D + 16 * c0;
                vf a[MAXC];
                for (long c = 0; c < cc; c++) a[c] = t0 ? *(const vf *)(o + 16 * c) : (vf){0};
                for (long t = 0; t < count; t++)
                    for (long c = 0; c < cc; c++) a[c] += p[t] * *(const vf *)(vb + t * D + 16 * (c0 + c));
                for (long c = 0; c < cc; c++) *(vf *)(o + 16 * c) = a[c];
            }
        }
    }
    for (long r = 0; r < g; r++)
        for (long c = 0; c < chunks; c++) *(vf *)(out + r * D + 16 * c) /= z[r];
}

/* `pair` with the head dims 64 and 128 inlined as constants */
static void attend_rows(const float *q, long g, long d, const float *k, const float *v, long len, float scale,
                        float *s, float *out) {
    if (d == 64)
        pair(q, g, 64, k, v, len, scale, s, out);
    else if (d == 128)
        pair(q, g, 128, k, v, len, scale, s, out);
    else
        pair(q, g, d, k, v, len, scale, s, out);
}

/* pair p = (sequence i, key head j) of attend's arguments (below) */
static void attend_pair(const float *q, long p, long h, long g, long d, const float *k, const float *v, long seq,
                        long head, const long *n, float scale, float *out, float *scratch, long longest) {
    const long i = p / h, at = i * seq + p % h * head;
    float *s = scratch + p * g * ((longest + 15) & ~15L);
    attend_rows(q + p * g * d, g, d, k + at, v + at, n[i], scale, s, out + p * g * d);
}

/* q: [b, h, g, d] contiguous; keys of sequence i, head j: rows of d floats from k + i * seq + j * head
 * (values alike from v); n[i] of them visible (1 or more); out: [b, h, g, d]; scratch: b * h * g *
 * (longest n rounded up to 16) floats; d a multiple of 16. */
static void attend_for(const float *q, long b, long h, long g, long d, const float *k, const float *v, long seq,
                       long head, const long *n, float scale, float *out, float *scratch, long longest) {
#pragma omp for schedule(dynamic, 1)
    for (long p = 0; p < b * h; p++) attend_pair(q, p, h, g, d, k, v, seq, head, n, scale, out, scratch, longest);
}

void attend(const float *q, long b, long h, long g, long d, const float *k, const float *v, long seq, long head,
            const long *n, float scale, float *out, float *scratch, long longest, int threads) {
#pragma omp parallel num_threads(threads)
    attend_for(q, b, h, g, d, k, v, seq, head, n, scale, out, scratch, longest);
}

/* x = silu(g) * u for k values: SwiGLU's activation, as Llama's MLP has it */
static void swiglu(const float *g, const float *u, long k, float *x) {
    long j = 0;
    for (; j + 16 <= k; j += 16) { /* silu(g) = g / (1 + e^-g), as g e^g / (1 + e^g) below 0 */
        const vf a = *(const vf *)(g + j), e = exp16(pick(a >= 0.f, -a, a));
        *(vf *)(x + j) = pick(a >= 0.f, a, a * e) / (1.f + e) * *(const vf *)(u + j);
    }
    for (; j < k; j++) x[j] = g[j] / (1.f + expf(-g[j])) * u[j];
}

/* rowmm_swiglu: rowmm of x = silu(gate) * up, gu: [m, 2 * k] contiguous (gate's k columns, then up's),
 * x computed into scratch [m, k] first (SwiGLU's down projection). */
void rowmm_swiglu(const float *gu, long m, long k, float *scratch, const float *tiles, const float *bias,
                  const float *residual, long n, float *y, int threads) {
    for (long r = 0; r < m; r++) swiglu(gu + r * 2 * k, gu + r * 2 * k + k, k, scratch + r * k);
    rowmm(scratch, m, k, tiles, bias, residual, n, y, threads);
}

/* the index of row's largest of n values as torch's argmax has it: the first of equal maxima, or the
 * first NaN where there is one. Sixteen lanes keep their largest value and where it first came. */
static long first_max(const float *row, long n) {
    long best = 0, j = 0;
    float top = row[0];
    if (n >= 16) {
        const vi step = (vi){0} + 16;
        vf m = *(const vf *)row;
        vi at = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, here = at, nan = m != m;
        for (j = 16; j + 16 <= n; j += 16) {
            const vf x = *(const vf *)(row + j);
            here += step;
            const vi more = x > m;
            m = pick(more, x, m);
            at = (at & ~more) | (here & more);
            nan |= x != x;
        }
        top = m[0], best = at[0];
        for (int l = 1; l < 16; l++)
            if (m[l] > top || (m[l] == top && at[l] < best)) top = m[l], best = at[l];
        for (int l = 0; l < 16; l++)
            if (nan[l]) j = 0; /* a NaN: the scalar scan below from the start finds the first */
        if (!j) top = row[0], best = 0;
    }
    for (long i = j ? j : 1; i < n && !isnan(top); i++)
        if (row[i] > top || isnan(row[i])) top = row[i], best = i;
    return best;
}

/* decode_layers: a decode step's whole layer stack for b sequences, one new token each, Llama's layer
 * (the residual stream h [b, D] updated in place):
 *   h += o(attend(rope_store(qkv(rms_norm(h)))));  h += down(silu(gate) * up), [gate | up] = gu(rms_norm(h))
 * table: per layer, LAYER_PTRS addresses (below; a bias may be 0); q/k/v, gate/up and down are read
 * as tiles (tile_step k * TW, ld TW) or as transposed weights [k, ld] (their *_ld > 0: tile_step TW),
 * o likewise. k_all, v_all: the cache, layer l's keys of sequence i, head j from
 * k_all + l * layer + i * seq + j * head; n[i] keys visible to sequence i, its new token the last.
 * scratch: decode_scratch(...) floats (its threads: as many as decode_layers is called with). With
 * final_norm (else 0): the final norm into normed [b, dim] and the LM head (vocab outputs, laid out
 * as head_ld says) into logits [b, vocab], and with argmax (else 0) each row's greedy token into
 * argmax [b] (as torch's argmax: the first of equal maxima, the first NaN where there is one). With
 * ids (else 0): h is first each sequence's token's row of the embedding table embed [*, dim].
 *
 * A prefill's rows (slots, else 0): row i goes to the cache's slot slots[i], where several rows may
 * share a slot (a prompt's tokens, at positions n[i] - 1, each seeing the keys up to its own). The
 * rotation then writes every row's keys and values before any row attends, and the attention's
 * pairs are shared out dynamically (their lengths differ). With keep (else 0), the last layer goes
 * on past its keys and values with the kept rows alone (keep[0 .. kept - 1], ascending: each
 * prompt's last), moved to h's first kept rows, and so do the final norm and the head; a prompt's
 * other rows are wanted only for their keys and values, as llama.cpp's graph has it. */
enum { N1, QKV, QKV_B, O, O_B, N2, GU, GU_B, DOWN, DOWN_B, LAYER_PTRS };

long decode_scratch(long b, long dim, long heads, long kv_heads, long d, long inter, long longest, long threads) {
    const long qkv = (heads + 2 * kv_heads) * d, padded = (longest + 15) & ~15L;
    return b * (qkv + 2 * heads * d + 2 * inter) + b * heads * padded + threads * b * (dim + inter);
}

void decode_layers(float *h, long b, long dim, long layers, const long *table, const long *lds, long heads,
                   long kv_heads, long d, long inter, const float *cos, const float *sin, const long *n, long longest,
                   float *k_all, float *v_all, long layer, long seq, long head, float eps, float scale,
                   float *scratch, int threads, const float *final_norm, const float *lm_head, long head_ld,
                   const float *head_b, long vocab, float *normed, float *logits, long *argmax, const long *ids,
                   const float *embed, const long *slots, const long *keep, long kept) {
    const long g = heads / kv_heads, qkv = (heads + 2 * kv_heads) * d;
    long pos[b];
    for (long i = 0; i < b; i++) pos[i] = n[i] - 1;
    float *y = scratch, *q = y + b * qkv, *att = q + b * heads * d, *gu = att + b * heads * d;
    float *scores = gu + 2 * b * inter, *own = scores + b * heads * ((longest + 15) & ~15L);
    /* each weight's layout: tiles where its ld is 0, else a transposed weight with that ld */
#define STEP(ld, k) ((ld) ? TW : (k) * TW)
#define LD(ld) ((ld) ? (ld) : TW)
    const long qkv_ld = lds[0], o_ld = lds[1], gu_ld = lds[2], down_ld = lds[3];
    /* one parallel region for the whole step: the tiles of each projection and the (sequence, key
     * head) pairs of the rotation and attention shared out among its threads, which wait for each
     * other at the end of each (omp for). Each thread normalises every row, and computes every row's
     * SwiGLU activation, into its own x and act (from `own`) and reads them in the projection after:
     * no wait for the others between the two, and no rows from another core's cache. With the pairs'
     * loop, the 8-sequence step took 0.93-0.94x the time where the AMD machine's two cores sit far
     * apart, the same where they are close (docs/engine.md) */
#pragma omp parallel num_threads(threads)
    {
        float *x = own + omp_get_thread_num() * b * (dim + inter), *act = x + b * dim;
        long rows = b; /* the rows past the attention: all, or in a prefill's last layer the kept ones */
        if (ids) {
#pragma omp for schedule(static)
            for (long r = 0; r < b; r++)
                for (long j = 0; j < dim; j++) h[r * dim + j] = embed[ids[r] * dim + j];
        }
        for (long l = 0; l < layers; l++) {
            const float *const *w = (const float *const *)(table + l * LAYER_PTRS);
            float *kl = k_all + l * layer, *vl = v_all + l * layer;
            for (long r = 0; r < b; r++) norm_row(h + r * dim, dim, w[N1], eps, x + r * dim);
            mm_for(x, b, dim, w[QKV], STEP(qkv_ld, dim), LD(qkv_ld), w[QKV_B], 0, qkv, y);
            if (!slots) {
#pragma omp for schedule(static)
                for (long p = 0; p < b * kv_heads; p++) { /* a pair's rotation, then its attention */
                    rope_pair(y, p / kv_heads, p % kv_heads, kv_heads, g, d, cos, sin, pos, kl, vl, seq, head,
                              p / kv_heads, q);
                    attend_pair(q, p, kv_heads, g, d, kl, vl, seq, head, n, scale, att, scores, longest);
                }
            } else {
#pragma omp for schedule(static)
                for (long p = 0; p < b * kv_heads; p++)
                    rope_pair(y, p / kv_heads, p % kv_heads, kv_heads, g, d, cos, sin, pos, kl, vl, seq, head,
                              slots[p / kv_heads], q);
                if (keep && l == layers - 1) {
                    rows = kept;
#pragma omp single
                    for (long r = 0; r < kept; r++) /* ascending: a row is read before it is written */
                        for (long j = 0; j < dim; j++) h[r * dim + j] = h[keep[r] * dim + j];
                }
                const long padded = (longest + 15) & ~15L;
#pragma omp for schedule(dynamic, 1)
                for (long p = 0; p < rows * kv_heads; p++) { /* pair p of the rows attending: row i, key head j */
                    const long i = rows < b ? keep[p / kv_heads] : p / kv_heads, j = p % kv_heads;
                    const long at = slots[i] * seq + j * head;
                    attend_rows(q + (i * kv_heads + j) * g * d, g, d, kl + at, vl + at, n[i], scale,
                                scores + p * g * padded, att + p * g * d);
                }
            }
            mm_for(att, rows, heads * d, w[O], STEP(o_ld, heads * d), LD(o_ld), w[O_B], h, dim, h);
            for (long r = 0; r < rows; r++) norm_row(h + r * dim, dim, w[N2], eps, x + r * dim);
            mm_for(x, rows, dim, w[GU], STEP(gu_ld, dim), LD(gu_ld), w[GU_B], 0, 2 * inter, gu);
            for (long r = 0; r < rows; r++)
                swiglu(gu + r * 2 * inter, gu + r * 2 * inter + inter, inter, act + r * inter);
            mm_for(act, rows, inter, w[DOWN], STEP(down_ld, inter), LD(down_ld), w[DOWN_B], h, dim, h);
        }
        if (final_norm) { /* the final norm and the LM head: normed [rows, dim], logits [rows, vocab] */
            rms_norm(h, rows, dim, final_norm, eps, normed);
            mm_for(normed, rows, dim, lm_head, STEP(head_ld, dim), LD(head_ld), head_b, 0, vocab, logits);
            if (argmax) {
#pragma omp for schedule(static)
                for (long r = 0; r < rows; r++) argmax[r] = first_max(logits + r * vocab, vocab);
            }
        }
    }
#undef STEP
#undef LD
}

/* encode_layers: a small vision tower's (SigLIP's) whole encoder for n images of p patches each, in
 * one call: rows = n * p, the residual stream h [rows, dim],
 *   h = patches @ E + b + pos;  per layer: h += o(attention(qkv(ln1(h))));  h += fc2(gelu(fc1(ln2(h))))
 * and, with post_w (else 0), the final layer norm into out [rows, dim]. Each projection is read as
 * tiles ([ceil(out / TW), in, TW], `rowmm`'s) with its bias (or 0): patches [rows, cpp] by E, pos
 * [p, dim]; table: per layer, ENC_PTRS addresses (below). The attention: each (image, head) pair's
 * p patches over the same p, as `pair` takes a head's g query rows (d a multiple of 16), from copies
 * into the thread's own rows. gelu: 1 the tanh approximation, 0 the exact one (erf). Each thread
 * normalises every row, and takes the activation of every row, into rows of its own, as
 * decode_layers does. scratch: encode_scratch(...) floats. A tower this small spends more in the
 * dispatch of its ~10 operations a layer than in their arithmetic (docs/engine.md). */
enum { LN1_W, LN1_B, E_QKV, E_QKV_B, E_O, E_O_B, LN2_W, LN2_B, FC1, FC1_B, FC2, FC2_B, ENC_PTRS };

static void layer_norm_row(const float *x, long d, const float *w, const float *b, float eps, float *y) {
    float s = 0.f, v = 0.f;
#pragma omp simd reduction(+ : s)
    for (long j = 0; j < d; j++) s += x[j];
    const float mean = s / d;
#pragma omp simd reduction(+ : v)
    for (long j = 0; j < d; j++) v += (x[j] - mean) * (x[j] - mean);
    const float inv = 1.f / sqrtf(v / d + eps);
#pragma omp simd
    for (long j = 0; j < d; j++) y[j] = (x[j] - mean) * inv * w[j] + b[j];
}

/* y = gelu(x) for k values: with tanh, x sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3), which is
 * 0.5 x (1 + tanh(u)); else 0.5 x (1 + erf(x / sqrt(2))) */
static void gelu_row(const float *x, long k, int tanh_kind, float *y) {
    long j = 0;
    if (tanh_kind) {
        for (; j + 16 <= k; j += 16) {
            const vf a = *(const vf *)(x + j), t = 1.5957691216057308f * (a + 0.044715f * a * a * a);
            const vf e = exp16(pick(t >= 0.f, -t, t)); /* sigmoid(t) = 1 / (1 + e^-t), e^t / (1 + e^t) below 0 */
            *(vf *)(y + j) = a * pick(t >= 0.f, (vf){0} + 1.f, e) / (1.f + e);
        }
        for (; j < k; j++) y[j] = x[j] / (1.f + expf(-1.5957691216057308f * (x[j] + 0.044715f * x[j] * x[j] * x[j])));
    } else
        for (; j < k; j++) y[j] = 0.5f * x[j] * (1.f + erff(x[j] * 0.70710678118654752f));
}

long encode_scratch(long rows, long p, long dim, long heads, long d, long inter, long threads) {
    const long padded = (p + 15) & ~15L;
    return rows * (4 * heads * d + inter) + threads * (rows * (dim + inter) + 4 * p * d + p * padded);
}

void encode_layers(const float *patches, long n, long p, long cpp, const float *embed, const float *embed_b,
                   const float *pos, float *h, long dim, long layers, const long *table, long heads, long d,
                   long inter, float eps, float scale, int gelu_tanh, const float *post_w, const float *post_b,
                   float *out, float *scratch, int threads) {
    const long rows = n * p, hd = heads * d, padded = (p + 15) & ~15L;
    float *y = scratch, *att = y + rows * 3 * hd, *f = att + rows * hd, *own = f + rows * inter;
#pragma omp parallel num_threads(threads)
    {
        float *x = own + omp_get_thread_num() * (rows * (dim + inter) + 4 * p * d + p * padded);
        float *act = x + rows * dim, *qh = act + rows * inter, *kh = qh + p * d, *vh = kh + p * d;
        float *oh = vh + p * d, *s = oh + p * d;
        for (long i = 0; i < n; i++) /* each image's patches embedded, its positions added */
            mm_for(patches + i * p * cpp, p, cpp, embed, cpp * TW, TW, embed_b, pos, dim, h + i * p * dim);
        for (long l = 0; l < layers; l++) {
            const float *const *w = (const float *const *)(table + l * ENC_PTRS);
            for (long r = 0; r < rows; r++) layer_norm_row(h + r * dim, dim, w[LN1_W], w[LN1_B], eps, x + r * dim);
            mm_for(x, rows, dim, w[E_QKV], dim * TW, TW, w[E_QKV_B], 0, 3 * hd, y);
#pragma omp for schedule(static)
            for (long a = 0; a < n * heads; a++) { /* pair (image i, head j): its q, k, v rows copied together */
                const long i = a / heads, j = a % heads;
                const float *yi = y + i * p * 3 * hd + j * d;
                for (long t = 0; t < p; t++)
                    for (long e = 0; e < d; e++) {
                        qh[t * d + e] = yi[t * 3 * hd + e];
                        kh[t * d + e] = yi[t * 3 * hd + hd + e];
                        vh[t * d + e] = yi[t * 3 * hd + 2 * hd + e];
                    }
                attend_rows(qh, p, d, kh, vh, p, scale, s, oh);
                for (long t = 0; t < p; t++)
                    for (long e = 0; e < d; e++) att[(i * p + t) * hd + j * d + e] = oh[t * d + e];
            }
            mm_for(att, rows, hd, w[E_O], hd * TW, TW, w[E_O_B], h, dim, h);
            for (long r = 0; r < rows; r++) layer_norm_row(h + r * dim, dim, w[LN2_W], w[LN2_B], eps, x + r * dim);
            mm_for(x, rows, dim, w[FC1], dim * TW, TW, w[FC1_B], 0, inter, f);
            for (long r = 0; r < rows; r++) gelu_row(f + r * inter, inter, gelu_tanh, act + r * inter);
            mm_for(act, rows, inter, w[FC2], inter * TW, TW, w[FC2_B], h, dim, h);
        }
        if (post_w) {
#pragma omp for schedule(static)
            for (long r = 0; r < rows; r++) layer_norm_row(h + r * dim, dim, post_w, post_b, eps, out + r * dim);
        }
    }
}
