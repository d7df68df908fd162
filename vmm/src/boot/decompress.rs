//! Host-side decompression of a bzImage's payload.
//!
//! A bzImage normally decompresses itself after entry. On this workplace's nested KVM the
//! guest's CPL0 code is emulated at ~4 MIPS, so the in-guest XZ decompressor would take many
//! minutes; we instead unpack the embedded `vmlinux` (ELF) on the host and boot that with the
//! bzImage's own setup header. Payload formats other than XZ (Debian's choice) are booted the
//! standard way.

/// The payload compressions a kernel can use (from the first bytes of the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    Xz,
    Gzip,
    Zstd,
    Lz4,
    Bzip2,
    Lzma,
    Lzo,
    Unknown,
}

/// Identifies a payload by its magic bytes.
pub fn payload_format(p: &[u8]) -> PayloadFormat {
    match p {
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => PayloadFormat::Xz,
        [0x1f, 0x8b, ..] => PayloadFormat::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => PayloadFormat::Zstd,
        [0x02, 0x21, 0x4c, 0x18, ..] => PayloadFormat::Lz4,
        [b'B', b'Z', b'h', ..] => PayloadFormat::Bzip2,
        [0x5d, 0x00, 0x00, ..] => PayloadFormat::Lzma,
        [0x89, b'L', b'Z', b'O', ..] => PayloadFormat::Lzo,
        _ => PayloadFormat::Unknown,
    }
}

/// The compressed payload of a bzImage: `payload_offset`/`payload_length` from the setup
/// header (boot protocol 2.08+) are relative to the protected-mode code after the setup
/// sectors. `None` if the header has no payload fields or they point outside the file.
pub fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if image.get(0x202..0x206)? != b"HdrS" || u16_at(0x206)? < 0x208 {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = pm_start.checked_add(u32_at(0x248)? as usize)?;
    let len = u32_at(0x24c)? as usize;
    image.get(offset..offset.checked_add(len)?)
}

/// Decompresses one XZ stream (any filter chain liblzma knows, including the x86 BCJ filter
/// the kernel uses), ignoring bytes after its end (the kernel appends its uncompressed size),
/// and refusing output larger than `limit` bytes.
pub fn xz(payload: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    use xz2::stream::{Action, Status, Stream};
    let mut stream =
        Stream::new_stream_decoder(u64::MAX, 0).map_err(|e| format!("XZ decoder: {e}"))?;
    let mut out: Vec<u8> = Vec::with_capacity(payload.len().saturating_mul(4).min(limit));
    loop {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(format!("XZ payload expands beyond {limit} bytes"));
            }
            out.reserve((out.len().max(1 << 20)).min(limit - out.len()));
        }
        let consumed = usize::try_from(stream.total_in()).unwrap_or(usize::MAX);
        let input = payload.get(consumed..).unwrap_or(&[]);
        let before = (stream.total_in(), stream.total_out());
        match stream.process_vec(input, &mut out, Action::Run) {
            Ok(Status::StreamEnd) => return Ok(out),
            Ok(_)
                if (stream.total_in(), stream.total_out()) == before
                    && out.len() < out.capacity() =>
            {
                return Err("XZ payload is truncated".into());
            }
            Ok(_) => {}
            Err(e) => return Err(format!("XZ payload: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn formats_by_magic() {
        assert_eq!(
            payload_format(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1]),
            PayloadFormat::Xz
        );
        assert_eq!(payload_format(&[0x1f, 0x8b, 8]), PayloadFormat::Gzip);
        assert_eq!(
            payload_format(&[0x28, 0xb5, 0x2f, 0xfd]),
            PayloadFormat::Zstd
        );
        assert_eq!(payload_format(b"BZh9"), PayloadFormat::Bzip2);
        assert_eq!(payload_format(b"\x7fELF"), PayloadFormat::Unknown);
        assert_eq!(payload_format(&[]), PayloadFormat::Unknown);
    }

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 3 * 512];
        img[0x1f1] = 2; // setup sectors: protected-mode code at 3 * 512
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn finds_and_unpacks_an_xz_payload() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(&data).unwrap();
        let packed = enc.finish().unwrap();
        let mut with_size = packed.clone();
        with_size.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let img = fake_bzimage(&with_size);
        let p = bzimage_payload(&img).unwrap();
        assert_eq!(payload_format(p), PayloadFormat::Xz);
        assert_eq!(xz(p, 1 << 20).unwrap(), data);
        assert!(xz(p, 1000).is_err());
        assert!(xz(&packed[..packed.len() / 2], 1 << 20).is_err());
    }

    #[test]
    fn bad_headers_have_no_payload() {
        let mut img = fake_bzimage(b"abc");
        assert_eq!(bzimage_payload(&img), Some(&b"abc"[..]));
        img[0x24c..0x250].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(bzimage_payload(&img), None);
        let mut old = fake_bzimage(b"abc");
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert_eq!(bzimage_payload(&old), None);
        assert_eq!(bzimage_payload(b"short"), None);
    }
}
