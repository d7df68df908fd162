/* Strata test guest workload (runs at CPL3 with IOPL=3): parses the workload from BootInfo,
 * drives virtio-blk, keeps the ledger and verifies every read against it. */
#include "layout.h"
#include "logic.h"
#include "virtio.h"

#define LEDGER ((volatile struct ledger *)(usize)LEDGER_ADDR)
#define TAGS ((u32 *)(usize)LEDGER_TAGS_ADDR)
#define MAX_REPORTED 8

static struct virtio_blk_req_hdr req_hdr[MAX_QD];
static u8 req_status[MAX_QD];

struct stats { u64 ops, reads, writes, flushes, errors, bytes, cycles, iops, max_stall; };
static struct stats st;
static u32 tsc_khz;
static u64 reported;
static int ledger_ready; /* the ledger header is in RAM that exists and has been initialised */
static int tags_ready;   /* the tags of the region are initialised (ledger digest is meaningful) */
static int dirty_ready;  /* the dirty region is initialised (mem digest is meaningful) */
static u64 dirty_seed;

static inline void outb(u16 port, u8 v)
{
    __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
    __asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* The guest's clock: the gaps between its progress points (loop turns, console bytes, dirty
 * pages) by its TSC, summed into st.cycles, the longest in st.max_stall. Runs during run(). */
static struct { u64 last; int running; } clk;

/* Counts and returns the gap since the last progress point. Never negative: the VMM may
 * restore the TSC of a checkpoint, lower than what this RAM saw last. */
static u64 tick(void)
{
    if (!clk.running)
        return 0;
    u64 now = rdtsc();
    u64 gap = now >= clk.last ? now - clk.last : 0;
    clk.last = now;
    st.cycles += gap;
    if (gap > st.max_stall)
        st.max_stall = gap;
    return gap;
}

/* Every byte is an exit to the VMM (a line takes ms): each is a progress point of its own, so a
 * line is not a stall but a pause of the VM while printing is. */
static void puts_raw(const char *s)
{
    while (*s) {
        outb(SERIAL_PORT, (u8)*s++);
        tick();
    }
}

/* Line builder: "strata-guest: " + pieces + "\n". */
static char line[4096 + 128];
static usize line_at;

static void l_begin(const char *what)
{
    line_at = str_append(line, sizeof line, 0, "strata-guest: ");
    line_at = str_append(line, sizeof line, line_at, what);
}

static void l_str(const char *s)
{
    line_at = str_append(line, sizeof line, line_at, s);
}

static void l_kv(const char *key, u64 v)
{
    char num[24];
    fmt_u64(num, sizeof num, v);
    l_str(" ");
    l_str(key);
    l_str("=");
    l_str(num);
}

static void l_end(void)
{
    line_at = str_append(line, sizeof line, line_at, "\n");
    puts_raw(line);
}

static void error_line(const char *a, const char *b)
{
    l_begin("error ");
    l_str(a);
    l_str(b);
    l_end();
}

static void l_hex(const char *key, u64 v)
{
    char num[24];
    fmt_hex64(num, sizeof num, v);
    l_str(" ");
    l_str(key);
    l_str("=");
    l_str(num);
}

/* TSC cycles to microseconds (0 if the VMM gave no TSC frequency). */
static u64 cycles_us(u64 cycles)
{
    if (!tsc_khz)
        return 0;
    return cycles / tsc_khz * 1000 + cycles % tsc_khz * 1000 / tsc_khz;
}

/* FNV-1a 64 over the ledger tags (little-endian u32s, region order). */
static u64 ledger_digest(void)
{
    if (!tags_ready)
        return FNV_OFFSET;
    return fnv1a64(FNV_OFFSET, TAGS, (usize)(LEDGER->region_sectors * 4));
}

/* FNV-1a 64 over the bytes of the dirty region. */
static u64 mem_digest(void)
{
    if (!dirty_ready)
        return FNV_OFFSET;
    return fnv1a64(FNV_OFFSET, (const void *)(usize)LEDGER->dirty_base,
                   (usize)(LEDGER->dirty_pages * PAGE_SIZE));
}

static __attribute__((noreturn)) void finish(u32 status)
{
    clk.running = 0;
    if (st.cycles && tsc_khz) {
        u64 us = cycles_us(st.cycles);
        st.iops = st.ops * 1000000ULL / (us ? us : 1);
    }
    u64 ledger = ledger_digest(), mem = mem_digest();
    l_begin("done");
    l_kv("ops", st.ops);
    l_kv("reads", st.reads);
    l_kv("writes", st.writes);
    l_kv("flushes", st.flushes);
    l_kv("errors", st.errors);
    l_kv("bytes", st.bytes);
    l_kv("cycles", st.cycles);
    l_kv("iops", st.iops);
    l_kv("max_stall_us", cycles_us(st.max_stall));
    l_kv("dirtied", dirty_ready ? LEDGER->dirty_written : 0);
    l_hex("ledger", ledger);
    l_hex("mem", mem);
    l_kv("kicks", vblk_kicks);
    l_kv("waits", vblk_waits);
    l_end();
    if (ledger_ready)
        LEDGER->state = STATE_DONE;
    for (;;) {
        outl(EXIT_PORT, status);
        __asm__ __volatile__("pause");
    }
}

static int overlaps(u64 sector, u64 n)
{
    for (u32 i = 0; i < MAX_QD; i++) {
        volatile struct slot *s = &LEDGER->slots[i];
        if ((s->kind == SLOT_READ || s->kind == SLOT_WRITE) && sector < s->sector + s->sectors &&
            s->sector < sector + n)
            return 1;
    }
    return 0;
}

static void report_mismatch(u64 seed, u64 sector, u32 want, const u64 *got)
{
    u64 expect[SECTOR_SIZE / 8];
    u64 word = 0;
    if (reported >= MAX_REPORTED)
        return;
    reported++;
    pattern_fill(seed, sector, want, expect);
    while (word < SECTOR_SIZE / 8 && expect[word] == got[word])
        word++;
    l_begin("error verify");
    l_kv("sector", sector);
    l_kv("expected_tag", want);
    l_kv("found_sector", got[0]);
    l_kv("found_tag", (u32)got[1]);
    l_kv("first_bad_byte", word * 8);
    l_end();
}

static void report_io(const char *kind, u64 sector, u64 n, u32 status)
{
    if (reported >= MAX_REPORTED)
        return;
    reported++;
    l_begin("error io ");
    l_str(kind);
    l_kv("sector", sector);
    l_kv("sectors", n);
    l_kv("status", status);
    l_end();
}

static void report_page(u64 page, u64 want, const u64 *got)
{
    u64 expect[PAGE_SIZE / 8];
    u64 word = 0;
    if (reported >= MAX_REPORTED)
        return;
    reported++;
    dirty_fill(dirty_seed, page, want, expect);
    while (word < PAGE_SIZE / 8 && expect[word] == got[word])
        word++;
    l_begin("error mem");
    l_kv("page", page);
    l_kv("expected_gen", want);
    l_kv("found_page", got[0]);
    l_kv("found_gen", got[1]);
    l_kv("first_bad_byte", word * 8);
    l_end();
}

static u64 *dirty_page(u64 page)
{
    return (u64 *)(usize)(LEDGER->dirty_base + page * PAGE_SIZE);
}

/* Fills the dirty region with generation 0. */
static void dirty_init(u64 base, u64 pages, u32 rate)
{
    volatile struct ledger *lg = LEDGER;
    lg->dirty_base = base;
    lg->dirty_pages = pages;
    lg->dirty_rate = rate;
    lg->dirty_written = 0;
    for (u64 p = 0; p < pages; p++)
        dirty_fill(dirty_seed, p, 0, dirty_page(p));
    __asm__ __volatile__("" ::: "memory");
    dirty_ready = 1;
}

/* Rewrites the next n pages round-robin; each must still hold what it was last written with.
 * The count lives in the ledger (guest RAM), so the guest resumes correctly from any instant. */
static void dirty_step(u64 n)
{
    volatile struct ledger *lg = LEDGER;
    u64 pages = lg->dirty_pages;
    for (; n; n--) {
        u64 c = lg->dirty_written;
        u64 p = c % pages, gen = c / pages;
        u64 *words = dirty_page(p);
        if (!dirty_check(dirty_seed, p, gen, words)) {
            st.errors++;
            lg->errors = st.errors;
            report_page(p, gen, words);
        }
        dirty_fill(dirty_seed, p, gen + 1, words);
        __asm__ __volatile__("" ::: "memory");
        lg->dirty_written = c + 1;
        tick();
    }
}

/* Checks every page of the dirty region against the rewrite count. */
static void dirty_verify_all(void)
{
    volatile struct ledger *lg = LEDGER;
    u64 pages = lg->dirty_pages, written = lg->dirty_written;
    for (u64 p = 0; p < pages; p++) {
        u64 gen = dirty_gen(written, pages, p);
        if (!dirty_check(dirty_seed, p, gen, dirty_page(p))) {
            st.errors++;
            lg->errors = st.errors;
            report_page(p, gen, dirty_page(p));
        }
    }
}

struct op { u32 kind; u64 sector; u64 sectors; };

static void gen_op(const struct workload *w, struct rng *r, u64 region_bytes, u64 region_sector,
                   struct op *op)
{
    u64 span = (w->bs_max - w->bs_min) / SECTOR_SIZE + 1;
    u64 len = w->bs_min + rng_below(r, span) * SECTOR_SIZE;
    u64 align = w->bs_min;
    u64 choices = (region_bytes - len) / align + 1;
    u64 off = rng_below(r, choices) * align;
    op->kind = rng_below(r, 100) < w->read_pct ? SLOT_READ : SLOT_WRITE;
    op->sector = region_sector + off / SECTOR_SIZE;
    op->sectors = len / SECTOR_SIZE;
}

/* Handles one completed request in slot i. */
static void complete(const struct workload *w, u32 i)
{
    volatile struct ledger *lg = LEDGER;
    struct slot s = *(struct slot *)&lg->slots[i];
    u32 status = *(volatile u8 *)&req_status[i];
    u64 *buf = (u64 *)(usize)(BUF_BASE + (u64)i * MAX_BS);
    u64 base = lg->region_sector;

    if (s.kind == SLOT_FLUSH) {
        st.flushes++;
        if (status != VIRTIO_BLK_S_OK) {
            st.errors++;
            report_io("flush", 0, 0, status);
        }
    } else if (s.kind == SLOT_WRITE) {
        st.writes++;
        st.ops++;
        st.bytes += s.sectors * SECTOR_SIZE;
        u32 tag = s.tag;
        if (status != VIRTIO_BLK_S_OK) {
            st.errors++;
            report_io("write", s.sector, s.sectors, status);
            tag = TAG_UNKNOWN;
        }
        for (u64 k = 0; k < s.sectors; k++)
            TAGS[s.sector - base + k] = tag;
    } else {
        st.reads++;
        st.ops++;
        st.bytes += s.sectors * SECTOR_SIZE;
        if (status != VIRTIO_BLK_S_OK) {
            st.errors++;
            report_io("read", s.sector, s.sectors, status);
        } else if (w->verify) {
            for (u64 k = 0; k < s.sectors; k++) {
                u32 tag = TAGS[s.sector - base + k];
                const u64 *words = buf + k * (SECTOR_SIZE / 8);
                if (tag == TAG_NEVER || tag == TAG_UNKNOWN)
                    continue;
                if (!pattern_check(w->seed, s.sector + k, tag, words)) {
                    st.errors++;
                    report_mismatch(w->seed, s.sector + k, tag, words);
                }
            }
        }
    }
    lg->completed = st.ops;
    lg->errors = st.errors;
    /* Tags before freeing the slot: a VM snapshot taken between the two must still show the
     * write as in flight, never as done with old tags. */
    __asm__ __volatile__("" ::: "memory");
    lg->slots[i].kind = SLOT_FREE;
}

/* Fills slot i's header and buffer for `op` and adds it to the avail ring. */
static void submit(struct vblk *d, const struct workload *w, u32 i, const struct op *op, u32 tag)
{
    volatile struct ledger *lg = LEDGER;
    u64 *buf = (u64 *)(usize)(BUF_BASE + (u64)i * MAX_BS);

    lg->slots[i].kind = op->kind;
    lg->slots[i].tag = tag;
    lg->slots[i].sector = op->sector;
    lg->slots[i].sectors = op->sectors;
    req_status[i] = 0xFF;
    req_hdr[i].ioprio = 0;
    req_hdr[i].sector = op->sector;
    if (op->kind == SLOT_FLUSH) {
        req_hdr[i].type = VIRTIO_BLK_T_FLUSH;
        req_hdr[i].sector = 0;
        vblk_add(d, i, &req_hdr[i], 0, 0, 0, &req_status[i]);
        return;
    }
    if (op->kind == SLOT_WRITE) {
        req_hdr[i].type = VIRTIO_BLK_T_OUT;
        for (u64 k = 0; k < op->sectors; k++)
            pattern_fill(w->seed, op->sector + k, tag, buf + k * (SECTOR_SIZE / 8));
    } else {
        req_hdr[i].type = VIRTIO_BLK_T_IN;
    }
    vblk_add(d, i, &req_hdr[i], buf, (u32)(op->sectors * SECTOR_SIZE), op->kind == SLOT_READ,
             &req_status[i]);
}

#define WAIT_LIMIT_S 30ULL

static void run(struct vblk *d, const struct workload *w, u64 region_sector, u64 region_bytes)
{
    volatile struct ledger *lg = LEDGER;
    u32 free_slots[MAX_QD], nfree = 0, inflight = 0;
    struct rng r;
    struct op pending = { 0, 0, 0 };
    int have_pending = 0, flush_due = 0;
    u64 issued = 0, writes_since_flush = 0, last_tag = 0;
    u64 progress_every = w->ops >= 10 ? w->ops / 10 : 0, next_progress = progress_every;
    u64 khz = tsc_khz ? tsc_khz : 1000000; /* assume 1 GHz if unknown, only for the timeout */
    u64 waited = 0;
    u64 poll_cycles = (u64)w->poll_us * khz / 1000;
    u64 dirty_rate = dirty_ready ? lg->dirty_rate : 0;

    for (u32 i = w->qd; i > 0; i--)
        free_slots[nfree++] = i - 1;
    rng_seed(&r, w->seed);
    clk.last = rdtsc();
    clk.running = 1;
    lg->state = STATE_RUNNING;

    while (st.ops < w->ops || inflight || flush_due) {
        while (nfree) {
            struct op fl = { SLOT_FLUSH, 0, 0 };
            if (flush_due) {
                flush_due = 0;
                submit(d, w, free_slots[--nfree], &fl, 0);
                inflight++;
                continue;
            }
            if (!have_pending) {
                if (issued >= w->ops)
                    break;
                gen_op(w, &r, region_bytes, region_sector, &pending);
                have_pending = 1;
                issued++;
            }
            if (overlaps(pending.sector, pending.sectors))
                break;
            u32 tag = 0;
            if (pending.kind == SLOT_WRITE) {
                tag = (u32)++last_tag;
                lg->last_tag = last_tag;
                if (w->flush && ++writes_since_flush == w->flush) {
                    writes_since_flush = 0;
                    flush_due = 1;
                }
            }
            submit(d, w, free_slots[--nfree], &pending, tag);
            have_pending = 0;
            inflight++;
        }
        vblk_kick(d);

        u32 head;
        int got = 0;
        while (vblk_next_used(d, &head)) {
            int slot = vblk_slot_of(d, head);
            u32 i = (u32)slot;
            if (slot < 0 || i >= w->qd || lg->slots[i].kind == SLOT_FREE) {
                error_line("device returned an unknown used id", "");
                st.errors++;
                finish(EXIT_DEVICE);
            }
            complete(w, i);
            free_slots[nfree++] = i;
            inflight--;
            got++;
            /* Memory work between I/Os, counted per completion (not per loop turn), so the
             * region's final contents depend only on the workload. */
            if (dirty_rate)
                dirty_step(dirty_rate);
            /* Checked per completion, so the line is printed at exactly st.ops = next_progress
             * and the console does not depend on how completions were batched. */
            if (progress_every && st.ops == next_progress && st.ops < w->ops) {
                next_progress += progress_every;
                l_begin("progress");
                l_kv("ops", st.ops);
                l_kv("errors", st.errors);
                l_end();
            }
        }
        u64 gap = tick();
        if (got) {
            waited = 0;
        } else {
            /* Count only short gaps so a VM paused for a checkpoint does not time out. */
            if (gap < khz * 1000) {
                u64 before = waited / (khz * 1000);
                waited += gap;
                /* Once per second of waiting, look at the device status (one MMIO exit). */
                if (waited / (khz * 1000) != before && vblk_broken()) {
                    error_line("device: DEVICE_NEEDS_RESET or FAILED set while requests were in "
                               "flight", "");
                    finish(EXIT_DEVICE);
                }
            }
            if (waited > WAIT_LIMIT_S * khz * 1000) {
                error_line("device timeout: no request completed for 30 s", "");
                finish(EXIT_DEVICE);
            }
            if (w->irq && inflight && waited >= poll_cycles)
                vblk_wait(d); /* a config-change bit is seen by the once-a-second check */
            else
                __asm__ __volatile__("pause");
        }
    }
    tick();
    clk.running = 0;
}

void guest_main(const struct boot_info *bi)
{
    static struct workload w;
    static char err[256];
    static char norm[512];
    static struct vblk dev;

    if (bi->magic != BOOT_INFO_MAGIC || bi->version != BOOT_INFO_VERSION) {
        error_line("boot info: bad magic or version at 0x7000", "");
        finish(EXIT_DEVICE);
    }
    tsc_khz = bi->tsc_khz;
    if (bi->workload_len > WORKLOAD_MAX) {
        error_line("workload: longer than 3800 bytes", "");
        finish(EXIT_BAD_SPEC);
    }
    if (workload_parse(bi->workload, bi->workload_len, &w, err, sizeof err)) {
        error_line("workload: ", err);
        finish(EXIT_BAD_SPEC);
    }
    workload_format(&w, norm, sizeof norm);
    l_begin("start ");
    l_str(norm);
    l_end();

    volatile struct ledger *lg = LEDGER;
    u64 dirty_base = 0, max_sectors = 0, max_dirty = 0;
    int plan = memory_plan(bi->mem_size, w.dirty, w.bs_max, &dirty_base, &max_sectors, &max_dirty);
    if (plan == -1) {
        error_line("guest RAM too small: need more than 64 MiB for buffers and the ledger", "");
        finish(EXIT_DEVICE);
    }
    if (plan == -2) {
        char num[24];
        usize at = fmt_size(num, sizeof num, w.dirty);
        at = str_append(err, sizeof err, 0, "dirty=");
        at = str_append(err, sizeof err, at, num);
        at = str_append(err, sizeof err, at, " does not fit in guest RAM beside the ledger (at most ");
        fmt_size(num, sizeof num, max_dirty);
        at = str_append(err, sizeof err, at, num);
        str_append(err, sizeof err, at, ")");
        error_line("workload: ", err);
        finish(EXIT_BAD_SPEC);
    }
    lg->magic = 0;
    lg->version = LEDGER_VERSION;
    lg->seed = w.seed;
    lg->state = STATE_SETUP;
    lg->qd = w.qd;
    lg->last_tag = lg->completed = lg->errors = 0;
    lg->region_sector = lg->region_sectors = 0;
    lg->dirty_base = lg->dirty_pages = lg->dirty_written = 0;
    lg->dirty_rate = w.dirty_rate;
    for (u32 i = 0; i < MAX_QD; i++)
        lg->slots[i].kind = SLOT_FREE;
    lg->magic = LEDGER_MAGIC;
    ledger_ready = 1;

    if (vblk_init(&dev, err, sizeof err)) {
        error_line("device: ", err);
        finish(EXIT_DEVICE);
    }
    u64 cap = dev.capacity_sectors * SECTOR_SIZE;
    u64 off = 0, len = cap;
    if (w.has_region) {
        off = w.region_off;
        len = w.region_len;
    } else if (len / SECTOR_SIZE > max_sectors) {
        len = max_sectors * SECTOR_SIZE;
    }
    l_begin("device");
    l_kv("capacity", cap);
    l_kv("queue", dev.qsize);
    l_kv("flush", (u64)dev.has_flush);
    l_kv("indirect", (u64)dev.indirect);
    l_kv("region_offset", off);
    l_kv("region_len", len);
    l_kv("ledger_sectors", max_sectors);
    l_end();
    if (off > cap || len > cap - off) {
        error_line("workload: region is beyond the end of the disk", "");
        finish(EXIT_BAD_SPEC);
    }
    if (len / SECTOR_SIZE > max_sectors) {
        error_line("workload: region has more sectors than the ledger can hold in guest RAM", "");
        finish(EXIT_BAD_SPEC);
    }
    if (len < w.bs_max) {
        error_line("workload: region (or disk) is smaller than the largest block size", "");
        finish(EXIT_BAD_SPEC);
    }
    if (dev.per_request * w.qd > dev.qsize) {
        error_line("workload: qd is larger than the device queue allows (3 descriptors per request "
                   "without VIRTIO_RING_F_INDIRECT_DESC)", "");
        finish(EXIT_BAD_SPEC);
    }
    if (w.flush && !dev.has_flush) {
        error_line("device: flush requested but VIRTIO_BLK_F_FLUSH is not offered", "");
        finish(EXIT_DEVICE);
    }
    if (w.read_pct < 100 && w.ops && dev.read_only) {
        error_line("device: read-only but the workload writes", "");
        finish(EXIT_DEVICE);
    }
    for (u64 i = 0; i < len / SECTOR_SIZE; i++)
        TAGS[i] = TAG_NEVER;
    __asm__ __volatile__("" ::: "memory");
    lg->region_sector = off / SECTOR_SIZE;
    lg->region_sectors = len / SECTOR_SIZE;
    tags_ready = 1;
    dirty_seed = w.seed;
    if (w.dirty)
        dirty_init(dirty_base, w.dirty / PAGE_SIZE, w.dirty_rate);

    run(&dev, &w, off / SECTOR_SIZE, len);
    if (dirty_ready)
        dirty_verify_all();
    finish(st.errors ? EXIT_VERIFY : EXIT_PASSED);
}
