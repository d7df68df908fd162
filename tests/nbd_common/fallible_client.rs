//! A fallible NBD client (every error is returned, never a panic), for the crash test whose
//! server is killed mid-request, and a deterministic 4 KiB data pattern.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

/// A minimal synchronous NBD client (one request at a time).
pub struct NbdClient {
    s: UnixStream,
    pub size: u64,
    pub flags: u16,
    handle: u64,
}

impl NbdClient {
    /// Connects and negotiates the default export with NBD_OPT_GO.
    pub fn connect(socket: &Path) -> std::io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&6u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes()); // empty export name
        opt.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        s.write_all(&opt)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match typ {
                1 => break, // ACK
                3 if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                3 => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(std::io::Error::other(format!("OPT_GO refused: {t:#x}")))
                }
                _ => {}
            }
        }
        Ok(NbdClient {
            s,
            size,
            flags,
            handle: 1,
        })
    }

    /// Sends one request and waits for its simple reply; returns the NBD error (0 = ok) and
    /// read data.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        self.handle += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32::from_be_bytes(h[0..4].try_into().unwrap()) != 0x6744_6698 {
            return Err(std::io::Error::other("bad reply magic"));
        }
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if u64::from_be_bytes(h[8..16].try_into().unwrap()) != self.handle {
            return Err(std::io::Error::other("reply for another handle"));
        }
        let mut out = Vec::new();
        if cmd == CMD_READ && err == 0 {
            out = vec![0u8; len as usize];
            self.s.read_exact(&mut out)?;
        }
        Ok((err, out))
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<u32> {
        Ok(self
            .request(
                CMD_WRITE,
                if fua { FLAG_FUA } else { 0 },
                offset,
                data.len() as u32,
                data,
            )?
            .0)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Result<Vec<u8>, u32>> {
        let (err, data) = self.request(CMD_READ, 0, offset, len, &[])?;
        Ok(if err == 0 { Ok(data) } else { Err(err) })
    }

    pub fn flush(&mut self) -> std::io::Result<u32> {
        Ok(self.request(CMD_FLUSH, 0, 0, 0, &[])?.0)
    }

    /// Sends NBD_CMD_DISC.
    pub fn disconnect(mut self) {
        let mut r = Vec::new();
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&CMD_DISC.to_be_bytes());
        r.extend_from_slice(&[0u8; 20]);
        let _ = self.s.write_all(&r);
    }
}

/// A deterministic 4 KiB pattern for (block, version).
pub fn pattern(block: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(version ^ (i as u64) << 48).to_le_bytes());
    }
    v
}
