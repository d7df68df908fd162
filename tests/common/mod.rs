//! Helpers shared by the integration tests: starting `strata disk serve`, a minimal NBD
//! client (fixed newstyle, OPT_GO, simple replies) to drive it precisely.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the `strata` binary under test.
pub fn strata() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

/// Runs `strata ARGS`, returning (exit code, stdout, stderr).
pub fn run_strata(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(strata())
        .args(args)
        .output()
        .expect("run strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `strata disk serve` process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    /// Starts serving `disk` on a unix socket in `dir` with extra args, waiting until ready.
    pub fn start(disk: &Path, dir: &Path, extra: &[&str]) -> Server {
        let socket = dir.join(format!("nbd-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listen = format!("unix:{}", socket.display());
        let mut child = Command::new(strata())
            .args(["disk", "serve"])
            .arg(disk)
            .args(["--listen", &listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn strata disk serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                assert!(
                    line.contains("serving"),
                    "unexpected first line from serve: {line}"
                );
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("strata disk serve exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "strata disk serve did not become ready"
            );
        }
        Server { child, socket }
    }

    /// The NBD URI of the socket.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        panic!("strata disk serve did not exit on SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

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
