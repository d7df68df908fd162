//! Parsing a descriptor chain into a [`Request`]. No I/O happens here: every guest-controlled
//! field is validated (addresses, directions, lengths, alignment, ranges, limits) so that the
//! executor only ever sees requests it can run, and the memory a request makes the device
//! allocate is bounded by [`Limits`].

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::guest::{SegList, Segment};

/// `VIRTIO_BLK_T_IN`.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Bytes of the serial returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u64 = 16;
/// Size of one discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const DWZ_SEGMENT_LEN: u64 = 16;
const SECTOR: u64 = journal::SECTOR_SIZE;
/// Descriptors of one chain the parser reads at most, looking for the status byte.
pub const MAX_SCAN: u32 = 1024;

/// What the device accepts; derived from the volume, the config space and the negotiated
/// features.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Capacity in bytes.
    pub capacity: u64,
    pub read_only: bool,
    /// Descriptors per chain (`seg_max` plus header and status).
    pub max_descriptors: u16,
    /// Data bytes of one IN or OUT request: the most one request makes the device allocate.
    pub max_data_bytes: u32,
    /// Negotiated VIRTIO_BLK_F_FLUSH.
    pub flush: bool,
    /// Negotiated VIRTIO_BLK_F_DISCARD.
    pub discard: bool,
    /// Negotiated VIRTIO_BLK_F_WRITE_ZEROES.
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// Why a chain was refused. [`crate::status`] maps each to the status the guest sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the chain has no descriptors (bad head index or indirect table)")]
    NoDescriptors,
    #[error("the chain is broken: it loops, points past the table, or exceeds 4 GiB")]
    BrokenChain,
    #[error("the chain has more than {0} descriptors")]
    TooManyDescriptors(u16),
    #[error("descriptor at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain has no device-writable byte for the status")]
    NoStatusByte,
    #[error("the request header needs 16 device-readable bytes, the chain has {0}")]
    HeaderTooShort(u64),
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("request needs feature {0}, which the driver did not negotiate")]
    FeatureNotNegotiated(&'static str),
    #[error("unsupported flags {flags:#x} in a discard/write-zeroes segment")]
    UnsupportedFlags { flags: u32 },
    #[error("{len} bytes of device-readable data where the request type takes none")]
    UnexpectedReadableData { len: u64 },
    #[error("{len} bytes of device-writable data where the request type takes none")]
    UnexpectedWritableData { len: u64 },
    #[error("the request carries no data buffer")]
    MissingData,
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("data length {len} exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error(
        "sector range at byte {offset} of {len} bytes is past the capacity ({capacity} bytes)"
    )]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("segment list of {0} bytes is not a non-empty multiple of 16")]
    BadSegmentList(u64),
    #[error("{count} segments exceed the limit of {max}")]
    TooManySegments { count: u64, max: u32 },
    #[error("segment of {sectors} sectors exceeds the limit of {max}")]
    SegmentTooLarge { sectors: u32, max: u32 },
    #[error("guest memory could not be read")]
    GuestMemory,
}

/// A byte range of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// What a request does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data.len()` bytes at `offset` into the guest buffers `data`.
    Read {
        offset: u64,
        data: SegList,
    },
    /// Write the guest buffers `data` at `offset`.
    Write {
        offset: u64,
        data: SegList,
    },
    Flush,
    /// Copy the serial (up to 20 bytes) into `data`.
    GetId {
        data: SegList,
    },
    Discard {
        ranges: Vec<Range>,
    },
    WriteZeroes {
        ranges: Vec<Range>,
    },
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, returned in the used ring.
    pub head: u16,
    pub kind: RequestKind,
    /// Where the status byte goes (checked to be in guest memory).
    pub status: GuestAddress,
}

impl Request {
    /// Bytes the executor allocates to run this request.
    pub fn buffer_bytes(&self) -> u64 {
        match &self.kind {
            RequestKind::Read { data, .. } | RequestKind::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// A refused chain: its status goes to `status`, or, when the chain has no usable status
/// byte, the device needs a reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub head: u16,
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// The descriptors of a chain, sorted into the two streams.
struct Layout {
    readable: SegList,
    writable: SegList,
    status: Option<GuestAddress>,
    problem: Option<RequestError>,
}

fn collect(
    chain: &mut DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    max_descriptors: u16,
) -> Result<Layout, RequestError> {
    let mut layout = Layout {
        readable: SegList::new(),
        writable: SegList::new(),
        status: None,
        problem: None,
    };
    let mut count: u32 = 0;
    let mut last_has_next = false;
    let mut last_writable: Option<Segment> = None;
    // The iterator is bounded by the queue (or indirect table) size; we keep walking past
    // `max_descriptors` only to find the status byte, storing nothing more, and give up
    // after MAX_SCAN descriptors (an indirect table may hold 65535).
    for desc in chain.by_ref() {
        count += 1;
        if count > MAX_SCAN {
            return Err(RequestError::TooManyDescriptors(max_descriptors));
        }
        last_has_next = desc.has_next();
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() && seg.len > 0 {
            last_writable = Some(seg);
        }
        if count > u32::from(max_descriptors) {
            layout
                .problem
                .get_or_insert(RequestError::TooManyDescriptors(max_descriptors));
            continue;
        }
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize, access) {
            layout
                .problem
                .get_or_insert(RequestError::OutsideGuestMemory {
                    addr: seg.addr.raw_value(),
                    len: seg.len,
                });
        }
        if desc.is_write_only() {
            layout.writable.push(seg);
        } else {
            if !layout.writable.is_empty() {
                layout
                    .problem
                    .get_or_insert(RequestError::ReadableAfterWritable);
            }
            layout.readable.push(seg);
        }
    }
    if count == 0 {
        return Err(RequestError::NoDescriptors);
    }
    if last_has_next {
        return Err(RequestError::BrokenChain);
    }
    layout.status = last_writable
        .and_then(|s| s.addr.checked_add(u64::from(s.len) - 1))
        .filter(|&a| mem.check_range(a, 1, Permissions::Write));
    Ok(layout)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), RequestError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

fn sector_offset(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    let offset = sector.checked_mul(SECTOR).ok_or(RequestError::OutOfRange {
        offset: u64::MAX,
        len,
        capacity,
    })?;
    check_range(offset, len, capacity)?;
    Ok(offset)
}

fn expect_empty(readable: &SegList, writable: &SegList) -> Result<(), RequestError> {
    if !readable.is_empty() {
        return Err(RequestError::UnexpectedReadableData {
            len: readable.len(),
        });
    }
    if !writable.is_empty() {
        return Err(RequestError::UnexpectedWritableData {
            len: writable.len(),
        });
    }
    Ok(())
}

fn data_request(data: &SegList, sector: u64, limits: &Limits) -> Result<u64, RequestError> {
    let len = data.len();
    if !len.is_multiple_of(SECTOR) {
        return Err(RequestError::Unaligned(len));
    }
    let max = u64::from(limits.max_data_bytes);
    if len > max {
        return Err(RequestError::TooLarge { len, max });
    }
    sector_offset(sector, len, limits.capacity)
}

fn ranges(
    mem: &GuestMemoryMmap,
    list: &SegList,
    limits: &Limits,
    max_seg: u32,
    max_sectors: u32,
    allowed_flags: u32,
) -> Result<Vec<Range>, RequestError> {
    if list.is_empty() || !list.len().is_multiple_of(DWZ_SEGMENT_LEN) {
        return Err(RequestError::BadSegmentList(list.len()));
    }
    let count = list.len() / DWZ_SEGMENT_LEN;
    if count > u64::from(max_seg) {
        return Err(RequestError::TooManySegments {
            count,
            max: max_seg,
        });
    }
    // count <= max_seg (a small number from our own config), so this allocation is bounded.
    let mut raw = vec![0u8; (count * DWZ_SEGMENT_LEN) as usize];
    list.read_into(mem, &mut raw)
        .map_err(|_| RequestError::GuestMemory)?;
    let mut out = Vec::with_capacity(count as usize);
    for seg in raw.chunks_exact(DWZ_SEGMENT_LEN as usize) {
        let (sector, sectors, flags) = (
            le_u64(&seg[0..8]),
            le_u32(&seg[8..12]),
            le_u32(&seg[12..16]),
        );
        if flags & !allowed_flags != 0 {
            return Err(RequestError::UnsupportedFlags { flags });
        }
        if sectors > max_sectors {
            return Err(RequestError::SegmentTooLarge {
                sectors,
                max: max_sectors,
            });
        }
        let len = u64::from(sectors) * SECTOR;
        let offset = sector_offset(sector, len, limits.capacity)?;
        out.push(Range { offset, len });
    }
    Ok(out)
}

fn parse_kind(
    mem: &GuestMemoryMmap,
    layout: Layout,
    limits: &Limits,
) -> Result<RequestKind, RequestError> {
    let Layout {
        mut readable,
        mut writable,
        problem,
        ..
    } = layout;
    if let Some(p) = problem {
        return Err(p);
    }
    // The status byte is the last writable byte; the rest of the writable stream is data.
    writable.split_off(writable.len().saturating_sub(1));
    if readable.len() < HEADER_LEN {
        return Err(RequestError::HeaderTooShort(readable.len()));
    }
    let out_data = readable.split_off(HEADER_LEN);
    let mut header = [0u8; HEADER_LEN as usize];
    readable
        .read_into(mem, &mut header)
        .map_err(|_| RequestError::GuestMemory)?;
    let ty = le_u32(&header[0..4]);
    let sector = le_u64(&header[8..16]);

    match ty {
        VIRTIO_BLK_T_IN => {
            expect_empty(&out_data, &SegList::new())?;
            let offset = data_request(&writable, sector, limits)?;
            Ok(RequestKind::Read {
                offset,
                data: writable,
            })
        }
        VIRTIO_BLK_T_OUT => {
            expect_empty(&SegList::new(), &writable)?;
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let offset = data_request(&out_data, sector, limits)?;
            Ok(RequestKind::Write {
                offset,
                data: out_data,
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            if !limits.flush {
                return Err(RequestError::FeatureNotNegotiated("VIRTIO_BLK_F_FLUSH"));
            }
            expect_empty(&out_data, &writable)?;
            Ok(RequestKind::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            expect_empty(&out_data, &SegList::new())?;
            if writable.is_empty() {
                return Err(RequestError::MissingData);
            }
            Ok(RequestKind::GetId { data: writable })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = ty == VIRTIO_BLK_T_DISCARD;
            let (negotiated, name) = if discard {
                (limits.discard, "VIRTIO_BLK_F_DISCARD")
            } else {
                (limits.write_zeroes, "VIRTIO_BLK_F_WRITE_ZEROES")
            };
            if !negotiated {
                return Err(RequestError::FeatureNotNegotiated(name));
            }
            expect_empty(&SegList::new(), &writable)?;
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            if discard {
                let r = ranges(
                    mem,
                    &out_data,
                    limits,
                    limits.max_discard_seg,
                    limits.max_discard_sectors,
                    0,
                )?;
                Ok(RequestKind::Discard { ranges: r })
            } else {
                let r = ranges(
                    mem,
                    &out_data,
                    limits,
                    limits.max_write_zeroes_seg,
                    limits.max_write_zeroes_sectors,
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                )?;
                Ok(RequestKind::WriteZeroes { ranges: r })
            }
        }
        other => Err(RequestError::UnknownType(other)),
    }
}

/// Turns a descriptor chain into a request, validating everything the guest controls.
pub fn parse(
    mut chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Request, Rejected> {
    let head = chain.head_index();
    let layout = collect(&mut chain, mem, limits.max_descriptors).map_err(|error| Rejected {
        head,
        status: None,
        error,
    })?;
    let Some(status) = layout.status else {
        return Err(Rejected {
            head,
            status: None,
            error: RequestError::NoStatusByte,
        });
    };
    match parse_kind(mem, layout, limits) {
        Ok(kind) => Ok(Request { head, kind, status }),
        Err(error) => Err(Rejected {
            head,
            status: Some(status),
            error,
        }),
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
