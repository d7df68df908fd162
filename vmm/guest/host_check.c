/* Host build of the guest's pure logic, run by the vmm crate's unit tests to check that the
 * Rust side (WorkloadSpec, sector pattern, struct layouts) matches the guest exactly.
 * Reads commands from stdin, one per line, answers one line each:
 *   spec <text>                 -> "ok <normalised>" | "err <message>"
 *   pattern <seed> <sector> <tag> -> 1024 hex digits (the 512-byte sector)
 *   rng <seed> <n>              -> n values of the generator, space separated
 *   dirty <seed> <page> <gen>   -> 8192 hex digits (the 4096-byte dirty page)
 *   gen <written> <pages> <page> -> the generation the page holds
 *   fnv <hex bytes>             -> FNV-1a 64 of the bytes, 16 hex digits
 *   plan <mem> <dirty> <bs_max> -> "ok <dirty_base> <ledger_sectors>" | "err <code> <max_dirty>"
 *   layout                      -> offsets and sizes of boot_info and ledger */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "layout.h"

int main(void)
{
    static char buf[8192];
    while (fgets(buf, sizeof buf, stdin)) {
        size_t n = strlen(buf);
        if (n && buf[n - 1] == '\n')
            buf[--n] = 0;
        if (!strncmp(buf, "spec ", 5)) {
            struct workload w;
            char err[256], out[512];
            if (workload_parse(buf + 5, n - 5, &w, err, sizeof err)) {
                printf("err %s\n", err);
            } else {
                workload_format(&w, out, sizeof out);
                printf("ok %s\n", out);
            }
        } else if (!strncmp(buf, "pattern ", 8)) {
            unsigned long long seed, sector;
            unsigned tag;
            u64 words[64];
            if (sscanf(buf + 8, "%llu %llu %u", &seed, &sector, &tag) != 3)
                return 2;
            pattern_fill(seed, sector, tag, words);
            if (!pattern_check(seed, sector, tag, words))
                return 3;
            const u8 *b = (const u8 *)words;
            for (int i = 0; i < 512; i++)
                printf("%02x", b[i]);
            printf("\n");
        } else if (!strncmp(buf, "rng ", 4)) {
            unsigned long long seed;
            int count;
            struct rng r;
            if (sscanf(buf + 4, "%llu %d", &seed, &count) != 2)
                return 2;
            rng_seed(&r, seed);
            for (int i = 0; i < count; i++)
                printf(i ? " %llu" : "%llu", (unsigned long long)rng_next(&r));
            printf("\n");
        } else if (!strncmp(buf, "dirty ", 6)) {
            unsigned long long seed, page, gen;
            static u64 words[512];
            if (sscanf(buf + 6, "%llu %llu %llu", &seed, &page, &gen) != 3)
                return 2;
            dirty_fill(seed, page, gen, words);
            if (!dirty_check(seed, page, gen, words))
                return 3;
            words[300] ^= 1;
            if (dirty_check(seed, page, gen, words))
                return 3;
            words[300] ^= 1;
            const u8 *b = (const u8 *)words;
            for (int i = 0; i < 4096; i++)
                printf("%02x", b[i]);
            printf("\n");
        } else if (!strncmp(buf, "gen ", 4)) {
            unsigned long long written, pages, page;
            if (sscanf(buf + 4, "%llu %llu %llu", &written, &pages, &page) != 3 || !pages)
                return 2;
            printf("%llu\n", (unsigned long long)dirty_gen(written, pages, page));
        } else if (!strncmp(buf, "fnv ", 4)) {
            static u8 bytes[4096];
            size_t len = 0;
            unsigned v;
            for (const char *h = buf + 4; h[0] && h[1] && len < sizeof bytes; h += 2) {
                if (sscanf(h, "%2x", &v) != 1)
                    return 2;
                bytes[len++] = (u8)v;
            }
            printf("%016llx\n", (unsigned long long)fnv1a64(FNV_OFFSET, bytes, len));
        } else if (!strncmp(buf, "plan ", 5)) {
            unsigned long long mem, dirty, bs_max;
            u64 base = 0, sectors = 0, max_dirty = 0;
            if (sscanf(buf + 5, "%llu %llu %llu", &mem, &dirty, &bs_max) != 3)
                return 2;
            int rc = memory_plan(mem, dirty, bs_max, &base, &sectors, &max_dirty);
            if (rc)
                printf("err %d %llu\n", rc, (unsigned long long)max_dirty);
            else
                printf("ok %llu %llu\n", (unsigned long long)base, (unsigned long long)sectors);
        } else if (!strcmp(buf, "layout")) {
            printf("boot_info mem_size=%zu tsc_khz=%zu workload_len=%zu workload=%zu "
                   "ledger seed=%zu region_sector=%zu region_sectors=%zu state=%zu qd=%zu "
                   "last_tag=%zu completed=%zu errors=%zu slots=%zu slot_size=%zu dirty_base=%zu "
                   "dirty_pages=%zu dirty_written=%zu dirty_rate=%zu size=%zu\n",
                   offsetof(struct boot_info, mem_size), offsetof(struct boot_info, tsc_khz),
                   offsetof(struct boot_info, workload_len), offsetof(struct boot_info, workload),
                   offsetof(struct ledger, seed), offsetof(struct ledger, region_sector),
                   offsetof(struct ledger, region_sectors), offsetof(struct ledger, state),
                   offsetof(struct ledger, qd), offsetof(struct ledger, last_tag),
                   offsetof(struct ledger, completed), offsetof(struct ledger, errors),
                   offsetof(struct ledger, slots), sizeof(struct slot),
                   offsetof(struct ledger, dirty_base), offsetof(struct ledger, dirty_pages),
                   offsetof(struct ledger, dirty_written), offsetof(struct ledger, dirty_rate),
                   sizeof(struct ledger));
        } else {
            return 2;
        }
        fflush(stdout);
    }
    return 0;
}
