/* Modern virtio-mmio virtio-blk driver (virtio 1.2 sections 2.7, 4.2.2, 5.2). Every register
 * access is one MMIO exit (~66 us on this host's nested KVM): set-up uses ~30, the data path one
 * QueueNotify write per batch (none while the device says NO_NOTIFY) and, when it sleeps, one
 * wait-port read. */
#include "virtio.h"
#include "layout.h"

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1U
#define S_DRIVER 2U
#define S_DRIVER_OK 4U
#define S_FEATURES_OK 8U
#define S_NEEDS_RESET 0x40U
#define S_FAILED 0x80U

#define F_INDIRECT_DESC (1ULL << 28)
#define F_BLK_RO (1ULL << 5)
#define F_BLK_FLUSH (1ULL << 9)
#define F_VERSION_1 (1ULL << 32)

#define VRING_AVAIL_F_NO_INTERRUPT 1U
#define VRING_USED_F_NO_NOTIFY 1U

struct virtq_avail { u16 flags; u16 idx; u16 ring[VIRTQ_MAX]; u16 used_event; };
struct virtq_used_elem { u32 id; u32 len; };
struct virtq_used { u16 flags; u16 idx; struct virtq_used_elem ring[VIRTQ_MAX]; u16 avail_event; };

static struct virtq_desc vq_desc[VIRTQ_MAX] __attribute__((aligned(4096)));
static struct virtq_avail vq_avail __attribute__((aligned(4096)));
static struct virtq_used vq_used __attribute__((aligned(4096)));
/* One indirect table of 3 descriptors per request slot (used with INDIRECT_DESC). */
static struct virtq_desc vq_indirect[VIRTQ_MAX][3] __attribute__((aligned(16)));

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4

#define barrier() __asm__ __volatile__("" ::: "memory")

u64 vblk_kicks, vblk_waits;

static u32 rd(u32 off)
{
    return *(volatile u32 *)(usize)(MMIO_BASE + off);
}

static void wr(u32 off, u32 v)
{
    *(volatile u32 *)(usize)(MMIO_BASE + off) = v;
}

static void fail(char *err, usize errlen, const char *what, u32 value)
{
    char num[24];
    usize at = str_append(err, errlen, 0, what);
    if (value != 0xFFFFFFFFU) {
        at = str_append(err, errlen, at, " (0x");
        static const char hex[] = "0123456789abcdef";
        int i = 0;
        for (int sh = 28; sh >= 0; sh -= 4)
            num[i++] = hex[(value >> sh) & 0xF];
        num[i] = 0;
        at = str_append(err, errlen, at, num);
        str_append(err, errlen, at, ")");
    }
    wr(R_STATUS, rd(R_STATUS) | S_FAILED);
}

int vblk_init(struct vblk *d, char *err, usize errlen)
{
    u32 v = rd(R_MAGIC);
    if (v != 0x74726976U) {
        str_append(err, errlen, 0, "no virtio-mmio device at 0xd0000000 (bad magic)");
        return -1;
    }
    v = rd(R_VERSION);
    if (v != 2) {
        str_append(err, errlen, 0, "virtio-mmio version is not 2 (legacy devices unsupported)");
        return -1;
    }
    v = rd(R_DEVICE_ID);
    if (v != 2) {
        str_append(err, errlen, 0, v == 0 ? "no virtio device behind the virtio-mmio transport"
                                          : "virtio device is not a block device");
        return -1;
    }
    wr(R_STATUS, 0);
    for (int i = 0; rd(R_STATUS) != 0; i++)
        if (i > 1000) {
            str_append(err, errlen, 0, "device reset did not complete");
            return -1;
        }
    wr(R_STATUS, S_ACKNOWLEDGE);
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);

    wr(R_DEVICE_FEATURES_SEL, 0);
    u64 offered = rd(R_DEVICE_FEATURES);
    wr(R_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)rd(R_DEVICE_FEATURES) << 32;
    if (!(offered & F_VERSION_1)) {
        fail(err, errlen, "device does not offer VIRTIO_F_VERSION_1", 0xFFFFFFFFU);
        return -1;
    }
    d->features = offered & (F_VERSION_1 | F_BLK_FLUSH | F_BLK_RO | F_INDIRECT_DESC);
    d->indirect = (d->features & F_INDIRECT_DESC) != 0;
    d->per_request = d->indirect ? 1 : 3;
    d->has_flush = (d->features & F_BLK_FLUSH) != 0;
    d->read_only = (d->features & F_BLK_RO) != 0;
    wr(R_DRIVER_FEATURES_SEL, 0);
    wr(R_DRIVER_FEATURES, (u32)d->features);
    wr(R_DRIVER_FEATURES_SEL, 1);
    wr(R_DRIVER_FEATURES, (u32)(d->features >> 32));
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    v = rd(R_STATUS);
    if (!(v & S_FEATURES_OK)) {
        fail(err, errlen, "device rejected the features (FEATURES_OK not set)", v);
        return -1;
    }

    wr(R_QUEUE_SEL, 0);
    v = rd(R_QUEUE_READY);
    if (v != 0) {
        fail(err, errlen, "queue 0 already ready after reset", v);
        return -1;
    }
    u32 max = rd(R_QUEUE_NUM_MAX);
    if (max == 0) {
        fail(err, errlen, "queue 0 not available (QueueNumMax is 0)", 0xFFFFFFFFU);
        return -1;
    }
    u32 q = VIRTQ_MAX;
    while (q > max)
        q >>= 1;
    d->qsize = q;
    d->avail_idx = 0;
    d->used_seen = 0;
    d->pending = 0;
    vq_avail.flags = VRING_AVAIL_F_NO_INTERRUPT;
    vq_avail.idx = 0;
    vq_used.idx = 0;
    wr(R_QUEUE_NUM, q);
    u64 a = (u64)(usize)vq_desc;
    wr(R_QUEUE_DESC_LOW, (u32)a);
    wr(R_QUEUE_DESC_HIGH, (u32)(a >> 32));
    a = (u64)(usize)&vq_avail;
    wr(R_QUEUE_DRIVER_LOW, (u32)a);
    wr(R_QUEUE_DRIVER_HIGH, (u32)(a >> 32));
    a = (u64)(usize)&vq_used;
    wr(R_QUEUE_DEVICE_LOW, (u32)a);
    wr(R_QUEUE_DEVICE_HIGH, (u32)(a >> 32));
    wr(R_QUEUE_READY, 1);
    wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    v = rd(R_STATUS);
    if (v & (S_NEEDS_RESET | S_FAILED)) {
        fail(err, errlen, "device failed after DRIVER_OK", v);
        return -1;
    }

    u32 gen, lo, hi;
    int tries = 0;
    do {
        gen = rd(R_CONFIG_GENERATION);
        lo = rd(R_CONFIG);
        hi = rd(R_CONFIG + 4);
        if (++tries > 100) {
            fail(err, errlen, "config generation never settled", gen);
            return -1;
        }
    } while (gen != rd(R_CONFIG_GENERATION));
    d->capacity_sectors = ((u64)hi << 32) | lo;
    return 0;
}

void vblk_add(struct vblk *d, u32 slot, const void *hdr, void *data, u32 data_len, int device_writes,
              u8 *status)
{
    struct virtq_desc *t;
    u16 base, head;
    if (d->indirect) {
        t = vq_indirect[slot];
        base = 0;
        head = (u16)slot;
    } else {
        t = &vq_desc[3 * slot];
        base = (u16)(3 * slot);
        head = base;
    }
    u16 n = 0;
    t[n].addr = (u64)(usize)hdr;
    t[n].len = sizeof(struct virtio_blk_req_hdr);
    t[n].flags = DESC_F_NEXT;
    t[n].next = (u16)(base + n + 1);
    n++;
    if (data_len) {
        t[n].addr = (u64)(usize)data;
        t[n].len = data_len;
        t[n].flags = (u16)(DESC_F_NEXT | (device_writes ? DESC_F_WRITE : 0));
        t[n].next = (u16)(base + n + 1);
        n++;
    }
    t[n].addr = (u64)(usize)status;
    t[n].len = 1;
    t[n].flags = DESC_F_WRITE;
    t[n].next = 0;
    n++;
    if (d->indirect) {
        vq_desc[slot].addr = (u64)(usize)t;
        vq_desc[slot].len = (u32)(n * sizeof(struct virtq_desc));
        vq_desc[slot].flags = DESC_F_INDIRECT;
        vq_desc[slot].next = 0;
    }
    vq_avail.ring[(u16)(d->avail_idx + d->pending) % d->qsize] = head;
    d->pending++;
}

int vblk_slot_of(const struct vblk *d, u32 head)
{
    if (head >= d->qsize || head % d->per_request)
        return -1;
    return (int)(head / d->per_request);
}

void vblk_kick(struct vblk *d)
{
    if (!d->pending)
        return;
    barrier(); /* ring entries and descriptors before idx (x86 keeps store order) */
    d->avail_idx = (u16)(d->avail_idx + d->pending);
    *(volatile u16 *)&vq_avail.idx = d->avail_idx;
    d->pending = 0;
    __asm__ __volatile__("mfence" ::: "memory"); /* idx store before the used flags load */
    if (!(*(volatile u16 *)&vq_used.flags & VRING_USED_F_NO_NOTIFY)) {
        wr(R_QUEUE_NOTIFY, 0);
        vblk_kicks++;
    }
}

int vblk_next_used(struct vblk *d, u32 *head)
{
    u16 idx = *(volatile u16 *)&vq_used.idx;
    if (idx == d->used_seen)
        return 0;
    barrier(); /* idx load before the element load (x86 keeps load order) */
    *head = ((volatile struct virtq_used_elem *)&vq_used.ring[d->used_seen % d->qsize])->id;
    d->used_seen++;
    return 1;
}

static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

u32 vblk_wait(struct vblk *d)
{
    u32 bits = 0;
    *(volatile u16 *)&vq_avail.flags = 0;
    /* The flags store before the used idx load; the device adds used entries and then loads the
     * flags, so one of the two sides sees the other. */
    __asm__ __volatile__("mfence" ::: "memory");
    if (*(volatile u16 *)&vq_used.idx == d->used_seen) {
        bits = inl(WAIT_PORT);
        vblk_waits++;
    }
    *(volatile u16 *)&vq_avail.flags = VRING_AVAIL_F_NO_INTERRUPT;
    return bits;
}

int vblk_broken(void)
{
    return (rd(R_STATUS) & (S_NEEDS_RESET | S_FAILED)) != 0;
}
