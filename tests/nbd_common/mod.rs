//! Helpers shared by the `nbd_*` integration tests: running `strata`, a served disk that is
//! stopped with a signal, external tools (qemu-io, qemu-img, nbdinfo), and a raw NBD client
//! for the tests that need to send exactly chosen bytes.
#![allow(dead_code)]

pub mod fallible_client;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// Fails the test (never skips) when an external tool is missing.
pub fn require_tool(tool: &str, debian_package: &str) {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) => {
            panic!("{tool} is required by this test but cannot be run ({e}); install Debian package {debian_package}")
        }
    }
}

/// Runs a command, fails the test with its output unless it succeeds, returns stdout.
pub fn run_ok(mut cmd: impl std::borrow::BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail with `want` in its stderr; returns its output.
pub fn run_fails(mut cmd: impl std::borrow::BorrowMut<Command>, want: &str) -> Output {
    let cmd = cmd.borrow_mut();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} succeeded: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(want),
        "{cmd:?}: no {want:?} in {out:?}"
    );
    out
}

/// VmHWM (peak resident memory) of a process in KiB.
pub fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `strata ARGS`, returning (exit code, stdout, stderr).
pub fn run_strata(args: &[&str]) -> (i32, String, String) {
    let out = strata(args).output().expect("run strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn strata(args: &[&str]) -> Command {
    let mut c = Command::new(STRATA);
    c.args(args);
    c
}

/// Creates a disk of `size` (e.g. "16M") at `dir/name`.
pub fn create_disk(dir: &Path, name: &str, size: &str) -> PathBuf {
    let disk = dir.join(name);
    run_ok(
        strata(&["disk", "create"])
            .arg(&disk)
            .args(["--size", size]),
    );
    disk
}

/// Runs qemu-io on `target` with one `-c` per command; returns the raw output.
pub fn qemu_io(target: &str, cmds: &[&str]) -> Output {
    qemu_io_with(&[], target, cmds)
}

/// Like [`qemu_io`] with extra options before the target (e.g. `-r` for read-only).
pub fn qemu_io_with(opts: &[&str], target: &str, cmds: &[&str]) -> Output {
    require_tool("qemu-io", "qemu-utils");
    let mut c = Command::new("qemu-io");
    c.args(opts).args(["-f", "raw", target]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io: {e}"))
}

/// Runs qemu-io and fails the test unless every command succeeded.
pub fn qemu_io_ok(target: &str, cmds: &[&str]) {
    qemu_io_ok_with(&[], target, cmds)
}

/// Like [`qemu_io_ok`] with extra options.
pub fn qemu_io_ok_with(opts: &[&str], target: &str, cmds: &[&str]) {
    let out = qemu_io_with(opts, target, cmds);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} on {target} failed ({}):\n{text}",
        out.status
    );
}

/// A `strata disk serve` process.
pub struct Server {
    child: Option<Child>,
    pub sock: PathBuf,
    pub api: PathBuf,
    /// The line printed when the server became ready.
    pub ready_line: String,
    lines: mpsc::Receiver<String>,
}

impl Server {
    /// Serves `disk` on `dir/nbd.sock` with a control socket `dir/api.sock`, plus `extra`
    /// arguments, and waits for the ready line.
    pub fn start(disk: &Path, dir: &Path, extra: &[&str]) -> Server {
        let sock = dir.join("nbd.sock");
        let api = dir.join("api.sock");
        let mut cmd = strata(&["disk", "serve"]);
        cmd.arg(disk)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--api")
            .arg(&api)
            .args(extra);
        Self::spawn(cmd, sock, api, disk)
    }

    /// Like [`Server::start`] with an explicit `--listen` value and no control socket.
    pub fn start_listen(disk: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut cmd = strata(&["disk", "serve"]);
        cmd.arg(disk).args(["--listen", listen]).args(extra);
        Self::spawn(cmd, PathBuf::new(), PathBuf::new(), disk)
    }

    fn spawn(mut cmd: Command, sock: PathBuf, api: PathBuf, disk: &Path) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child: Some(child),
            sock,
            api,
            ready_line: String::new(),
            lines,
        };
        let ready = server
            .lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                let status = server
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!("strata disk serve printed no ready line (exit status {status:?})")
            });
        let want = format!("strata: serving {} on ", disk.display());
        assert!(
            ready.starts_with(&want),
            "unexpected ready line {ready:?}, wanted {want:?}..."
        );
        server.ready_line = ready;
        server
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// True while the process runs and still completes a handshake and a read.
    pub fn alive_after_clients(&self) -> bool {
        let mut c = Client::connect(&self.sock);
        let (errno, data) = c.call(NBD_CMD_READ, 0, 0, 512, &[]);
        c.disconnect();
        errno == 0 && data.len() == 512
    }

    /// Sends `signal`, waits for a clean exit, and checks nothing else went to stdout.
    pub fn stop_with(mut self, signal: i32) {
        let mut child = self.child.take().expect("server already stopped");
        // SAFETY: kill() on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = child.try_wait().expect("waitpid") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("strata disk serve did not exit after signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "strata disk serve exited with {status} after signal {signal}"
        );
        let extra: Vec<String> = self.lines.try_iter().collect();
        assert!(
            extra.is_empty(),
            "unexpected stdout from the server: {extra:?}"
        );
    }

    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// SIGKILLs the server (a crash) and reaps it.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- A raw NBD client -------------------------------------------------------------------

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_FLAG_FUA: u16 = 1;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REPLY_MAGIC: u32 = 0x6744_6698;

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A client past the handshake.
pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
}

/// Reads the server greeting from a fresh connection.
pub fn connect_raw(sock: &Path) -> UnixStream {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
    s
}

/// Sends one option.
pub fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Reads one option reply: (option, reply type, data).
pub fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h), 0x0003_e889_0455_65a9, "option reply magic");
    let mut d = vec![0u8; be32(&h[16..]) as usize];
    s.read_exact(&mut d).unwrap();
    (be32(&h[8..]), be32(&h[12..]), d)
}

impl Client {
    /// Connects and negotiates the default export with NBD_OPT_GO.
    pub fn connect(sock: &Path) -> Client {
        let mut s = connect_raw(sock);
        s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        let mut go = 0u32.to_be_bytes().to_vec(); // empty name
        go.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut s, 7, &go);
        let (mut size, mut flags) = (0, 0);
        loop {
            let (opt, kind, data) = read_option_reply(&mut s);
            assert_eq!(opt, 7);
            match kind {
                1 => break, // ACK
                3 if data[..2] == [0, 0] => {
                    size = be64(&data[2..]);
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                3 => {}
                other => panic!("NBD_OPT_GO failed with reply type {other:#x}"),
            }
        }
        Client { s, size, flags }
    }

    /// Sends a request header (and `payload`, if any).
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Reads a simple reply: (errno, cookie); `data_len` bytes follow a successful read.
    pub fn reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), REPLY_MAGIC, "simple reply magic");
        let errno = be32(&h[4..]);
        let mut data = Vec::new();
        if errno == 0 && data_len > 0 {
            data = vec![0u8; data_len];
            self.s.read_exact(&mut data).unwrap();
        }
        (errno, be64(&h[8..]), data)
    }

    /// One request, one reply; returns (errno, data).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send(kind, flags, 0x1234, offset, len, payload);
        let want = if kind == NBD_CMD_READ {
            len as usize
        } else {
            0
        };
        let (errno, cookie, data) = self.reply(want);
        assert_eq!(cookie, 0x1234);
        (errno, data)
    }

    /// Sends NBD_CMD_DISC and waits for the server to close.
    pub fn disconnect(mut self) {
        self.send(NBD_CMD_DISC, 0, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "bytes after NBD_CMD_DISC");
    }
}
