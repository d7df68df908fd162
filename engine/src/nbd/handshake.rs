//! The fixed newstyle handshake: greeting, client flags, then option haggling until the client
//! picks the export (NBD_OPT_GO / NBD_OPT_EXPORT_NAME) or leaves.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::protocol::*;
use super::stream::Stream;

/// Options accepted before the server gives up on a client that never picks an export.
const MAX_OPTIONS: usize = 256;
/// The one export this server offers: the default (empty) name.
pub const EXPORT_NAME: &[u8] = b"";

/// How the handshake ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The client entered the transmission phase.
    Transmit,
    /// The client aborted or sent something unacceptable; the connection is to be closed.
    Closed,
}

/// Runs the handshake on a non-blocking stream; the whole of it must be over by `deadline`.
/// `cancel` becomes readable when the server shuts down. I/O failures (client gone, timeout)
/// are errors; protocol violations close.
pub fn negotiate(
    s: &mut Stream,
    ex: &ExportLimits,
    cancel: RawFd,
    deadline: Instant,
) -> io::Result<Outcome> {
    let mut h = Haggle {
        s,
        cancel,
        deadline,
    };
    h.write(&server_greeting())?;
    let mut flags = [0u8; 4];
    h.read(&mut flags)?;
    let no_zeroes = match parse_client_flags(flags) {
        Ok(z) => z,
        Err(e) => {
            tracing::debug!("nbd handshake: {e}");
            return Ok(Outcome::Closed);
        }
    };
    for _ in 0..MAX_OPTIONS {
        let mut hb = [0u8; 16];
        h.read(&mut hb)?;
        let hdr = match OptionHeader::parse(&hb) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("nbd handshake: {e}");
                return Ok(Outcome::Closed);
            }
        };
        if hdr.len > MAX_OPTION_LEN {
            // The payload is not read, so the stream cannot continue after this reply.
            if hdr.option != OPT_EXPORT_NAME {
                h.send(hdr.option, REP_ERR_TOO_BIG, b"option too long")?;
            }
            return Ok(Outcome::Closed);
        }
        let mut data = vec![0u8; hdr.len as usize];
        h.read(&mut data)?;
        match handle_option(&mut h, ex, hdr.option, &data, no_zeroes)? {
            Some(outcome) => return Ok(outcome),
            None => continue,
        }
    }
    tracing::debug!("nbd handshake: too many options");
    Ok(Outcome::Closed)
}

/// The stream during the handshake: every read and write shares one deadline.
struct Haggle<'a> {
    s: &'a mut Stream,
    cancel: RawFd,
    deadline: Instant,
}

impl Haggle<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake took too long",
            ));
        }
        Ok(left)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let left = self.left()?;
        self.s.read_full(buf, self.cancel, left)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let left = self.left()?;
        self.s.write_full(buf, Some(self.cancel), left)
    }

    fn send(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        self.write(&option_reply(option, reply, data))
    }
}

/// Answers one option; `Some` when the handshake is over.
fn handle_option(
    h: &mut Haggle<'_>,
    ex: &ExportLimits,
    option: u32,
    data: &[u8],
    no_zeroes: bool,
) -> io::Result<Option<Outcome>> {
    match option {
        OPT_EXPORT_NAME => {
            if data != EXPORT_NAME {
                // This option has no error reply: the only answer is to hang up.
                return Ok(Some(Outcome::Closed));
            }
            let reply = export_name_reply(ex.size, ex.transmission_flags(), no_zeroes);
            h.write(&reply)?;
            Ok(Some(Outcome::Transmit))
        }
        OPT_ABORT => {
            // Best effort: the client may already have closed its end.
            let _ = h.send(option, REP_ACK, &[]);
            Ok(Some(Outcome::Closed))
        }
        OPT_LIST => {
            if !data.is_empty() {
                h.send(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
            } else {
                h.send(option, REP_SERVER, &rep_server(EXPORT_NAME))?;
                h.send(option, REP_ACK, &[])?;
            }
            Ok(None)
        }
        OPT_INFO | OPT_GO => {
            let Some(req) = parse_info_request(data) else {
                h.send(option, REP_ERR_INVALID, b"malformed request")?;
                return Ok(None);
            };
            if req.name != EXPORT_NAME {
                h.send(option, REP_ERR_UNKNOWN, b"only the default export exists")?;
                return Ok(None);
            }
            h.send(
                option,
                REP_INFO,
                &info_export(ex.size, ex.transmission_flags()),
            )?;
            // Sent whether asked for or not (minimum block size 1: any alignment works).
            h.send(option, REP_INFO, &info_block_size())?;
            if req.infos.contains(&INFO_NAME) {
                h.send(option, REP_INFO, &info_name(EXPORT_NAME))?;
            }
            h.send(option, REP_ACK, &[])?;
            Ok((option == OPT_GO).then_some(Outcome::Transmit))
        }
        _ => {
            h.send(option, REP_ERR_UNSUP, &[])?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::new_eventfd;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    const LIMIT: Duration = Duration::from_secs(30);
    const EX: ExportLimits = ExportLimits {
        size: 1 << 30,
        read_only: false,
    };

    fn start() -> (UnixStream, std::thread::JoinHandle<io::Result<Outcome>>) {
        start_with(LIMIT)
    }

    fn start_with(limit: Duration) -> (UnixStream, std::thread::JoinHandle<io::Result<Outcome>>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let cancel = new_eventfd()?;
            let mut s = Stream::Unix(a);
            s.set_nonblocking()?;
            negotiate(&mut s, &EX, cancel.as_raw_fd(), Instant::now() + limit)
        });
        let mut greet = [0u8; 18];
        b.read_exact(&mut greet).unwrap();
        assert_eq!(greet, server_greeting());
        (b, t)
    }

    fn opt(b: &mut UnixStream, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        b.write_all(&m).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    fn reply(b: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        b.read_exact(&mut h).unwrap();
        assert_eq!(h[..8], REPLY_OPT_MAGIC.to_be_bytes());
        let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let n = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; n as usize];
        b.read_exact(&mut d).unwrap();
        (o, t, d)
    }

    fn go_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn list_unknown_info_go() {
        let (mut b, t) = start();
        b.write_all(&3u32.to_be_bytes()).unwrap();
        opt(&mut b, OPT_LIST, &[]);
        assert_eq!(reply(&mut b), (OPT_LIST, REP_SERVER, vec![0, 0, 0, 0]));
        assert_eq!(reply(&mut b).1, REP_ACK);
        opt(&mut b, 42, b"whatever");
        assert_eq!(reply(&mut b), (42, REP_ERR_UNSUP, vec![]));
        opt(&mut b, OPT_GO, &go_payload(b"nope", &[]));
        assert_eq!(reply(&mut b).1, REP_ERR_UNKNOWN);
        opt(&mut b, OPT_INFO, &[1, 2, 3]);
        assert_eq!(reply(&mut b).1, REP_ERR_INVALID);
        opt(&mut b, OPT_INFO, &go_payload(b"", &[INFO_BLOCK_SIZE]));
        assert_eq!(
            reply(&mut b),
            (
                OPT_INFO,
                REP_INFO,
                info_export(1 << 30, EX.transmission_flags())
            )
        );
        assert_eq!(reply(&mut b), (OPT_INFO, REP_INFO, info_block_size()));
        assert_eq!(reply(&mut b).1, REP_ACK);
        opt(&mut b, OPT_GO, &go_payload(b"", &[INFO_NAME]));
        assert_eq!(reply(&mut b).1, REP_INFO);
        assert_eq!(reply(&mut b).1, REP_INFO);
        assert_eq!(reply(&mut b), (OPT_GO, REP_INFO, info_name(b"")));
        assert_eq!(reply(&mut b).1, REP_ACK);
        assert_eq!(t.join().unwrap().unwrap(), Outcome::Transmit);
    }

    #[test]
    fn export_name_with_zero_padding() {
        let (mut b, t) = start();
        b.write_all(&1u32.to_be_bytes()).unwrap();
        opt(&mut b, OPT_EXPORT_NAME, b"");
        let mut r = [0u8; 134];
        b.read_exact(&mut r).unwrap();
        assert_eq!(r[..8], (1u64 << 30).to_be_bytes());
        assert!(r[10..].iter().all(|&x| x == 0));
        assert_eq!(t.join().unwrap().unwrap(), Outcome::Transmit);
    }

    #[test]
    fn hostile_handshakes_close() {
        // Unknown client flags.
        let (mut b, t) = start();
        b.write_all(&[0xff; 4]).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), Outcome::Closed);
        // Bad option magic.
        let (mut b, t) = start();
        b.write_all(&1u32.to_be_bytes()).unwrap();
        b.write_all(&[0x55; 16]).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), Outcome::Closed);
        // Huge option length: refused without allocating it.
        let (mut b, t) = start();
        b.write_all(&1u32.to_be_bytes()).unwrap();
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        b.write_all(&m).unwrap();
        assert_eq!(reply(&mut b).1, REP_ERR_TOO_BIG);
        assert_eq!(t.join().unwrap().unwrap(), Outcome::Closed);
        // Disconnect in the middle of an option.
        let (mut b, t) = start();
        b.write_all(&1u32.to_be_bytes()).unwrap();
        b.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        drop(b);
        assert_eq!(
            t.join().unwrap().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // Abort is acknowledged.
        let (mut b, t) = start();
        b.write_all(&1u32.to_be_bytes()).unwrap();
        opt(&mut b, OPT_ABORT, &[]);
        assert_eq!(reply(&mut b), (OPT_ABORT, REP_ACK, vec![]));
        assert_eq!(t.join().unwrap().unwrap(), Outcome::Closed);
    }

    #[test]
    fn the_whole_handshake_is_bounded() {
        // Each option arrives well within the limit, but together they take longer: the
        // handshake ends with a timeout instead of serving 256 options.
        let (mut b, t) = start_with(Duration::from_millis(500));
        b.write_all(&1u32.to_be_bytes()).unwrap();
        let mut sent = 0;
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&42u32.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        while !t.is_finished() && sent < MAX_OPTIONS {
            if b.write_all(&m).is_err() {
                break;
            }
            sent += 1;
            let mut h = [0u8; 20];
            if b.read_exact(&mut h).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            t.join().unwrap().unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert!(sent < MAX_OPTIONS, "all {sent} options were served");
    }
}
