//! The front-end conformance suite ([`block::conformance`]) for NBD, through a real socket
//! and the real connection, and for virtio-blk under the engine's real quiesce gate.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use block::conformance::{suite, Answer, Cmd, Frontend, Quiesce, VirtioFront};
use journal::Volume;

use super::tests::{connect, fixture_sized, Fixture};
use super::*;

struct NbdFront {
    f: Fixture,
    conn: Option<(UnixStream, JoinHandle<Result<()>>)>,
    /// Cookies sent and not answered, with the read length of reads.
    sent: Vec<(u64, Option<u32>)>,
    next_cookie: u64,
}

impl NbdFront {
    fn new() -> NbdFront {
        let f = fixture_sized(16 << 20, false, ServerLimits::default());
        let conn = Some(connect(&f.export));
        NbdFront {
            f,
            conn,
            sent: Vec::new(),
            next_cookie: 1,
        }
    }

    fn sock(&mut self) -> &mut UnixStream {
        &mut self.conn.as_mut().expect("connected").0
    }

    fn encode(&mut self, cmds: Vec<Cmd>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for c in cmds {
            let cookie = self.next_cookie;
            self.next_cookie += 1;
            let fua = |on: bool| if on { CMD_FLAG_FUA } else { 0 };
            let (kind, flags, offset, len, payload, read) = match c {
                Cmd::Read { offset, len } => (CMD_READ, 0, offset, len, None, Some(len)),
                Cmd::Write {
                    offset,
                    data,
                    fua: f,
                } => (
                    CMD_WRITE,
                    fua(f),
                    offset,
                    data.len() as u32,
                    Some(data),
                    None,
                ),
                Cmd::Flush => (CMD_FLUSH, 0, 0, 0, None, None),
                Cmd::Discard {
                    offset,
                    len,
                    fua: f,
                } => (CMD_TRIM, fua(f), offset, len, None, None),
                Cmd::WriteZeroes {
                    offset,
                    len,
                    fua: f,
                } => (CMD_WRITE_ZEROES, fua(f), offset, len, None, None),
            };
            let h = RequestHeader {
                flags,
                kind,
                cookie,
                offset,
                len,
            };
            bytes.extend_from_slice(&h.encode());
            bytes.extend(payload.unwrap_or_default());
            self.sent.push((cookie, read));
        }
        bytes
    }
}

impl Frontend for NbdFront {
    fn size(&self) -> u64 {
        self.f.export.volume.size()
    }

    fn volume(&self) -> Arc<Volume> {
        self.f.export.volume.clone()
    }

    fn has_fua(&self) -> bool {
        true
    }

    fn send(&mut self, cmds: Vec<Cmd>) {
        let bytes = self.encode(cmds);
        self.sock().write_all(&bytes).expect("send requests");
    }

    fn collect(&mut self) -> Vec<Answer> {
        let sent = std::mem::take(&mut self.sent);
        let lens: HashMap<u64, Option<u32>> = sent.iter().copied().collect();
        let mut answers: HashMap<u64, Answer> = HashMap::new();
        while answers.len() < sent.len() {
            let mut h = [0u8; REPLY_LEN];
            self.sock().read_exact(&mut h).expect("reply");
            assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
            let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            let len = *lens.get(&cookie).expect("a reply for a cookie never sent");
            let answer = if errno != 0 {
                Err(format!("nbd errno {errno}"))
            } else {
                let mut data = vec![0u8; len.unwrap_or(0) as usize];
                self.sock().read_exact(&mut data).expect("reply data");
                Ok(data)
            };
            assert!(
                answers.insert(cookie, answer).is_none(),
                "two replies for {cookie}"
            );
        }
        sent.iter()
            .map(|(c, _)| answers.remove(c).expect("answered"))
            .collect()
    }

    fn abandon(&mut self, cmds: Vec<Cmd>) {
        self.send(cmds);
        self.sent.clear();
        let (sock, server) = self.conn.take().expect("connected");
        drop(sock);
        server
            .join()
            .expect("connection thread")
            .expect("a client that goes away is not a server error");
        self.conn = Some(connect(&self.f.export));
    }

    fn budget_used(&self) -> Option<usize> {
        Some(self.f.export.budget.used())
    }
}

/// The engine's gate, paused from a thread that holds the pause until `resume`.
struct GateQuiesce {
    gate: Arc<Gate>,
    held: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
}

impl GateQuiesce {
    fn new(gate: Arc<Gate>) -> GateQuiesce {
        GateQuiesce {
            gate,
            held: Mutex::new(None),
        }
    }
}

impl Quiesce for GateQuiesce {
    fn pause(&self) -> bool {
        let (paused_tx, paused_rx) = mpsc::channel();
        let (resume_tx, resume_rx) = mpsc::channel::<()>();
        let gate = self.gate.clone();
        let t = std::thread::spawn(move || match gate.pause(Duration::from_secs(30)) {
            Ok(guard) => {
                let _ = paused_tx.send(true);
                let _ = resume_rx.recv();
                drop(guard);
            }
            Err(_) => {
                let _ = paused_tx.send(false);
            }
        });
        let ok = paused_rx.recv().unwrap_or(false);
        *self.held.lock().unwrap() = Some((resume_tx, t));
        ok
    }

    fn resume(&self) {
        if let Some((tx, t)) = self.held.lock().unwrap().take() {
            let _ = tx.send(());
            t.join().expect("pause thread");
        }
    }

    fn in_flight(&self) -> u64 {
        self.gate.in_flight()
    }
}

#[test]
fn nbd_conforms() {
    let mut f = NbdFront::new();
    let q = GateQuiesce::new(f.f.export.gate.clone());
    suite(&mut f, Some(&q));
    let (sock, server) = f.conn.take().unwrap();
    drop(sock);
    server.join().unwrap().unwrap();
    assert_eq!(f.f.export.budget.used(), 0);
}

#[test]
fn virtio_conforms_under_the_engine_gate() {
    let disk = block::testutil::test_disk(16 << 20);
    let m = block::testutil::mem();
    let gate = Gate::new();
    let member: Arc<dyn block::RequestGate> = Arc::new(crate::quiesce::Member::new(&gate).unwrap());
    let mut f = VirtioFront::new(
        &m,
        disk.volume.clone(),
        block::BackendKind::Uring,
        Some(member),
    );
    suite(&mut f, Some(&GateQuiesce::new(gate.clone())));
    assert_eq!(gate.in_flight(), 0);
}
