/* Minimal modern (version 2) virtio-mmio virtio-blk driver with one split virtqueue, polled or
 * slept on through the VMM's wait port. */
#ifndef STRATA_GUEST_VIRTIO_H
#define STRATA_GUEST_VIRTIO_H
#include "logic.h"

#define VIRTQ_MAX 512U               /* largest queue the driver sets up (3 descriptors/request) */
#define VIRTIO_BLK_T_IN 0U
#define VIRTIO_BLK_T_OUT 1U
#define VIRTIO_BLK_T_FLUSH 4U
#define VIRTIO_BLK_S_OK 0U

struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct virtio_blk_req_hdr { u32 type; u32 ioprio; u64 sector; };

struct vblk {
    u64 capacity_sectors;
    u64 features;      /* negotiated */
    u32 qsize;
    u32 per_request;   /* ring descriptors per request: 1 with indirect tables, else 3 */
    int has_flush;
    int read_only;
    int indirect;      /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    u16 avail_idx;     /* next free avail ring position (free-running) */
    u16 used_seen;     /* used entries consumed (free-running) */
    u32 pending;       /* chains added to the avail ring since the last publish */
};

/* Exits the data path caused: QueueNotify writes and wait-port reads (the done line's kicks=
 * and waits=). */
extern u64 vblk_kicks, vblk_waits;

/* Probes and initialises the device at MMIO_BASE. Returns 0, or -1 with a message in err. */
int vblk_init(struct vblk *d, char *err, usize errlen);
/* Builds request `slot`'s chain (header, data unless data_len is 0 (a flush), status byte) and
 * puts it on the avail ring (visible to the device after vblk_kick). Slots are 0..qsize/per_request. */
void vblk_add(struct vblk *d, u32 slot, const void *hdr, void *data, u32 data_len, int device_writes,
              u8 *status);
/* The request slot of a used head id, or -1 if the id is not a head this driver uses. */
int vblk_slot_of(const struct vblk *d, u32 head);
/* Publishes added chains and notifies the device unless it asked not to be notified. */
void vblk_kick(struct vblk *d);
/* Returns 1 and the head id of the next used element, or 0 if none is ready. */
int vblk_next_used(struct vblk *d, u32 *head);
/* Sleeps until the device interrupts: turns interrupts on (VRING_AVAIL_F_NO_INTERRUPT clear),
 * looks at the used ring once more and, if nothing arrived, reads the VMM's wait port (one exit;
 * the vCPU thread sleeps in the VMM until the device signals its used queue, a pause, or 100 ms
 * pass); then turns interrupts off again. Returns the InterruptStatus bits the wait acknowledged
 * (0: nothing was signalled, or the ring had moved already). */
u32 vblk_wait(struct vblk *d);
/* Device status register has DEVICE_NEEDS_RESET or FAILED set. */
int vblk_broken(void);

#endif
