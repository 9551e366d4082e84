/* Hot loops of the data pipeline in C (the cleaning workers', the driver's dedup decisions). Each
 * function gives, bit for bit, what the function named in its comment gives (numpy's, or for the
 * BPE the tokenizers library's: it stays the reference and the fallback; the tests compare them). Built on first use by pipelines/native.py (cc -O2 -shared -fPIC) and
 * called through ctypes: no Python headers, no Python objects here. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Eight bytes at p as a little-endian word (unaligned). */
static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* How many bytes of m hold 0x80 (m: only such bits set): a multiplication, not __builtin_popcountll,
 * which without -mpopcnt (no machine flags here) is a call into libgcc. */
static inline int64_t marked_bytes(uint64_t m)
{
    return (int64_t)(((m >> 7) * 0x0101010101010101ULL) >> 56);
}

/* 0x80 in each byte of v that is zero, 0 in the others (exact: no borrow between bytes). */
static inline uint64_t zero_bytes(uint64_t v)
{
    const uint64_t low7 = 0x7F7F7F7F7F7F7F7FULL;
    return ~(((v & low7) + low7) | v | low7);
}

/* pipelines.dedup._mix64: splitmix64's finalizer. */
static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* pipelines.dedup.text_hashes: text t = buf[starts[t] : starts[t] + lens[t]] (buf readable 8 bytes
 * past each text) as 8-byte little-endian words w_i, the last zero-padded: out[t] =
 * mix64(sum_i mix64(w_i ^ (i + 1) * k1) ^ lens[t] * k2), sums mod 2^64. The words are mixed
 * independently of each other (no chain from one to the next): ~4x blake2b's speed. */
void text_hashes(const uint8_t *buf, const int64_t *starts, const int64_t *lens, int64_t n, uint64_t k1,
                 uint64_t k2, int64_t *out)
{
    for (int64_t t = 0; t < n; t++) {
        const uint8_t *p = buf + starts[t];
        int64_t len = lens[t], i = 0;
        uint64_t acc = 0, salt = k1;
        for (; i + 8 <= len; i += 8, salt += k1)
            acc += mix64(load_le64(p + i) ^ salt);
        if (i < len)
            acc += mix64((load_le64(p + i) & ((1ULL << (8 * (len - i))) - 1)) ^ salt);
        out[t] = (int64_t)mix64(acc ^ ((uint64_t)len * k2));
    }
}

/* One document's bins after hashing (row: P values, `empty` where no shingle fell) → densified,
 * written to out (P uint32). */
static void densify(int64_t P, uint64_t *row, unsigned char *full, const int16_t *borrow, uint32_t *out)
{
    const uint64_t empty = (uint64_t)1 << 32;
    for (int64_t b = 0; b < P; b++)
        full[b] = row[b] != empty;
    for (int64_t b = 0; b < P; b++) {
        if (full[b])
            continue;
        for (int64_t t = 0; t < P - 1; t++) { /* (the sources: non-empty after hashing) */
            int64_t src = borrow[t * P + b];
            if (full[src]) {
                row[b] = row[src];
                break;
            }
        }
    }
    for (int64_t b = 0; b < P; b++)
        out[b] = (uint32_t)row[b]; /* (an empty bin left: 2^32 -> 0, as numpy's cast) */
}

static inline void add_shingle(uint64_t *row, int64_t P, uint64_t s, uint64_t salt)
{
    uint64_t h = mix64(s ^ salt);
    uint64_t *cell = row + (int64_t)(((h >> 32) * (uint64_t)P) >> 32);
    uint64_t v = h & 0xFFFFFFFFULL, c = *cell;
    *cell = v < c ? v : c; /* (no branch: a random value is the smaller one half the time) */
}

/* pipelines.dedup.MinHasher.signatures_from_shingles: the signatures (n documents x P bins,
 * uint32, row-major into `out`) of S shingles, shingle j (s[j]) of document d[j] (0 <= d[j] < n).
 * One-permutation hashing: the mixed hash's high 32 bits pick the bin, its low 32 bits are the
 * value, a bin keeps its minimum. Optimal densification: an empty bin takes the value of the first
 * bin in its own order (borrow: (P - 1) x P, row t = every bin's t-th choice) that was non-empty
 * after hashing; a document with no shingle keeps every bin 0. Shingles sorted by document (as
 * the batches give them) are hashed one document at a time into one row of bins (in cache);
 * otherwise into all n rows first. Returns 0, or -1 when scratch memory could not be allocated. */
int minhash_signatures(int64_t n, int64_t P, int64_t S, const uint64_t *s, const int64_t *d,
                       uint64_t salt, const int16_t *borrow, uint32_t *out)
{
    const uint64_t empty = (uint64_t)1 << 32; /* above every value */
    int sorted = 1;
    for (int64_t j = 1; j < S && sorted; j++)
        sorted = d[j] >= d[j - 1];
    int64_t rows = sorted ? 1 : n;
    uint64_t *sig = malloc((size_t)(rows * P) * sizeof *sig + 1);
    unsigned char *full = malloc((size_t)P + 1);
    if (!sig || !full) {
        free(sig);
        free(full);
        return -1;
    }
    if (sorted) {
        int64_t j = 0;
        for (int64_t doc = 0; doc < n; doc++) {
            for (int64_t b = 0; b < P; b++)
                sig[b] = empty;
            for (; j < S && d[j] == doc; j++)
                add_shingle(sig, P, s[j], salt);
            densify(P, sig, full, borrow, out + doc * P);
        }
    } else {
        for (int64_t c = 0; c < n * P; c++)
            sig[c] = empty;
        for (int64_t j = 0; j < S; j++)
            add_shingle(sig + d[j] * P, P, s[j], salt);
        for (int64_t doc = 0; doc < n; doc++)
            densify(P, sig + doc * P, full, borrow, out + doc * P);
    }
    free(sig);
    free(full);
    return 0;
}

/* pipelines.clean.normalize_batch's pass (\r\n and \r to \n, control bytes but tab and newline
 * deleted, then pipelines.clean._whitespace_runs) in one pass: n bytes of texts (ASCII, or UTF-8,
 * whose bytes >= 0x80 are characters like letters here) joined by (and starting and ending with)
 * byte sep (0xFF: in no UTF-8); each maximal run of whitespace next to a sep goes, one without a
 * newline becomes one space, one with k newlines becomes min(k, 2) newlines. Bytes that need
 * nothing (33..126, 128..) are copied eight at a time up to the next one that does. Text t's
 * words (str.split's of the result for an ASCII text: its runs of whitespace + 1, 0 when empty)
 * into words[t]. out: n + 8 bytes (a copy writes 8). Returns the length written. */
int64_t normalize_ascii(const uint8_t *in, int64_t n, uint8_t sep, uint8_t *out, int64_t *words)
{
    const uint64_t ones = 0x0101010101010101ULL;
    int64_t o = 0, i = 0, t = -1, runs = 0, text_o = 0;
    while (i < n) {
        /* Eight bytes at a time up to the first that needs the rule below: a control byte, DEL, a
         * sep, or a space next to whitespace, a control byte or a sep (a lone space between two
         * characters stays as it is: it only counts a run). Exact per-byte tests (no borrow from
         * one byte into the next). */
        while (i >= 1 && i + 9 <= n) {
            uint64_t w = load_le64(in + i), wn = load_le64(in + i + 1), wp = load_le64(in + i - 1);
            uint64_t hard = zero_bytes(w & (ones * 0xE0)) | zero_bytes(w ^ (ones * 0x7F)) | zero_bytes(w ^ (ones * sep));
            uint64_t hard_n = zero_bytes(wn & (ones * 0xE0)) | zero_bytes(wn ^ (ones * 0x7F)) | zero_bytes(wn ^ (ones * sep));
            uint64_t space = zero_bytes(w ^ (ones * ' ')), space_n = zero_bytes(wn ^ (ones * ' '));
            uint64_t hit = hard | (space & (hard_n | space_n | zero_bytes(wp ^ (ones * sep))));
            memcpy(out + o, in + i, 8);
            int64_t k = hit ? __builtin_ctzll(hit) >> 3 : 8;
            runs += marked_bytes(k == 8 ? space : space & ((1ULL << (8 * k)) - 1));
            o += k, i += k;
            if (hit)
                break;
        }
        if (i >= n)
            break;
        uint8_t c = in[i];
        if (c == sep) { /* a text ends: its words are its runs of whitespace + 1 (0: empty) */
            if (t >= 0)
                words[t] = o > text_o ? runs + 1 : 0;
            t++, runs = 0, text_o = o + 1;
        }
        if (c > 32 && c != 127) {
            out[o++] = c;
            i++;
            continue;
        }
        int64_t j = i, k = 0;
        int ws = 0;
        for (; j < n && (in[j] <= 32 || in[j] == 127); j++) { /* a run: whitespace, and bytes deleted */
            uint8_t b = in[j];
            ws |= b == ' ' || b == '\t' || b == '\n' || b == '\r';
            k += b == '\n' || b == '\r';
            if (b == '\r' && j + 1 < n && in[j + 1] == '\n')
                j++;
        }
        /* (the byte before a run is no whitespace, so it is the last one written) */
        int edge = (o == 0 || out[o - 1] == sep) || (j >= n || in[j] == sep);
        if (ws && !edge) {
            out[o++] = k ? '\n' : ' ';
            if (k > 1)
                out[o++] = '\n';
            runs++;
        }
        i = j;
    }
    return o;
}

/* pipelines.ftpredict.fnv1a_runs: fastText's 32-bit FNV-1a hash of each run buf[starts[i]:ends[i]]
 * (its bytes read as signed chars, as fastText's Dictionary::hash does), sign-extended to 64 bits
 * (as its n-gram mix reads it), into out[i]. */
void fnv1a_runs(int64_t m, const uint8_t *buf, const int64_t *starts, const int64_t *ends, uint64_t *out)
{
    for (int64_t i = 0; i < m; i++) {
        uint32_t h = 2166136261u;
        for (int64_t p = starts[i]; p < ends[i]; p++)
            h = (h ^ (uint32_t)(int32_t)(int8_t)buf[p]) * 16777619u;
        out[i] = (uint64_t)(int64_t)(int32_t)h;
    }
}

/* pipelines.pack.ShardWriter's token counts: counts[id] += 1 for each of the n uint16 ids below
 * v (np.bincount(ids, minlength=v)[:v] added to counts, without its int64 copy of the ids). */
void count_u16(int64_t n, const uint16_t *ids, int64_t v, int64_t *counts)
{
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < v)
            counts[ids[i]]++;
}

/* pipelines.domain._bucket's hash: zlib.crc32 of each run buf[starts[i]:ends[i]] into out[i]
 * (CRC-32, reflected polynomial 0xEDB88320, initial and final value 0xFFFFFFFF; one table lookup
 * a byte, the table built per call: 256 entries). */
void crc32_runs(int64_t m, const uint8_t *buf, const int64_t *starts, const int64_t *ends, uint32_t *out)
{
    uint32_t table[256];
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int i = 0; i < 8; i++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        table[b] = c;
    }
    for (int64_t i = 0; i < m; i++) {
        uint32_t c = 0xFFFFFFFFu;
        for (int64_t p = starts[i]; p < ends[i]; p++)
            c = (c >> 8) ^ table[(c ^ buf[p]) & 0xFFu];
        out[i] = c ^ 0xFFFFFFFFu;
    }
}

/* Byte-level BPE (the Hugging Face tokenizers library's BPE model without dropout, prefixes,
 * suffixes, byte fallback or ignore_merges) of pieces joined by byte `sep`: each piece starts as
 * one symbol per byte (byte_id: the id of its single-byte token), then, while some adjacent pair
 * has a merge, the pair of lowest rank (the leftmost among equals) becomes its merged token: the
 * order of the library's queue of (rank, position). Merges: an open-addressing table of `mask + 1`
 * slots, key (left id << 32 | right id), UINT64_MAX where empty, with each merge's rank and
 * token. Ids end to end into out_ids (at most one per byte), each piece's count into out_sizes
 * (as many as pieces). Returns the number of pieces, or -1 when a piece is longer than `cap`
 * symbols (sym: 3 * cap scratch) or a byte has no token (nothing usable written then). */
static inline int64_t merge_slot(const uint64_t *keys, uint64_t mask, uint64_t key)
{
    uint64_t h = (key * 0x9E3779B97F4A7C15ULL) >> 32;
    for (;;) {
        uint64_t k = keys[h & mask];
        if (k == key)
            return (int64_t)(h & mask);
        if (k == UINT64_MAX)
            return -1;
        h++;
    }
}

/* The rank and merged token of the pair (a, b), or rank INT32_MAX where no merge joins them. */
static inline int32_t pair_rank(const uint64_t *keys, const int32_t *rank, const int32_t *merged, uint64_t mask,
                                int32_t a, int32_t b, int32_t *to)
{
    int64_t s = merge_slot(keys, mask, ((uint64_t)(uint32_t)a << 32) | (uint32_t)b);
    if (s < 0)
        return INT32_MAX;
    *to = merged[s];
    return rank[s];
}

int64_t bpe_pieces(const uint8_t *joined, int64_t size, uint8_t sep, const int32_t *byte_id,
                   const uint64_t *keys, const int32_t *rank, const int32_t *merged, uint64_t mask,
                   int32_t *sym, int64_t cap, int32_t *out_ids, int64_t *out_sizes)
{
    /* sym: scratch of 3 * cap: the symbols, each adjacent pair's rank and merged token (a pair's
     * rank is looked up once, and again only when a merge next to it changes it) */
    int32_t *pr = sym + cap, *to = sym + 2 * cap;
    int64_t pieces = 0, o = 0, start = 0;
    for (int64_t end = 0; end <= size; end++) {
        if (end < size && joined[end] != sep)
            continue;
        int64_t n = end - start;
        if (n > cap)
            return -1;
        for (int64_t i = 0; i < n; i++) {
            int32_t id = byte_id[joined[start + i]];
            if (id < 0)
                return -1;
            sym[i] = id;
        }
        for (int64_t i = 0; i + 1 < n; i++)
            pr[i] = pair_rank(keys, rank, merged, mask, sym[i], sym[i + 1], to + i);
        for (;;) {
            int64_t best = -1;
            int32_t best_rank = INT32_MAX;
            for (int64_t i = 0; i + 1 < n; i++) /* the lowest rank, the leftmost among equals */
                if (pr[i] < best_rank)
                    best_rank = pr[i], best = i;
            if (best < 0)
                break;
            sym[best] = to[best];
            for (int64_t i = best + 1; i + 1 < n; i++) {
                sym[i] = sym[i + 1];
                if (i + 2 < n)
                    pr[i] = pr[i + 1], to[i] = to[i + 1];
            }
            n--;
            if (best > 0)
                pr[best - 1] = pair_rank(keys, rank, merged, mask, sym[best - 1], sym[best], to + best - 1);
            if (best + 1 < n)
                pr[best] = pair_rank(keys, rank, merged, mask, sym[best], sym[best + 1], to + best);
        }
        for (int64_t i = 0; i < n; i++)
            out_ids[o++] = sym[i];
        out_sizes[pieces++] = n;
        start = end + 1;
    }
    return pieces;
}

/* pipelines.chunkpass.ChunkPass.signatures' numpy path (gather the texts' word hashes from their
 * chunks' rows, pipelines.dedup.MinHasher.shingles_from_words, then minhash_signatures) in one
 * pass: text t's words are the rows (off[e] .. off[e + 1] of `words`) of the chunks entries[c],
 * c in bounds[t] .. bounds[t + 1]; its shingles are each k consecutive words' polynomial
 * (s = s * mult + w, mod 2^64; rolled here), or one of all its words when it has fewer than k.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int minhash_rows(int64_t n, const int64_t *bounds, const int64_t *entries, const int64_t *off,
                 const uint64_t *words, int64_t k, uint64_t mult, int64_t P, uint64_t salt,
                 const int16_t *borrow, uint32_t *out)
{
    const uint64_t empty = (uint64_t)1 << 32;
    uint64_t *row = malloc((size_t)P * sizeof *row + 1), *ring = malloc((size_t)k * sizeof *ring + 1);
    unsigned char *full = malloc((size_t)P + 1);
    if (!row || !ring || !full) {
        free(row);
        free(ring);
        free(full);
        return -1;
    }
    uint64_t top = 1; /* mult^(k - 1): the oldest word's weight in a shingle */
    for (int64_t j = 0; j + 1 < k; j++)
        top *= mult;
    for (int64_t t = 0; t < n; t++) {
        for (int64_t b = 0; b < P; b++)
            row[b] = empty;
        int64_t m = 0, at = 0, end = bounds[t + 1], last = n ? bounds[n] : 0; /* at: m % k, kept */
        uint64_t s = 0;
        for (int64_t c = bounds[t]; c < end; c++) {
            if (c + 16 < last) /* (rows of random entries: fetched ahead) */
                __builtin_prefetch(off + entries[c + 16]);
            if (c + 8 < last)
                __builtin_prefetch(words + off[entries[c + 8]]);
            int64_t e = entries[c];
            for (int64_t p = off[e]; p < off[e + 1]; p++) {
                uint64_t w = words[p];
                if (m >= k)
                    s -= ring[at] * top;
                s = s * mult + w;
                ring[at] = w;
                at = at + 1 == k ? 0 : at + 1;
                m++;
                if (m >= k)
                    add_shingle(row, P, s, salt);
            }
        }
        if (m < k)
            add_shingle(row, P, s, salt);
        densify(P, row, full, borrow, out + t * P);
    }
    free(row);
    free(ring);
    free(full);
    return 0;
}

/* numpy's pairwise sum of n contiguous doubles (np.add.reduce's: 8 partial sums in blocks of up
 * to 128, halves above; fewer than 8: in order from 0.0). */
static double pairwise_sum(const double *a, int64_t n)
{
    if (n < 8) {
        double res = 0.;
        for (int64_t i = 0; i < n; i++)
            res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int j = 0; j < 8; j++)
            r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++)
                r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* np.add.reduceat's sum of one segment: its first value, plus the pairwise sum of the rest. */
static inline double segment_sum(const double *a, int64_t n)
{
    return a[0] + pairwise_sum(a + 1, n - 1);
}

/* a % d by a multiplication (inv = UINT64_MAX / d: the quotient it gives is short by at most 2):
 * a 64-bit division costs ~40 cycles here, and fastText's n-grams take one each. */
static inline uint64_t mod_u64(uint64_t a, uint64_t d, uint64_t inv)
{
#ifdef __SIZEOF_INT128__
    uint64_t r = a - (uint64_t)(((__uint128_t)a * inv) >> 64) * d;
    while (r >= d)
        r -= d;
    return r;
#else
    (void)inv;
    return a % d;
#endif
}

static int grow(void **p, int64_t *cap, int64_t need, size_t item)
{
    if (need <= *cap)
        return 0;
    int64_t c = need > 2 * *cap ? need : 2 * *cap;
    void *q = realloc(*p, (size_t)c * item);
    if (!q)
        return -1;
    *p = q, *cap = c;
    return 0;
}

/* pipelines.ftpredict.BatchPredictor.combine's sums for a model with one logit column (a binary
 * one): per text (its chunks entries[bounds[t]:bounds[t + 1]], each chunk's words a row of
 * logits / counts / hashes), the sum of its words' logits, then of each word k-gram's row
 * (k = 2..ngrams: mix = mix * mixc + hash, row nwords + mix % bucket), each sum taken as
 * np.add.reduceat takes it and added in the same order, into sums[t]; the number of ids into
 * counts[t]. The float operations are numpy's, in numpy's order: the same bits. Returns 0, or -1
 * when scratch memory could not be allocated. */
int quality_rows(int64_t n, const int64_t *bounds, const int64_t *entries, const int64_t *off,
                 const double *logits, const int64_t *count, const uint64_t *hash, const double *row_logits,
                 int64_t nwords, uint64_t bucket, int64_t ngrams, uint64_t mixc, double *sums, double *counts)
{
    double *val = NULL;
    uint64_t *h = NULL, *mix = NULL, inv_bucket = bucket ? UINT64_MAX / bucket : 0; /* (0: no n-grams) */
    int64_t cap_v = 0, cap_h = 0, cap_m = 0, failed = 0;
    for (int64_t t = 0; t < n && !failed; t++) {
        int64_t W = 0, ids = 0;
        for (int64_t c = bounds[t]; c < bounds[t + 1]; c++)
            W += off[entries[c] + 1] - off[entries[c]];
        if (grow((void **)&val, &cap_v, W + 1, sizeof *val) || grow((void **)&h, &cap_h, W + 1, sizeof *h) ||
            grow((void **)&mix, &cap_m, W + 1, sizeof *mix)) {
            failed = 1;
            break;
        }
        int64_t w = 0, end = bounds[t + 1];
        for (int64_t c = bounds[t]; c < end; c++) {
            if (c + 16 < end) /* (rows of random entries: fetched ahead) */
                __builtin_prefetch(off + entries[c + 16]);
            if (c + 8 < end) {
                int64_t q = off[entries[c + 8]];
                __builtin_prefetch(logits + q);
                __builtin_prefetch(hash + q);
                __builtin_prefetch(count + q);
            }
            int64_t a = off[entries[c]], b = off[entries[c] + 1];
            if (b - a == 1) { /* (most chunks: one word; the loop below becomes two memcpy calls) */
                val[w] = logits[a], h[w] = hash[a], ids += count[a];
                w++;
                continue;
            }
            for (int64_t p = a; p < b; p++, w++) {
                val[w] = logits[p];
                h[w] = hash[p];
                ids += count[p];
            }
        }
        double s = 0.0;
        if (W > 0)
            s += segment_sum(val, W);
        for (int64_t k = 1; k < ngrams && W - k > 0; k++) {
            int64_t m = W - k;
            const uint64_t *prev = k == 1 ? h : mix; /* (the 1-grams' mix: the hashes themselves) */
            for (int64_t i = 0; i < m; i++) { /* the n-grams' rows, prefetched while the next are hashed */
                mix[i] = prev[i] * mixc + h[i + k];
                val[i] = (double)(nwords + (int64_t)mod_u64(mix[i], bucket, inv_bucket));
                __builtin_prefetch(row_logits + (int64_t)val[i]);
            }
            for (int64_t i = 0; i < m; i++)
                val[i] = row_logits[(int64_t)val[i]];
            s += segment_sum(val, m);
            ids += m;
        }
        sums[t] = s;
        counts[t] = (double)ids;
    }
    free(val);
    free(h);
    free(mix);
    return failed ? -1 : 0;
}

/* pipelines.domain.SparseRows.dot: cells z (rows ascending, row[z], col[z], value[z]) times the
 * (dim, k) row-major c: out[row] (n, k, zero where a row has no cell) = per column j, the sum over
 * its cells of c[col * k + j] * value, each product rounded, summed as np.add.reduceat sums a
 * segment (segment_sum): the same bits (built without contracting a product and a sum into one
 * FMA). Returns 0, or -1 when scratch memory could not be allocated. */
int sparse_dot(int64_t nnz, const int64_t *row, const int64_t *col, const double *value, const double *c,
               int64_t k, double *out)
{
    double *p = NULL;
    int64_t cap = 0;
    for (int64_t z = 0; z < nnz;) {
        int64_t end = z + 1;
        while (end < nnz && row[end] == row[z])
            end++;
        if (grow((void **)&p, &cap, end - z, sizeof *p)) {
            free(p);
            return -1;
        }
        for (int64_t j = 0; j < k; j++) {
            for (int64_t q = z; q < end; q++)
                p[q - z] = c[col[q] * k + j] * value[q];
            out[row[z] * k + j] = segment_sum(p, end - z);
        }
        z = end;
    }
    free(p);
    return 0;
}

/* A pipelines.dedup.SeenSet: keys in a table of mask + 1 int64 slots (0: empty), linear probing
 * from ((key * 0x9E3779B97F4A7C15) >> 20) & mask. The key's slot, or the empty slot ending its
 * probe sequence. */
static inline uint64_t seen_home(int64_t key, int64_t mask)
{
    return (((uint64_t)key * 0x9E3779B97F4A7C15ULL) >> 20) & (uint64_t)mask;
}

static inline int64_t seen_slot(const int64_t *table, int64_t mask, int64_t key)
{
    uint64_t s = seen_home(key, mask);
    while (table[s] != 0 && table[s] != key)
        s = (s + 1) & (uint64_t)mask;
    return (int64_t)s;
}

/* pipelines.dedup.SeenSet.add_many(keys, _new=True): n distinct keys, none 0 or in the table, into
 * it (room for them: load stays <= 1/2), one after another. */
void seen_insert(int64_t *table, int64_t mask, const int64_t *keys, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        if (i + 16 < n) /* (random slots: fetched ahead) */
            __builtin_prefetch(table + seen_home(keys[i + 16], mask), 1);
        table[seen_slot(table, mask, keys[i])] = keys[i];
    }
}

/* pipelines.dedup.Deduplicator.check_codes from document `from` on, in order: 1 when `exact` and
 * its text hash h[i] is in the exact table (seen before, or earlier in the batch), else 2 when
 * `near` and one of its B band keys k[i * B ..] is in the band table, else 0, and its hash and
 * keys go into the tables (keys are SeenSet._fix'ed: never 0). counts[0], counts[1]: the tables'
 * key counts, updated; a document whose keys would take a table past load 1/2 is not decided:
 * its index is returned (need[0], need[1]: the keys it would add), and the caller grows the table
 * (SeenSet._grow) and calls again from it. Returns n when every document is decided. */
int64_t dedup_codes(int64_t from, int64_t n, int64_t B, const int64_t *h, const int64_t *k, int exact,
                    int near, int64_t *et, int64_t emask, int64_t *bt, int64_t bmask, int64_t *counts,
                    int64_t *need, int8_t *out)
{
    for (int64_t i = from; i < n; i++) {
        const int64_t *keys = k + i * B;
        if (i + 2 < n) { /* (a document's slots are random: the one after next's fetched ahead) */
            if (exact)
                __builtin_prefetch(et + seen_home(h[i + 2], emask), 1);
            for (int64_t j = 0; near && j < B; j++)
                __builtin_prefetch(bt + seen_home(k[(i + 2) * B + j], bmask), 1);
        }
        if (exact && et[seen_slot(et, emask, h[i])] != 0) {
            out[i] = 1;
            continue;
        }
        int dup = 0;
        for (int64_t j = 0; near && j < B && !dup; j++)
            dup = bt[seen_slot(bt, bmask, keys[j])] != 0;
        if (dup) {
            out[i] = 2;
            continue;
        }
        int64_t new_b = 0; /* (its distinct keys: a key may repeat inside a document) */
        for (int64_t j = 0; near && j < B; j++) {
            int again = 0;
            for (int64_t q = 0; q < j && !again; q++)
                again = keys[q] == keys[j];
            new_b += !again;
        }
        int64_t new_e = exact ? 1 : 0;
        if (2 * (counts[0] + new_e) > emask + 1 || 2 * (counts[1] + new_b) > bmask + 1) {
            need[0] = new_e, need[1] = new_b;
            return i;
        }
        out[i] = 0;
        if (exact)
            et[seen_slot(et, emask, h[i])] = h[i];
        for (int64_t j = 0; near && j < B; j++) {
            int64_t s = seen_slot(bt, bmask, keys[j]);
            if (bt[s] == 0)
                bt[s] = keys[j];
        }
        counts[0] += new_e, counts[1] += new_b;
    }
    return n;
}

/* dsv3ray.runtable: a run's key (lenf = 2 * length + flag, its bytes 0-8, 8-16 and last 8 read
 * as little-endian words, bytes past the run zeroed: `keys`) and its hash (`RunTable._hash64`). */
typedef struct {
    int64_t lenf;
    uint64_t head, mid, tail;
} run_key;

/* All of a run's bytes hashed (8 a step; the buffer is readable 8 bytes past the run). */
static inline uint64_t bytes_hash(const uint8_t *p, int64_t len)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)len;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        h = mix64(h ^ load_le64(p + i));
    if (i < len)
        h = mix64(h ^ (load_le64(p + i) & ((1ULL << (8 * (len - i))) - 1)));
    return h;
}

/* A run of at most 24 bytes is keyed exactly by (lenf, bytes 0-8, 8-16, last 8); a longer one's mid
 * is a hash of all its bytes (a table that holds such runs compares their bytes too: CRunTable). */
static inline run_key key_of(const uint8_t *buf, int64_t s, int64_t e, int flag)
{
    run_key k;
    int64_t len = e - s;
    uint64_t h = load_le64(buf + s);
    k.lenf = 2 * len + flag;
    k.head = len >= 8 ? h : h & ((1ULL << (8 * len)) - 1);
    k.mid = len > 24 ? bytes_hash(buf + s, len) : len > 16 ? load_le64(buf + s + 8) : 0;
    k.tail = len > 8 ? load_le64(buf + e - 8) : 0;
    return k;
}

static inline uint64_t key_hash(run_key k)
{
    const uint64_t K_LEN = 0xC2B2AE3D27D4EB4FULL, K_MIX = 0x9E3779B97F4A7C15ULL;
    return ((((((uint64_t)k.lenf * K_LEN) ^ k.head) * K_MIX ^ k.mid) * K_LEN) ^ k.tail) * K_MIX;
}

static inline int same_key(run_key a, run_key b)
{
    return a.head == b.head && a.tail == b.tail && a.mid == b.mid && a.lenf == b.lenf;
}

/* A call's distinct missing runs: an open-addressing set (linear probing, load <= 1/2) of their
 * numbers, their keys and starts kept for comparing (a run over 24 bytes: its bytes too). */
typedef struct {
    int32_t *slots;
    int64_t mask, count, cap;
    run_key *key;
    int64_t *start;
} miss_set;

static int miss_rehash(miss_set *m, int64_t slots)
{
    int32_t *s = malloc((size_t)slots * sizeof *s);
    if (!s)
        return -1;
    for (int64_t i = 0; i < slots; i++)
        s[i] = -1;
    for (int64_t j = 0; j < m->count; j++) {
        uint64_t p = key_hash(m->key[j]) & (uint64_t)(slots - 1);
        while (s[p] >= 0)
            p = (p + 1) & (uint64_t)(slots - 1);
        s[p] = (int32_t)j;
    }
    free(m->slots);
    m->slots = s, m->mask = slots - 1;
    return 0;
}

/* The number of the distinct missing run with this key (bytes buf[s:s + len]), added if new;
 * -1 when scratch memory could not be allocated. */
static int64_t miss_number(miss_set *m, const uint8_t *buf, int64_t s, int64_t len, run_key key, uint64_t h)
{
    uint64_t q = h & (uint64_t)m->mask;
    for (;; q = (q + 1) & (uint64_t)m->mask) {
        int32_t j = m->slots[q];
        if (j < 0)
            break;
        if (same_key(m->key[j], key) && (len <= 24 || !memcmp(buf + m->start[j], buf + s, (size_t)len)))
            return j;
    }
    if (m->count + 1 > m->cap) {
        int64_t cap = 2 * m->cap;
        run_key *k = realloc(m->key, (size_t)cap * sizeof *k);
        if (!k)
            return -1;
        m->key = k;
        int64_t *st = realloc(m->start, (size_t)cap * sizeof *st);
        if (!st)
            return -1;
        m->start = st, m->cap = cap;
    }
    int64_t j = m->count++;
    m->key[j] = key, m->start[j] = s;
    m->slots[q] = (int32_t)j;
    if (2 * m->count > m->mask + 1 && miss_rehash(m, 2 * (m->mask + 1)))
        return -1;
    return j;
}

/* A dsv3ray.runtable.RunTable as its probe reads it (RunTable.arrays). */
typedef struct {
    const int32_t *slots;
    uint64_t mask;
    int64_t shift;
    const run_key *keys; /* entry e's key: keys[e] (RunTable._keys' rows: one cache line a probe) */
    const uint8_t *arena;     /* a CRunTable's: runs over 24 bytes are entries, their bytes here */
    const int64_t *arena_off; /* (entry e's at arena_off[e]); NULL: such runs are never entries */
} table_view;

/* The entry of the run buf[s:s + len] (key, its hash h) in the table, or -1. */
static inline int64_t table_find(const table_view *tv, const uint8_t *buf, int64_t s, int64_t len, run_key key,
                                 uint64_t h)
{
    if (len > 24 && !tv->arena)
        return -1;
    for (uint64_t q = h >> tv->shift;; q = (q + 1) & tv->mask) {
        int32_t x = tv->slots[q];
        if (x < 0)
            return -1;
        const run_key *k = tv->keys + x;
        if (k->head == key.head && k->tail == key.tail && k->mid == key.mid && k->lenf == key.lenf &&
            (len <= 24 || !memcmp(buf + s, tv->arena + tv->arena_off[x], (size_t)len)))
            return x;
    }
}

static int miss_init(miss_set *m)
{
    m->cap = 256;
    m->key = malloc((size_t)m->cap * sizeof *m->key);
    m->start = malloc((size_t)m->cap * sizeof *m->start);
    return !m->key || !m->start || miss_rehash(m, 1024);
}

static void miss_free(miss_set *m)
{
    free(m->slots);
    free(m->key);
    free(m->start);
}

/* Runs looked up a block at a time: the table is megabytes (its slots, then its entries' keys),
 * so each probe would wait on memory in turn; a block's slots are prefetched first, then the keys
 * of the entries they hold, then the probes run. */
enum { BLOCK = 32 };

typedef struct {
    int64_t n, s[BLOCK], e[BLOCK];
    uint8_t flag[BLOCK], valid[BLOCK];
    run_key key[BLOCK];
    uint64_t h[BLOCK];
    int64_t found[BLOCK];
} run_block;

/* found[r] for the block's valid runs: the entry of buf[s:e] (key flag `flag`), or, absent from
 * the table (a run over 24 bytes always, unless the table is a CRunTable), -2 - its number
 * among the call's distinct misses (its first occurrence written to miss_start/miss_end/
 * miss_flag); -1 for an invalid run. Returns -1 when scratch memory could not be allocated. */
static int lookup_block(const table_view *tv, miss_set *m, const uint8_t *buf, run_block *b,
                        int64_t *miss_start, int64_t *miss_end, int64_t *miss_flag)
{
    for (int64_t r = 0; r < b->n; r++) {
        if (!b->valid[r])
            continue;
        b->key[r] = key_of(buf, b->s[r], b->e[r], b->flag[r]);
        b->h[r] = key_hash(b->key[r]);
        __builtin_prefetch(tv->slots + (b->h[r] >> tv->shift));
    }
    for (int64_t r = 0; r < b->n; r++) {
        int32_t x = b->valid[r] ? tv->slots[b->h[r] >> tv->shift] : -1;
        if (x >= 0)
            __builtin_prefetch(tv->keys + x);
    }
    for (int64_t r = 0; r < b->n; r++) {
        b->found[r] = -1;
        if (!b->valid[r])
            continue;
        int64_t s = b->s[r], len = b->e[r] - s;
        run_key key = b->key[r];
        b->found[r] = table_find(tv, buf, s, len, key, b->h[r]);
        if (b->found[r] >= 0)
            continue;
        int64_t j = miss_number(m, buf, s, len, key, b->h[r]);
        if (j < 0)
            return -1;
        if (m->start[j] == s) { /* (new: its first occurrence) */
            miss_start[j] = s, miss_end[j] = b->e[r];
            if (miss_flag)
                miss_flag[j] = b->flag[r];
        }
        b->found[r] = -2 - j;
    }
    return 0;
}

/* dsv3ray.runtable.RunTable._insert: entries numbers[0..m) (their key rows keys[e]) into the
 * slots (slot_mask + 1 of them, load below 1/2: a free slot is always found), each at the first
 * free slot from its hash >> shift, one after another (the numpy path places contested slots in
 * rounds: other slots, the same entries found). */
void runtable_insert(int32_t *slots, int64_t slot_mask, int64_t shift, const run_key *keys, const int64_t *numbers,
                     int64_t m)
{
    for (int64_t j = 0; j < m; j++) {
        int64_t x = numbers[j];
        run_key k = keys[x];
        uint64_t q = key_hash(k) >> shift;
        while (slots[q] >= 0)
            q = (q + 1) & (uint64_t)slot_mask;
        slots[q] = (int32_t)x;
    }
}

/* The first space (or, when `newlines`, newline) in buf[e:end], else end: eight bytes a step (the
 * lowest byte the zero-byte test flags is the first zero byte; buf is readable 8 bytes past end). */
static inline int64_t next_cut(const uint8_t *buf, int64_t e, int64_t end, int newlines)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    for (; e < end; e += 8) {
        uint64_t w = load_le64(buf + e), x = w ^ (ones * ' '), hit = (x - ones) & ~x & highs;
        if (newlines) {
            uint64_t y = w ^ (ones * '\n');
            hit |= (y - ones) & ~y & highs;
        }
        if (hit) {
            e += __builtin_ctzll(hit) >> 3;
            return e < end ? e : end;
        }
    }
    return end;
}

/* pipelines.chunkpass.ChunkPass._lookup_group's numpy path before its new chunks are added
 * (dsv3ray.runtable.SpaceChunks, the group's distinct chunks, RunTable.lookup, SpaceChunks.with_runs)
 * in one pass over the bytes. buf: the n texts joined (text t: text_start[t] .. text_end[t]), 8
 * readable bytes past the end. A text is cut at every space and, when `newlines`, at every run of
 * newlines, which is an item of its own after its chunk: nl_entry[k - 1] for a run of k <= max_nl.
 * A chunk's key flag is 1 when `mark_first` and it starts its text or follows a run. Per item, its
 * entry (the table's: slots of slot_mask + 1, hash >> shift, the entries' keys t_*) into entry[],
 * its text into doc[]; text t's items: bounds[t] .. bounds[t + 1]. A chunk not in the table is a
 * miss (lookup_block): entry -2 - its number, each distinct one once into miss_start/miss_end/
 * miss_flag. A text with an empty chunk, one over max_chunk bytes or a run over max_nl: bad[t] = 1
 * and no items (its other chunks' misses are kept, as the numpy path adds them: both tables grow
 * alike). entry/doc hold one item per byte and text; the misses as many. Returns the number of
 * misses, or -1 when scratch memory could not be allocated. */
int64_t chunk_scan(const uint8_t *buf, int64_t n, const int64_t *text_start, const int64_t *text_end,
                   int newlines, int mark_first, int64_t max_chunk, int64_t max_nl, const int64_t *nl_entry,
                   const int32_t *slots, int64_t slot_mask, int64_t shift, const run_key *t_keys,
                   const uint8_t *arena, const int64_t *arena_off, int64_t *entry, int64_t *doc, int64_t *bounds,
                   uint8_t *bad,
                   int64_t *miss_start, int64_t *miss_end, int64_t *miss_flag)
{
    miss_set m = {0};
    table_view tv = {slots, (uint64_t)slot_mask, shift, t_keys, arena, arena_off};
    run_block b;
    int64_t t = 0, s = n ? text_start[0] : 0, o = 0, failed = miss_init(&m);
    int64_t text[BLOCK], k_run[BLOCK];
    uint8_t starts_text[BLOCK], ends_text[BLOCK];
    int first = 1;
    while (t < n && !failed) {
        for (b.n = 0; b.n < BLOCK && t < n; b.n++) { /* the next chunks, across texts */
            int64_t r = b.n, end = text_end[t], e = next_cut(buf, s, end, newlines), k = 0;
            if (e < end && buf[e] == '\n')
                for (k = 1; e + k < end && buf[e + k] == '\n'; k++)
                    ;
            if (s == text_start[t])
                bad[t] = 0;
            b.s[r] = s, b.e[r] = e, b.flag[r] = mark_first && first;
            b.valid[r] = e > s && e - s <= max_chunk;
            bad[t] |= !b.valid[r] || k > max_nl;
            text[r] = t, k_run[r] = k, starts_text[r] = s == text_start[t];
            ends_text[r] = e >= end;
            if (e >= end) {
                if (++t < n)
                    s = text_start[t];
                first = 1;
            } else {
                first = k > 0;
                s = e + (k ? k : 1);
            }
        }
        if (lookup_block(&tv, &m, buf, &b, miss_start, miss_end, miss_flag)) {
            failed = 1;
            break;
        }
        for (int64_t r = 0; r < b.n; r++) { /* the block's items */
            int64_t tt = text[r];
            if (starts_text[r])
                bounds[tt] = o;
            entry[o] = b.found[r], doc[o++] = tt;
            if (k_run[r] && k_run[r] <= max_nl)
                entry[o] = nl_entry[k_run[r] - 1], doc[o++] = tt;
            if (ends_text[r] && bad[tt]) /* (its items are not used; its chunks' misses stay) */
                o = bounds[tt];
        }
    }
    bounds[n] = o;
    miss_free(&m);
    return failed ? -1 : m.count;
}

/* _ASCII_PRETOKEN in dsv3ray/tokenizer.py (GPT-2's split on printable ASCII and newlines; \x00
 * a piece of its own): the end of the piece that starts at b[i], as the regex's first matching
 * alternative ends it. */
static inline int pre_class(uint8_t c)
{
    if ((c | 32) >= 'a' && (c | 32) <= 'z')
        return 0; /* letter */
    if (c >= '0' && c <= '9')
        return 1; /* digit */
    if (c == ' ' || c == '\n')
        return 3; /* whitespace */
    return c == 0 ? 4 : 2; /* \x00, other */
}

static inline int64_t pretoken_end(const uint8_t *b, int64_t n, int64_t i)
{
    uint8_t c = b[i];
    if (c == '\'' && i + 1 < n) { /* 's 't 'm 'd 're 've 'll */
        uint8_t x = b[i + 1], y = i + 2 < n ? b[i + 2] : 0;
        if (x == 's' || x == 't' || x == 'm' || x == 'd')
            return i + 2;
        if (((x == 'r' || x == 'v') && y == 'e') || (x == 'l' && y == 'l'))
            return i + 3;
    }
    int cls = pre_class(c);
    int64_t j = i + 1;
    if (c == ' ' && j < n && pre_class(b[j]) <= 2) /* " ?X+": the space and the run after it */
        cls = pre_class(b[j++]);
    if (cls <= 2) {
        while (j < n && pre_class(b[j]) == cls)
            j++;
        return j;
    }
    if (cls == 4)
        return i + 1;
    while (j < n && pre_class(b[j]) == 3)
        j++;
    if (j < n && j - i >= 2) /* [ \n]+(?![^ \n]): the run but its last, which the next piece takes */
        return j - 1;
    return j; /* the run to the end, or one byte ([ \n]+) */
}

/* dsv3ray.tokenizer._ChunkCache._simple_runs_numpy before its new pieces are encoded: m runs of
 * joined (printable ASCII and newlines, no whitespace at either end) written to raw as that path
 * writes them (" " first where space[r], then the run, then a 0x00), each run cut into
 * _ASCII_PRETOKEN's pieces (_pretoken_starts) and each piece looked up (key flag 0) in the table
 * (lookup_block); entry per piece into entry[] (-2 - k: distinct miss k, its first occurrence
 * into miss_start/miss_end, positions in raw), each run's pieces into pieces_R. raw: the runs'
 * sizes + 8 bytes (zeroed past them); entry and the misses: one per byte. Returns the number of
 * misses, or -1 when scratch memory could not be allocated. */
int64_t runs_pieces(const uint8_t *joined, const int64_t *starts, const int64_t *ends, const uint8_t *space, int64_t m,
                    const int32_t *slots, int64_t slot_mask, int64_t shift, const run_key *t_keys,
                    const uint8_t *arena, const int64_t *arena_off, uint8_t *raw, int64_t *entry, int64_t *pieces_R,
                    int64_t *miss_start, int64_t *miss_end)
{
    miss_set ms = {0};
    table_view tv = {slots, (uint64_t)slot_mask, shift, t_keys, arena, arena_off};
    run_block b;
    int64_t o = 0, pos = 0, failed = miss_init(&ms);
    b.n = 0;
    for (int64_t r = 0; r <= m && !failed; r++) {
        if (r < m) { /* (the run written first: a block's keys read only bytes of runs written) */
            int64_t begin = pos, len = ends[r] - starts[r];
            if (space[r])
                raw[pos++] = ' ';
            memcpy(raw + pos, joined + starts[r], (size_t)len);
            pos += len;
            int64_t end = pos;
            raw[pos++] = 0;
            memset(raw + pos, 0, 8); /* (a key reads 8 bytes from a piece's start) */
            pieces_R[r] = 0;
            for (int64_t i = begin; i < end; pieces_R[r]++) {
                int64_t e = pretoken_end(raw, end, i);
                b.s[b.n] = i, b.e[b.n] = e, b.flag[b.n] = 0, b.valid[b.n] = 1;
                i = e;
                if (++b.n < BLOCK)
                    continue;
                failed = lookup_block(&tv, &ms, raw, &b, miss_start, miss_end, NULL);
                for (int64_t k = 0; k < b.n && !failed; k++)
                    entry[o++] = b.found[k];
                b.n = 0;
            }
        } else if (b.n) {
            failed = lookup_block(&tv, &ms, raw, &b, miss_start, miss_end, NULL);
            for (int64_t k = 0; k < b.n && !failed; k++)
                entry[o++] = b.found[k];
        }
    }
    miss_free(&ms);
    return failed ? -1 : ms.count;
}

/* pipelines.native.CRunTable's keys of runs buf[starts[j]:ends[j]] (key_of; flags[j]: 0/1) into
 * out[j] (rows of RunTable._keys). */
void run_keys(const uint8_t *buf, const int64_t *starts, const int64_t *ends, const int64_t *flags, int64_t m,
              run_key *out)
{
    for (int64_t j = 0; j < m; j++)
        out[j] = key_of(buf, starts[j], ends[j], (int)flags[j]);
}

/* pipelines.native.CRunTable.lookup: the entry of each run buf[starts[j]:ends[j]] (flags[j]), -1
 * where absent, into out. */
void run_lookup(const uint8_t *buf, const int64_t *starts, const int64_t *ends, const int64_t *flags, int64_t m,
                const int32_t *slots, int64_t slot_mask, int64_t shift, const run_key *t_keys, const uint8_t *arena,
                const int64_t *arena_off, int64_t *out)
{
    table_view tv = {slots, (uint64_t)slot_mask, shift, t_keys, arena, arena_off};
    for (int64_t j = 0; j < m; j++) {
        run_key k = key_of(buf, starts[j], ends[j], (int)flags[j]);
        out[j] = table_find(&tv, buf, starts[j], ends[j] - starts[j], k, key_hash(k));
    }
}

/* pipelines.dedup.MinHasher._words_at: the words of in[0:n] (maximal runs of bytes that are ASCII
 * letters, digits, underscore or >= 0x80; A-Z folded to a-z), each one's hash into hashes[] (at
 * most 8 bytes: ((len * k1) ^ its bytes as a little-endian word) * k2; 9-16: that, then
 * (h ^ bytes 8-16) * k1; longer: (sum of byte_j * p^j ^ len * k2) * k1, mod 2^64), and per text t
 * the words starting in doc_start[t] .. doc_start[t + 1] (ascending) into words_D. Returns the
 * number of words, or -1 when scratch memory could not be allocated. */
static inline int mh_word_byte(uint8_t c)
{
    return c >= 0x80 || (uint8_t)(c - 'a') < 26 || (uint8_t)(c - '0') < 10 || c == '_';
}

int64_t minhash_words(const uint8_t *in, int64_t n, const int64_t *doc_start, int64_t D, uint64_t p, uint64_t k1,
                      uint64_t k2, uint64_t *hashes, int64_t *words_D)
{
    uint8_t *b = malloc((size_t)n + 16);
    if (!b)
        return -1;
    for (int64_t i = 0; i < n; i++)
        b[i] = (uint8_t)(in[i] - 'A') < 26 ? in[i] + 32 : in[i];
    memset(b + n, 0, 16);
    for (int64_t t = 0; t < D; t++)
        words_D[t] = 0;
    int64_t w = 0, d = -1;
    for (int64_t i = 0; i < n;) {
        if (!mh_word_byte(b[i])) {
            i++;
            continue;
        }
        int64_t s = i;
        while (i < n && mh_word_byte(b[i]))
            i++;
        int64_t len = i - s;
        uint64_t lo = load_le64(b + s), h;
        h = (((uint64_t)len * k1) ^ (len >= 8 ? lo : lo & ((1ULL << (8 * len)) - 1))) * k2;
        if (len > 8) {
            uint64_t hi = load_le64(b + s + 8);
            h = (h ^ (len >= 16 ? hi : hi & ((1ULL << (8 * (len - 8))) - 1))) * k1;
        }
        if (len > 16) {
            uint64_t poly = 0, pw = 1;
            for (int64_t j = 0; j < len; j++, pw *= p)
                poly += (uint64_t)b[s + j] * pw;
            h = (poly ^ ((uint64_t)len * k2)) * k1;
        }
        hashes[w++] = h;
        while (d + 1 < D && doc_start[d + 1] <= s)
            d++;
        if (d >= 0)
            words_D[d]++;
    }
    free(b);
    return w;
}

/* pipelines.chunkpass.ChunkPass._rows' gather for one int32 column (dsv3ray.runtable.Ragged.gather
 * of the entries, then summed per text): text t's items are the rows off[e] .. off[e + 1] of the
 * chunks entries[c], c in bounds[t] .. bounds[t + 1]. With out NULL: each text's number of items
 * into per_text, their total returned; else the items end to end into out (as many as that total).
 * The rows of random entries are prefetched a few chunks ahead. */
int64_t rows_gather_i32(int64_t n, const int64_t *bounds, const int64_t *entries, const int64_t *off,
                        const int32_t *items, int64_t *per_text, int32_t *out)
{
    int64_t total = 0, m = n ? bounds[n] : 0;
    for (int64_t t = 0; t < n; t++) {
        int64_t count = 0;
        for (int64_t c = bounds[t]; c < bounds[t + 1]; c++) {
            if (c + 16 < m)
                __builtin_prefetch(off + entries[c + 16]);
            if (out && c + 8 < m)
                __builtin_prefetch(items + off[entries[c + 8]]);
            int64_t a = off[entries[c]], b = off[entries[c] + 1];
            if (out)
                for (int64_t p = a; p < b; p++)
                    out[total + count++] = items[p];
            else
                count += b - a;
        }
        if (!out)
            per_text[t] = count;
        total += count;
    }
    return total;
}

/* Runs src[src_start[j]:src_start[j] + len[j]] copied to dst[dst_start[j]:...], for j < m (the
 * numpy path: dst[ranges(dst_start, len)] = src[ranges(src_start, len)]). */
void copy_runs(const uint8_t *src, const int64_t *src_start, const int64_t *len, int64_t m, uint8_t *dst,
               const int64_t *dst_start)
{
    for (int64_t j = 0; j < m; j++)
        memcpy(dst + dst_start[j], src + src_start[j], (size_t)len[j]);
}
