//! The control socket listener: one thread serving every client from one epoll loop, so an
//! idle client costs a descriptor and nothing else. Requests are answered one at a time, in
//! arrival order. A client is disconnected when it has been silent (or has not read its
//! reply) for [`ControlLimits::idle_timeout`]; when [`ControlLimits::max_clients`] are
//! connected, a new client displaces the one that has been inactive longest, so idle clients
//! can never lock out a `checkpoint create`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::mpsc;

use super::{handle_request, Answer, Target, MAX_LINE};
use crate::sys::{self, ControlOperation, Epoll, EpollEvent, EventFd, EventSet, Flag};
use crate::{Error, Result};

/// Limits of one control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlLimits {
    /// Clients connected at once; one more displaces the longest inactive.
    pub max_clients: usize,
    /// How long a client may stay silent (or leave its reply unread) before it is dropped.
    pub idle_timeout: Duration,
}

impl Default for ControlLimits {
    fn default() -> ControlLimits {
        ControlLimits {
            max_clients: 16,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

const T_LISTEN: u64 = 0;
const T_STOP: u64 = 1;
/// A deferred answer is ready.
const T_ANSWER: u64 = 2;
/// Client tokens start here.
const T_CLIENT: u64 = 3;

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (mode 0600) and starts serving requests against `target`.
    pub fn start(path: &Path, target: Arc<dyn Target>) -> Result<ControlServer> {
        Self::start_with(path, target, ControlLimits::default())
    }

    /// Like [`ControlServer::start`] with explicit limits.
    pub fn start_with(
        path: &Path,
        target: Arc<dyn Target>,
        limits: ControlLimits,
    ) -> Result<ControlServer> {
        let ctx = |e| Error::io(format!("control socket {}", path.display()), e);
        let listener = sys::bind_unix(path).map_err(ctx)?;
        listener.set_nonblocking(true).map_err(ctx)?;
        let stop = Arc::new(sys::new_eventfd().map_err(ctx)?);
        let epoll = Epoll::new().map_err(ctx)?;
        let answer_ready = Arc::new(sys::new_eventfd().map_err(ctx)?);
        for (fd, token) in [
            (listener.as_raw_fd(), T_LISTEN),
            (stop.as_raw_fd(), T_STOP),
            (answer_ready.as_raw_fd(), T_ANSWER),
        ] {
            let ev = EpollEvent::new(EventSet::IN, token);
            epoll.ctl(ControlOperation::Add, fd, ev).map_err(ctx)?;
        }
        let (answers_tx, answers) = mpsc::channel();
        let mut lp = Loop {
            listener,
            epoll,
            target,
            limits,
            clients: HashMap::new(),
            next_token: T_CLIENT,
            answers,
            answers_tx,
            answer_ready,
        };
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || lp.run())
            .map_err(ctx)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting, ends every client (after the request being answered), removes the
    /// socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.notify();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the control thread panicked");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One connected client.
struct Client {
    stream: UnixStream,
    /// Received bytes not yet answered (at most one line past [`MAX_LINE`]).
    input: Vec<u8>,
    /// Reply bytes not yet written.
    output: Vec<u8>,
    sent: usize,
    last_active: Instant,
    /// Close once the output is written.
    closing: bool,
    interest: EventSet,
    /// A deferred answer is being computed: nothing else is read or answered until it is in.
    waiting: bool,
}

struct Loop {
    listener: UnixListener,
    epoll: Epoll,
    target: Arc<dyn Target>,
    limits: ControlLimits,
    clients: HashMap<u64, Client>,
    next_token: u64,
    /// Deferred answers: (client token, reply line).
    answers: mpsc::Receiver<(u64, String)>,
    answers_tx: mpsc::Sender<(u64, String)>,
    answer_ready: Arc<EventFd>,
}

impl Loop {
    fn run(&mut self) {
        let mut buf = [EpollEvent::default(); sys::MAX_EVENTS];
        loop {
            let timeout = self.expire();
            let events = match sys::wait_events(&self.epoll, &mut buf, timeout) {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!("control socket: {e}");
                    return;
                }
            };
            for ev in events {
                match ev.data() {
                    T_STOP => return,
                    T_LISTEN => self.accept_all(),
                    T_ANSWER => self.deliver_answers(),
                    t => self.serve(t, EventSet::from_bits_truncate(ev.events())),
                }
            }
        }
    }

    /// Drops clients idle past the limit; returns the time until the next may expire.
    fn expire(&mut self) -> Option<Duration> {
        let limit = self.limits.idle_timeout;
        let expired: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| !c.waiting && c.last_active.elapsed() >= limit)
            .map(|(&t, _)| t)
            .collect();
        for t in expired {
            tracing::debug!("control socket: dropping a client idle for {limit:?}");
            self.drop_client(t);
        }
        self.clients
            .values()
            .filter(|c| !c.waiting)
            .map(|c| limit.saturating_sub(c.last_active.elapsed()))
            .min()
    }

    /// Hands finished deferred answers to their clients (gone clients' are dropped).
    fn deliver_answers(&mut self) {
        self.answer_ready.clear();
        while let Ok((token, mut line)) = self.answers.try_recv() {
            let Some(c) = self.clients.get_mut(&token) else {
                continue;
            };
            line.push('\n');
            c.output = line.into_bytes();
            c.sent = 0;
            c.waiting = false;
            c.last_active = Instant::now();
            self.serve(token, EventSet::OUT);
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    return;
                }
            };
            if self.clients.len() >= self.limits.max_clients.max(1) {
                // Every client here is idle or waiting to read a reply (requests are answered
                // as they arrive): the longest inactive one makes room.
                // Clients waiting for a deferred answer are not idle: they go last.
                if let Some(oldest) = self
                    .clients
                    .iter()
                    .min_by_key(|(_, c)| (c.waiting, c.last_active))
                    .map(|(&t, _)| t)
                {
                    tracing::debug!("control socket: full, dropping the longest idle client");
                    self.drop_client(oldest);
                }
            }
            if let Err(e) = self.add_client(stream) {
                tracing::warn!("control socket: cannot serve a client: {e}");
            }
        }
    }

    fn add_client(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let token = self.next_token;
        self.next_token += 1;
        let ein = EventSet::IN;
        let ev = EpollEvent::new(ein, token);
        self.epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)?;
        self.clients.insert(
            token,
            Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                sent: 0,
                last_active: Instant::now(),
                closing: false,
                interest: ein,
                waiting: false,
            },
        );
        Ok(())
    }

    fn drop_client(&mut self, token: u64) {
        if let Some(c) = self.clients.remove(&token) {
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Reads, answers and writes for one client; drops it when it is done or broken.
    fn serve(&mut self, token: u64, ev: EventSet) {
        let Some(c) = self.clients.get_mut(&token) else {
            return;
        };
        let deferred = Deferred {
            token,
            tx: &self.answers_tx,
            ready: &self.answer_ready,
        };
        let keep = match step(c, &*self.target, ev, &deferred) {
            Ok(keep) => keep,
            Err(e) => {
                tracing::debug!("control client: {e}");
                false
            }
        };
        if !keep {
            self.drop_client(token);
            return;
        }
        // Read only while no reply is waiting: a client that does not read its replies gets
        // no more answers (and is dropped when idle too long).
        let want = if c.waiting {
            // Only hang-ups (always reported) until the answer is in.
            EventSet::empty()
        } else if c.output.len() > c.sent {
            EventSet::OUT
        } else {
            EventSet::IN
        };
        if want != c.interest {
            c.interest = want;
            let ev = EpollEvent::new(want, token);
            if self
                .epoll
                .ctl(ControlOperation::Modify, c.stream.as_raw_fd(), ev)
                .is_err()
            {
                self.drop_client(token);
            }
        }
    }
}

/// Where a deferred answer goes when its thread is done.
struct Deferred<'a> {
    token: u64,
    tx: &'a mpsc::Sender<(u64, String)>,
    ready: &'a Arc<EventFd>,
}

impl Deferred<'_> {
    /// Computes `f` on a thread of its own and posts the answer to the loop.
    fn spawn(&self, f: Box<dyn FnOnce() -> String + Send>) -> io::Result<()> {
        let (token, tx, ready) = (self.token, self.tx.clone(), self.ready.clone());
        std::thread::Builder::new()
            .name("control-wait".into())
            .spawn(move || {
                let line = f();
                // The loop may be gone (stopped): then nobody wants the answer.
                if tx.send((token, line)).is_ok() {
                    ready.notify();
                }
            })
            .map(|_| ())
    }
}

/// One round for a client: read what is there, answer complete lines, write what it takes.
/// `Ok(false)` when the client is finished.
fn step(
    c: &mut Client,
    target: &dyn Target,
    ev: EventSet,
    deferred: &Deferred,
) -> io::Result<bool> {
    let readable = EventSet::IN | EventSet::HANG_UP | EventSet::ERROR;
    if ev.intersects(readable) && !c.closing {
        let mut chunk = [0u8; 4096];
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    c.closing = true;
                    break;
                }
                Ok(n) => {
                    c.input.extend_from_slice(&chunk[..n]);
                    c.last_active = Instant::now();
                    if c.input.len() > MAX_LINE {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    loop {
        if c.waiting {
            return Ok(!c.closing);
        }
        if c.output.len() > c.sent {
            match c.stream.write(&c.output[c.sent..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    c.sent += n;
                    c.last_active = Instant::now();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        c.output.clear();
        c.sent = 0;
        if let Some(nl) = c.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.input.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let mut reply = match handle_request(target, line) {
                Answer::Now(r) => r,
                Answer::Later(f) => {
                    deferred.spawn(f)?;
                    c.waiting = true;
                    c.last_active = Instant::now();
                    continue;
                }
            };
            reply.push('\n');
            c.output = reply.into_bytes();
            // The request may have taken a while (a checkpoint drains I/O): that was the
            // server's time, not the client's.
            c.last_active = Instant::now();
            continue;
        }
        if c.input.len() > MAX_LINE {
            let reply = serde_json::json!({ "ok": false, "error": "request line too long" });
            c.output = format!("{reply}\n").into_bytes();
            c.input.clear();
            c.closing = true;
            continue;
        }
        return Ok(!c.closing);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::fake;
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn serves_lines_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = ControlServer::start(&path, Arc::new(fake())).unwrap();
        let s = UnixStream::connect(&path).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(
            b"{\"op\":\"checkpoint-create\",\"name\":\"one\"}\n\n{\"op\":\"checkpoint-list\"}\n",
        )
        .unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["checkpoint"]["name"], "one");
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["checkpoints"][0]["name"], "one");
        // An over-long line is refused and the client is dropped.
        w.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("too long"));
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0);
        // A silent client does not keep stop() from finishing.
        let _idle = UnixStream::connect(&path).unwrap();
        server.stop();
        assert!(!path.exists());
    }

    #[test]
    fn idle_clients_cannot_lock_out_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _server = ControlServer::start(&path, Arc::new(fake())).unwrap();
        let max = ControlLimits::default().max_clients;
        // More silent clients than the server serves at once, the first one half-way through
        // a request line (written before the others connect: once the server is full it may
        // already have displaced that client, and a write would then fail).
        let mut idle = vec![UnixStream::connect(&path).unwrap()];
        idle[0].write_all(b"{\"op\":").unwrap();
        idle.extend((0..max + 3).map(|_| UnixStream::connect(&path).unwrap()));
        let v = super::super::client::call(
            &path,
            &super::super::Request::CheckpointCreate {
                name: "c".into(),
                memory: None,
            },
        )
        .unwrap();
        assert_eq!(v["checkpoint"]["name"], "c");
        // The longest idle clients made room and were closed.
        let mut first = [0u8; 1];
        idle[0]
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        match idle[0].read(&mut first) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
    }

    #[test]
    fn silent_clients_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let limits = ControlLimits {
            max_clients: 4,
            idle_timeout: Duration::from_millis(100),
        };
        let _server = ControlServer::start_with(&path, Arc::new(fake()), limits).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "an idle client is disconnected");
        // One that sends requests and never reads the replies is dropped too: its writes end
        // with the connection closed rather than blocking forever.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let line = b"{\"op\":\"checkpoint-list\"}\n".repeat(1000);
        let err = loop {
            if let Err(e) = s.write_all(&line) {
                break e;
            }
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
        // The socket is for its owner only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A delete with `wait` is answered after its merge, while other clients are served.
    #[test]
    fn a_waiting_delete_does_not_block_other_clients() {
        use journal::{CacheMode, Disk, OpenOptions};
        let dir = tempfile::tempdir().unwrap();
        let disk_dir = dir.path().join("disk");
        Disk::create(&disk_dir, 8 << 20, None).unwrap();
        let mut disk = Disk::open(
            &disk_dir,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
            },
        )
        .unwrap();
        let data = vec![0x5au8; 4 << 20];
        disk.now().write_at(&data, 0, false).unwrap();
        disk.checkpoint("a").unwrap();
        disk.now()
            .write_at(&data[..1 << 20], 1 << 20, false)
            .unwrap();
        disk.checkpoint("b").unwrap();
        let disk = Arc::new(std::sync::Mutex::new(disk));
        let gate = crate::quiesce::Gate::new();
        let target = super::super::DiskTarget::new(disk.clone(), gate, true);
        let path = dir.path().join("api.sock");
        let server = ControlServer::start(&path, Arc::new(target)).unwrap();
        // About 4 MiB at 1 MB/s: the merge takes seconds.
        let waiting = UnixStream::connect(&path).unwrap();
        let mut w = waiting.try_clone().unwrap();
        w.write_all(
            b"{\"op\":\"checkpoint-delete\",\"name\":\"a\",\"strategy\":\"compact-into-child\",\"rate\":1,\"wait\":true}\n",
        )
        .unwrap();
        // Meanwhile another client lists (a is gone already) and sees the merge running.
        let mut listed = false;
        for _ in 0..1000 {
            let v =
                super::super::client::call(&path, &super::super::Request::CheckpointList).unwrap();
            if v["checkpoints"].as_array().unwrap().len() == 1 {
                listed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(listed, "the delete did not take a out of the tree");
        let v =
            super::super::client::call(&path, &super::super::Request::CheckpointStatus).unwrap();
        let merges = v["merges"].as_array().unwrap();
        assert!(
            merges.iter().any(|m| m["checkpoint"] == "a"),
            "the waiting delete's merge is not running: {v}"
        );
        let mut r = BufReader::new(waiting);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["deleted"]["deleted"][0], "a", "{v}");
        let ended = v["merges"].as_array().unwrap();
        assert!(!ended.is_empty(), "{v}");
        assert!(ended.iter().all(|m| m["status"]["state"] == "done"), "{v}");
        let v =
            super::super::client::call(&path, &super::super::Request::CheckpointStatus).unwrap();
        assert!(v["merges"].as_array().unwrap().is_empty(), "{v}");
        server.stop();
        let mut want = data.clone();
        want[1 << 20..2 << 20].copy_from_slice(&data[..1 << 20]);
        let mut got = vec![0u8; 4 << 20];
        disk.lock()
            .unwrap()
            .checkpoint_view("b")
            .unwrap()
            .read_at(&mut got, 0)
            .unwrap();
        assert!(got == want);
    }
}
