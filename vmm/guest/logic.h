/* Pure logic of the Strata test guest, shared by the guest image and the host check program:
 * workload spec parser/normaliser, random numbers, data pattern, number formatting.
 * No I/O, no globals: compiled freestanding for the guest and hosted for the build-time check. */
#ifndef STRATA_GUEST_LOGIC_H
#define STRATA_GUEST_LOGIC_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define SECTOR_SIZE 512ULL
#define MAX_BS (256ULL * 1024)      /* largest block size a workload may ask for */
#define MAX_QD 128                  /* most requests in flight */
#define MAX_OPS 2000000000ULL       /* write tags are u32; keep far from the UNKNOWN tag */
#define TAG_NEVER 0U                /* ledger: sector never written by this run */
#define TAG_UNKNOWN 0xFFFFFFFFU     /* ledger: a write failed, contents unknown, never verified */

struct workload {
    u64 seed;
    u64 ops;
    u32 read_pct;
    u32 bs_min, bs_max;     /* bytes, multiples of 512 */
    int has_region;
    u64 region_off, region_len; /* bytes, multiples of 512 (only if has_region) */
    u32 qd;
    u32 flush;              /* a FLUSH after every `flush` writes, 0 = never */
    u32 verify;             /* 0 or 1 */
};

/* Parses the workload text (see GUEST-CONTRACT.md). Returns 0 on success; otherwise -1 and
 * writes a NUL-terminated message into err (size errlen). */
int workload_parse(const char *text, usize len, struct workload *w, char *err, usize errlen);

/* Writes the normalised spec (parses back to the same workload), NUL-terminated.
 * Returns its length (without NUL); output is truncated to cap-1 bytes. */
usize workload_format(const struct workload *w, char *out, usize cap);

/* splitmix64 finaliser */
u64 mix64(u64 z);

/* xorshift-free deterministic generator: splitmix64 sequence. */
struct rng { u64 state; };
void rng_seed(struct rng *r, u64 seed);
u64 rng_next(struct rng *r);
/* uniform-ish in [0, n) for n > 0 */
u64 rng_below(struct rng *r, u64 n);

/* The 512-byte pattern of `sector` written with `tag` in a run with `seed`:
 * word 0 = sector, word 1 = tag | (low 32 bits of seed) << 32,
 * word i (2..63) = mix64(k + i) with k = mix64(seed ^ mix64(sector ^ mix64(tag))). */
void pattern_fill(u64 seed, u64 sector, u32 tag, u64 *words /* 64 */);
/* Returns 1 if the 64 words equal the pattern. */
int pattern_check(u64 seed, u64 sector, u32 tag, const u64 *words);

/* Formatting helpers (return chars written, never more than cap-1, always NUL-terminate). */
usize fmt_u64(char *out, usize cap, u64 v);
usize fmt_size(char *out, usize cap, u64 v); /* 4k, 1m, 2g or plain bytes */
usize str_append(char *out, usize cap, usize at, const char *s);

#endif
