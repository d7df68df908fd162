//! Guest buffers as byte streams: a request's readable (or writable) descriptors, in chain
//! order, form one stream regardless of how the driver framed it (VIRTIO_F_ANY_LAYOUT).

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// One guest-physical buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Buffers that together form one byte stream. Zero-length buffers are never stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegList {
    segs: Vec<Segment>,
    len: u64,
}

impl SegList {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a buffer to the end of the stream (ignored when empty).
    pub fn push(&mut self, seg: Segment) {
        if seg.len > 0 {
            self.len += u64::from(seg.len);
            self.segs.push(seg);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the stream has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers.
    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }

    /// Splits the stream at byte `at`: `self` keeps `[0, at)`, the result is `[at, len)`.
    /// `at` past the end leaves `self` unchanged and returns an empty stream.
    pub fn split_off(&mut self, at: u64) -> SegList {
        let mut tail = SegList::new();
        let mut pos = 0u64;
        let mut keep = Vec::with_capacity(self.segs.len());
        for seg in self.segs.drain(..) {
            let end = pos + u64::from(seg.len);
            if end <= at {
                keep.push(seg);
            } else if pos >= at {
                tail.push(seg);
            } else {
                // The split falls inside this segment: 0 < at - pos < seg.len <= u32::MAX.
                let head_len = (at - pos) as u32;
                keep.push(Segment {
                    addr: seg.addr,
                    len: head_len,
                });
                tail.push(Segment {
                    // Inside the segment; should the guest's address wrap, the wrapped
                    // address fails every later guest-memory access instead of panicking.
                    addr: GuestAddress(seg.addr.0.wrapping_add(u64::from(head_len))),
                    len: seg.len - head_len,
                });
            }
            pos = end;
        }
        self.segs = keep;
        self.len -= tail.len;
        tail
    }

    /// Address of the last byte of the stream.
    pub fn last_byte(&self) -> Option<GuestAddress> {
        self.segs
            .last()
            .and_then(|s| s.addr.checked_add(u64::from(s.len) - 1))
    }

    /// Fills `dst` from the start of the stream. `dst` may be shorter than the stream.
    pub fn read_into(&self, mem: &GuestMemoryMmap, dst: &mut [u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0usize;
        for seg in &self.segs {
            if done == dst.len() {
                break;
            }
            let n = (seg.len as usize).min(dst.len() - done);
            mem.read_slice(&mut dst[done..done + n], seg.addr)?;
            done += n;
        }
        if done < dst.len() {
            return Err(GuestMemoryError::PartialBuffer {
                expected: dst.len(),
                completed: done,
            });
        }
        Ok(())
    }

    /// Copies `src` to the start of the stream. `src` may be shorter than the stream.
    pub fn write_from(&self, mem: &GuestMemoryMmap, src: &[u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0usize;
        for seg in &self.segs {
            if done == src.len() {
                break;
            }
            let n = (seg.len as usize).min(src.len() - done);
            mem.write_slice(&src[done..done + n], seg.addr)?;
            done += n;
        }
        if done < src.len() {
            return Err(GuestMemoryError::PartialBuffer {
                expected: src.len(),
                completed: done,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("test memory")
    }

    #[test]
    fn split_inside_and_between_segments() {
        let mut l = SegList::new();
        l.push(seg(0x100, 10));
        l.push(seg(0x200, 0));
        l.push(seg(0x300, 6));
        assert_eq!(l.len(), 16);
        assert_eq!(l.segments().len(), 2);

        let mut a = l.clone();
        let tail = a.split_off(4);
        assert_eq!(a.segments(), &[seg(0x100, 4)]);
        assert_eq!(tail.segments(), &[seg(0x104, 6), seg(0x300, 6)]);
        assert_eq!((a.len(), tail.len()), (4, 12));

        let mut b = l.clone();
        let tail = b.split_off(10);
        assert_eq!(b.segments(), &[seg(0x100, 10)]);
        assert_eq!(tail.segments(), &[seg(0x300, 6)]);

        let mut c = l.clone();
        assert!(c.split_off(100).is_empty());
        assert_eq!(c, l);
        assert_eq!(l.last_byte(), Some(GuestAddress(0x305)));
    }

    #[test]
    fn copies_across_segments() {
        let m = mem();
        let mut l = SegList::new();
        l.push(seg(0x1000, 3));
        l.push(seg(0x2000, 5));
        l.write_from(&m, b"abcdefgh").expect("write");
        let mut out = [0u8; 8];
        l.read_into(&m, &mut out).expect("read");
        assert_eq!(&out, b"abcdefgh");
        let mut first = [0u8; 3];
        m.read_slice(&mut first, GuestAddress(0x1000))
            .expect("raw read");
        assert_eq!(&first, b"abc");
        assert!(l.write_from(&m, b"123456789").is_err());
        let mut big = [0u8; 9];
        assert!(l.read_into(&m, &mut big).is_err());
    }
}
