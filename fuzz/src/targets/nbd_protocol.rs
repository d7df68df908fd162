//! The NBD wire parsers on their own (fast, many executions): client flags, option headers,
//! NBD_OPT_INFO/GO payloads, request headers and the decision taken on each request.
//!
//! Input: export size (u64 BE), read-only byte, client flags (4 bytes), then items, each a tag
//! byte (`% 3`: 0 option header, 1 info payload with a u16 BE length, 2 request header).

use engine::nbd::protocol::*;

use super::Target;

pub const TARGET: Target = Target {
    name: "nbd_protocol",
    about: "NBD handshake and request parsers and the request decision (pure functions)",
    run,
    seeds,
    keep_last_input: false,
};

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (a, b) = data.split_at(n);
    *data = b;
    Some(a)
}

fn run(mut data: &[u8]) {
    let Some(size) = take(&mut data, 8) else {
        return;
    };
    let size = u64::from_be_bytes(size.try_into().unwrap());
    let read_only = take(&mut data, 1).is_some_and(|b| b[0] & 1 != 0);
    let ex = ExportLimits { size, read_only };
    if let Some(f) = take(&mut data, 4) {
        let _ = parse_client_flags(f.try_into().unwrap());
    }
    while let Some(tag) = take(&mut data, 1) {
        match tag[0] % 3 {
            0 => {
                let Some(h) = take(&mut data, 16) else { return };
                if let Ok(h) = OptionHeader::parse(h.try_into().unwrap()) {
                    let _ = (h.option, h.len);
                }
            }
            1 => {
                let Some(l) = take(&mut data, 2) else { return };
                let n = usize::from(u16::from_be_bytes([l[0], l[1]])).min(data.len());
                let payload = take(&mut data, n).unwrap_or_default();
                if let Some(req) = parse_info_request(payload) {
                    assert_eq!(
                        4 + req.name.len() + 2 + 2 * req.infos.len(),
                        payload.len(),
                        "an info request was parsed from bytes it does not account for"
                    );
                }
            }
            _ => {
                let Some(h) = take(&mut data, REQUEST_LEN) else {
                    return;
                };
                let Some(h) = RequestHeader::parse(h.try_into().unwrap()) else {
                    continue;
                };
                check_decision(&h, &ex);
            }
        }
    }
}

fn check_decision(h: &RequestHeader, ex: &ExportLimits) {
    match decide(h, ex) {
        Decision::Reject { skip, .. } => {
            let expected = if h.kind == CMD_WRITE {
                u64::from(h.len)
            } else {
                0
            };
            assert_eq!(
                skip, expected,
                "a refused request would desynchronise the stream: {h:?}"
            );
        }
        Decision::Run(cmd) => {
            let range = match cmd {
                Command::Read { offset, len } => Some((offset, len, false)),
                Command::Write { offset, len, .. } => Some((offset, len, true)),
                Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
                    Some((offset, len, true))
                }
                Command::Flush | Command::Disconnect => None,
            };
            if let Some((offset, len, write)) = range {
                assert!(
                    offset
                        .checked_add(u64::from(len))
                        .is_some_and(|e| e <= ex.size),
                    "accepted a request outside the export: {h:?} size {}",
                    ex.size
                );
                assert!(
                    !(write && ex.read_only),
                    "accepted a write on a read-only export: {h:?}"
                );
                assert_eq!(
                    (offset, len),
                    (h.offset, h.len),
                    "the command changed the range"
                );
            }
            if matches!(cmd, Command::Read { .. } | Command::Write { .. }) {
                assert!(
                    h.len <= MAX_PAYLOAD,
                    "accepted a payload over the limit: {h:?}"
                );
            }
        }
    }
}

fn request(kind: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut v = vec![2u8];
    v.extend_from_slice(
        &RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
        .encode(),
    );
    v
}

fn seeds() -> Vec<Vec<u8>> {
    let mut s = (1u64 << 30).to_be_bytes().to_vec();
    s.push(0);
    s.extend_from_slice(&3u32.to_be_bytes());
    let mut opt = vec![0u8];
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&8u32.to_be_bytes());
    s.extend_from_slice(&opt);
    let go = [0u8, 0, 0, 0, 0, 1, 0, 3];
    s.extend_from_slice(&[1, 0, go.len() as u8]);
    s.extend_from_slice(&go);
    let mut a = s.clone();
    for (kind, flags, off, len) in [
        (CMD_READ, 0, 0, 4096),
        (CMD_WRITE, CMD_FLAG_FUA, 512, 512),
        (CMD_TRIM, 0, 4096, 1 << 20),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, (1 << 30) - 512, 512),
        (CMD_FLUSH, 0, 0, 0),
        (CMD_READ, 0, u64::MAX - 511, 512),
        (CMD_DISC, 0, 0, 0),
    ] {
        a.extend_from_slice(&request(kind, flags, off, len));
    }
    let mut ro = a.clone();
    ro[8] = 1;
    vec![s, a, ro]
}
