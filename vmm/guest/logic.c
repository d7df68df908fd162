/* Pure logic of the Strata test guest (see logic.h). Freestanding: no libc calls. */
#include "layout.h"

usize str_append(char *out, usize cap, usize at, const char *s)
{
    if (cap == 0)
        return 0;
    while (*s && at + 1 < cap)
        out[at++] = *s++;
    out[at] = 0;
    return at;
}

usize fmt_u64(char *out, usize cap, u64 v)
{
    char tmp[24];
    usize n = 0, i = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (cap == 0)
        return 0;
    while (n && i + 1 < cap)
        out[i++] = tmp[--n];
    out[i] = 0;
    return i;
}

usize fmt_size(char *out, usize cap, u64 v)
{
    static const char suffix[] = "kmg";
    int unit = -1;
    while (unit < 2 && v != 0 && v % 1024 == 0) {
        v /= 1024;
        unit++;
    }
    usize n = fmt_u64(out, cap, v);
    if (unit >= 0 && n + 1 < cap) {
        out[n++] = suffix[unit];
        out[n] = 0;
    }
    return n;
}

usize fmt_hex64(char *out, usize cap, u64 v)
{
    static const char hex[] = "0123456789abcdef";
    usize i = 0;
    if (cap == 0)
        return 0;
    for (int sh = 60; sh >= 0 && i + 1 < cap; sh -= 4)
        out[i++] = hex[(v >> sh) & 0xF];
    out[i] = 0;
    return i;
}

static void set_err(char *err, usize errlen, const char *a, const char *b, const char *c)
{
    usize at = 0;
    if (errlen == 0)
        return;
    err[0] = 0;
    at = str_append(err, errlen, at, a);
    at = str_append(err, errlen, at, b);
    str_append(err, errlen, at, c);
}

/* Parses decimal digits [s, e) with an optional k/m/g suffix when `sized`. */
static int parse_num(const char *s, const char *e, int sized, u64 *out)
{
    u64 v = 0, mult = 1;
    if (sized && e > s) {
        char c = e[-1];
        if (c == 'k' || c == 'K')
            mult = 1024ULL;
        else if (c == 'm' || c == 'M')
            mult = 1024ULL * 1024;
        else if (c == 'g' || c == 'G')
            mult = 1024ULL * 1024 * 1024;
        if (mult != 1)
            e--;
    }
    if (s == e)
        return -1;
    for (; s < e; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        u64 d = (u64)(*s - '0');
        if (v > (~0ULL - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    if (v > ~0ULL / mult)
        return -1;
    *out = v * mult;
    return 0;
}

static const char *find_char(const char *s, const char *e, char c)
{
    for (; s < e; s++)
        if (*s == c)
            return s;
    return 0;
}

static int key_is(const char *k, const char *ke, const char *name)
{
    while (k < ke && *name && *k == *name) {
        k++;
        name++;
    }
    return k == ke && *name == 0;
}

/* Copies at most 32 bytes of [s, e) into out (33 bytes), NUL-terminated. */
static void copy_trunc(char *out, const char *s, const char *e)
{
    usize n = 0;
    while (s < e && n < 32)
        out[n++] = *s++;
    out[n] = 0;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

enum { K_SEED, K_OPS, K_READ, K_BS, K_REGION, K_QD, K_FLUSH, K_VERIFY, K_DIRTY, K_DIRTY_RATE,
       K_IRQ, K_POLL, K_COUNT };
static const char *const key_names[K_COUNT] = {
    "seed", "ops", "read", "bs", "region", "qd", "flush", "verify", "dirty", "dirty_rate", "irq",
    "poll"
};

static int parse_value(int key, const char *v, const char *ve, struct workload *w)
{
    u64 a, b;
    const char *sep;
    switch (key) {
    case K_SEED:
        return parse_num(v, ve, 0, &w->seed);
    case K_OPS:
        if (parse_num(v, ve, 0, &a) || a > MAX_OPS)
            return -1;
        w->ops = a;
        return 0;
    case K_READ:
        if (parse_num(v, ve, 0, &a) || a > 100)
            return -1;
        w->read_pct = (u32)a;
        return 0;
    case K_BS:
        sep = find_char(v, ve, '-');
        if (sep) {
            if (parse_num(v, sep, 1, &a) || parse_num(sep + 1, ve, 1, &b))
                return -1;
        } else {
            if (parse_num(v, ve, 1, &a))
                return -1;
            b = a;
        }
        if (a < SECTOR_SIZE || a % SECTOR_SIZE || b % SECTOR_SIZE || b > MAX_BS || a > b)
            return -1;
        w->bs_min = (u32)a;
        w->bs_max = (u32)b;
        return 0;
    case K_REGION:
        sep = find_char(v, ve, ':');
        if (!sep || parse_num(v, sep, 1, &a) || parse_num(sep + 1, ve, 1, &b))
            return -1;
        if (a % SECTOR_SIZE || b % SECTOR_SIZE || b == 0 || a > ~0ULL - b)
            return -1;
        w->has_region = 1;
        w->region_off = a;
        w->region_len = b;
        return 0;
    case K_QD:
        if (parse_num(v, ve, 0, &a) || a < 1 || a > MAX_QD)
            return -1;
        w->qd = (u32)a;
        return 0;
    case K_FLUSH:
        if (parse_num(v, ve, 0, &a) || a > 0xFFFFFFFFULL)
            return -1;
        w->flush = (u32)a;
        return 0;
    case K_VERIFY:
        if (parse_num(v, ve, 0, &a) || a > 1)
            return -1;
        w->verify = (u32)a;
        return 0;
    case K_DIRTY:
        if (parse_num(v, ve, 1, &a) || a % PAGE_SIZE || a > MAX_DIRTY)
            return -1;
        w->dirty = a;
        return 0;
    case K_DIRTY_RATE:
        if (parse_num(v, ve, 0, &a) || a < 1 || a > MAX_DIRTY_RATE)
            return -1;
        w->dirty_rate = (u32)a;
        return 0;
    case K_IRQ:
        if (parse_num(v, ve, 0, &a) || a > 1)
            return -1;
        w->irq = (u32)a;
        return 0;
    case K_POLL:
        if (parse_num(v, ve, 0, &a) || a > MAX_POLL_US)
            return -1;
        w->poll_us = (u32)a;
        return 0;
    default:
        return -1;
    }
}

static const char *const value_help[K_COUNT] = {
    "a decimal u64",
    "a decimal number 0..=2000000000",
    "a percentage 0..=100",
    "a size (512, 4k, 64k) or range 512-64k, multiples of 512, at most 256k",
    "OFFSET:LEN, sizes in bytes (k/m/g suffixes), multiples of 512, LEN > 0",
    "a number 1..=128",
    "a decimal number 0..=4294967295",
    "0 or 1",
    "a size (0 = off, 64m), a multiple of 4k, at most 3g",
    "a number of pages 1..=4096",
    "0 or 1",
    "microseconds 0..=1000000",
};

int workload_parse(const char *text, usize len, struct workload *w, char *err, usize errlen)
{
    const char *p = text, *end = text + len;
    int seen[K_COUNT] = { 0 };

    w->seed = 1;
    w->ops = 10000;
    w->read_pct = 50;
    w->bs_min = w->bs_max = 4096;
    w->has_region = 0;
    w->region_off = w->region_len = 0;
    w->qd = 32;
    w->flush = 0;
    w->verify = 1;
    w->dirty = 0;
    w->dirty_rate = 1;
    w->irq = 1;
    w->poll_us = DEFAULT_POLL_US;

    while (p < end && is_space(*p))
        p++;
    while (end > p && is_space(end[-1]))
        end--;
    if (p == end)
        return 0;
    for (;;) {
        const char *ie = find_char(p, end, ',');
        if (!ie)
            ie = end;
        const char *eq = find_char(p, ie, '=');
        char what[33];
        copy_trunc(what, p, eq ? eq : ie);
        if (!eq || eq == p) {
            set_err(err, errlen, "expected key=value, got '", what, "'");
            return -1;
        }
        int key = -1;
        for (int k = 0; k < K_COUNT; k++)
            if (key_is(p, eq, key_names[k]))
                key = k;
        if (key < 0) {
            set_err(err, errlen, "unknown key '", what,
                    "' (known: seed, ops, read, bs, region, qd, flush, verify, dirty, "
                    "dirty_rate, irq, poll)");
            return -1;
        }
        if (seen[key]) {
            set_err(err, errlen, "duplicate key ", key_names[key], "");
            return -1;
        }
        seen[key] = 1;
        if (parse_value(key, eq + 1, ie, w)) {
            set_err(err, errlen, key_names[key], ": bad value, expected ", value_help[key]);
            return -1;
        }
        if (ie == end)
            break;
        p = ie + 1;
    }
    if (w->has_region && w->region_len < w->bs_max) {
        set_err(err, errlen, "region: LEN is smaller than the largest block size", "", "");
        return -1;
    }
    return 0;
}

static usize put_kv(char *out, usize cap, usize at, const char *key, const char *val)
{
    if (at)
        at = str_append(out, cap, at, ",");
    at = str_append(out, cap, at, key);
    at = str_append(out, cap, at, "=");
    return str_append(out, cap, at, val);
}

usize workload_format(const struct workload *w, char *out, usize cap)
{
    char v[64];
    usize at = 0, n;
    if (cap == 0)
        return 0;
    out[0] = 0;
    fmt_u64(v, sizeof v, w->seed);
    at = put_kv(out, cap, at, "seed", v);
    fmt_u64(v, sizeof v, w->ops);
    at = put_kv(out, cap, at, "ops", v);
    fmt_u64(v, sizeof v, w->read_pct);
    at = put_kv(out, cap, at, "read", v);
    n = fmt_size(v, sizeof v, w->bs_min);
    if (w->bs_max != w->bs_min) {
        n = str_append(v, sizeof v, n, "-");
        fmt_size(v + n, sizeof v - n, w->bs_max);
    }
    at = put_kv(out, cap, at, "bs", v);
    if (w->has_region) {
        n = fmt_size(v, sizeof v, w->region_off);
        n = str_append(v, sizeof v, n, ":");
        fmt_size(v + n, sizeof v - n, w->region_len);
        at = put_kv(out, cap, at, "region", v);
    }
    fmt_u64(v, sizeof v, w->qd);
    at = put_kv(out, cap, at, "qd", v);
    fmt_u64(v, sizeof v, w->flush);
    at = put_kv(out, cap, at, "flush", v);
    fmt_u64(v, sizeof v, w->verify);
    at = put_kv(out, cap, at, "verify", v);
    if (w->dirty) {
        fmt_size(v, sizeof v, w->dirty);
        at = put_kv(out, cap, at, "dirty", v);
    }
    if (w->dirty_rate != 1) {
        fmt_u64(v, sizeof v, w->dirty_rate);
        at = put_kv(out, cap, at, "dirty_rate", v);
    }
    if (!w->irq)
        at = put_kv(out, cap, at, "irq", "0");
    if (w->poll_us != DEFAULT_POLL_US) {
        fmt_u64(v, sizeof v, w->poll_us);
        at = put_kv(out, cap, at, "poll", v);
    }
    return at;
}

u64 mix64(u64 z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void rng_seed(struct rng *r, u64 seed)
{
    r->state = seed;
}

u64 rng_next(struct rng *r)
{
    r->state += 0x9e3779b97f4a7c15ULL;
    return mix64(r->state);
}

u64 rng_below(struct rng *r, u64 n)
{
    return rng_next(r) % n;
}

static u64 pattern_key(u64 seed, u64 sector, u32 tag)
{
    return mix64(seed ^ mix64(sector ^ mix64(tag)));
}

void pattern_fill(u64 seed, u64 sector, u32 tag, u64 *words)
{
    u64 k = pattern_key(seed, sector, tag);
    words[0] = sector;
    words[1] = (u64)tag | (seed << 32);
    for (u64 i = 2; i < SECTOR_SIZE / 8; i++)
        words[i] = mix64(k + i);
}

int pattern_check(u64 seed, u64 sector, u32 tag, const u64 *words)
{
    u64 k = pattern_key(seed, sector, tag);
    if (words[0] != sector || words[1] != ((u64)tag | (seed << 32)))
        return 0;
    for (u64 i = 2; i < SECTOR_SIZE / 8; i++)
        if (words[i] != mix64(k + i))
            return 0;
    return 1;
}

static u64 dirty_key(u64 seed, u64 page, u64 gen)
{
    return mix64(~seed ^ mix64(page ^ mix64(gen)));
}

void dirty_fill(u64 seed, u64 page, u64 gen, u64 *words)
{
    u64 k = dirty_key(seed, page, gen);
    words[0] = page;
    words[1] = gen;
    for (u64 i = 2; i < PAGE_SIZE / 8; i++)
        words[i] = mix64(k + i);
}

int dirty_check(u64 seed, u64 page, u64 gen, const u64 *words)
{
    u64 k = dirty_key(seed, page, gen);
    u64 diff = (words[0] ^ page) | (words[1] ^ gen);
    for (u64 i = 2; i < PAGE_SIZE / 8; i++)
        diff |= words[i] ^ mix64(k + i);
    return diff == 0;
}

u64 dirty_gen(u64 written, u64 pages, u64 page)
{
    if (page >= written)
        return 0;
    return (written - 1 - page) / pages + 1;
}

u64 fnv1a64(u64 h, const void *p, usize n)
{
    const u8 *b = p;
    for (usize i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int memory_plan(u64 mem_size, u64 dirty, u64 bs_max, u64 *dirty_base, u64 *ledger_sectors,
                u64 *max_dirty)
{
    u64 top = (mem_size < RAM_TOP_MAX ? mem_size : RAM_TOP_MAX) & ~(PAGE_SIZE - 1);
    u64 need = LEDGER_TAGS_ADDR + 4 * (bs_max / SECTOR_SIZE);
    *max_dirty = 0;
    if (top < need)
        return -1;
    *max_dirty = (top - need) & ~(PAGE_SIZE - 1);
    if (dirty > *max_dirty)
        return -2;
    *dirty_base = top - dirty;
    *ledger_sectors = (*dirty_base - LEDGER_TAGS_ADDR) / 4;
    return 0;
}
