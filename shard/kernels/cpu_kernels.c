/* CPU kernels for the decode step, built on first use by shard/kernels/cpu.py.
 *
 * linear_f32: y[b, o] = sum_i x[b, i] * w[o, i] for a short batch (the rows of a decode step).
 * At a few rows a linear layer is a matrix-vector product in disguise: the weight is read once
 * from memory and each element meets a handful of inputs, so speed is how fast the weight
 * streams. MKL's GEMM reaches about half this machine's read bandwidth there; this kernel walks 8
 * weight rows at a time (8 sequential streams for the prefetcher, 8 independent FMA chains) and
 * dots each with every input row while those rows sit in L1. From about 8 rows the arithmetic
 * dominates: a tile of 3 weight rows by 4 input rows loads fewer vectors per FMA, and prefetching
 * the next block's weights while multiplying keeps it ahead of MKL's GEMM, which packs the weight
 * on every call, up to about 128 rows.
 *
 * Threads: OpenMP over blocks of output rows. It must be the same OpenMP runtime as PyTorch's
 * (the build links PyTorch's libgomp), or two thread pools would spin against each other.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One linear kernel per register tile: R weight rows by C input rows, R * C accumulators. Each
 * thread takes a contiguous run of R-row weight blocks; while a block meets the input rows, the next
 * block's rows are prefetched, spread over the tile steps, so that the weight stream overlaps
 * arithmetic. */
#define DEFINE_LINEAR(R, C)                                                                                   \
    static void linear_##R##x##C(const float *x, const float *w, float *y, int64_t batch, int64_t in,       \
                                 int64_t out, int32_t threads) {                                              \
        const int64_t blocks = (out + R - 1) / R, vec_in = in & ~(int64_t)7;                                  \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                     \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                          \
            const int64_t o0 = blk * R;                                                                       \
            const int rows = out - o0 < R ? (int)(out - o0) : R;                                              \
            const float *wr[R];                                                                               \
            for (int r = 0; r < R; r++)                                                                       \
                wr[r] = w + (o0 + (r < rows ? r : 0)) * in; /* a short last block repeats its first row */    \
            /* Each tile step prefetches `per_step` rows of the next block, so that all R arrive even when    \
             * there are fewer steps than rows (8 input rows on the 3 x 4 tile: 2 steps). */                  \
            const int steps = batch > C ? (int)((batch + C - 1) / C) : 1, per_step = (R + steps - 1) / steps; \
            int step = 0;                                                                                     \
            for (int64_t b0 = 0; b0 < batch; b0 += C, step++) {                                               \
                const int cols = batch - b0 < C ? (int)(batch - b0) : C;                                      \
                const float *xr[C];                                                                           \
                for (int k = 0; k < C; k++)                                                                   \
                    xr[k] = x + (b0 + (k < cols ? k : 0)) * in;                                               \
                const int64_t first = o0 + R + (int64_t)step * per_step; /* next block's rows to fetch */     \
                int fetch = batch >= 4 && step * per_step < R ? per_step : 0;                                 \
                if (fetch > out - first)                                                                      \
                    fetch = out - first > 0 ? (int)(out - first) : 0;                                         \
                const float *next = fetch ? w + first * in : w;                                               \
                __m256 acc[R][C];                                                                             \
                for (int r = 0; r < R; r++)                                                                   \
                    for (int k = 0; k < C; k++)                                                               \
                        acc[r][k] = _mm256_setzero_ps();                                                      \
                for (int64_t i = 0; i < vec_in; i += 8) {                                                     \
                    if ((i & 15) == 0)                                                                        \
                        for (int f = 0; f < fetch; f++)                                                       \
                            _mm_prefetch((const char *)(next + f * in + i), _MM_HINT_T0);                     \
                    __m256 xv[C];                                                                             \
                    for (int k = 0; k < C; k++)                                                               \
                        xv[k] = _mm256_loadu_ps(xr[k] + i);                                                   \
                    for (int r = 0; r < R; r++) {                                                             \
                        const __m256 wv = _mm256_loadu_ps(wr[r] + i);                                         \
                        for (int k = 0; k < C; k++)                                                           \
                            acc[r][k] = _mm256_fmadd_ps(wv, xv[k], acc[r][k]);                                \
                    }                                                                                         \
                }                                                                                             \
                for (int r = 0; r < rows; r++)                                                                \
                    for (int k = 0; k < cols; k++) {                                                          \
                        float s = hsum(acc[r][k]);                                                            \
                        for (int64_t i = vec_in; i < in; i++)                                                 \
                            s += wr[r][i] * xr[k][i];                                                         \
                        y[(b0 + k) * out + o0 + r] = s;                                                       \
                    }                                                                                         \
            }                                                                                                 \
        }                                                                                                     \
    }

/* Below 8 rows the weight stream is the cost: 8 rows of it at a time, one input row per tile. From
 * 8 rows the arithmetic is: a 3 x 4 tile loads 7 vectors per 12 FMAs where 8 x 1 loads 9 per 8
 * (1.2x to 1.5x faster at 16 to 64 rows here). */
DEFINE_LINEAR(8, 1)
DEFINE_LINEAR(3, 4)

/* x: [batch, in], w: [out, in], y: [batch, out]; all row-major and contiguous. */
void caravan_linear_f32(const float *x, const float *w, float *y, int64_t batch, int64_t in, int64_t out,
                        int32_t threads) {
    if (batch >= 8)
        linear_3x4(x, w, y, batch, in, out, threads);
    else
        linear_8x1(x, w, y, batch, in, out, threads);
}

/* e^x for 8 floats, to about 2 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a degree-6
 * Taylor polynomial; x below -87 flushes to 0, x above 88 saturates at e^88. */
static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);      /* ln2 split in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

/* silu_mul_f32: y[t, j] = silu(gate_up[t, j]) * gate_up[t, inter + j], for the MLP's fused gate|up
 * projection [rows, 2 * inter]; y is [rows, inter]. */
void caravan_silu_mul_f32(const float *gate_up, float *y, int64_t rows, int64_t inter, int32_t threads) {
    const int64_t vec = inter & ~(int64_t)7;
    const __m256 one = _mm256_set1_ps(1.0f);
#pragma omp parallel for schedule(static) num_threads(rows > 1 ? threads : 1)
    for (int64_t t = 0; t < rows; t++) {
        const float *g = gate_up + t * 2 * inter, *u = g + inter;
        float *yr = y + t * inter;
        for (int64_t j = 0; j < vec; j += 8) {
            const __m256 gv = _mm256_loadu_ps(g + j);
            const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            _mm256_storeu_ps(yr + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
        }
        for (int64_t j = vec; j < inter; j++)
            yr[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* rms_norm_f32: y[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), rows of length dim. */
void caravan_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t dim, float eps,
                          int32_t threads) {
    const int64_t vec = dim & ~(int64_t)7;
#pragma omp parallel for schedule(static) num_threads(rows > 1 ? threads : 1)
    for (int64_t t = 0; t < rows; t++) {
        const float *xr = x + t * dim;
        float *yr = y + t * dim;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < vec; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (int64_t i = vec; i < dim; i++)
            ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        const __m256 iv = _mm256_set1_ps(inv);
        for (int64_t i = 0; i < vec; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_loadu_ps(w + i),
                                                   _mm256_mul_ps(_mm256_loadu_ps(xr + i), iv)));
        for (int64_t i = vec; i < dim; i++)
            yr[i] = w[i] * (xr[i] * inv);
    }
}

/* rope_f32: rotates, in place, the first `heads` heads of each of `rows` tokens (token t starts at
 * x + t * row_stride; heads are contiguous, head_dim apart), in the half-split layout:
 * out[:h] = x1 cos1 - x2 sin1, out[h:] = x2 cos2 + x1 sin2; cos and sin are [rows, head_dim]. */
void caravan_rope_f32(float *x, int64_t row_stride, const float *cos, const float *sin, int64_t rows,
                      int64_t heads, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * row_stride + h * head_dim;
            for (int64_t j = 0; j < half; j++) {
                const float a = v[j], b = v[j + half];
                v[j] = a * c[j] - b * s[j];
                v[j + half] = b * c[j + half] + a * s[j + half];
            }
        }
    }
}

#define CHUNK 128
#ifndef CARAVAN_MAX_HEADS
#error "build with -DCARAVAN_MAX_HEADS (shard/kernels/cpu.py passes its MAX_HEADS)"
#endif
#define MAX_HEADS CARAVAN_MAX_HEADS

/* paged_decode_attention_f32: one new token per sequence, attending to its first kv_len[d] cached
 * tokens (its own already written). q: token row token_index[d] of a [T, ...] tensor with rows
 * q_stride apart, heads contiguous; caches: [blocks, block_size, kv_heads, head_dim]; block table
 * row seq_index[d] of block_tables ([B, table_stride]); out: [D, heads, head_dim].
 * One task per sequence, walking its keys in cache order: a key's heads are contiguous, so every
 * block is read front to back once (the prefetcher streams it; the cache is cold at every layer),
 * each key and value serving all the query heads that share it. Softmax runs over chunks of CHUNK
 * keys with a running maximum, so no buffer grows with the context; the sequence's rows of `out`
 * are the accumulators. The caller checks: head_dim a multiple of 8, heads at most MAX_HEADS. */
void caravan_paged_decode_attention_f32(const float *q, int64_t q_stride, const int64_t *token_index,
                                        const float *k_cache, const float *v_cache, const int64_t *block_tables,
                                        int64_t table_stride, const int64_t *seq_index, const int64_t *kv_len,
                                        int64_t num_decodes, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                        int64_t block_size, float scale, float *out, int32_t threads) {
    const int64_t group = heads / kv_heads;
    const int64_t token_stride = kv_heads * head_dim;
    const int64_t nv = head_dim / 8;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_decodes > 1 ? threads : 1)
    for (int64_t d = 0; d < num_decodes; d++) {
        const float *qd = q + token_index[d] * q_stride;
        const int64_t *table = block_tables + seq_index[d] * table_stride;
        const int64_t len = kv_len[d];
        float *acc = out + d * heads * head_dim;
        float scores[MAX_HEADS][CHUNK] __attribute__((aligned(32)));
        float running_max[MAX_HEADS], total[MAX_HEADS];
        int64_t offset[CHUNK];  /* cache offset of each key of the chunk */
        for (int64_t i = 0; i < heads * head_dim; i++)
            acc[i] = 0.0f;
        for (int64_t h = 0; h < heads; h++) {
            running_max[h] = -INFINITY;
            total[h] = 0.0f;
        }
        for (int64_t c0 = 0; c0 < len; c0 += CHUNK) {
            const int64_t n = len - c0 < CHUNK ? len - c0 : CHUNK;
            for (int64_t j = 0, blk = c0 / block_size, in_blk = c0 % block_size; j < n; j++) {
                offset[j] = (table[blk] * block_size + in_blk) * token_stride;
                if (++in_blk == block_size) {
                    in_blk = 0;
                    blk++;
                }
            }
            /* scores of this chunk's keys against every query head */
            for (int64_t j = 0; j < n; j++) {
                for (int64_t h = 0; h < heads; h++) {
                    const float *kv = k_cache + offset[j] + (h / group) * head_dim, *qv = qd + h * head_dim;
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    int64_t i = 0;
                    for (; i + 1 < nv; i += 2) {
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qv + 8 * i), _mm256_loadu_ps(kv + 8 * i), a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qv + 8 * i + 8), _mm256_loadu_ps(kv + 8 * i + 8), a1);
                    }
                    if (i < nv)
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qv + 8 * i), _mm256_loadu_ps(kv + 8 * i), a0);
                    scores[h][j] = hsum(_mm256_add_ps(a0, a1)) * scale;
                }
            }
            /* softmax weights, rescaling what was accumulated under an older maximum */
            for (int64_t h = 0; h < heads; h++) {
                float m = running_max[h];
                for (int64_t j = 0; j < n; j++)
                    m = scores[h][j] > m ? scores[h][j] : m;
                const float rescale = expf(running_max[h] - m);  /* 0 on the first chunk */
                running_max[h] = m;
                total[h] *= rescale;
                const __m256 rv = _mm256_set1_ps(rescale), mv = _mm256_set1_ps(m);
                for (int64_t i = 0; i < head_dim; i += 8)
                    _mm256_storeu_ps(acc + h * head_dim + i, _mm256_mul_ps(rv, _mm256_loadu_ps(acc + h * head_dim + i)));
                int64_t j = 0;
                __m256 sum = _mm256_setzero_ps();
                for (; j + 8 <= n; j += 8) {
                    const __m256 p = exp256(_mm256_sub_ps(_mm256_load_ps(&scores[h][j]), mv));
                    _mm256_store_ps(&scores[h][j], p);
                    sum = _mm256_add_ps(sum, p);
                }
                float t = hsum(sum);
                for (; j < n; j++) {
                    scores[h][j] = expf(scores[h][j] - m);
                    t += scores[h][j];
                }
                total[h] += t;
            }
            /* weighted values */
            for (int64_t j = 0; j < n; j++) {
                for (int64_t h = 0; h < heads; h++) {
                    const float *vv = v_cache + offset[j] + (h / group) * head_dim;
                    const __m256 pv = _mm256_set1_ps(scores[h][j]);
                    float *a = acc + h * head_dim;
                    for (int64_t i = 0; i < head_dim; i += 8)
                        _mm256_storeu_ps(a + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vv + i), _mm256_loadu_ps(a + i)));
                }
            }
        }
        for (int64_t h = 0; h < heads; h++) {
            const __m256 inv = _mm256_set1_ps(1.0f / total[h]);
            for (int64_t i = 0; i < head_dim; i += 8)
                _mm256_storeu_ps(acc + h * head_dim + i, _mm256_mul_ps(inv, _mm256_loadu_ps(acc + h * head_dim + i)));
        }
    }
}

/* The two halves of a decoder layer for a step of decode rows only (no prefill, at most a few rows),
 * each one call from Python instead of a dozen operators. Outputs come before the
 * tensor-parallel all-reduce and without the residual, which the caller adds. Scratch memory is
 * the caller's: `scratch` holds rows * (hidden + (heads + 2 kv_heads + heads) * head_dim) floats for
 * the attention half and rows * (hidden + 3 inter) for the MLP half. */

/* out = o_proj(attention(rope(qkv_proj(rms_norm(h))))), writing the new keys and values to the cache
 * at slot_mapping; every row is a decode row: row t attends to kv_len[t] keys of the sequence in row
 * seq_index[t] of block_tables (several rows may share a sequence: a speculative verification). */
void caravan_decode_attention_block_f32(const float *h, int64_t rows, int64_t hidden, const float *norm_w,
                                        float eps, const float *qkv_w, int64_t heads, int64_t kv_heads,
                                        int64_t head_dim, const float *cos, const float *sin, float *k_cache,
                                        float *v_cache, const int64_t *slot_mapping, const int64_t *token_index,
                                        const int64_t *seq_index, const int64_t *block_tables, int64_t table_stride, const int64_t *kv_len,
                                        int64_t block_size, float scale, const float *o_w, float *out,
                                        float *scratch, int32_t threads) {
    const int64_t qkv_width = (heads + 2 * kv_heads) * head_dim, kv_width = kv_heads * head_dim;
    float *x = scratch, *qkv = x + rows * hidden, *attn = qkv + rows * qkv_width;
    caravan_rms_norm_f32(h, norm_w, x, rows, hidden, eps, threads);
    caravan_linear_f32(x, qkv_w, qkv, rows, hidden, qkv_width, threads);
    caravan_rope_f32(qkv, qkv_width, cos, sin, rows, heads + kv_heads, head_dim);
    for (int64_t t = 0; t < rows; t++) {
        memcpy(k_cache + slot_mapping[t] * kv_width, qkv + t * qkv_width + heads * head_dim, kv_width * sizeof(float));
        memcpy(v_cache + slot_mapping[t] * kv_width, qkv + t * qkv_width + (heads + kv_heads) * head_dim,
               kv_width * sizeof(float));
    }
    caravan_paged_decode_attention_f32(qkv, qkv_width, token_index, k_cache, v_cache, block_tables, table_stride,
                                       seq_index, kv_len, rows, heads, kv_heads, head_dim, block_size, scale, attn,
                                       threads);
    caravan_linear_f32(attn, o_w, out, rows, heads * head_dim, hidden, threads);
}

/* out = down_proj(silu(gate) * up), [gate | up] = gate_up_proj(rms_norm(h)). */
void caravan_mlp_block_f32(const float *h, int64_t rows, int64_t hidden, const float *norm_w, float eps,
                           const float *gate_up_w, int64_t inter, const float *down_w, float *out, float *scratch,
                           int32_t threads) {
    float *x = scratch, *gate_up = x + rows * hidden, *act = gate_up + rows * 2 * inter;
    caravan_rms_norm_f32(h, norm_w, x, rows, hidden, eps, threads);
    caravan_linear_f32(x, gate_up_w, gate_up, rows, hidden, 2 * inter, threads);
    caravan_silu_mul_f32(gate_up, act, rows, inter, threads);
    caravan_linear_f32(act, down_w, out, rows, inter, hidden, threads);
}

/* check_decode_indices: whether a decode step's indices stay inside the tensors the attention
 * kernels read and write, checked before they trust them (a wrong index there reads or overwrites
 * another tensor's memory instead of failing). Row d reads token row token_index[d] < num_tokens
 * and block table row seq_index[d] < num_seqs, attends to 1 <= kv_len[d] <= table_width *
 * block_size keys, whose blocks (the table's first entries) lie in [0, num_blocks); and row t
 * writes its key and value at slot_mapping[t] in [0, num_blocks * block_size) for t <
 * num_slot_rows. Returns 0, or the kind of the first problem (1 token row,
 * 2 table row, 3 key count, 4 block id, 5 slot), with bad[0] its row and bad[1] the value. */
int32_t caravan_check_decode_indices(const int64_t *token_index, const int64_t *seq_index, const int64_t *kv_len,
                                     int64_t num_decodes, int64_t num_tokens, const int64_t *block_tables,
                                     int64_t num_seqs, int64_t table_stride, int64_t table_width,
                                     int64_t block_size, int64_t num_blocks, const int64_t *slot_mapping,
                                     int64_t num_slot_rows, int64_t *bad) {
    for (int64_t d = 0; d < num_decodes; d++) {
        int32_t kind = 0;
        int64_t value = 0;
        if (token_index[d] < 0 || token_index[d] >= num_tokens)
            kind = 1, value = token_index[d];
        else if (seq_index[d] < 0 || seq_index[d] >= num_seqs)
            kind = 2, value = seq_index[d];
        else if (kv_len[d] < 1 || kv_len[d] > table_width * block_size)
            kind = 3, value = kv_len[d];
        else {
            const int64_t *table = block_tables + seq_index[d] * table_stride;
            for (int64_t b = 0, used = (kv_len[d] + block_size - 1) / block_size; b < used && !kind; b++)
                if (table[b] < 0 || table[b] >= num_blocks)
                    kind = 4, value = table[b];
        }
        if (kind) {
            bad[0] = d, bad[1] = value;
            return kind;
        }
    }
    for (int64_t t = 0; t < num_slot_rows; t++)
        if (slot_mapping[t] < 0 || slot_mapping[t] >= num_blocks * block_size) {
            bad[0] = t, bad[1] = slot_mapping[t];
            return 5;
        }
    return 0;
}
