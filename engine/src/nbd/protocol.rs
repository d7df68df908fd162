//! NBD wire format: constants, parsing of what clients send (fixed newstyle handshake,
//! options, transmission requests) and encoding of what the server sends. Nothing here does
//! I/O; every length read from the wire is checked before it is used.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_OPT_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Errors sent in replies (NBD's own numbering, equal to Linux errno values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Advertised minimum block size: requests have byte granularity (the journal
/// read-modify-writes partial blocks under its block range lock).
pub const MIN_BLOCK: u32 = 1;
/// Advertised preferred block size (the journal's block).
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake (export names are at most 4096
/// bytes; an INFO/GO request adds 6 bytes plus 2 per information request).
pub const MAX_OPTION_LEN: u32 = 8192;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// Why handshake input is unacceptable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("client flags {0:#x} contain unknown bits")]
    ClientFlags(u32),
    #[error("client does not speak the fixed newstyle handshake")]
    NotFixedNewstyle,
    #[error("bad option magic {0:#x}")]
    OptionMagic(u64),
}

/// Parses the 4 client flags bytes; returns whether the client asked for no zero padding.
pub fn parse_client_flags(b: [u8; 4]) -> Result<bool, HandshakeError> {
    let flags = u32::from_be_bytes(b);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(flags));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// The 16-byte header of a client option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Parses an option header, checking its magic.
    pub fn parse(b: &[u8; 16]) -> Result<OptionHeader, HandshakeError> {
        let magic = be_u64(&b[0..8]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::OptionMagic(magic));
        }
        Ok(OptionHeader {
            option: be_u32(&b[8..12]),
            len: be_u32(&b[12..16]),
        })
    }
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub infos: Vec<u16>,
}

/// Parses the payload of NBD_OPT_INFO / NBD_OPT_GO; `None` if it is malformed.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let name_len = usize::try_from(be_u32(data.get(0..4)?)).ok()?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?.to_vec();
    let count = usize::from(be_u16(data.get(name_end..name_end.checked_add(2)?)?));
    let rest = data.get(name_end + 2..)?;
    if rest.len() != count.checked_mul(2)? {
        return None;
    }
    let infos = rest.chunks_exact(2).map(be_u16).collect();
    Some(InfoRequest { name, infos })
}

/// Encodes an option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_OPT_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Replies are built by the server from bounded data (names <= 4096 bytes).
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// NBD_INFO_EXPORT payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// NBD_INFO_BLOCK_SIZE payload with the server's constraints.
pub fn info_block_size() -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// NBD_INFO_NAME payload.
pub fn info_name(name: &[u8]) -> Vec<u8> {
    let mut v = INFO_NAME.to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v
}

/// NBD_REP_SERVER payload naming one export.
pub fn rep_server(name: &[u8]) -> Vec<u8> {
    let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the client
/// negotiated NO_ZEROES.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// The first bytes the server sends.
pub fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// A transmission request header as sent by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Parses a header; `None` on bad magic (the stream cannot be trusted any more).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
        if be_u32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: be_u16(&b[4..6]),
            kind: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            len: be_u32(&b[24..28]),
        })
    }

    /// Encodes the header (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// What the export allows; decided at handshake time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
}

impl ExportLimits {
    /// Transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let common = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            common | TFLAG_READ_ONLY
        } else {
            common | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
        }
    }
}

/// A validated command, ready to execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// The `len` payload bytes follow the header on the wire.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    /// With `fua`, durable before the reply.
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
}

/// What to do with one request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Execute it.
    Run(Command),
    /// Reply with `errno`, after reading and discarding `skip` payload bytes.
    Reject { errno: u32, skip: u64 },
}

/// Validates a request against the export: type, flags, range, size (any byte offset and
/// length inside the export is accepted).
pub fn decide(h: &RequestHeader, ex: &ExportLimits) -> Decision {
    // Only WRITE carries a payload; it must be consumed even when the write is refused.
    let skip = if h.kind == CMD_WRITE {
        u64::from(h.len)
    } else {
        0
    };
    let reject = |errno| Decision::Reject { errno, skip };
    let allowed_flags = match h.kind {
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_READ | CMD_FLUSH | CMD_DISC => 0,
        _ => return reject(EINVAL),
    };
    if h.flags & !allowed_flags != 0 {
        return reject(EINVAL);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match h.kind {
        CMD_DISC => return Decision::Run(Command::Disconnect),
        CMD_FLUSH => return Decision::Run(Command::Flush),
        _ => {}
    }
    let is_write = h.kind != CMD_READ;
    if is_write && ex.read_only {
        return reject(EPERM);
    }
    let has_payload = matches!(h.kind, CMD_READ | CMD_WRITE);
    if has_payload && h.len > MAX_PAYLOAD {
        return reject(ENOMEM);
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= ex.size);
    if !in_range {
        // The spec asks for ENOSPC on writes past the end and EINVAL on reads.
        return reject(if is_write { ENOSPC } else { EINVAL });
    }
    let (offset, len) = (h.offset, h.len);
    Decision::Run(match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        _ => Command::WriteZeroes { offset, len, fua },
    })
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, errno: u32) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Maps a journal error to the NBD error a client sees.
pub fn errno_of(e: &journal::Error) -> u32 {
    match e {
        journal::Error::Corrupt { .. } => EIO,
        journal::Error::ReadOnly => EPERM,
        journal::Error::Unaligned { .. }
        | journal::Error::BadSize(_)
        | journal::Error::Invalid(_) => EINVAL,
        journal::Error::OutOfRange { .. } => ENOSPC,
        other => errno_from_os(other.errno()),
    }
}

/// Maps a host errno to the closest NBD error.
pub fn errno_from_os(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: false,
    };
    const RO: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: true,
    };

    fn hdr(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 0xfeed,
            offset,
            len,
        }
    }

    #[test]
    fn request_roundtrip_and_magic() {
        let h = hdr(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let mut b = h.encode();
        assert_eq!(RequestHeader::parse(&b), Some(h));
        b[0] ^= 1;
        assert_eq!(RequestHeader::parse(&b), None);
    }

    #[test]
    fn decide_accepts_valid_commands() {
        assert_eq!(
            decide(&hdr(CMD_READ, 0, 0, 4096), &RW),
            Decision::Run(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            decide(&hdr(CMD_WRITE, CMD_FLAG_FUA, 512, 1024), &RW),
            Decision::Run(Command::Write {
                offset: 512,
                len: 1024,
                fua: true
            })
        );
        assert_eq!(
            decide(&hdr(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), &RW),
            Decision::Run(Command::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false
            })
        );
        assert_eq!(
            decide(&hdr(CMD_FLUSH, 0, 0, 0), &RO),
            Decision::Run(Command::Flush)
        );
        assert_eq!(
            decide(&hdr(CMD_DISC, 0, 0, 0), &RO),
            Decision::Run(Command::Disconnect)
        );
        assert_eq!(
            decide(&hdr(CMD_READ, 0, 0, 512), &RO),
            Decision::Run(Command::Read {
                offset: 0,
                len: 512
            })
        );
        // Byte granularity: unaligned offsets and lengths run.
        assert_eq!(
            decide(&hdr(CMD_READ, 0, 1, 511), &RW),
            Decision::Run(Command::Read {
                offset: 1,
                len: 511
            })
        );
        assert_eq!(
            decide(&hdr(CMD_WRITE, 0, (1 << 20) - 1, 1), &RW),
            Decision::Run(Command::Write {
                offset: (1 << 20) - 1,
                len: 1,
                fua: false
            })
        );
        assert_eq!(
            decide(&hdr(CMD_TRIM, 0, 7, 3), &RW),
            Decision::Run(Command::Trim {
                offset: 7,
                len: 3,
                fua: false
            })
        );
    }

    #[test]
    fn decide_rejects_with_the_right_errno_and_skip() {
        let rej = |errno, skip| Decision::Reject { errno, skip };
        assert_eq!(decide(&hdr(CMD_WRITE, 0, 0, 512), &RO), rej(EPERM, 512));
        assert_eq!(decide(&hdr(CMD_TRIM, 0, 0, 512), &RO), rej(EPERM, 0));
        assert_eq!(
            decide(&hdr(CMD_WRITE_ZEROES, 0, 0, 512), &RO),
            rej(EPERM, 0)
        );
        assert_eq!(
            decide(&hdr(CMD_WRITE, 0, (1 << 20) - 1, 2), &RW),
            rej(ENOSPC, 2)
        );
        assert_eq!(decide(&hdr(CMD_READ, 0, 1 << 20, 512), &RW), rej(EINVAL, 0));
        assert_eq!(
            decide(&hdr(CMD_WRITE, 0, (1 << 20) - 512, 1024), &RW),
            rej(ENOSPC, 1024)
        );
        assert_eq!(
            decide(&hdr(CMD_READ, 0, u64::MAX - 511, 512), &RW),
            rej(EINVAL, 0)
        );
        assert_eq!(decide(&hdr(CMD_READ, 0, 0, u32::MAX), &RW), rej(ENOMEM, 0));
        assert_eq!(
            decide(&hdr(CMD_WRITE, 0, 0, u32::MAX), &RW),
            rej(ENOMEM, u64::from(u32::MAX))
        );
        assert_eq!(decide(&hdr(99, 0, 0, 4096), &RW), rej(EINVAL, 0));
        assert_eq!(
            decide(&hdr(CMD_READ, CMD_FLAG_FUA, 0, 512), &RW),
            rej(EINVAL, 0)
        );
        assert_eq!(
            decide(&hdr(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), &RW),
            rej(EINVAL, 512)
        );
        // Large trims carry no payload and are not limited by MAX_PAYLOAD.
        let big = ExportLimits {
            size: 1 << 40,
            read_only: false,
        };
        assert_eq!(
            decide(&hdr(CMD_TRIM, 0, 0, 1 << 31), &big),
            Decision::Run(Command::Trim {
                offset: 0,
                len: 1 << 31,
                fua: false
            })
        );
        assert_eq!(
            decide(&hdr(CMD_TRIM, CMD_FLAG_FUA, 0, 4096), &big),
            Decision::Run(Command::Trim {
                offset: 0,
                len: 4096,
                fua: true
            })
        );
    }

    #[test]
    fn handshake_parsing() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(true));
        assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(false));
        assert_eq!(
            parse_client_flags([0, 0, 0, 0]),
            Err(HandshakeError::NotFixedNewstyle)
        );
        assert!(parse_client_flags([0, 0, 1, 1]).is_err());
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            OptionHeader::parse(&b),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 7
            })
        );
        b[0] = 0;
        assert!(OptionHeader::parse(&b).is_err());
    }

    #[test]
    fn info_request_parsing_checks_every_length() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(InfoRequest {
                name: b"abc".to_vec(),
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None, "truncated");
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None, "trailing bytes");
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert_eq!(parse_info_request(&huge), None, "name length past the end");
        assert_eq!(parse_info_request(&[]), None);
    }

    #[test]
    fn encodings() {
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &REPLY_OPT_MAGIC.to_be_bytes());
        let e = info_export(1 << 30, 0x10d);
        assert_eq!(e, [0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x01, 0x0d]);
        // Minimum 1 (byte granularity), preferred 4096, maximum 32 MiB.
        assert_eq!(
            info_block_size(),
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
        assert_eq!(simple_reply(9, EIO)[4..8], [0, 0, 0, 5]);
        assert_eq!(RO.transmission_flags() & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        assert_eq!(
            RW.transmission_flags() & TFLAG_SEND_WRITE_ZEROES,
            TFLAG_SEND_WRITE_ZEROES
        );
    }

    #[test]
    fn journal_errors_map_to_nbd_errors() {
        let corrupt = journal::Error::Corrupt {
            what: "x".into(),
            why: "y".into(),
        };
        assert_eq!(errno_of(&corrupt), EIO);
        assert_eq!(errno_of(&journal::Error::ReadOnly), EPERM);
        assert_eq!(
            errno_of(&journal::Error::Unaligned { offset: 1, len: 1 }),
            EINVAL
        );
        assert_eq!(
            errno_of(&journal::Error::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }),
            ENOSPC
        );
        let nospace = journal::Error::RawIo(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(errno_of(&nospace), ENOSPC);
        assert_eq!(errno_from_os(libc::EBADF), EIO);
    }
}
