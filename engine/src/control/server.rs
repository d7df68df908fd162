//! The control socket listener: one thread accepting, one thread per client (bounded), all
//! stopped by [`ControlServer::stop`].

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{handle_line, Target, MAX_LINE};
use crate::sys::{self, wait_readable, EventFd, Readiness};
use crate::{Error, Result};

/// Control clients served at once.
const MAX_CLIENTS: usize = 16;
/// A client silent for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` and starts serving requests against `target`.
    pub fn start(path: &Path, target: Arc<dyn Target>) -> Result<ControlServer> {
        let ctx = |e| Error::io(format!("control socket {}", path.display()), e);
        let listener = sys::bind_unix(path).map_err(ctx)?;
        listener.set_nonblocking(true).map_err(ctx)?;
        let stop = Arc::new(EventFd::new().map_err(ctx)?);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(listener, target, stop))
                .map_err(ctx)?
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting, ends every client (after its current request), removes the socket.
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

fn accept_loop(listener: UnixListener, target: Arc<dyn Target>, stop: Arc<EventFd>) {
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    loop {
        match wait_readable(listener.as_raw_fd(), Some(stop.as_raw_fd()), None) {
            Ok(Readiness::Ready) => {}
            Ok(_) => break,
            Err(e) => {
                tracing::error!("control socket: {e}");
                break;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                continue;
            }
        };
        clients.retain(|c| !c.is_finished());
        if clients.len() >= MAX_CLIENTS {
            tracing::warn!("control socket: too many clients");
            continue;
        }
        let (target, stop) = (target.clone(), stop.clone());
        match std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &*target, &stop) {
                    tracing::debug!("control client: {e}");
                }
            }) {
            Ok(h) => clients.push(h),
            Err(e) => tracing::error!("cannot start a control client thread: {e}"),
        }
    }
    for c in clients {
        let _ = c.join();
    }
}

/// Serves one client: a reply line for every request line, until EOF, idleness or stop.
fn serve_client(mut stream: UnixStream, target: &dyn Target, stop: &EventFd) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let mut reply = handle_line(target, line);
            reply.push('\n');
            stream.write_all(reply.as_bytes())?;
        }
        if pending.len() > MAX_LINE {
            let reply = serde_json::json!({ "ok": false, "error": "request line too long" });
            stream.write_all(format!("{reply}\n").as_bytes())?;
            return Ok(());
        }
        match wait_readable(
            stream.as_raw_fd(),
            Some(stop.as_raw_fd()),
            Some(IDLE_TIMEOUT),
        )? {
            Readiness::Ready => {}
            Readiness::Cancelled | Readiness::TimedOut => return Ok(()),
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
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
}
