/* tvlang's optional compiled helper: loops that numpy and torch run slowly.
 *
 * 1. DARE's masks from numpy's PCG64 stream, without numpy's per-word call.
 * tvlang.ops.dare.Dropper gives each entry a 32-bit word of a PCG64 stream (each 64-bit
 * output split in two, low half first) and keeps the entry when its word is at least a
 * threshold. numpy's random_raw gives those outputs at about 5 ns each on a 2 GHz core (each
 * 128-bit multiply waits for the one before it), then numpy compares, converts and scales
 * the words in three more passes: 3.1 ns an entry. This draws the same outputs on four
 * interleaved copies of the generator (one step apart, each stepping four at a time, so
 * their multiplies overlap) and writes the mask in the same loop: the same values, bit for
 * bit, at 1.5 ns an entry.
 *
 * 2. TIES' sign election and disjoint merge with unit weights; 3. the window pass of the
 * magnitude thresholds (one window or two); 4. breadcrumbs' band trim; 5. RAM's and RAM+'s
 * per-entry means; 6. nearswap; 7. DARE's kept flags applied with the L1 factor; 8. the
 * torch-free executor's linear steps; 9. block sums; 10. sce; 11. arcee_fusion; 12. random_like's
 * Gaussians; 13. DELLA's MAGPRUNE; 14. whole ties, dare_ties and breadcrumbs calls with the steps
 * around them (below).
 *
 * Built by hatch_build.py into tvlang/ops/libtvnative.so.1 when a C compiler is found, loaded by
 * tvlang/ops/native.py through ctypes (which lets go of the GIL during the call); without
 * it numpy and torch compute the same values. No Python headers: C99 with GCC/Clang's
 * __uint128_t.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* On x86-64 Linux the keep bits, the merge, the window gather and MAGPRUNE's row loops are compiled
 * twice, for AVX2 and for the baseline (the merge and MAGPRUNE's last loop also for AVX-512), and the
 * loader picks one for the machine (the values are the same: no fused multiply-add either way). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define MULTI_VERSION __attribute__((target_clones("avx2", "default")))
/* MAGPRUNE's last loop and the sign merge also for AVX-512 (eight doubles, sixteen floats a vector):
 * 4 % of MAGPRUNE's time and 2.5 % of della's row loop on an Intel Xeon */
#define WIDE_VERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTI_VERSION
#define WIDE_VERSION
#endif

typedef __uint128_t u128;

/* PCG64's multiplier (numpy's PCG_DEFAULT_MULTIPLIER_128). */
#define MULTIPLIER (((u128)0x2360ED051FC65DA4ULL << 64) | 0x4385DF649FCCF645ULL)

/* PCG64's output (XSL-RR) of a state: the halves xored, rotated by the state's top 6 bits. */
static inline uint64_t output(u128 state) {
    uint64_t x = (uint64_t)(state >> 64) ^ (uint64_t)state;
    unsigned rot = (unsigned)(state >> 122);
    return (x >> rot) | (x << ((-rot) & 63));
}

/* The two entries of one output: each mask is `scale` where its word >= threshold, else +0.0
 * (as bit patterns: `scale`'s bits and-ed with all ones or with zero). */
static inline void put(uint64_t out, uint32_t threshold, uint32_t scale_bits, uint32_t *mask) {
    uint32_t low = (uint32_t)out >= threshold, high = (uint32_t)(out >> 32) >= threshold;
    mask[0] = scale_bits & (0u - low);
    mask[1] = scale_bits & (0u - high);
}

/* `state` advanced by `steps` outputs (square-and-multiply on the affine step). */
static u128 advance(u128 state, u128 inc, uint64_t steps) {
    u128 mult = 1, plus = 0, cur_mult = MULTIPLIER, cur_plus = inc;
    while (steps) {
        if (steps & 1) {
            mult *= cur_mult;
            plus = plus * cur_mult + cur_plus;
        }
        cur_plus = (cur_mult + 1) * cur_plus;
        cur_mult *= cur_mult;
        steps >>= 1;
    }
    return mult * state + plus;
}

/* Eight interleaved copies of the generator, one step apart, each stepping eight at a time
 * (pcg8_fill): lane j holds the state of the next block's output j + 1. On a processor with
 * AVX-512 (F and DQ) the eight lanes step in one vector each for the state's low and high halves:
 * the low halves' full 128-bit product by the multiplier's low half from four 32-bit products, the
 * cross terms by 64-bit products, the carry of the increment by an unsigned comparison, and the
 * output by one rotate; elsewhere as scalars (pcg8_fill_scalar). The same outputs either way
 * (tests/test_native.py draws them both ways against numpy).
 * Every loop here that draws outputs in bulk uses it but tv_pcg64_drop_f32, the float32 masks' loop,
 * which keeps four copies' steps written out. */
typedef struct {
    uint64_t lo[8], hi[8];
    u128 m8, c8, m4, c4, inc; /* eight steps' multiplier and increment, four steps', one step's */
} pcg8;

/* MULTIPLIER's inverse modulo 2**128 (it is odd): Newton's iteration doubles the bits right each
 * time, from the three that any odd number's own inverse has right. */
static u128 multiplier_inverse(void) {
    u128 x = MULTIPLIER;
    for (int i = 0; i < 6; i++) x *= 2 - MULTIPLIER * x;
    return x;
}

static void pcg8_start(pcg8 *g, u128 state, u128 inc) {
    u128 m2 = MULTIPLIER * MULTIPLIER, m4 = m2 * m2;
    g->m4 = m4;
    g->c4 = inc * ((MULTIPLIER + 1) * (m2 + 1));
    g->m8 = m4 * m4;
    g->c8 = inc * ((MULTIPLIER + 1) * (m2 + 1) * (m4 + 1));
    g->inc = inc;
    for (int j = 0; j < 8; j++) {
        state = state * MULTIPLIER + inc;
        g->lo[j] = (uint64_t)state;
        g->hi[j] = (uint64_t)(state >> 64);
    }
}

/* The generator's state after the outputs drawn so far: one step before lane 0's. */
static u128 pcg8_state(const pcg8 *g) {
    u128 next = ((u128)g->hi[0] << 64) | g->lo[0];
    return (next - g->inc) * multiplier_inverse();
}

/* As scalars, the first four lanes step four at a time (four chains of 128-bit multiplies; eight
 * would not stay in the registers), and the other four follow the last one afterwards. */
MULTI_VERSION static void pcg8_fill_scalar(pcg8 *g, size_t n, uint64_t *out) {
    const u128 m4 = g->m4, c4 = g->c4;
    u128 s0 = ((u128)g->hi[0] << 64) | g->lo[0], s1 = ((u128)g->hi[1] << 64) | g->lo[1];
    u128 s2 = ((u128)g->hi[2] << 64) | g->lo[2], s3 = ((u128)g->hi[3] << 64) | g->lo[3];
    for (size_t i = 0; i < n; i += 4) {
        out[i] = output(s0);
        out[i + 1] = output(s1);
        out[i + 2] = output(s2);
        out[i + 3] = output(s3);
        s0 = s0 * m4 + c4;
        s1 = s1 * m4 + c4;
        s2 = s2 * m4 + c4;
        s3 = s3 * m4 + c4;
    }
    u128 s[8] = {s0, s1, s2, s3};
    for (int j = 4; j < 8; j++) s[j] = s[j - 1] * MULTIPLIER + g->inc;
    for (int j = 0; j < 8; j++) {
        g->lo[j] = (uint64_t)s[j];
        g->hi[j] = (uint64_t)(s[j] >> 64);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* One step of eight lanes by the multiplier m (its halves ml, mh; ml_top = ml >> 32) and the
 * increment c (cl, ch). */
typedef struct {
    __m512i lo, hi;
} lanes128;

__attribute__((target("avx512f,avx512dq"), always_inline)) static inline lanes128 pcg8_step(lanes128 s, __m512i ml,
                                                                                           __m512i ml_top, __m512i mh,
                                                                                           __m512i cl, __m512i ch) {
    const __m512i low32 = _mm512_set1_epi64(0xffffffffLL), one = _mm512_set1_epi64(1);
    /* lo * ml as 128 bits: (a1 2^32 + a0)(b1 2^32 + b0), the four 32-bit products */
    __m512i lo_top = _mm512_srli_epi64(s.lo, 32);
    __m512i p00 = _mm512_mul_epu32(s.lo, ml), p01 = _mm512_mul_epu32(s.lo, ml_top);
    __m512i p10 = _mm512_mul_epu32(lo_top, ml), p11 = _mm512_mul_epu32(lo_top, ml_top);
    __m512i mid = _mm512_add_epi64(_mm512_add_epi64(_mm512_srli_epi64(p00, 32), _mm512_and_si512(p01, low32)),
                                   _mm512_and_si512(p10, low32));
    __m512i new_lo = _mm512_or_si512(_mm512_and_si512(p00, low32), _mm512_slli_epi64(mid, 32));
    __m512i new_hi = _mm512_add_epi64(_mm512_add_epi64(p11, _mm512_srli_epi64(p01, 32)),
                                      _mm512_add_epi64(_mm512_srli_epi64(p10, 32), _mm512_srli_epi64(mid, 32)));
    /* the cross terms' low halves, the increment, and its carry out of the low half */
    new_hi = _mm512_add_epi64(new_hi, _mm512_add_epi64(_mm512_mullo_epi64(s.lo, mh), _mm512_mullo_epi64(s.hi, ml)));
    new_hi = _mm512_add_epi64(new_hi, ch);
    lanes128 t;
    t.lo = _mm512_add_epi64(new_lo, cl);
    t.hi = _mm512_mask_add_epi64(new_hi, _mm512_cmplt_epu64_mask(t.lo, new_lo), new_hi, one);
    return t;
}

__attribute__((target("avx512f,avx512dq"), always_inline)) static inline __m512i pcg8_output(lanes128 s) {
    return _mm512_rorv_epi64(_mm512_xor_si512(s.hi, s.lo), _mm512_srli_epi64(s.hi, 58));
}

#define PCG8_CONSTANTS(name, m, c)                                                                \
    const __m512i name##ml = _mm512_set1_epi64((long long)(uint64_t)(m)),                         \
                  name##mh = _mm512_set1_epi64((long long)(uint64_t)((m) >> 64)),                 \
                  name##ml_top = _mm512_srli_epi64(name##ml, 32),                                 \
                  name##cl = _mm512_set1_epi64((long long)(uint64_t)(c)),                         \
                  name##ch = _mm512_set1_epi64((long long)(uint64_t)((c) >> 64))

/* Each step's products wait on the step before (the 64-bit products' latency), so two sets of
 * lanes step side by side where n allows: the second eight steps ahead of the first, each stepping
 * sixteen at a time. tv_pcg64_words then took 0.82 of the time a word on an Intel Xeon (model 167:
 * 0.36-0.40 ns against 0.44-0.48, the best of 30 rounds of 2**16 words). */
__attribute__((target("avx512f,avx512dq"))) static void pcg8_fill_avx512(pcg8 *g, size_t n, uint64_t *out) {
    PCG8_CONSTANTS(e, g->m8, g->c8); /* eight steps */
    lanes128 s;
    s.lo = _mm512_loadu_si512(g->lo);
    s.hi = _mm512_loadu_si512(g->hi);
    size_t i = 0;
    if (n >= 16) {
        u128 m16 = g->m8 * g->m8, c16 = g->c8 * (g->m8 + 1);
        PCG8_CONSTANTS(x, m16, c16); /* sixteen */
        lanes128 t = pcg8_step(s, eml, eml_top, emh, ecl, ech);
        for (; i + 16 <= n; i += 16) {
            _mm512_storeu_si512(out + i, pcg8_output(s));
            _mm512_storeu_si512(out + i + 8, pcg8_output(t));
            s = pcg8_step(s, xml, xml_top, xmh, xcl, xch);
            t = pcg8_step(t, xml, xml_top, xmh, xcl, xch);
        }
    }
    for (; i < n; i += 8) {
        _mm512_storeu_si512(out + i, pcg8_output(s));
        s = pcg8_step(s, eml, eml_top, emh, ecl, ech);
    }
    _mm512_storeu_si512(g->lo, s.lo);
    _mm512_storeu_si512(g->hi, s.hi);
}

static int pcg_wide = -1; /* whether pcg8_fill steps its lanes as vectors: -1 not asked yet */

static int wide_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}
#endif

/* Whether the eight lanes step as vectors (AVX-512): want 1 where the processor can, 0 never, -1
 * as it is (the first call asks the processor); returns the setting now. For tests and benchmarks. */
int tv_pcg64_wide(int want) {
#if defined(__x86_64__) && defined(__GNUC__)
    /* atomic: the threads that draw may ask at once (any of them stores the same answer) */
    if (want >= 0) __atomic_store_n(&pcg_wide, want && wide_supported(), __ATOMIC_RELAXED);
    if (__atomic_load_n(&pcg_wide, __ATOMIC_RELAXED) < 0) __atomic_store_n(&pcg_wide, wide_supported(), __ATOMIC_RELAXED);
    return __atomic_load_n(&pcg_wide, __ATOMIC_RELAXED);
#else
    (void)want;
    return 0;
#endif
}

/* The next n outputs (n a multiple of 8) into out. */
static void pcg8_fill(pcg8 *g, size_t n, uint64_t *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    int wide = __atomic_load_n(&pcg_wide, __ATOMIC_RELAXED);
    if (wide < 0) wide = tv_pcg64_wide(-1);
    if (wide) {
        pcg8_fill_avx512(g, n, out);
        return;
    }
#endif
    pcg8_fill_scalar(g, n, out);
}

/* The float32 masks of the next `n` entries into `mask_out`.
 *
 * `st` holds the generator as four 64-bit words (state low, state high, increment low,
 * increment high: numpy's `PCG64.state["state"]`); on return its state has moved on by the
 * (n + 1) / 2 outputs used, as numpy's `random_raw((n + 1) // 2)` moves it. An odd `n` uses
 * the low half of its last output and drops the high half, as the numpy path does. */
void tv_pcg64_drop_f32(uint64_t *st, size_t n, uint32_t threshold, float scale, float *mask_out) {
    u128 state = ((u128)st[1] << 64) | st[0], inc = ((u128)st[3] << 64) | st[2];
    uint32_t scale_bits, *mask = (uint32_t *)mask_out;
    memcpy(&scale_bits, &scale, sizeof scale_bits);
    size_t i = 0, rounds = n / 8; /* each round: four outputs, eight entries */
    if (rounds) {
        u128 m2 = MULTIPLIER * MULTIPLIER, m4 = m2 * m2;
        u128 c4 = inc * (MULTIPLIER * m2 + m2 + MULTIPLIER + 1); /* four steps' increment */
        u128 s0 = state * MULTIPLIER + inc, s1 = s0 * MULTIPLIER + inc;
        u128 s2 = s1 * MULTIPLIER + inc, s3 = s2 * MULTIPLIER + inc;
        for (size_t r = 0; r < rounds; r++, i += 8) {
            uint64_t o0 = output(s0), o1 = output(s1), o2 = output(s2), o3 = output(s3);
            s0 = s0 * m4 + c4;
            s1 = s1 * m4 + c4;
            s2 = s2 * m4 + c4;
            s3 = s3 * m4 + c4;
            put(o0, threshold, scale_bits, mask + i);
            put(o1, threshold, scale_bits, mask + i + 2);
            put(o2, threshold, scale_bits, mask + i + 4);
            put(o3, threshold, scale_bits, mask + i + 6);
        }
        state = advance(state, inc, 4 * (uint64_t)rounds);
    }
    for (; i < n; i += 2) { /* the last 0-7 entries, one output at a time */
        state = state * MULTIPLIER + inc;
        uint64_t out = output(state);
        if (n - i >= 2) {
            put(out, threshold, scale_bits, mask + i);
        } else {
            mask[i] = scale_bits & (0u - (uint32_t)((uint32_t)out >= threshold));
        }
    }
    st[0] = (uint64_t)state;
    st[1] = (uint64_t)(state >> 64);
}

#define KEEP_BATCH 64 /* rounds of outputs tv_pcg64_keep_bits draws before it makes their bytes */
typedef uint32_t words8 __attribute__((vector_size(32)));
typedef int32_t signed8 __attribute__((vector_size(32)));

/* The keep bits of one round's eight words (four outputs, each low half first) as one byte, the
 * first in the high bit: the eight comparisons at once (unsigned, as signed ones of the words with
 * their top bit flipped), each lane's bit picked by its weight, the lanes or-ed together. */
static inline unsigned keep_byte(const uint64_t o[4], uint32_t threshold) {
    const words8 flip = {0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u,
                         0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u};
    const words8 weight = {128, 64, 32, 16, 8, 4, 2, 1};
    words8 w, t = flip ^ threshold;
    memcpy(&w, o, sizeof w); /* little-endian: word k is entry k */
    words8 bits = (words8)((signed8)(w ^ flip) >= (signed8)t) & weight;
    bits |= __builtin_shuffle(bits, (words8){4, 5, 6, 7, 0, 1, 2, 3});
    bits |= __builtin_shuffle(bits, (words8){2, 3, 0, 1, 2, 3, 0, 1});
    return bits[0] | bits[1];
}

/* The same outputs as keep bits (the torch-free executor's fused DARE calls, sections 8 and 14):
 * an entry's bit is set where its word is at least `threshold`, eight entries a byte, the first in
 * the high bit (numpy's packbits order); the state moves on as tv_pcg64_drop_f32 moves it. The
 * outputs of KEEP_BATCH rounds are drawn before their bytes are made eight comparisons at a time
 * (keep_byte): 1.9 cycles an entry, against 2.8 with the bits or-ed one by one and 4.5 with each
 * byte made from the four outputs just stored (its load waited for their stores). */
MULTI_VERSION void tv_pcg64_keep_bits(uint64_t *st, size_t n, uint32_t threshold, uint8_t *packed) {
    u128 state = ((u128)st[1] << 64) | st[0], inc = ((u128)st[3] << 64) | st[2];
    size_t i = 0, rounds = n / 16 * 2; /* each round: four outputs, eight entries, one byte; pairs of them */
    if (rounds) {
        pcg8 g;
        pcg8_start(&g, state, inc);
        uint64_t o[4 * KEEP_BATCH];
        for (size_t r = 0; r < rounds; r += KEEP_BATCH) { /* the outputs of a batch, then its bytes */
            size_t batch = rounds - r < KEEP_BATCH ? rounds - r : KEEP_BATCH;
            pcg8_fill(&g, 4 * batch, o);
            for (size_t q = 0; q < batch; q++) packed[r + q] = (uint8_t)keep_byte(o + 4 * q, threshold);
        }
        i = 8 * rounds;
        state = pcg8_state(&g);
    }
    if (i < n) { /* the last 1-15 entries, one output at a time, in their bytes */
        memset(packed + i / 8, 0, (n - i + 7) / 8);
        for (; i < n; i += 2) {
            state = state * MULTIPLIER + inc;
            uint64_t out = output(state);
            packed[i / 8] |= (uint8_t)((unsigned)((uint32_t)out >= threshold) << (7 - (i & 7)));
            if (n - i >= 2) packed[i / 8] |= (uint8_t)((unsigned)((uint32_t)(out >> 32) >= threshold) << (6 - (i & 7)));
        }
    }
    st[0] = (uint64_t)state;
    st[1] = (uint64_t)(state >> 64);
}

/* ---- 2. ties' sign election and disjoint merge, unit weights ------------------------------
 *
 * tvlang.ops.ties.sign_merge with every weight 1, entry by entry in one pass instead of about
 * twenty torch calls over scratch tensors. It repeats the torch path's float32 operations in
 * the same order, so the values are the same bit for bit, -0.0 and infinities included, and
 * NaN where the torch path has NaN (not always with the same sign bit: which NaN an
 * operation passes on depends on its operands' order; tests/test_native.py compares the two):
 *   torch.sign(x) is 1 for x > 0, -1 for x < 0, else +0.0 (0 for NaN and both zeros);
 *   clamp_(min=0) keeps NaN and -0.0 (x < 0 becomes 0, nothing else changes);
 *   the tally is p0 + p1 + ... in order ("total") or 0 + sign(p0) + sign(p1) + ...
 *   ("frequency"); the elected sign is -1 where the tally is below 0, else +1 (NaN: +1);
 *   the first input's agreeing part is clamp(p0 * e) + 0.0 (a -0.0 turned +0.0), its count
 *   sign(that); each further input adds clamp(p * e) and sign(clamp(p * e));
 *   the result is total * e, divided by max(count, 1) ("mean") or by the count with 0 read
 *   as 1 ("weighted_mean": the same for counts), not divided ("sum").
 * Built with -ffp-contract=off so no multiply and add are fused into one rounding. */

/* Branch-free forms: the signs are unpredictable, and a mispredicted branch each costs more
 * than the rest of the loop. */
static inline float torch_sign(float x) { return (float)(x > 0.0f) - (float)(x < 0.0f); }

static inline float zero_where(float v, uint32_t inside) { /* v, or +0.0 where inside is 1 */
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= inside - 1u;
    memcpy(&v, &bits, sizeof bits);
    return v;
}

static inline float clamp_min0(float x) { return zero_where(x, (uint32_t)(x < 0.0f)); }

#define TILE 512 /* entries a step covers at a time: its scratch rows stay in the L1 cache */

/* merge: 0 sum, 1 mean, 2 weighted_mean. `parts` holds k >= 1 pointers to n floats each.
 * Step by step over tiles of TILE entries, each step a loop the compiler vectorizes. */
WIDE_VERSION void tv_sign_merge_f32(const float *const *parts, size_t k, size_t n, int frequency, int merge, float *out) {
    float tally[TILE], e[TILE], total[TILE], count[TILE];
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        const float *p = parts[0] + start;
        if (frequency) {
            for (size_t j = 0; j < m; j++) tally[j] = 0.0f + torch_sign(p[j]);
        } else {
            for (size_t j = 0; j < m; j++) tally[j] = p[j];
        }
        for (size_t i = 1; i < k; i++) {
            const float *q = parts[i] + start;
            if (frequency) {
                for (size_t j = 0; j < m; j++) tally[j] += torch_sign(q[j]);
            } else {
                for (size_t j = 0; j < m; j++) tally[j] += q[j];
            }
        }
        for (size_t j = 0; j < m; j++) e[j] = 1.0f - 2.0f * (float)(tally[j] < 0.0f);
        for (size_t j = 0; j < m; j++) {
            total[j] = clamp_min0(p[j] * e[j]) + 0.0f;
            count[j] = torch_sign(total[j]);
        }
        for (size_t i = 1; i < k; i++) {
            const float *q = parts[i] + start;
            for (size_t j = 0; j < m; j++) {
                float agree = clamp_min0(q[j] * e[j]);
                total[j] += agree;
                count[j] += torch_sign(agree);
            }
        }
        float *o = out + start;
        if (merge) { /* counts are whole numbers >= 0: max(count, 1) and "0 read as 1" agree */
            for (size_t j = 0; j < m; j++) o[j] = total[j] * e[j] / (count[j] + (float)(count[j] == 0.0f));
        } else {
            for (size_t j = 0; j < m; j++) o[j] = total[j] * e[j];
        }
    }
}

/* ---- 3. The window pass of a magnitude threshold -------------------------------------------
 *
 * tvlang.ops.threshold.WindowSelect's first pass over float32 bit patterns (as int32): the
 * magnitudes' patterns (`& 0x7FFFFFFF`: ordered as the magnitudes, NaN above inf) that lie in
 * the window [lo, hi] are copied to `inside`, in order, and those above `hi` counted (no upper
 * end without `has_hi`), where numpy takes five passes and a boolean gather. In steps of
 * STEP entries: a loop the compiler vectorizes flags the entries inside, then the flags are
 * read eight at a time, skipping the groups with none (most: a window holds a few percent of
 * the entries). `inside` has room for n + 1 entries (each of a group is written, the count
 * moves on for those inside). Returns how many are inside; adds the count above to *above. */
#define STEP 4096

/* The m patterns of r whose flag is 1, as magnitudes, into inside from `count` on: the flags read
 * eight at a time, the groups without one skipped. Returns the new count. */
static inline size_t gather_flagged(const int32_t *r, const uint8_t *flags, size_t m, int32_t *inside, size_t count) {
    size_t j = 0;
    for (; j + 8 <= m; j += 8) {
        uint64_t group;
        memcpy(&group, flags + j, sizeof group);
        if (!group) continue;
        for (size_t t = 0; t < 8; t++) {
            inside[count] = r[j + t] & 0x7FFFFFFF;
            count += flags[j + t];
        }
    }
    for (; j < m; j++) {
        inside[count] = r[j] & 0x7FFFFFFF;
        count += flags[j];
    }
    return count;
}

/* On x86-64 with AVX2, both gathers take eight patterns at a time: two comparisons flag those inside
 * the window, and the lanes flagged are packed to the front of the vector (a permutation from a
 * table of the 256 flag bytes) and stored at inside + count, which moves on by how many there
 * were: no pass over a flags buffer, no branch. The store writes eight lanes where fewer are
 * inside; count <= j before each group of j..j+7, so it stays within inside[0 .. n). The loops
 * below take the last n % 8 entries. The same patterns in the same order, and the same counts, as
 * those loops alone give (tests/test_native.py). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GATHER_VECTORS 1
static uint32_t pack_lanes[256][8]; /* for each flag byte, the lanes flagged in order, then lane 0 */
static int vectors_ok;              /* whether this machine has AVX2 (and POPCNT) */

/* Run once as the library is loaded (one thread), before any call. */
__attribute__((constructor)) static void fill_pack_lanes(void) {
    for (int mask = 0; mask < 256; mask++) {
        int k = 0;
        for (int lane = 0; lane < 8; lane++)
            if (mask >> lane & 1) pack_lanes[mask][k++] = (uint32_t)lane;
        for (; k < 8; k++) pack_lanes[mask][k] = 0;
    }
    __builtin_cpu_init();
    vectors_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

/* Windows w < k (k is 1 or 2) over r[0 .. n - n % 8): inside[w] from got[w] on, those above hi[w]
 * added to over[w]; returns the entries done (n rounded down to eight). */
__attribute__((target("avx2,popcnt"))) static size_t gather_vectors(const int32_t *r, size_t n, int k,
                                                                   const int32_t *lo, const int32_t *hi,
                                                                   int32_t *const *inside, size_t *got,
                                                                   uint64_t *over) {
    __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i vlo0 = _mm256_set1_epi32(lo[0]), vhi0 = _mm256_set1_epi32(hi[0]);
    __m256i vlo1 = _mm256_set1_epi32(lo[k - 1]), vhi1 = _mm256_set1_epi32(hi[k - 1]);
    int32_t *in0 = inside[0], *in1 = inside[k - 1];
    size_t c0 = got[0], c1 = got[k - 1];
    uint64_t o0 = 0, o1 = 0;
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i v = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(r + j)), magnitude);
        __m256i above0 = _mm256_cmpgt_epi32(v, vhi0);
        unsigned out0 = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(above0,
                                                                        _mm256_cmpgt_epi32(vlo0, v))));
        unsigned in = ~out0 & 0xFFu;
        o0 += (uint64_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(above0)));
        __m256i lanes = _mm256_loadu_si256((const __m256i *)pack_lanes[in]);
        _mm256_storeu_si256((__m256i *)(in0 + c0), _mm256_permutevar8x32_epi32(v, lanes));
        c0 += (size_t)__builtin_popcount(in);
        if (k == 2) {
            __m256i above1 = _mm256_cmpgt_epi32(v, vhi1);
            unsigned out1 = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(above1,
                                                                            _mm256_cmpgt_epi32(vlo1, v))));
            unsigned in1m = ~out1 & 0xFFu;
            o1 += (uint64_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(above1)));
            lanes = _mm256_loadu_si256((const __m256i *)pack_lanes[in1m]);
            _mm256_storeu_si256((__m256i *)(in1 + c1), _mm256_permutevar8x32_epi32(v, lanes));
            c1 += (size_t)__builtin_popcount(in1m);
        }
    }
    got[0] = c0;
    over[0] += o0;
    if (k == 2) {
        got[1] = c1;
        over[1] += o1;
    }
    return j;
}

/* below_top's loop, eight words at a time (limit < 2**32 here): the columns j .. j+7 whose word is
 * below `limit`, packed to the front as gather_vectors packs its patterns, stored at want + *n
 * (*n <= j, so within want[0 .. m)). Returns the columns done (m rounded down to eight). */
__attribute__((target("avx2,popcnt"))) static size_t below_vectors(const uint32_t *words, size_t m, uint32_t limit,
                                                                  uint32_t *want, size_t *n) {
    __m256i flip = _mm256_set1_epi32((int32_t)0x80000000u);
    __m256i bound = _mm256_set1_epi32((int32_t)(limit ^ 0x80000000u));
    __m256i columns = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_epi32(8);
    size_t count = *n, j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(words + j)), flip);
        unsigned below = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bound, w)));
        __m256i lanes = _mm256_loadu_si256((const __m256i *)pack_lanes[below]);
        _mm256_storeu_si256((__m256i *)(want + count), _mm256_permutevar8x32_epi32(columns, lanes));
        count += (size_t)__builtin_popcount(below);
        columns = _mm256_add_epi32(columns, eight);
    }
    *n = count;
    return j;
}
#endif

MULTI_VERSION size_t tv_window_gather(const int32_t *raw, size_t n, int32_t lo, int32_t hi, int has_hi, int32_t *inside,
                                      uint64_t *above) {
    uint8_t flags[STEP];
    size_t count = 0, begin = 0; /* the entries from `begin` on: this loop's (those before: the vectors') */
    uint64_t over = 0;
    if (!has_hi) hi = INT32_MAX;
#ifdef GATHER_VECTORS
    if (vectors_ok) {
        int32_t *const windows[1] = {inside};
        begin = gather_vectors(raw, n, 1, &lo, &hi, windows, &count, &over);
    }
#endif
    for (size_t start = begin; start < n; start += STEP) {
        size_t m = n - start < STEP ? n - start : STEP;
        const int32_t *r = raw + start;
        uint32_t step_over = 0;
        for (size_t j = 0; j < m; j++) {
            int32_t v = r[j] & 0x7FFFFFFF;
            step_over += v > hi;
            flags[j] = (uint8_t)((v >= lo) & (v <= hi));
        }
        over += step_over;
        count = gather_flagged(r, flags, m, inside, count);
    }
    *above += over;
    return count;
}

/* Two windows of the same patterns in one pass (breadcrumbs' two cuts on one input): what two
 * calls of tv_window_gather give, the first window's into inside[0], the second's into
 * inside[1], their counts into count[0] and count[1], those above each added to above[0] and
 * above[1]; the entries read once instead of twice. */
MULTI_VERSION void tv_window_gather2(const int32_t *raw, size_t n, const int32_t *lo, const int32_t *hi,
                                     const int *has_hi, int32_t *const *inside, size_t *count, uint64_t *above) {
    uint8_t flags[2][STEP];
    size_t got[2] = {0, 0};
    uint64_t over[2] = {0, 0};
    int32_t lo0 = lo[0], lo1 = lo[1], hi0 = has_hi[0] ? hi[0] : INT32_MAX, hi1 = has_hi[1] ? hi[1] : INT32_MAX;
    size_t begin = 0; /* the entries from here on: this loop's (those before: the vectors') */
#ifdef GATHER_VECTORS
    if (vectors_ok) {
        const int32_t los[2] = {lo0, lo1}, his[2] = {hi0, hi1};
        begin = gather_vectors(raw, n, 2, los, his, inside, got, over);
    }
#endif
    for (size_t start = begin; start < n; start += STEP) {
        size_t m = n - start < STEP ? n - start : STEP;
        const int32_t *r = raw + start;
        uint32_t over0 = 0, over1 = 0;
        for (size_t j = 0; j < m; j++) {
            int32_t v = r[j] & 0x7FFFFFFF;
            over0 += v > hi0;
            over1 += v > hi1;
            flags[0][j] = (uint8_t)((v >= lo0) & (v <= hi0));
            flags[1][j] = (uint8_t)((v >= lo1) & (v <= hi1));
        }
        over[0] += over0;
        over[1] += over1;
        for (int w = 0; w < 2; w++) got[w] = gather_flagged(r, flags[w], m, inside[w], got[w]);
    }
    for (int w = 0; w < 2; w++) {
        count[w] = got[w];
        above[w] += over[w];
    }
}

/* ---- 4. A band of magnitudes: breadcrumbs' trim --------------------------------------------
 *
 * tvlang.ops.prune.trim with both cuts, `hardshrink(x, lo) - hardshrink(x, hi)` (the entries
 * with lo < |x| <= hi, where lo and hi are the largest floats below the two thresholds), in
 * one pass instead of three torch calls: torch's hardshrink is `(x >= -l && x <= l) ? 0 : x`
 * (so NaN stays NaN), and the difference is taken as torch takes it (an infinity above the
 * band gives inf - inf = NaN, as there). */
MULTI_VERSION void tv_band_f32(const float *x, size_t n, float lo, float hi, float *out) {
    for (size_t j = 0; j < n; j++) { /* & rather than &&: no branch, so the loop vectorizes */
        float v = x[j];
        float kept = zero_where(v, (uint32_t)(v >= -lo) & (uint32_t)(v <= lo));
        float above = zero_where(v, (uint32_t)(v >= -hi) & (uint32_t)(v <= hi));
        out[j] = kept - above;
    }
}

/* One cut: tvlang.ops.prune.trim with a lower threshold only, torch's `hardshrink(x, lo)` (the
 * entries with |x| > lo, where lo is the largest float below the threshold): the torch-free
 * executor's trim of `ties` (tvlang/run/direct.py). */
MULTI_VERSION void tv_hardshrink_f32(const float *x, size_t n, float lo, float *out) {
    for (size_t j = 0; j < n; j++) {
        float v = x[j];
        out[j] = zero_where(v, (uint32_t)(v >= -lo) & (uint32_t)(v <= lo));
    }
}

/* ---- 5. RAM and RAM+ (tvlang/ops/ram.py) -------------------------------------------------------
 *
 * An input contributes at an entry when |x| > eps (eps as float32, as torch compares a float32
 * tensor with a number). `ram`: total = 0 + x_0*m_0 + x_1*m_1 + ..., in input order, with m the
 * 0/1 mask (so a NaN input makes NaN, as x*0 does there), divided by max(count, 1): the
 * operations torch's kernel does, entry by entry, in one pass over tiles instead of four
 * passes per input. Each product is exact (m is 0 or 1), so no fused multiply-add in torch
 * could round differently. The comparisons go through an int (`int in = ...; (float)in`):
 * GCC 12 takes `(float)(a > b)` used in a product for control flow and leaves the loop
 * scalar, with a branch the data mispredicts (24 ns an entry instead of about 1). */
static inline float contributes(float v, float eps) {
    int in = fabsf(v) > eps;
    return (float)in;
}

static inline float at_least_1(float count) { /* max(count, 1) for whole numbers >= 0 */
    int zero = count < 1.0f;
    return count + (float)zero;
}

MULTI_VERSION void tv_ram_f32(const float *const *parts, size_t k, size_t n, float eps, float *out) {
    float total[TILE], count[TILE];
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        for (size_t j = 0; j < m; j++) total[j] = count[j] = 0.0f;
        for (size_t i = 0; i < k; i++) {
            const float *q = parts[i] + start;
            for (size_t j = 0; j < m; j++) {
                float v = q[j];
                float mask = contributes(v, eps);
                total[j] = total[j] + v * mask;
                count[j] = count[j] + mask;
            }
        }
        float *o = out + start;
        for (size_t j = 0; j < m; j++) o[j] = total[j] / at_least_1(count[j]);
    }
}

/* How many inputs contribute at each of the m entries from `start`: count[j], a whole number. */
static inline void contributors(const float *const *parts, size_t k, size_t start, size_t m, float eps,
                                float *count) {
    for (size_t j = 0; j < m; j++) count[j] = 0.0f;
    for (size_t i = 0; i < k; i++) {
        const float *q = parts[i] + start;
        for (size_t j = 0; j < m; j++) count[j] = count[j] + contributes(q[j], eps);
    }
}

/* RAM+'s counting pass: per input i, the entries where it contributes with others
 * (shared[i] += ...) and alone (unique[i] += ...). */
MULTI_VERSION void tv_ramplus_count_f32(const float *const *parts, size_t k, size_t n, float eps, uint64_t *shared,
                                        uint64_t *unique) {
    float count[TILE];
    uint32_t alone[TILE], with_others[TILE];
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        contributors(parts, k, start, m, eps, count);
        for (size_t j = 0; j < m; j++) {
            int one = count[j] == 1.0f, more = count[j] > 1.0f;
            alone[j] = (uint32_t)one;
            with_others[j] = (uint32_t)more;
        }
        for (size_t i = 0; i < k; i++) {
            const float *q = parts[i] + start;
            uint32_t s = 0, u = 0;
            for (size_t j = 0; j < m; j++) {
                int in = fabsf(q[j]) > eps;
                s += (uint32_t)in & with_others[j];
                u += (uint32_t)in & alone[j];
            }
            shared[i] += s;
            unique[i] += u;
        }
    }
}

/* RAM+'s merge, as RamPlusCounts.apply computes it with torch: with c the count, share =
 * (c > 1) / max(c, 1), and out = 0 + (x_0*m_0) * ((c == 1)*boost_0 + share) + ... in input
 * order, each operation rounded to float32 as there. */
MULTI_VERSION void tv_ramplus_apply_f32(const float *const *parts, size_t k, size_t n, float eps, const float *boosts,
                                        float *out) {
    float count[TILE], alone[TILE], share[TILE], total[TILE];
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        contributors(parts, k, start, m, eps, count);
        for (size_t j = 0; j < m; j++) {
            int one = count[j] == 1.0f, more = count[j] > 1.0f;
            total[j] = 0.0f;
            alone[j] = (float)one;
            share[j] = (float)more / at_least_1(count[j]);
        }
        for (size_t i = 0; i < k; i++) {
            const float *q = parts[i] + start;
            float boost = boosts[i];
            for (size_t j = 0; j < m; j++) {
                float v = q[j];
                total[j] = total[j] + (v * contributes(v, eps)) * (alone[j] * boost + share[j]);
            }
        }
        float *o = out + start;
        for (size_t j = 0; j < m; j++) o[j] = total[j];
    }
}

/* ---- 6. nearswap (tvlang/ops/nearswap.py) -------------------------------------------------------
 *
 * w = clamp(t * (1 / clamp(|a - b|, min=1e-6)), 0, 1), out = w*b + (-w + 1)*a, each operation
 * rounded to float32 in the order torch's nine calls take, in one pass. torch's clamp keeps a NaN
 * (its maximum and minimum propagate one), so the comparisons here do too. */
static inline float pick(int cond, float yes, float no) { /* branch-free: yes where cond */
    uint32_t m = -(uint32_t)cond, y, n, r;
    memcpy(&y, &yes, sizeof y);
    memcpy(&n, &no, sizeof n);
    r = (y & m) | (n & ~m);
    memcpy(&yes, &r, sizeof r);
    return yes;
}

static inline float clamp_low(float x, float lo) { int keep = (x > lo) | (x != x); return pick(keep, x, lo); }
static inline float clamp_high(float x, float hi) { int keep = (x < hi) | (x != x); return pick(keep, x, hi); }

MULTI_VERSION void tv_nearswap_f32(const float *a, const float *b, size_t n, float t, float *out) {
    for (size_t j = 0; j < n; j++) {
        float d = clamp_low(fabsf(a[j] - b[j]), 1e-6f);
        float w = clamp_high(clamp_low((1.0f / d) * t, 0.0f), 1.0f);
        float taken = w * b[j];
        float kept = (-w + 1.0f) * a[j];
        out[j] = taken + kept;
    }
}

/* ---- 7. Kept flags times an input, times a factor (tvlang/ops/chunks.py, _Drops) --------------
 *
 * `dare`'s L1 rescale keeps each entry's keep flag from its pass (numpy.packbits: eight a byte,
 * the first in the high bit); the main pass multiplies each input by its flags (x * 1.0 or
 * x * 0.0, so an infinity dropped is NaN, as torch gives) and then by the input's factor when it
 * has one: two float32 products, rounded as torch's two calls round them, in one pass instead of
 * an unpack, a conversion and two multiplications. */
static float flag_floats[256][8]; /* for each flag byte, its eight flags as 1.0f or 0.0f, high bit first */

/* Run once as the library is loaded (one thread), before any call. */
__attribute__((constructor)) static void fill_flag_floats(void) {
    for (unsigned v = 0; v < 256; v++)
        for (unsigned k = 0; k < 8; k++) flag_floats[v][k] = (float)((v >> (7 - k)) & 1u);
}

/* The flags of a byte come from flag_floats (a row of eight floats a byte, so the products
 * vectorize eight at a time); the same two products, in the same order, as flag by flag. */
MULTI_VERSION void tv_flags_scale_f32(const float *x, const uint8_t *packed, size_t n, int has_factor, float factor,
                                      float *out) {
    size_t whole = n / 8 * 8;
    if (has_factor) {
        for (size_t j = 0; j < whole; j += 8) {
            const float *flag = flag_floats[packed[j >> 3]];
            for (int b = 0; b < 8; b++) out[j + b] = (x[j + b] * flag[b]) * factor;
        }
    } else {
        for (size_t j = 0; j < whole; j += 8) {
            const float *flag = flag_floats[packed[j >> 3]];
            for (int b = 0; b < 8; b++) out[j + b] = x[j + b] * flag[b];
        }
    }
    for (size_t j = whole; j < n; j++) {
        float kept = x[j] * flag_floats[packed[j >> 3]][j & 7];
        out[j] = has_factor ? kept * factor : kept;
    }
}

/* ---- 8. The linear steps of a recipe, as torch computes them (tvlang/run/direct.py) -------------
 *
 * torch's CPU kernels compute `mul(x, c)` as one float32 product and `add(x, y, alpha=c)` as one
 * fused multiply-add, fma(y, c, x) (ATen's vectorized add on machines with AVX2 and FMA, the
 * kernels it picks there), so these give the same bits on such a machine; tv_fma_ok says whether
 * this one is (the torch-free executor runs only there). tv_nonfinite_f32 is nonzero when an entry
 * is a NaN or an infinity (its exponent bits all ones). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FMA_TARGET __attribute__((target("avx2,fma")))
#define F16C_TARGET __attribute__((target("avx2,fma,f16c")))
int tv_fma_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
#define FMA_TARGET
#define F16C_TARGET
int tv_fma_ok(void) { return 0; }
#endif

FMA_TARGET void tv_scale_f32(const float *x, float c, size_t n, float *out) {
    for (size_t j = 0; j < n; j++) out[j] = x[j] * c;
}

FMA_TARGET void tv_axpy_f32(float *acc, const float *x, float c, size_t n) {
    for (size_t j = 0; j < n; j++) acc[j] = fmaf(x[j], c, acc[j]);
}

/* A run of linear steps on one buffer, in one pass (tvlang/run/direct.py, _linear_run): out = first *
 * c0, or first itself where `copy` (a `set` with coefficient 1), then out = fma(xs[i], cs[i], out)
 * for each i in turn: the same IEEE operations in the same order as tv_scale_f32 and the
 * tv_axpy_f32 calls of the steps, so the same bits, but each input read once and out written once,
 * a block at a time while it sits in the L1 cache. Returns nonzero when an entry of out is a NaN
 * or an infinity (as tv_nonfinite_f32). out may be first. */
#define LINEAR_BLOCK 1024
FMA_TARGET int tv_linear_run_f32(const float *first, float c0, int copy, const float *const *xs, const float *cs,
                                 size_t k, size_t n, float *out) {
    uint32_t bad = 0;
    for (size_t s = 0; s < n; s += LINEAR_BLOCK) {
        size_t m = n - s < LINEAR_BLOCK ? n - s : LINEAR_BLOCK;
        float *o = out + s;
        const float *f = first + s;
        if (!copy) {
            for (size_t j = 0; j < m; j++) o[j] = f[j] * c0;
        } else if (o != f) {
            memcpy(o, f, m * sizeof(float));
        }
        for (size_t i = 0; i < k; i++) {
            const float *x = xs[i] + s;
            float c = cs[i];
            for (size_t j = 0; j < m; j++) o[j] = fmaf(x[j], c, o[j]);
        }
        const uint32_t *bits = (const uint32_t *)o;
        for (size_t j = 0; j < m; j++) bad |= (uint32_t)((bits[j] & 0x7f800000u) == 0x7f800000u);
    }
    return (int)bad;
}

/* tv_window_gather (k = 1) or tv_window_gather2 (k = 2) of the patterns of fma(x, c, a), an axpy's
 * result (a call's input `a - pre`, in the pass that finds its threshold), without writing it to
 * a buffer: a block of STEP entries at a time is made on the stack, where it stays in the L1
 * cache, and gathered from there. The same patterns, counts and order as tv_linear_run_f32 (the
 * axpy: fmaf(x[j], c, a[j])) then the gather over its result. inside[w]: room for n + 1; count[w]
 * set, above[w] added to. */
FMA_TARGET void tv_window_gather_axpy(const float *a, const float *x, float c, size_t n, int k, const int32_t *lo,
                                      const int32_t *hi, const int *has_hi, int32_t *const *inside, size_t *count,
                                      uint64_t *above) {
    float block[STEP];
    size_t got[2] = {0, 0};
    for (size_t s = 0; s < n; s += STEP) {
        size_t m = n - s < STEP ? n - s : STEP;
        for (size_t j = 0; j < m; j++) block[j] = fmaf(x[s + j], c, a[s + j]);
        if (k == 1) {
            got[0] += tv_window_gather((const int32_t *)block, m, lo[0], hi[0], has_hi[0], inside[0] + got[0], above);
        } else {
            int32_t *const at[2] = {inside[0] + got[0], inside[1] + got[1]};
            size_t these[2];
            tv_window_gather2((const int32_t *)block, m, lo, hi, has_hi, at, these, above);
            got[0] += these[0];
            got[1] += these[1];
        }
    }
    for (int w = 0; w < k; w++) count[w] = got[w];
}

/* A plain DARE call between the linear steps around it, in one pass (tvlang/run/direct.py,
 * _fused_drop): x = fma(b, cb, a), the axpy that makes the call's input (a - pre); x * mask, the
 * call (mask: 0 or the rescale factor); fma(that, c, base), the axpy or add that takes its result,
 * with base = acc, times `first` where that is not 1 (the add's first term). The same IEEE
 * operations in the same order as the three steps, so the same bits; one pass over a, b, the mask
 * and acc instead of three. out may be acc. */
FMA_TARGET void tv_drop_axpy_f32(const float *a, const float *b, float cb, const float *mask, const float *acc,
                                 float first, float c, size_t n, float *out) {
    if (first == 1.0f) {
        for (size_t j = 0; j < n; j++) out[j] = fmaf(fmaf(b[j], cb, a[j]) * mask[j], c, acc[j]);
    } else {
        for (size_t j = 0; j < n; j++) out[j] = fmaf(fmaf(b[j], cb, a[j]) * mask[j], c, acc[j] * first);
    }
}

/* Masks as keep bits (tv_pcg64_keep_bits: numpy's packbits order, from bit `offset` of `packed`):
 * an entry's mask is `scale` where its bit is set, +0.0 where not (as bit patterns, without a
 * branch), so the product is the float32 mask's. The masks' thread writes, and the loops read, a
 * bit an entry instead of four bytes. (With keep bits, a plain DARE call and the steps around it
 * run in section 14's loop.) */
static inline float keep_scale(const uint8_t *packed, size_t at, uint32_t scale_bits) {
    uint32_t bit = (packed[at >> 3] >> (7 - (at & 7))) & 1u, v = scale_bits & (0u - bit);
    float f;
    memcpy(&f, &v, sizeof f);
    return f;
}

/* Each byte's eight masks (`scale` or +0.0, bit 7 first): whole bytes of keep bits then run eight
 * entries a vector. */
static void keep_table(float table[256][8], uint32_t scale_bits) {
    for (unsigned v = 0; v < 256; v++) {
        for (unsigned k = 0; k < 8; k++) {
            uint32_t bits = scale_bits & (0u - ((v >> (7 - k)) & 1u));
            memcpy(&table[v][k], &bits, sizeof bits);
        }
    }
}

/* An input of a DARE call made in the same pass (tvlang/run/direct.py, _Fusions.subs): out =
 * fma(b, cb, a) * mask, the axpy that made the input (a - pre) and the call's product, the same
 * operations as the two steps; the mask as floats, or as keep bits from bit `offset`. */
FMA_TARGET void tv_sub_mask_f32(const float *a, const float *b, float cb, const float *mask, size_t n, float *out) {
    for (size_t j = 0; j < n; j++) out[j] = fmaf(b[j], cb, a[j]) * mask[j];
}

/* fma(b, cb, a) * mask (a * mask where b is NULL), the masks as keep bits from bit `offset`, their
 * byte's eight masks from `table` (keep_table) where whole bytes start: tv_sub_bits_f32's loop and
 * the tile loop's (section 14). */
static FMA_TARGET void sub_times_bits(const float *a, const float *b, float cb, const uint8_t *packed, size_t offset,
                                      const float table[256][8], uint32_t scale_bits, size_t n, float *out) {
    size_t j = 0;
    for (; j < n && ((offset + j) & 7); j++)
        out[j] = (b ? fmaf(b[j], cb, a[j]) : a[j]) * keep_scale(packed, offset + j, scale_bits);
#if defined(__x86_64__) && defined(__GNUC__)
    __m256 vcb = _mm256_set1_ps(cb);
    for (; j + 8 <= n; j += 8) {
        __m256 mask = _mm256_loadu_ps(table[packed[(offset + j) >> 3]]);
        __m256 x = _mm256_loadu_ps(a + j);
        if (b) x = _mm256_fmadd_ps(_mm256_loadu_ps(b + j), vcb, x);
        _mm256_storeu_ps(out + j, _mm256_mul_ps(x, mask));
    }
#else
    for (; j + 8 <= n; j += 8) {
        const float *mask = table[packed[(offset + j) >> 3]];
        for (size_t k = 0; k < 8; k++) out[j + k] = (b ? fmaf(b[j + k], cb, a[j + k]) : a[j + k]) * mask[k];
    }
#endif
    for (; j < n; j++) out[j] = (b ? fmaf(b[j], cb, a[j]) : a[j]) * keep_scale(packed, offset + j, scale_bits);
}

FMA_TARGET void tv_sub_bits_f32(const float *a, const float *b, float cb, const uint8_t *packed, size_t offset,
                                float scale, size_t n, float *out) {
    uint32_t scale_bits;
    memcpy(&scale_bits, &scale, sizeof scale_bits);
    float table[256][8];
    keep_table(table, scale_bits);
    sub_times_bits(a, b, cb, packed, offset, (const float (*)[8])table, scale_bits, n, out);
}

/* ties' and dare_ties' sign merge followed by the step that takes it (tvlang/run/direct.py,
 * _Fusions.merges): out = fma(merged, c, base) (base times `first` where that is not 1), a tile
 * of TILE entries at a time, the merge into a tile on the stack first: the same operations as the
 * merge and the axpy or add after it, one pass instead of three. out may be base. */
static FMA_TARGET void axpy_tile(const float *merged, const float *base, float first, float c, size_t m, float *out) {
    if (first == 1.0f) {
        for (size_t j = 0; j < m; j++) out[j] = fmaf(merged[j], c, base[j]);
    } else {
        for (size_t j = 0; j < m; j++) out[j] = fmaf(merged[j], c, base[j] * first);
    }
}

void tv_sign_merge_add_f32(const float *const *parts, size_t k, size_t n, int frequency, int merge, const float *base,
                           float first, float c, float *out) {
    enum { MAX_PARTS = 64 };
    const float *shifted[MAX_PARTS];
    float merged[TILE];
    if (k > MAX_PARTS) k = MAX_PARTS; /* (the caller passes at most MAX_PARTS) */
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        for (size_t i = 0; i < k; i++) shifted[i] = parts[i] + start;
        tv_sign_merge_f32(shifted, k, m, frequency, merge, merged);
        axpy_tile(merged, base + start, first, c, m, out + start);
    }
}

FMA_TARGET int tv_nonfinite_f32(const float *x, size_t n) {
    const uint32_t *bits = (const uint32_t *)x;
    uint32_t bad = 0;
    for (size_t j = 0; j < n; j++) bad |= (uint32_t)((bits[j] & 0x7f800000u) == 0x7f800000u);
    return (int)bad;
}

/* Entries a fused loop writes, checked as tv_nonfinite_f32 right after (still in the L1 cache):
 * tv_fused_merge_f32 and tv_drop_chain_f32 return whether one of theirs is not finite, so the
 * executor need not read the written chunk again. A multiple of 8 (a keep bit's place in its byte
 * stays the same from one block to the next). */
#define CHECK_BLOCK 2048

/* The 16-bit float types in and out of float32, as torch converts them: to float32 exactly, and
 * back rounding to nearest, ties to even (an overflow is an infinity). The conversions out return
 * nonzero when an entry of the result is a NaN or an infinity (the executor then hands the run to
 * the local one, which says where: a NaN's bits are not matched here). */
void tv_bf16_to_f32(const uint16_t *x, size_t n, float *out) {
    uint32_t *bits = (uint32_t *)out;
    for (size_t j = 0; j < n; j++) bits[j] = (uint32_t)x[j] << 16;
}

int tv_f32_to_bf16(const float *x, size_t n, uint16_t *out) {
    const uint32_t *bits = (const uint32_t *)x;
    uint32_t bad = 0;
    for (size_t j = 0; j < n; j++) {
        uint32_t u = bits[j];
        uint16_t h = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        bad |= (uint32_t)((h & 0x7f80u) == 0x7f80u);
        out[j] = h;
    }
    return (int)bad;
}

#if defined(__x86_64__) && defined(__GNUC__)
F16C_TARGET void tv_f16_to_f32(const uint16_t *x, size_t n, float *out) {
    size_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + j))));
    for (; j < n; j++) out[j] = _cvtsh_ss(x[j]);
}

F16C_TARGET int tv_f32_to_f16(const float *x, size_t n, uint16_t *out) {
    size_t j = 0;
    uint32_t bad = 0;
    for (; j + 8 <= n; j += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(out + j), h);
    }
    for (; j < n; j++) out[j] = _cvtss_sh(x[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    for (size_t k = 0; k < n; k++) bad |= (uint32_t)((out[k] & 0x7c00u) == 0x7c00u);
    return (int)bad;
}
#else
void tv_f16_to_f32(const uint16_t *x, size_t n, float *out) { (void)x; (void)n; (void)out; }
int tv_f32_to_f16(const float *x, size_t n, uint16_t *out) { (void)x; (void)n; (void)out; return 1; }
#endif

/* ---- 9. Block sums (tvlang/ops/sums.py) ---------------------------------------------------------
 *
 * The sums that slerp, model_stock, the Gram merges and the reducers need before their main pass,
 * over blocks of TV_BLOCK consecutive entries from x[0] (the last block zero-padded): one float64
 * value a block, by a fixed halving tree: s[q] = p[q] + p[q + H] for H = TV_BLOCK / 2, then
 * s[q] += s[q + h] for h = H/2, H/4, ..., 1. Each term p is exact in float64 (a product of two
 * float32 values, or a magnitude), and every addition is one IEEE float64 addition in an order
 * fixed here, so torch's elementwise additions in the same tree (sums.py, without the helper, or on
 * another device) give the same bits, whatever the machine. mode 0: x[k] * y[k] (y may be x); mode 1:
 * |x[k]| (y unused). out: one value per block, ceil(n / TV_BLOCK) of them. */
#define TV_BLOCK 16384

static inline double block_term(const float *x, const float *y, size_t k, size_t m, int mode) {
    if (k >= m) return 0.0;
    return mode ? fabs((double)x[k]) : (double)x[k] * (double)y[k];
}

/* One block's value: m entries (at most TV_BLOCK) from xb and yb, by the tree above; s: TV_BLOCK / 2
 * doubles of scratch. */
static inline double block_value(const float *xb, const float *yb, size_t m, int mode, double *s) {
    enum { H = TV_BLOCK / 2 };
    if (m == TV_BLOCK && mode == 0) {
        for (size_t q = 0; q < H; q++) s[q] = (double)xb[q] * (double)yb[q] + (double)xb[q + H] * (double)yb[q + H];
    } else if (m == TV_BLOCK) {
        for (size_t q = 0; q < H; q++) s[q] = fabs((double)xb[q]) + fabs((double)xb[q + H]);
    } else {
        for (size_t q = 0; q < H; q++) s[q] = block_term(xb, yb, q, m, mode) + block_term(xb, yb, q + H, m, mode);
    }
    for (size_t h = H / 2; h >= 1; h /= 2)
        for (size_t q = 0; q < h; q++) s[q] += s[q + h];
    return s[0];
}

MULTI_VERSION void tv_block_sums_f32(const float *x, const float *y, size_t n, int mode, double *out) {
    double s[TV_BLOCK / 2];
    for (size_t start = 0, b = 0; start < n; start += TV_BLOCK, b++) {
        size_t m = n - start < TV_BLOCK ? n - start : TV_BLOCK;
        out[b] = block_value(x + start, (mode ? x : y) + start, m, mode, s);
    }
}

/* The block sums of several products at once (the sums of slerp, model_stock and the Gram merges):
 * row p of out (out + p * stride) gets tv_block_sums_f32(v[i], v[j], n, 0, ...)'s values, where
 * (i, j) = (pairs[2p], pairs[2p + 1]) and v[i] is x[i], or with base given x[i] - base (one float32
 * subtraction an entry, numpy's subtract): the same values, bit for bit, as the subtractions and the
 * calls one by one, but a block at a time, so each block of the inputs is read once and its
 * differences stay in the cache for every product. k <= TV_GRAM_VECTORS; vectors: k * TV_BLOCK
 * floats of scratch (used with base only). */
#define TV_GRAM_VECTORS 16

MULTI_VERSION void tv_gram_sums_f32(const float *const *x, size_t k, const float *base, const int32_t *pairs,
                                    size_t npairs, size_t n, size_t stride, double *out, float *vectors) {
    double s[TV_BLOCK / 2];
    const float *v[TV_GRAM_VECTORS];
    if (k > TV_GRAM_VECTORS) return;
    for (size_t start = 0, b = 0; start < n; start += TV_BLOCK, b++) {
        size_t m = n - start < TV_BLOCK ? n - start : TV_BLOCK;
        for (size_t i = 0; i < k; i++) {
            if (base != NULL) {
                float *d = vectors + i * TV_BLOCK;
                const float *xi = x[i] + start, *bb = base + start;
                for (size_t q = 0; q < m; q++) d[q] = xi[q] - bb[q];
                v[i] = d;
            } else {
                v[i] = x[i] + start;
            }
        }
        for (size_t p = 0; p < npairs; p++) out[p * stride + b] = block_value(v[pairs[2 * p]], v[pairs[2 * p + 1]], m, 0, s);
    }
}

/* ---- 10. sce (tvlang/ops/sce.py), for the torch-free executor ------------------------------------
 *
 * tv_variance_f32: the population variance across k inputs of each of n entries, as sce.variance
 * computes it with torch: Welford's update in float64 (delta = x - mean; mean += delta / i;
 * m2 += (x - mean) * delta), then m2 / k rounded to float32; the same IEEE operations in the same
 * order (no fused multiply-add: -ffp-contract=off), so the same bits.
 *
 * tv_sce_erase_f32: sce._erase over n entries of k selected inputs: the elected sign is
 * sign(sign(x_0 + x_1 + ...) + 0.5) (the float32 sum in input order: 0 elects +; torch's sign, 0 for
 * a NaN); input i agrees
 * where sign(x_i) is the elected one; merged and divisor accumulate w_i * (x_i * agree) and
 * w_i * agree by fused multiply-adds (torch's add_(y, alpha=w)); the result is merged divided by
 * the divisor clamped to at least 1e-6 (a NaN stays NaN). */
MULTI_VERSION void tv_variance_f32(const float *const *parts, size_t k, size_t n, float *out) {
    double mean[TILE], m2[TILE];
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        for (size_t j = 0; j < m; j++) { mean[j] = 0.0; m2[j] = 0.0; }
        for (size_t i = 0; i < k; i++) {
            const float *x = parts[i] + start;
            double count = (double)(i + 1);
            for (size_t j = 0; j < m; j++) {
                double xd = (double)x[j];
                double delta = xd - mean[j];
                mean[j] = mean[j] + delta / count;
                m2[j] = m2[j] + (xd - mean[j]) * delta;
            }
        }
        for (size_t j = 0; j < m; j++) out[start + j] = (float)(m2[j] / (double)k);
    }
}

FMA_TARGET void tv_sce_erase_f32(const float *const *parts, size_t k, size_t n, const float *weights, float *out) {
    float elected[TILE], merged[TILE], divisor[TILE];
    const float eps = 1e-6f;
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        for (size_t j = 0; j < m; j++) elected[j] = 0.0f;
        for (size_t i = 0; i < k; i++)
            for (size_t j = 0; j < m; j++) elected[j] = elected[j] + parts[i][start + j];
        for (size_t j = 0; j < m; j++) {
            elected[j] = torch_sign(torch_sign(elected[j]) + 0.5f);
            merged[j] = 0.0f;
            divisor[j] = 0.0f;
        }
        for (size_t i = 0; i < k; i++) {
            const float *x = parts[i] + start;
            float w = weights[i];
            for (size_t j = 0; j < m; j++) {
                float agree = (float)(torch_sign(x[j]) == elected[j]);
                merged[j] = fmaf(x[j] * agree, w, merged[j]);
                divisor[j] = fmaf(agree, w, divisor[j]);
            }
        }
        for (size_t j = 0; j < m; j++) {
            float d = divisor[j];
            d = (d < eps) ? eps : d; /* clamp_(min=eps): a NaN is not below eps and stays */
            out[start + j] = merged[j] / d;
        }
    }
}

/* ---- 11. arcee_fusion's scores and fuse (tvlang/ops/fusion.py, FusionPasses) ----------------------
 *
 * Over `rows` rows of `width` entries, with kl one float32 per row: the importance |m - b| * kl
 * (torch's sub, abs and product by the row's KL), and the fusion b + (m - b) * (float)(score >= t)
 * (torch's sub, mul by the 0/1 mask, add): the same IEEE float32 operations, so the same bits. */
MULTI_VERSION void tv_fusion_scores_f32(const float *base, const float *model, const float *kl, size_t rows,
                                        size_t width, float *out) {
    for (size_t r = 0; r < rows; r++) {
        const float *b = base + r * width, *m = model + r * width;
        float *o = out + r * width, k = kl[r];
        for (size_t j = 0; j < width; j++) o[j] = fabsf(m[j] - b[j]) * k;
    }
}

MULTI_VERSION void tv_fuse_f32(const float *base, const float *model, const float *kl, size_t rows, size_t width,
                               float t, float *out) {
    for (size_t r = 0; r < rows; r++) {
        const float *b = base + r * width, *m = model + r * width;
        float *o = out + r * width, k = kl[r];
        for (size_t j = 0; j < width; j++) {
            float d = m[j] - b[j];
            float keep = (float)(fabsf(d) * k >= t);
            o[j] = d * keep + b[j];
        }
    }
}

/* ---- 12. random_like's noise: numpy's float32 Gaussian over PCG64 (tvlang/ops/dare.py, Noise) ----
 *
 * numpy's Generator.standard_normal(n, dtype=float32) over a PCG64: the 256-layer ziggurat of
 * Marsaglia and Tsang on 32-bit words (each 64-bit output split in two, low half first, the high
 * half kept for the next word as numpy keeps it). Per word r: layer i = r & 0xff, sign = bit 8,
 * a = r >> 9 (23 bits), x = a * w[i] in float32; x is the draw when a < k[i] (99.3 % of words);
 * else layer 0 draws from the tail beyond R with two more words per try, and the other layers
 * accept x when (f[i-1] - f[i]) * u + f[i] < exp(-x*x/2) (u a word's top 24 bits over 2**24),
 * otherwise a fresh word starts again. The tables k, w, f come from tvlang/ops/native.py
 * (ziggurat_tables), which computes them from the ziggurat's definition; every operation here is
 * the one IEEE operation numpy makes (float32 products and sums without fusing, the acceptance
 * test against the float64 exp, logf in the tail), so the draws are numpy's, bit for bit, and so
 * is the generator's state after them (tests/test_native.py). numpy draws a word at a time through
 * a function pointer, 9.8 ns an entry here; this takes the outputs eight interleaved streams at a
 * time (as section 1) into a buffer, and the ziggurat reads them from there.
 *
 * st: state low, state high, increment low, increment high, has_uint32, uinteger (numpy's
 * PCG64.state); on return the state has moved on by the outputs used, and the last two say whether
 * a high half is waiting and the last high half drawn (numpy keeps it after its use too). */
#define ZIG_R 3.6541528853610087963519472518f
#define ZIG_INV_R 0.27366123732975827203338247596f
enum { ZIG_WORDS = 512 };

typedef struct {
    pcg8 gen; /* the outputs after those in words */
    uint64_t words[ZIG_WORDS];
    size_t pos, len, used; /* next output in words, outputs there, outputs taken in all */
    int has_half;
    uint32_t half;
} zig_stream;

static void zig_refill(zig_stream *z) {
    pcg8_fill(&z->gen, ZIG_WORDS, z->words);
    z->pos = 0;
    z->len = ZIG_WORDS;
}

static inline uint32_t zig_next32(zig_stream *z) {
    if (z->has_half) {
        z->has_half = 0;
        return z->half;
    }
    if (z->pos == z->len) zig_refill(z);
    uint64_t w = z->words[z->pos++];
    z->used++;
    z->has_half = 1;
    z->half = (uint32_t)(w >> 32);
    return (uint32_t)w;
}

static inline float zig_uniform(zig_stream *z) { return (float)(zig_next32(z) >> 8) * (1.0f / 16777216.0f); }

static float zig_slow(zig_stream *z, uint32_t a, int layer, float x, const uint32_t *k, const float *w,
                      const float *f) {
    for (;;) {
        if (layer == 0) {
            for (;;) {
                float xx = -ZIG_INV_R * log1pf(-zig_uniform(z));
                float yy = -log1pf(-zig_uniform(z));
                if (yy + yy > xx * xx) return ((a >> 8) & 1u) ? -(ZIG_R + xx) : ZIG_R + xx;
            }
        }
        float lower = (f[layer - 1] - f[layer]) * zig_uniform(z) + f[layer];
        if ((double)lower < exp(-0.5 * (double)x * (double)x)) return x;
        uint32_t r = zig_next32(z);
        layer = (int)(r & 0xffu);
        a = (r >> 9) & 0x7fffffu;
        x = (float)a * w[layer];
        if ((r >> 8) & 1u) x = -x;
        if (a < k[layer]) return x;
    }
}

/* A word's draw when it lands inside its layer (the common case): 1, with the draw in *x. */
static inline int zig_fast(uint32_t r, const uint32_t *k, const float *w, float *x, uint32_t *a, int *layer) {
    *layer = (int)(r & 0xffu);
    *a = (r >> 9) & 0x7fffffu;
    float v = (float)*a * w[*layer];
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits ^= (r & 0x100u) << 23; /* bit 8 is the sign: -v without a branch on a coin toss */
    memcpy(x, &bits, sizeof bits);
    return *a < k[*layer];
}

void tv_pcg64_normal_f32(uint64_t *st, size_t n, const uint32_t *k, const float *w, const float *f, float *out) {
    zig_stream z;
    u128 start = ((u128)st[1] << 64) | st[0], inc = ((u128)st[3] << 64) | st[2];
    pcg8_start(&z.gen, start, inc);
    z.pos = z.len = z.used = 0;
    z.has_half = (int)(st[4] != 0);
    z.half = (uint32_t)st[5];
    size_t i = 0;
    uint32_t a;
    int layer;
    float x;
    while (i < n) {
        if (z.has_half) { /* a high half left waiting (at the start, or by a draw outside its layer) */
            uint32_t r = zig_next32(&z);
            out[i++] = zig_fast(r, k, w, &x, &a, &layer) ? x : zig_slow(&z, a, layer, x, k, w, f);
            continue;
        }
        if (z.pos == z.len) zig_refill(&z);
        /* whole outputs straight from the buffer, two draws each, while both land in their layers */
        size_t pos = z.pos, len = z.len, room = (n - i) / 2, stop = len - pos < room ? len : pos + room;
        while (pos < stop) {
            uint64_t word = z.words[pos];
            float x0, x1;
            uint32_t a1;
            int layer1;
            int ok0 = zig_fast((uint32_t)word, k, w, &x0, &a, &layer);
            int ok1 = zig_fast((uint32_t)(word >> 32), k, w, &x1, &a1, &layer1);
            if (!(ok0 & ok1)) break;
            out[i] = x0;
            out[i + 1] = x1;
            i += 2;
            pos++;
        }
        if (pos > z.pos) z.half = (uint32_t)(z.words[pos - 1] >> 32); /* as numpy leaves it */
        z.used += pos - z.pos;
        z.pos = pos;
        /* a word with a draw outside its layer, or one draw left to make: that word the general way */
        if (i < n && pos < len && (pos < stop || n - i < 2)) {
            uint32_t r = zig_next32(&z);
            out[i++] = zig_fast(r, k, w, &x, &a, &layer) ? x : zig_slow(&z, a, layer, x, k, w, f);
        }
    }
    u128 end = advance(start, inc, z.used);
    st[0] = (uint64_t)end;
    st[1] = (uint64_t)(end >> 64);
    st[4] = (uint64_t)z.has_half;
    st[5] = z.half; /* numpy keeps the last high half even once it is used */
}

/* ---- 13. DELLA's MAGPRUNE over whole rows (tvlang/ops/della.py, Magprune) ---------------------------
 *
 * tv_pcg64_words: the next n 32-bit words of a PCG64 stream as della.Words hands them out (each
 * 64-bit output split low half first; a high half left over by the last call comes first, and an odd
 * count leaves the last output's high half over). st: state low, state high, increment low,
 * increment high, whether a half is left over, that half. The outputs come eight interleaved
 * generators at a time, as section 1's.
 *
 * tv_magprune_f32: for each of `rows` rows of m float32 entries, the row's m words from the stream
 * st (as tv_pcg64_words takes it) after `skip` words, then the rank of each entry by increasing |x|
 * (the bit pattern with the sign cleared; equal patterns ranked by position: row_ranks), the same
 * order as della.rank_order's sort of distinct keys; then Magprune's torch calls: the keep
 * probability p = (float)rank * c + d (two float32 roundings, as the ramp's mul_ and add_), kept
 * when word * 2**-32 < p in float64, out = x / p * kept (rescale) or x * kept (the bool as 1.0 or
 * 0.0, so a dropped infinity is NaN, as torch gives) where `out` is given, and kept (0 or 1) into
 * `flags` where given. st is left where the stream stands after the last row's words. Rows of a
 * piece can so run on several threads, each skipping the words of the rows before its own.
 * Only the entries whose word is below the largest probability are ranked where that gives the
 * same values (below_top; the others keep a rank below m, which drops them all the same); about
 * density + epsilon of them.
 * With m == 1, p = d for every entry (no ranks). scratch: 5 * m + 32 uint64. */

/* A PCG64 stream of 32-bit words, each 64-bit output split low half first; `half` is the high
 * half of the last output where `has_half` (not handed out yet). */
typedef struct {
    u128 state, inc;
    int has_half;
    uint32_t half;
} word_stream;

/* The stream of st (tv_pcg64_words' six words) after `skip` more words. */
static word_stream words_after(const uint64_t *st, uint64_t skip) {
    word_stream w;
    w.state = ((u128)st[1] << 64) | st[0];
    w.inc = ((u128)st[3] << 64) | st[2];
    w.has_half = st[4] != 0;
    w.half = (uint32_t)st[5];
    if (skip && w.has_half) {
        skip--;
        w.has_half = 0;
    }
    if (skip) {
        w.state = advance(w.state, w.inc, skip / 2);
        if (skip & 1) {
            w.state = w.state * MULTIPLIER + w.inc;
            w.half = (uint32_t)(output(w.state) >> 32);
            w.has_half = 1;
        }
    }
    return w;
}

/* The stream's next n words. */
static void words_next(word_stream *w, size_t n, uint32_t *words) {
    size_t i = 0;
    if (n && w->has_half) {
        words[i++] = w->half;
        w->has_half = 0;
    }
    size_t outputs = (n - i) / 16 * 8; /* whole blocks of eight outputs, sixteen words */
    if (outputs) {
        pcg8 g;
        pcg8_start(&g, w->state, w->inc);
        uint64_t o[256];
        for (size_t done = 0; done < outputs;) {
            size_t k = outputs - done < 256 ? outputs - done : 256;
            pcg8_fill(&g, k, o);
            memcpy(words + i, o, 8 * k); /* little-endian: each output's low half first */
            i += 2 * k;
            done += k;
        }
        w->state = pcg8_state(&g);
    }
    for (; i < n; i += 2) {
        w->state = w->state * MULTIPLIER + w->inc;
        uint64_t out = output(w->state);
        words[i] = (uint32_t)out;
        if (n - i >= 2) {
            words[i + 1] = (uint32_t)(out >> 32);
        } else {
            w->has_half = 1;
            w->half = (uint32_t)(out >> 32);
        }
    }
}

static void words_store(const word_stream *w, uint64_t *st) {
    st[0] = (uint64_t)w->state;
    st[1] = (uint64_t)(w->state >> 64);
    st[4] = (uint64_t)w->has_half;
    st[5] = w->half;
}

void tv_pcg64_words(uint64_t *st, size_t n, uint32_t *words) {
    word_stream w = words_after(st, 0);
    words_next(&w, n, words);
    words_store(&w, st);
}

/* Sort n items (|x|'s bits << 32 | column) by their key bits (stable LSD radix of 8-bit digits,
 * digits that every item shares skipped), with b as scratch; returns where the sorted items lie (a
 * or b). Each pass counts and then scatters four quarters side by side, each with its own offsets
 * (a quarter's items of a digit go after those of the quarters before it): the same stable order,
 * with four chains of counter updates instead of one (a chain waits on each store before the next
 * load where neighbours share a digit, as similar magnitudes share their high digits). */
static uint64_t *radix_items(uint64_t *a, uint64_t *b, size_t n) {
    enum { DIGIT = 8, BUCKETS = 1 << DIGIT, PASSES = 4, PARTS = 4 };
    uint32_t counts[PARTS][BUCKETS];
    size_t part = n / PARTS, rest = n - PARTS * part; /* the last quarter also takes the rest */
    for (int pass = 0; pass < PASSES; pass++) {
        unsigned shift = 32 + DIGIT * (unsigned)pass;
        memset(counts, 0, sizeof counts);
        const uint64_t *a0 = a, *a1 = a + part, *a2 = a + 2 * part, *a3 = a + 3 * part;
        uint32_t *c0 = counts[0], *c1 = counts[1], *c2 = counts[2], *c3 = counts[3];
        for (size_t j = 0; j < part; j++) {
            c0[(a0[j] >> shift) & (BUCKETS - 1)]++;
            c1[(a1[j] >> shift) & (BUCKETS - 1)]++;
            c2[(a2[j] >> shift) & (BUCKETS - 1)]++;
            c3[(a3[j] >> shift) & (BUCKETS - 1)]++;
        }
        for (size_t j = part; j < part + rest; j++) c3[(a3[j] >> shift) & (BUCKETS - 1)]++;
        size_t first = (a[0] >> shift) & (BUCKETS - 1);
        if ((size_t)c0[first] + c1[first] + c2[first] + c3[first] == n) continue; /* one digit for all */
        uint32_t total = 0;
        for (size_t d = 0; d < BUCKETS; d++) {
            for (int q = 0; q < PARTS; q++) {
                uint32_t here = counts[q][d];
                counts[q][d] = total;
                total += here;
            }
        }
        for (size_t j = 0; j < part; j++) {
            uint64_t v0 = a0[j], v1 = a1[j], v2 = a2[j], v3 = a3[j];
            b[c0[(v0 >> shift) & (BUCKETS - 1)]++] = v0;
            b[c1[(v1 >> shift) & (BUCKETS - 1)]++] = v1;
            b[c2[(v2 >> shift) & (BUCKETS - 1)]++] = v2;
            b[c3[(v3 >> shift) & (BUCKETS - 1)]++] = v3;
        }
        for (size_t j = part; j < part + rest; j++) b[c3[(a3[j] >> shift) & (BUCKETS - 1)]++] = a3[j];
        uint64_t *t = a;
        a = b;
        b = t;
    }
    return a;
}

/* A bucket of at most this many items ranks its items by counting, over a fixed window of this many
 * items from the bucket's start, those below each (the items past the bucket's end are above it);
 * a larger bucket is sorted (radix_items) and ranks its items by their places. */
#define RANK_WINDOW 16
/* ... sorted by insertion up to this many items, else by radix_items (whose four passes each clear
 * and sum 1,024 counters) */
#define INSERTION_LIMIT 128

/* The number of items below v in window[0 .. RANK_WINDOW): four lanes of 64-bit comparisons at a
 * time (GCC's vector extension: one instruction each on AVX2), the lanes' -1s summed. */
typedef int64_t lanes64 __attribute__((vector_size(32)));

static inline uint32_t below_in_window(const int64_t *window, int64_t v) {
    lanes64 sum = {0, 0, 0, 0}, at = {v, v, v, v};
    for (int k = 0; k < RANK_WINDOW; k += 4) {
        lanes64 w;
        memcpy(&w, window + k, sizeof w);
        sum += w < at;
    }
    return (uint32_t)-(sum[0] + sum[1] + sum[2] + sum[3]);
}

typedef struct {
    uint32_t least, most; /* the row's least and largest key */
} key_span;

/* The key of entry j of a row: |x|'s bits (the sign cleared), ordered as the magnitudes. */
static inline uint32_t row_key(const float *x, size_t j) {
    uint32_t bits;
    memcpy(&bits, x + j, sizeof bits);
    return bits & 0x7fffffffu;
}

/* The least and largest key of a row. */
static MULTI_VERSION key_span row_span(const float *x, size_t m) {
    uint32_t least = 0xffffffffu, most = 0;
    for (size_t j = 0; j < m; j++) {
        uint32_t bits = row_key(x, j);
        least = bits < least ? bits : least;
        most = bits > most ? bits : most;
    }
    key_span span = {least, most};
    return span;
}

/* How row_ranks puts a row's keys into buckets: bucket = (max(key, lo) - lo) >> shift, of `buckets`.
 * B = the least power of two from m, at most 2**16; lo the row's least key but at most 2**27 below
 * its largest, that is 16 binades, so that an exact zero or a denormal does not stretch the
 * buckets of the rest; shift the least that puts the largest key in bucket B - 1 or less; the
 * buckets in use are those up to the largest key's. */
typedef struct {
    uint32_t lo;
    unsigned shift;
    size_t buckets;
} bucketing;

static bucketing row_bucketing(size_t m, key_span span) {
    bucketing g;
    g.lo = span.most - span.least > (1u << 27) ? span.most - (1u << 27) : span.least;
    unsigned width = 0; /* log2 of B */
    while (width < 16 && ((size_t)1 << width) < m) width++;
    g.shift = 0;
    while (((span.most - g.lo) >> g.shift) >= ((size_t)1 << width)) g.shift++;
    g.buckets = (size_t)((span.most - g.lo) >> g.shift) + 1;
    return g;
}

/* The item of entry j of a row: its key << 32 | column (below 2**63). */
static inline uint64_t row_item(const float *x, size_t j) { return ((uint64_t)row_key(x, j) << 32) | j; }

/* Each entry's bucket of a row into bucket[0..m); with `item`, also its short item into item[0..m):
 * the key's bits below the bucket's (key - lo, its low `shift` bits) << colbits | the column. Where no
 * key is below lo (so none is clamped) and shift + colbits <= 32, items of one bucket compare as the
 * long items (row_item) do: the same key bits above them, then these. */
static MULTI_VERSION void row_buckets(const float *x, size_t m, bucketing g, uint16_t *bucket, uint32_t *item,
                                      unsigned colbits) {
    if (!item) {
        for (size_t j = 0; j < m; j++) {
            uint32_t bits = row_key(x, j);
            bucket[j] = (uint16_t)(((bits > g.lo ? bits : g.lo) - g.lo) >> g.shift);
        }
        return;
    }
    uint32_t low = ((uint32_t)1 << g.shift) - 1;
    for (size_t j = 0; j < m; j++) {
        uint32_t k = row_key(x, j) - g.lo;
        bucket[j] = (uint16_t)(k >> g.shift);
        item[j] = (k & low) << colbits | (uint32_t)j;
    }
}

/* counts[0 .. n) replaced by the sums of the counts before each (an exclusive prefix sum), eight
 * at a time: within a vector, three shifted adds give the sums up to each lane, and the total
 * before the vector is added to all; the same sums as the one-by-one loop (whole numbers, no
 * rounding). It was a sixth of row_ranks' time one by one, with a bucket for every entry. */
typedef uint32_t counts8 __attribute__((vector_size(32)));

/* counts[d .. n) replaced by their exclusive sums after `total`, one by one (a vector loop's rest). */
static inline void sums_after(uint32_t *counts, size_t d, size_t n, uint32_t total) {
    for (; d < n; d++) {
        uint32_t here = counts[d];
        counts[d] = total;
        total += here;
    }
}

static inline void exclusive_sums(uint32_t *counts, size_t n) {
    const counts8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t total = 0;
    size_t d = 0;
    for (; d + 8 <= n; d += 8) {
        counts8 v, x;
        memcpy(&v, counts + d, sizeof v);
        x = v + __builtin_shuffle(v, zero, (counts8){8, 0, 1, 2, 3, 4, 5, 6});
        x += __builtin_shuffle(x, zero, (counts8){8, 8, 0, 1, 2, 3, 4, 5});
        x += __builtin_shuffle(x, zero, (counts8){8, 8, 8, 8, 0, 1, 2, 3});
        counts8 before = x - v + total;
        memcpy(counts + d, &before, sizeof before);
        total += x[7];
    }
    sums_after(counts, d, n, total);
}

/* exclusive_sums sixteen at a time (four shifted adds), for the AVX-512 ranking: the same sums. */
typedef uint32_t counts16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) void exclusive_sums16(uint32_t *counts, size_t n) {
    const counts16 zero = {0};
    uint32_t total = 0;
    size_t d = 0;
    for (; d + 16 <= n; d += 16) {
        counts16 v, x;
        memcpy(&v, counts + d, sizeof v);
        x = v + __builtin_shuffle(v, zero, (counts16){16, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14});
        x += __builtin_shuffle(x, zero, (counts16){16, 16, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13});
        x += __builtin_shuffle(x, zero, (counts16){16, 16, 16, 16, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
        x += __builtin_shuffle(x, zero, (counts16){16, 16, 16, 16, 16, 16, 16, 16, 0, 1, 2, 3, 4, 5, 6, 7});
        counts16 before = x - v + total;
        memcpy(counts + d, &before, sizeof before);
        total += x[15];
    }
    sums_after(counts, d, n, total);
}

/* The rank of each entry of one row by increasing |x|, equal magnitudes by position (a stable
 * sort's order), into rank[0..m). Items are |x|'s bits << 32 | column (below 2**63), so they
 * compare as that order does.
 *
 * One counting pass sorts the items into buckets of the key (row_bucketing). Keys
 * are about the logarithms of the magnitudes, so a row spreads over many buckets, a few items
 * each: Gaussian rows of 1,288 or 4,096 entries have about 5 items in an entry's bucket, 16 at
 * most. The bucket order is the item order between buckets, so an
 * item's rank is its bucket's start plus the items of its bucket below it (below_in_window), or
 * for a bucket of more than RANK_WINDOW items its place once that bucket is sorted. A loop of
 * comparisons without branches: insertion sorts of every bucket mispredicted about once an item
 * (the whole ranking 11 ns an entry with them, 7 ns with the count).
 *
 * (row_buckets has put each entry's bucket in `bucket`; a long item is made from the row where it
 * is used, row_item, not kept in a second array: the row's scratch then fits the L1 cache better.)
 *
 * Short items: with `item` (row_buckets' 32-bit items: no key clamped, and they fit) and no bucket
 * of more than RANK_WINDOW entries, the buckets take the short items instead, and a window counts
 * only its bucket's items (a mask of the first n lanes: the items after them belong to the next
 * buckets). The scatter then moves 4 bytes made beforehand in row_buckets' vectorized loop instead
 * of making 8, and one AVX-512 comparison takes a window: MAGPRUNE 0.91-0.95 of the time in a loop
 * benchmark (rows of 1,824 and 4,864 entries) on an Intel Xeon. Rows with a larger bucket (many
 * equal magnitudes), a key clamped (an exact zero 16 binades below the largest) or more than 2**21
 * columns over a wide span take the long items as before.
 * With `want`, only the entries listed there (wanted of them) get their rank (and, where a bucket
 * is sorted, the rest of that bucket's entries). row_ranks_any is compiled twice (MULTI_VERSION):
 * AVX2's 64-bit comparisons take four at a time; row_ranks_wide for AVX-512 (below). Scratch: a m +
 * RANK_WINDOW (the short items' buckets in its first m + RANK_WINDOW uint32, `item` after them), b m
 * (radix_items' scratch), counts B uint32 (tv_magprune_f32 lays them out, and the buckets after the
 * words). */
typedef uint32_t (*window_count)(const int64_t *window, int64_t v);
typedef uint32_t (*short_count)(const uint32_t *window, uint32_t n, uint32_t v);

/* The number of items below v among the n (at most RANK_WINDOW) short items of window[0 .. n):
 * sixteen lanes compared, those from n on masked off (they hold the next buckets' items, whose short
 * items say nothing of their order to v). */
typedef uint32_t lanes32 __attribute__((vector_size(64)));
typedef int32_t marks32 __attribute__((vector_size(64)));

static inline uint32_t below_in_short(const uint32_t *window, uint32_t n, uint32_t v) {
    const lanes32 place = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    lanes32 w, at = v - (lanes32){0}, count = n - (lanes32){0};
    memcpy(&w, window, sizeof w);
    marks32 hit = (w < at) & (place < count);
    int32_t sum = 0;
    for (int k = 0; k < RANK_WINDOW; k++) sum += hit[k];
    return (uint32_t)-sum;
}

static inline __attribute__((always_inline)) void ranks_in(const float *x, size_t m, bucketing g, uint64_t *a,
                                                           uint64_t *b, const uint16_t *bucket, uint32_t *counts,
                                                           uint32_t *rank, const uint32_t *want, size_t wanted,
                                                           const uint32_t *item, window_count below,
                                                           short_count below_short, int wide) {
    size_t buckets = g.buckets;
    memset(counts, 0, buckets * sizeof *counts);
    for (size_t j = 0; j < m; j++) counts[bucket[j]]++;
    if (item) { /* short items where no bucket needs a sort */
        uint32_t most = 0;
        for (size_t d = 0; d < buckets; d++) most = counts[d] > most ? counts[d] : most;
        if (most <= RANK_WINDOW) {
            uint32_t *a32 = (uint32_t *)a;
            if (wide)
                exclusive_sums16(counts, buckets);
            else
                exclusive_sums(counts, buckets);
            for (size_t j = 0; j < m; j++) a32[counts[bucket[j]]++] = item[j];
            for (int k = 0; k < RANK_WINDOW; k++) a32[m + k] = 0; /* read, masked off */
            size_t n = want ? wanted : m;
            for (size_t p = 0; p < n; p++) {
                size_t j = want ? want[p] : p;
                size_t d = bucket[j];
                uint32_t begin = d ? counts[d - 1] : 0;
                rank[j] = begin + below_short(a32 + begin, counts[d] - begin, item[j]);
            }
            return;
        }
    }
    exclusive_sums(counts, buckets);
    for (size_t j = 0; j < m; j++) a[counts[bucket[j]]++] = row_item(x, j);
    for (int k = 0; k < RANK_WINDOW; k++) a[m + k] = UINT64_MAX >> 1; /* above every item */
    /* counts[d] is now the end of bucket d */
    int large = 0;
    size_t n = want ? wanted : m;
    for (size_t p = 0; p < n; p++) {
        size_t j = want ? want[p] : (uint32_t)a[p];
        uint64_t v = row_item(x, j);
        size_t d = bucket[j];
        uint32_t begin = d ? counts[d - 1] : 0;
        large |= counts[d] - begin > RANK_WINDOW;
        rank[j] = begin + below((const int64_t *)a + begin, (int64_t)v);
    }
    if (!large) return;
    uint32_t begin = 0;
    for (size_t d = 0; d < buckets; d++) {
        uint32_t end = counts[d], n = end - begin;
        if (n > RANK_WINDOW) {
            const uint64_t *sorted = a + begin;
            if (n > INSERTION_LIMIT) {
                sorted = radix_items(a + begin, b, n);
            } else {
                uint64_t *t = a + begin;
                for (uint32_t i = 1; i < n; i++) {
                    uint64_t v = t[i];
                    uint32_t k = i;
                    for (; k > 0 && t[k - 1] > v; k--) t[k] = t[k - 1];
                    t[k] = v;
                }
            }
            for (uint32_t i = 0; i < n; i++) rank[(uint32_t)sorted[i]] = begin + i;
        }
        begin = end;
    }
}

#define RANK_ARGUMENTS                                                                                          \
    const float *x, size_t m, bucketing g, uint64_t *a, uint64_t *b, const uint16_t *bucket, uint32_t *counts, \
        uint32_t *rank, const uint32_t *want, size_t wanted, const uint32_t *item

static MULTI_VERSION void row_ranks_any(RANK_ARGUMENTS) {
    ranks_in(x, m, g, a, b, bucket, counts, rank, want, wanted, item, below_in_window, below_in_short, 0);
}

#if defined(__x86_64__) && defined(__GNUC__)
/* below_in_window in two AVX-512 comparisons of eight lanes, their mask bits counted: with the whole
 * of row_ranks compiled for AVX-512, MAGPRUNE took 0.87 of the time on an Intel Xeon. */
#define WIDE_RANKS "avx512f,avx2,popcnt"

static inline __attribute__((always_inline, target(WIDE_RANKS))) uint32_t below_in_window_wide(const int64_t *window,
                                                                                               int64_t v) {
    __m512i at = _mm512_set1_epi64(v);
    __mmask8 low = _mm512_cmplt_epi64_mask(_mm512_loadu_si512(window), at);
    __mmask8 high = _mm512_cmplt_epi64_mask(_mm512_loadu_si512(window + 8), at);
    return (uint32_t)__builtin_popcount((unsigned)low | (unsigned)high << 8);
}

/* below_in_short in one AVX-512 comparison of sixteen lanes under a mask of the first n. */
static inline __attribute__((always_inline, target(WIDE_RANKS))) uint32_t below_in_short_wide(const uint32_t *window,
                                                                                              uint32_t n, uint32_t v) {
    __mmask16 lanes = (__mmask16)((1u << n) - 1);
    __mmask16 low = _mm512_mask_cmplt_epu32_mask(lanes, _mm512_loadu_si512(window), _mm512_set1_epi32((int)v));
    return (uint32_t)__builtin_popcount((unsigned)low);
}

static __attribute__((target(WIDE_RANKS))) void row_ranks_wide(RANK_ARGUMENTS) {
    ranks_in(x, m, g, a, b, bucket, counts, rank, want, wanted, item, below_in_window_wide, below_in_short_wide, 1);
}
#endif

/* row_ranks_wide where the PCG64 lanes step as vectors (tv_pcg64_wide: the processor has AVX-512 F
 * and DQ, and the tests have not turned it off), else row_ranks_any: the same ranks either way. */
static void row_ranks(RANK_ARGUMENTS) {
#if defined(__x86_64__) && defined(__GNUC__)
    int wide = __atomic_load_n(&pcg_wide, __ATOMIC_RELAXED);
    if (wide < 0) wide = tv_pcg64_wide(-1);
    if (wide) {
        row_ranks_wide(x, m, g, a, b, bucket, counts, rank, want, wanted, item);
        return;
    }
#endif
    row_ranks_any(x, m, g, a, b, bucket, counts, rank, want, wanted, item);
}

/* w * 2**-32, exactly, through a signed conversion (which vectorizes; an unsigned one does not on
 * AVX2). */
static inline double unit_word(uint32_t w) { return ((double)(int32_t)(w ^ 0x80000000u) + 0x1p31) * 0x1p-32; }

/* Magprune's draws for one row, from its ranks (below 2**31: a signed conversion). Compiled three
 * times (WIDE_VERSION), each loop vectorized. */
static WIDE_VERSION void magprune_row(const float *x, const uint32_t *words, const uint32_t *rank, size_t m,
                                       float c, float d, int rescale, float *out, uint8_t *flags) {
    if (m == 1) c = 0.0f; /* p = d */
    float top = (float)(int32_t)(m - 1) * c + d, least = top < d ? top : d, most = top < d ? d : top;
    if (least >= 0x1p-9f && most < 1.0f) {
        /* Every p (from least to most: p moves with the rank one way) has an exponent of -9 or more,
         * so p * 2**32 is a whole number below 2**32, exactly (a power of two's product): word * 2**-32
         * < p is then word < (uint32_t)(p * 2**32), one comparison of whole numbers (no float64). */
        if (out && rescale) {
            for (size_t j = 0; j < m; j++) {
                float p = (float)(int32_t)rank[j] * c + d;
                out[j] = x[j] / p * pick(words[j] < (uint32_t)(p * 0x1p32f), 1.0f, 0.0f);
            }
        } else if (out) {
            for (size_t j = 0; j < m; j++) {
                float p = (float)(int32_t)rank[j] * c + d;
                out[j] = x[j] * pick(words[j] < (uint32_t)(p * 0x1p32f), 1.0f, 0.0f);
            }
        }
        if (flags) {
            for (size_t j = 0; j < m; j++) {
                float p = (float)(int32_t)rank[j] * c + d;
                flags[j] = (uint8_t)(words[j] < (uint32_t)(p * 0x1p32f));
            }
        }
        return;
    }
    if (out && rescale) {
        for (size_t j = 0; j < m; j++) {
            float p = (float)(int32_t)rank[j] * c + d;
            out[j] = x[j] / p * pick(unit_word(words[j]) < (double)p, 1.0f, 0.0f);
        }
    } else if (out) {
        for (size_t j = 0; j < m; j++) {
            float p = (float)(int32_t)rank[j] * c + d;
            out[j] = x[j] * pick(unit_word(words[j]) < (double)p, 1.0f, 0.0f);
        }
    }
    if (flags) {
        for (size_t j = 0; j < m; j++) {
            float p = (float)(int32_t)rank[j] * c + d;
            flags[j] = (uint8_t)(unit_word(words[j]) < (double)p);
        }
    }
}

/* The entries of a row whose word w has w * 2**-32 < top (a float), into want; returns how many.
 * top * 2**32 is exact in float64, so that is w < ceil(top * 2**32), compared as integers. */
static size_t below_top(const uint32_t *words, size_t m, float top, uint32_t *want) {
    double bound = ceil((double)top * 0x1p32);
    if (bound >= 0x1p32) { /* every word (a probability of 1 or more: every word is below 2**32) */
        for (size_t j = 0; j < m; j++) want[j] = (uint32_t)j;
        return m;
    }
    uint64_t limit = bound > 0.0 ? (uint64_t)bound : 0;
    size_t n = 0, j = 0;
#ifdef GATHER_VECTORS
    if (vectors_ok) j = below_vectors(words, m, (uint32_t)limit, want, &n);
#endif
    for (; j < m; j++) {
        want[n] = (uint32_t)j;
        n += words[j] < limit;
    }
    return n;
}

/* Where tv_magprune_f32's scratch lies (5 * m + 32 uint64). */
typedef struct {
    uint64_t *a, *b;
    uint32_t *rank, *counts, *words, *want;
    uint16_t *bucket;
} prune_scratch;

static prune_scratch prune_layout(uint64_t *scratch, size_t m) {
    prune_scratch s;
    s.a = scratch;
    s.b = scratch + m + RANK_WINDOW;
    s.rank = (uint32_t *)(s.b + m);
    s.counts = s.rank + m; /* m/2 + B/2 <= 3m/2 uint64 */
    s.words = (uint32_t *)(s.b + m + (m + 1) / 2 + m); /* after counts (B <= 2m uint32) */
    s.want = s.words + 2 * ((m + 1) / 2);
    s.bucket = (uint16_t *)(s.want + 2 * ((m + 1) / 2));
    return s;
}

/* MAGPRUNE of one row xr of m entries, its words the next m of w; out and flags as tv_magprune_f32's
 * (either may be NULL). top: the largest probability. */
static void magprune_one(word_stream *w, const float *xr, size_t m, float c, float d, float top, int rescale,
                         const prune_scratch *s, float *o, uint8_t *f) {
    uint32_t *rank = s->rank, *words = s->words;
    words_next(w, m, words);
    if (m == 1) {
        rank[0] = 0;
        magprune_row(xr, words, rank, m, c, d, rescale, o, f);
        return;
    }
    key_span span = row_span(xr, m);
    if (span.least == span.most) { /* one magnitude: ranked by position */
        for (size_t j = 0; j < m; j++) rank[j] = (uint32_t)j;
        magprune_row(xr, words, rank, m, c, d, rescale, o, f);
        return;
    }
    bucketing g = row_bucketing(m, span);
    unsigned colbits = 0; /* the bits of a column */
    while (((size_t)1 << colbits) < m) colbits++;
    uint32_t *item = span.least >= g.lo && g.shift + colbits <= 32 ? (uint32_t *)s->a + m + RANK_WINDOW : NULL;
    row_buckets(xr, m, g, s->bucket, item, colbits);
    /* Only entries below the top need ranks, where a dropped entry's x / p * 0.0 is x * 0.0 for
     * every p: p >= d > 0 (so its sign is x's) and no x / p overflows (every |x| finite and at
     * most d * 2**127; an infinity or NaN gives NaN either way, but is left to the full loop). */
    float largest;
    memcpy(&largest, &span.most, sizeof largest);
    if (d > 0.0f && c >= 0.0f && span.most < 0x7f800000u && (double)largest < (double)d * 0x1p127) {
        /* the others keep whatever rank below m the rows before left them (the caller cleared the
         * ranks once): their words are not below any rank's probability, and their x / p * 0.0 is
         * x * 0.0 whatever p is */
        size_t wanted = below_top(words, m, top, s->want);
        row_ranks(xr, m, g, s->a, s->b, s->bucket, s->counts, rank, s->want, wanted, item);
    } else {
        row_ranks(xr, m, g, s->a, s->b, s->bucket, s->counts, rank, NULL, 0, item);
    }
    magprune_row(xr, words, rank, m, c, d, rescale, o, f);
}

/* The largest probability: ranks are at most m - 1, and p grows with the rank, so an entry whose
 * word is not below it is dropped whatever its rank. */
static float top_probability(size_t m, float c, float d) { return m > 1 ? (float)(m - 1) * c + d : d; }

void tv_magprune_f32(uint64_t *st, uint64_t skip, const float *x, size_t rows, size_t m, float c, float d,
                     int rescale, uint64_t *scratch, float *out, uint8_t *flags) {
    prune_scratch s = prune_layout(scratch, m);
    memset(s.rank, 0, m * sizeof *s.rank); /* every rank below m (magprune_one) */
    float top = top_probability(m, c, d);
    word_stream w = words_after(st, skip);
    for (size_t r = 0; r < rows; r++)
        magprune_one(&w, x + r * m, m, c, d, top, rescale, &s, out ? out + r * m : NULL, flags ? flags + r * m : NULL);
    words_store(&w, st);
}

/* della's and della_linear's whole call over `rows` rows of m entries (tvlang/run/direct.py,
 * _Della): each of k inputs x = fma(b[i], cb[i], a[i]) (the axpy that made it, a - pre; x = a[i]
 * where b[i] is NULL) MAGPRUNE'd as tv_magprune_f32 takes it, its words from the stream st + 6 * i
 * after `skip` words (st is not changed), then the merge of the k parts: tv_sign_merge_f32's
 * (merge 0, 1 or 2, as it takes them), or with merge -1 della_linear's sum (0 + p0 + p1 + ..., as
 * tv_axpy_f32 adds each part with a coefficient of 1); then, where base is given, the step that
 * takes it (axpy_tile: out = fma(merged, cc, base), base times `first` where that is not 1), else
 * out = merged times `scale` where that is not 1 (tv_scale_f32, della's lambda). A row at a time: a
 * row's inputs and parts stay in the L1 cache, where the steps one by one write each input and each
 * part of every row and read them again; entry by entry the same operations, so the same bits. k
 * is at most DELLA_PARTS. scratch: 5 * m + 32 uint64, then (k + 1) * m floats. Returns whether an
 * entry written is not finite. */
#define DELLA_PARTS 16

static FMA_TARGET void axpy_row(const float *a, const float *b, float cb, size_t m, float *x) {
    for (size_t j = 0; j < m; j++) x[j] = fmaf(b[j], cb, a[j]);
}

int tv_della_rows_f32(const float *const *a, const float *const *b, const float *cb, const uint64_t *st,
                      uint64_t skip, size_t k, size_t rows, size_t m, float c, float d, int rescale, int frequency,
                      int merge, float scale, const float *base, float first, float cc, uint64_t *scratch,
                      float *out) {
    word_stream w[DELLA_PARTS];
    float merged[TILE];
    if (k > DELLA_PARTS) k = DELLA_PARTS; /* (the caller passes at most DELLA_PARTS) */
    prune_scratch s = prune_layout(scratch, m);
    memset(s.rank, 0, m * sizeof *s.rank); /* every rank below m (magprune_one) */
    float *part = (float *)(scratch + 5 * m + 32), *x = part + k * m;
    float top = top_probability(m, c, d);
    for (size_t i = 0; i < k; i++) w[i] = words_after(st + 6 * i, skip);
    int bad = 0;
    for (size_t r = 0; r < rows; r++) {
        for (size_t i = 0; i < k; i++) {
            const float *xi = a[i] + r * m;
            if (b[i]) {
                axpy_row(xi, b[i] + r * m, cb[i], m, x);
                xi = x;
            }
            magprune_one(&w[i], xi, m, c, d, top, rescale, &s, part + i * m, NULL);
        }
        float *o = out + r * m;
        for (size_t start = 0; start < m; start += TILE) {
            size_t n = m - start < TILE ? m - start : TILE;
            const float *shifted[DELLA_PARTS];
            for (size_t i = 0; i < k; i++) shifted[i] = part + i * m + start;
            if (merge < 0) { /* della_linear's sum: tv_axpy_f32 of each part into zeros */
                memset(merged, 0, n * sizeof *merged);
                for (size_t i = 0; i < k; i++) tv_axpy_f32(merged, shifted[i], 1.0f, n);
            } else {
                tv_sign_merge_f32(shifted, k, n, frequency, merge, merged);
            }
            if (base) {
                axpy_tile(merged, base + r * m + start, first, cc, n, o + start);
            } else if (scale != 1.0f) {
                tv_scale_f32(merged, scale, n, o + start);
            } else {
                memcpy(o + start, merged, n * sizeof *merged);
            }
        }
        bad |= tv_nonfinite_f32(o, m);
    }
    return bad;
}

/* ---- 14. Whole merging calls with the steps around them ---------------------------------------
 *
 * A whole `ties`, `dare_ties`, `breadcrumbs` or plain `dare` (keep bits) call with the steps around
 * it (tvlang/run/direct.py, _whole_call): each input x = fma(b, cb, a) (the axpy that made it, a - pre; x = a where b is NULL),
 * then its trim or drop (`form`), then its tie windows, then, for k > 1, the sign merge
 * (tv_sign_merge_f32's operations), then the step that takes the result: out = fma(value, c, base)
 * (base times `first` where that is not 1; out = value where base is NULL). The forms: 0 the
 * input as it is, 1 times its keep bits (`scale` or +0.0, from bit `offset` of `packed`), 2
 * hardshrink at lo (tv_hardshrink_f32), 3 the band (lo, hi] (tv_band_f32), 4 x - hardshrink(x,
 * lo), 5 zeros, 6 times its keep bits as 1.0 or 0.0, then times lo (the L1 rule's factor:
 * tv_flags_scale_f32's two products; tv_fused_merge_f32 only). A tie window
 * (tvlang.ops.common.TieWindow, the executor's _TieWindow): the entries whose magnitude's bits are `bits`, numbered seen+1, seen+2, ... in flat order, are x
 * where numbered in (start, stop] and +0.0 elsewhere; `seen` goes on from call to call. The same
 * operations in the same order as the steps one by one, so the same bits; a, b and base are read
 * once, where the steps one by one write and read a chunk of each part. k is at most
 * FUSED_PARTS; out may be base. */
#define FUSED_PARTS 16

typedef struct {
    const float *a, *b;
    float cb, lo, hi;
    int32_t form;
    const uint8_t *packed;
    uint64_t offset;
    int32_t windows; /* 0, 1 or 2 */
    int32_t bits[2];
    double start[2], stop[2];
    uint64_t seen[2];
} fused_input;

static inline float tie_kept(fused_input *in, int w, float x) {
    double number = (double)++in->seen[w];
    return (in->start[w] < number && number <= in->stop[w]) ? x : 0.0f;
}

/* The tie windows over m entries: x the input, part its trim (rewritten where tied). */
static void tie_windows(fused_input *in, const float *x, size_t m, float *part) {
    for (int w = 0; w < in->windows; w++) {
        uint32_t want = (uint32_t)in->bits[w];
        for (size_t j = 0; j < m; j++) {
            uint32_t v;
            memcpy(&v, x + j, sizeof v);
            if ((v & 0x7FFFFFFFu) == want) part[j] = tie_kept(in, w, x[j]);
        }
    }
}

/* A tile of TILE entries at a time, each step a loop over the tile. */
static FMA_TARGET void fused_tiles(fused_input *in, size_t k, size_t n, const float table[256][8], uint32_t scale_bits,
                                   int frequency, int merge, const float *base, float first, float c, float *out) {
    float x[TILE], parts[FUSED_PARTS][TILE], merged[TILE];
    const float *made[FUSED_PARTS];
    for (size_t start = 0; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        for (size_t i = 0; i < k; i++) {
            const float *xi = in[i].a + start;
            if (in[i].b) {
                const float *ai = in[i].a + start, *bi = in[i].b + start;
                float ci = in[i].cb;
                for (size_t j = 0; j < m; j++) x[j] = fmaf(bi[j], ci, ai[j]);
                xi = x;
            }
            float *p = parts[i];
            switch (in[i].form) {
            case 0: memcpy(p, xi, m * sizeof *p); break;
            case 1: sub_times_bits(xi, NULL, 0.0f, in[i].packed, in[i].offset + start, table, scale_bits, m, p); break;
            case 6:
                for (size_t j = 0, at = in[i].offset + start; j < m; j++, at++)
                    p[j] = (xi[j] * flag_floats[in[i].packed[at >> 3]][at & 7]) * in[i].lo;
                break;
            case 2: tv_hardshrink_f32(xi, m, in[i].lo, p); break;
            case 3: tv_band_f32(xi, m, in[i].lo, in[i].hi, p); break;
            case 4:
                tv_hardshrink_f32(xi, m, in[i].lo, p);
                for (size_t j = 0; j < m; j++) p[j] = xi[j] - p[j];
                break;
            default: memset(p, 0, m * sizeof *p); break;
            }
            tie_windows(&in[i], xi, m, p);
            made[i] = p;
        }
        const float *value = made[0];
        if (k > 1) {
            tv_sign_merge_f32(made, k, m, frequency, merge, merged);
            value = merged;
        }
        if (base) axpy_tile(value, base + start, first, c, m, out + start);
        else memcpy(out + start, value, m * sizeof *out);
    }
}

/* The same, eight entries a vector with every step in registers (AVX2): each input's fma and trim
 * or drop, the election, the agreeing sum and count, the division and the taker's fma, in one loop
 * over the inputs' memory. The same IEEE operations as the steps: comparisons ordered and quiet
 * (false on NaN, as C's), torch_sign as the difference of two 0/1 floats, clamp_min0 and the
 * hardshrinks as masks of bits; a vector with an entry tied at a window's magnitude takes the
 * window's count entry by entry. The entries before the keep bits' first whole byte and after
 * the last whole vector take the tile loop above; so does a call whose keep bits start at unlike
 * places within a byte. */
#if defined(__x86_64__) && defined(__GNUC__)
static FMA_TARGET inline __m256 v_sign(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), one),
                         _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), one));
}

static FMA_TARGET inline __m256 v_clamp_min0(__m256 x) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ), x);
}

static FMA_TARGET inline __m256 v_hardshrink(__m256 v, float lo) {
    __m256 inside = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_set1_ps(-lo), _CMP_GE_OQ),
                                  _mm256_cmp_ps(v, _mm256_set1_ps(lo), _CMP_LE_OQ));
    return _mm256_andnot_ps(inside, v);
}

static FMA_TARGET __attribute__((noinline)) __m256 v_tie_windows(fused_input *in, __m256 x, __m256 part) {
    float xs[8], ps[8];
    _mm256_storeu_ps(xs, x);
    _mm256_storeu_ps(ps, part);
    tie_windows(in, xs, 8, ps);
    return _mm256_loadu_ps(ps);
}

/* `same`: the form of every input where they share one (-1: each its own); inlined with k and
 * `same` constant (fused_vectors), the loops over the inputs unroll and the parts stay in
 * registers. */
static FMA_TARGET inline __attribute__((always_inline)) void fused_body(
        size_t k, int same, fused_input *in, size_t n, const float table[256][8], int frequency, int merge,
        const float *base, float first, float c, float *out) {
    __m256 part[FUSED_PARTS];
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
    const __m256 vc = _mm256_set1_ps(c), vfirst = _mm256_set1_ps(first);
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    /* the counts' divisors are whole numbers 1..k: where each is a power of two 2^m, 1/d is exact
     * (its bits 254 << 23 minus d's) and x * (1/d) rounds as x / d (the same real number) */
    const __m256i mantissa = _mm256_set1_epi32(0x007FFFFF), two_254 = _mm256_set1_epi32(254 << 23);
    for (size_t j = 0; j + 8 <= n; j += 8) {
        for (size_t i = 0; i < k; i++) {
            __m256 x = _mm256_loadu_ps(in[i].a + j), p;
            if (in[i].b) x = _mm256_fmadd_ps(_mm256_loadu_ps(in[i].b + j), _mm256_set1_ps(in[i].cb), x);
            switch (same >= 0 ? same : in[i].form) {
            case 0: p = x; break;
            case 1: p = _mm256_mul_ps(x, _mm256_loadu_ps(table[in[i].packed[(in[i].offset + j) >> 3]])); break;
            case 6:
                p = _mm256_mul_ps(_mm256_mul_ps(x, _mm256_loadu_ps(flag_floats[in[i].packed[(in[i].offset + j) >> 3]])),
                                  _mm256_set1_ps(in[i].lo));
                break;
            case 2: p = v_hardshrink(x, in[i].lo); break;
            case 3: p = _mm256_sub_ps(v_hardshrink(x, in[i].lo), v_hardshrink(x, in[i].hi)); break;
            case 4: p = _mm256_sub_ps(x, v_hardshrink(x, in[i].lo)); break;
            default: p = zero; break;
            }
            if (in[i].windows) {
                __m256i mag = _mm256_and_si256(_mm256_castps_si256(x), magnitude);
                __m256i tied = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(in[i].bits[0]));
                if (in[i].windows > 1) tied = _mm256_or_si256(tied, _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(in[i].bits[1])));
                if (!_mm256_testz_si256(tied, tied)) p = v_tie_windows(&in[i], x, p);
            }
            part[i] = p;
        }
        __m256 value = part[0];
        if (k > 1) {
            __m256 tally = frequency ? _mm256_add_ps(zero, v_sign(part[0])) : part[0];
            for (size_t i = 1; i < k; i++) tally = _mm256_add_ps(tally, frequency ? v_sign(part[i]) : part[i]);
            __m256 e = _mm256_blendv_ps(one, minus_one, _mm256_cmp_ps(tally, zero, _CMP_LT_OQ));
            __m256 total = _mm256_add_ps(v_clamp_min0(_mm256_mul_ps(part[0], e)), zero);
            __m256 count = v_sign(total);
            for (size_t i = 1; i < k; i++) {
                __m256 agree = v_clamp_min0(_mm256_mul_ps(part[i], e));
                total = _mm256_add_ps(total, agree);
                count = _mm256_add_ps(count, v_sign(agree));
            }
            value = _mm256_mul_ps(total, e);
            if (merge) {
                __m256 d = _mm256_add_ps(count, _mm256_and_ps(_mm256_cmp_ps(count, zero, _CMP_EQ_OQ), one));
                __m256i bits = _mm256_castps_si256(d);
                if (_mm256_testz_si256(bits, mantissa)) /* every d a power of two: times 1/d is exact */
                    value = _mm256_mul_ps(value, _mm256_castsi256_ps(_mm256_sub_epi32(two_254, bits)));
                else
                    value = _mm256_div_ps(value, d);
            }
        }
        if (base) {
            __m256 y = _mm256_loadu_ps(base + j);
            if (first != 1.0f) y = _mm256_mul_ps(y, vfirst);
            value = _mm256_fmadd_ps(value, vc, y);
        }
        _mm256_storeu_ps(out + j, value);
    }
}

static FMA_TARGET void fused_vectors(fused_input *in, size_t k, size_t n, const float table[256][8], int frequency,
                                     int merge, const float *base, float first, float c, float *out) {
    int same = in[0].form;
    for (size_t i = 1; i < k; i++) {
        if (in[i].form != same) same = -1;
    }
#define FUSED_CASE(K, FORM) \
    if (k == K && same == FORM) { \
        fused_body(K, FORM, in, n, table, frequency, merge, base, first, c, out); \
        return; \
    }
    FUSED_CASE(1, 1) /* a plain dare: keep bits */
    FUSED_CASE(1, 2) FUSED_CASE(1, 3) FUSED_CASE(1, 4) /* breadcrumbs: one input, one cut or two */
    FUSED_CASE(2, 1) FUSED_CASE(3, 1) FUSED_CASE(4, 1) /* dare_ties: keep bits */
    FUSED_CASE(2, 2) FUSED_CASE(3, 2) FUSED_CASE(4, 2) /* ties: a lower cut */
    FUSED_CASE(2, 6) FUSED_CASE(3, 6) FUSED_CASE(4, 6) /* dare_ties with the L1 rule: keep bits, factors */
#undef FUSED_CASE
    fused_body(k, -1, in, n, table, frequency, merge, base, first, c, out);
}
#endif

/* The inputs moved on by `by` entries. */
static void fused_skip(fused_input *in, size_t k, size_t by) {
    for (size_t i = 0; i < k; i++) {
        in[i].a += by;
        if (in[i].b) in[i].b += by;
        in[i].offset += by;
    }
}

int tv_fused_merge_f32(fused_input *in, size_t k, size_t n, float scale, int frequency, int merge, const float *base,
                       float first, float c, float *out) {
    fused_input at[FUSED_PARTS];
    float table[256][8];
    uint32_t scale_bits;
    memcpy(&scale_bits, &scale, sizeof scale_bits);
    if (k > FUSED_PARTS) k = FUSED_PARTS; /* (the caller passes at most FUSED_PARTS) */
    memcpy(at, in, k * sizeof *at);
    int bad = 0;
    size_t r = 8; /* where the keep bits start within a byte: 8 none, 9 unlike places */
    for (size_t i = 0; i < k; i++) {
        if (at[i].form != 1 && at[i].form != 6) continue;
        if (r == 8) r = at[i].offset & 7;
        else if ((at[i].offset & 7) != r) r = 9;
    }
    if (r != 8) keep_table(table, scale_bits);
    size_t done = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (r != 9) {
        size_t head = r == 8 ? 0 : (8 - r) & 7;
        if (head > n) head = n;
        fused_tiles(at, k, head, (const float (*)[8])table, scale_bits, frequency, merge, base, first, c, out);
        fused_skip(at, k, head);
        bad |= tv_nonfinite_f32(out, head);
        size_t body = (n - head) & ~(size_t)7;
        for (size_t s = 0; s < body; s += CHECK_BLOCK) { /* a block at a time, checked while in the L1 cache */
            size_t m = body - s < CHECK_BLOCK ? body - s : CHECK_BLOCK;
            fused_vectors(at, k, m, (const float (*)[8])table, frequency, merge, base ? base + head + s : NULL, first,
                          c, out + head + s);
            fused_skip(at, k, m);
            bad |= tv_nonfinite_f32(out + head + s, m);
        }
        done = head + body;
    }
#endif
    fused_tiles(at, k, n - done, (const float (*)[8])table, scale_bits, frequency, merge, base ? base + done : NULL,
                first, c, out + done);
    for (size_t i = 0; i < k; i++) memcpy(in[i].seen, at[i].seen, sizeof in[i].seen);
    return bad | tv_nonfinite_f32(out + done, n - done);
}

/* A chain of single-input DARE or breadcrumbs calls, each with the axpy that makes its input and
 * the axpy or add that takes its result into one buffer (tvlang/run/direct.py, _drop_chains: `pre +
 * dare(a - pre) + dare(b - pre) + ...`): y = base (times `first` where that is not 1), then for each
 * input in turn y = fma(part, cs[i], y), part the input x = fma(b, cb, a) (a where b is NULL) trimmed
 * or dropped by its form as in tv_fused_merge_f32 (keep bits with the rescale scales[i], a trim with
 * its tie windows, their counts carried on in `in`); out = y. The same IEEE operations in the same
 * order as the calls' fused loops one after another (tv_fused_merge_f32, one input each), so the
 * same bits, but each input and the base read once and out written once, where the calls one by
 * one read and write out once each. out may be base. */
static FMA_TARGET int chain_tile(fused_input *in, const float *scales, const float *cs, size_t k, size_t from,
                                 size_t n, const float *base, float first, float *out) {
    int bad = 0;
    float x[TILE], p[TILE], y[TILE];
    for (size_t start = from; start < n; start += TILE) {
        size_t m = n - start < TILE ? n - start : TILE;
        for (size_t j = 0; j < m; j++) y[j] = first == 1.0f ? base[start + j] : base[start + j] * first;
        for (size_t i = 0; i < k; i++) {
            const float *a = in[i].a + start, *b = in[i].b ? in[i].b + start : NULL;
            for (size_t j = 0; j < m; j++) x[j] = b ? fmaf(b[j], in[i].cb, a[j]) : a[j];
            uint32_t scale_bits;
            memcpy(&scale_bits, &scales[i], sizeof scale_bits);
            switch (in[i].form) {
            case 0: memcpy(p, x, m * sizeof *p); break;
            case 1:
                for (size_t j = 0; j < m; j++) p[j] = x[j] * keep_scale(in[i].packed, in[i].offset + start + j, scale_bits);
                break;
            case 2: tv_hardshrink_f32(x, m, in[i].lo, p); break;
            case 3: tv_band_f32(x, m, in[i].lo, in[i].hi, p); break;
            case 4:
                tv_hardshrink_f32(x, m, in[i].lo, p);
                for (size_t j = 0; j < m; j++) p[j] = x[j] - p[j];
                break;
            default: memset(p, 0, m * sizeof *p); break;
            }
            tie_windows(&in[i], x, m, p);
            for (size_t j = 0; j < m; j++) y[j] = fmaf(p[j], cs[i], y[j]);
        }
        memcpy(out + start, y, m * sizeof *out);
        bad |= tv_nonfinite_f32(y, m);
    }
    return bad;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* One input's part of a block of m entries (a multiple of 8): o = fma(part, c, o). Keep bits of
 * entries j..j+7: one byte, or two where they start `shift` bits into one (the same place for every
 * j, a multiple of 8); a bit set -> the scale, as keep_table. Inlined with the form, `b` and `shift`
 * known, so the loop has no branch but the tie windows' (rare: a vector with an entry tied). */
static FMA_TARGET inline __attribute__((always_inline)) void chain_block(
        fused_input *in, size_t s, float scale, float c, size_t m, float *o, int form, int with_b, int shifted) {
    const __m256i place = _mm256_setr_epi32(128, 64, 32, 16, 8, 4, 2, 1);
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256 vscale = _mm256_set1_ps(scale), vc = _mm256_set1_ps(c), vcb = _mm256_set1_ps(in->cb);
    const float *a = in->a + s, *b = with_b ? in->b + s : NULL;
    size_t at = in->offset + s;
    const uint8_t *packed = form == 1 ? in->packed + (at >> 3) : NULL;
    unsigned shift = (unsigned)(at & 7);
    for (size_t j = 0; j < m; j += 8) {
        __m256 x = _mm256_loadu_ps(a + j), p;
        if (with_b) x = _mm256_fmadd_ps(_mm256_loadu_ps(b + j), vcb, x);
        switch (form) {
        case 0: p = x; break;
        case 1: {
            const uint8_t *q = packed + (j >> 3);
            unsigned v = shifted ? ((unsigned)q[0] << shift | (unsigned)q[1] >> (8 - shift)) & 0xFFu : q[0];
            __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)v), place), place);
            p = _mm256_mul_ps(x, _mm256_and_ps(_mm256_castsi256_ps(set), vscale));
            break;
        }
        case 2: p = v_hardshrink(x, in->lo); break;
        case 3: p = _mm256_sub_ps(v_hardshrink(x, in->lo), v_hardshrink(x, in->hi)); break;
        case 4: p = _mm256_sub_ps(x, v_hardshrink(x, in->lo)); break;
        default: p = _mm256_setzero_ps(); break;
        }
        if (in->windows) {
            __m256i mag = _mm256_and_si256(_mm256_castps_si256(x), magnitude);
            __m256i tied = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(in->bits[0]));
            if (in->windows > 1) tied = _mm256_or_si256(tied, _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(in->bits[1])));
            if (!_mm256_testz_si256(tied, tied)) p = v_tie_windows(in, x, p);
        }
        _mm256_storeu_ps(o + j, _mm256_fmadd_ps(p, vc, _mm256_loadu_ps(o + j)));
    }
}
#endif

#define CHAIN_BLOCK 1024

FMA_TARGET int tv_drop_chain_f32(fused_input *in, const float *scales, const float *cs, size_t k, size_t n,
                                 const float *base, float first, float *out) {
    size_t done = 0;
    int bad = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    /* a block of out at a time, in the L1 cache while each input adds its part in turn: per entry the
     * same order (the base, then input 0, 1, ...) as the calls one by one, and each input's entries
     * in their order (its tie windows' counts) */
    size_t body = n & ~(size_t)7;
    for (size_t s = 0; s < body; s += CHAIN_BLOCK) {
        size_t m = body - s < CHAIN_BLOCK ? body - s : CHAIN_BLOCK;
        float *o = out + s;
        if (first != 1.0f) {
            for (size_t j = 0; j < m; j++) o[j] = base[s + j] * first;
        } else if (o != base + s) {
            memcpy(o, base + s, m * sizeof *o);
        }
        for (size_t i = 0; i < k; i++) {
            int with_b = in[i].b != NULL, shifted = ((in[i].offset + s) & 7) != 0;
#define CHAIN_BLOCK_CALL(FORM, B, SHIFTED) chain_block(&in[i], s, scales[i], cs[i], m, o, FORM, B, SHIFTED)
#define CHAIN_CASE(FORM) \
            case FORM: \
                if (with_b) CHAIN_BLOCK_CALL(FORM, 1, 0); \
                else CHAIN_BLOCK_CALL(FORM, 0, 0); \
                break;
            switch (in[i].form) {
            case 1:
                if (with_b && shifted) CHAIN_BLOCK_CALL(1, 1, 1);
                else if (with_b) CHAIN_BLOCK_CALL(1, 1, 0);
                else if (shifted) CHAIN_BLOCK_CALL(1, 0, 1);
                else CHAIN_BLOCK_CALL(1, 0, 0);
                break;
            CHAIN_CASE(0) CHAIN_CASE(2) CHAIN_CASE(3) CHAIN_CASE(4)
            default: CHAIN_BLOCK_CALL(5, with_b, 0); break;
            }
#undef CHAIN_CASE
#undef CHAIN_BLOCK_CALL
        }
        bad |= tv_nonfinite_f32(o, m); /* the block still in the L1 cache */
    }
    done = body;
#endif
    return bad | chain_tile(in, scales, cs, k, done, n, base, first, out);
}
