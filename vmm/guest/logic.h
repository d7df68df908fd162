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
#define PAGE_SIZE 4096ULL
#define MAX_DIRTY (3ULL << 30)      /* dirty=SIZE at most 3 GiB (the guest's RAM below the hole) */
#define MAX_DIRTY_RATE 4096U        /* dirty_rate=N at most 4096 pages (16 MiB) per request */
#define RAM_TOP_MAX 0xC0000000ULL   /* only RAM below the MMIO hole is contiguous from 0 */
#define MAX_POLL_US 1000000U        /* poll=US at most one second */
#define DEFAULT_POLL_US 0U          /* poll= default (vmm/src/test_guest/workload.rs agrees) */

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
    u64 dirty;              /* bytes of RAM rewritten round-robin, a multiple of 4096, 0 = off */
    u32 dirty_rate;         /* pages of it rewritten per completed request, 1..=MAX_DIRTY_RATE */
    u32 irq;                /* 1: sleep on the device interrupt (wait port) when idle; 0: spin */
    u32 poll_us;            /* with irq: microseconds without a completion before sleeping */
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

/* The 4096-byte pattern of page `page` (index in the dirty region) at generation `gen` in a run
 * with `seed`: word 0 = page, word 1 = gen, word i (2..511) = mix64(k + i) with
 * k = mix64(~seed ^ mix64(page ^ mix64(gen))). */
void dirty_fill(u64 seed, u64 page, u64 gen, u64 *words /* 512 */);
/* Returns 1 if the 512 words equal the pattern. */
int dirty_check(u64 seed, u64 page, u64 gen, const u64 *words);
/* Generation page `page` of a region of `pages` pages holds after `written` round-robin
 * rewrites (rewrite c writes page c % pages with generation c / pages + 1; 0 = initial fill). */
u64 dirty_gen(u64 written, u64 pages, u64 page);

/* FNV-1a 64: folds n bytes at p into h (start with FNV_OFFSET). */
#define FNV_OFFSET 0xcbf29ce484222325ULL
u64 fnv1a64(u64 h, const void *p, usize n);

/* Where the guest puts its ledger tags and dirty region in `mem_size` bytes of RAM:
 * top = min(mem_size, 3 GiB) rounded down to 4 KiB, dirty region [top - dirty, top), tags from
 * LEDGER_TAGS_ADDR up to the dirty region. Returns 0 and fills *dirty_base and *ledger_sectors;
 * -1 if RAM is too small for the ledger of one largest block even without the dirty region;
 * -2 if the dirty region leaves no such room (*max_dirty: the largest dirty that fits). */
int memory_plan(u64 mem_size, u64 dirty, u64 bs_max, u64 *dirty_base, u64 *ledger_sectors,
                u64 *max_dirty);

/* Formatting helpers (return chars written, never more than cap-1, always NUL-terminate). */
usize fmt_u64(char *out, usize cap, u64 v);
usize fmt_size(char *out, usize cap, u64 v); /* 4k, 1m, 2g or plain bytes */
usize fmt_hex64(char *out, usize cap, u64 v); /* 16 lowercase hex digits */
usize str_append(char *out, usize cap, usize at, const char *s);

#endif
