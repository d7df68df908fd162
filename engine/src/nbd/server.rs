//! Listening for NBD clients on `unix:PATH` or `tcp:HOST:PORT`, one thread per client, until
//! SIGINT or SIGTERM.

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::connection::{self, Export};
use super::stream::Stream;
use crate::sys::{self, ControlOperation, Epoll, EpollEvent, EventSet, Flag, SignalFd};
use crate::{Error, Result};

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl ListenAddr {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<ListenAddr> {
        let bad = || {
            Error::Usage(format!(
                "--listen {s:?}: expected unix:PATH or tcp:HOST:PORT"
            ))
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let (host, port) = hp.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            return Ok(ListenAddr::Tcp(hp.to_string()));
        }
        Err(bad())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(hp) => write!(f, "tcp:{hp}"),
        }
    }
}

/// A bound listening socket; a unix socket file is removed on drop.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr` (non-blocking).
    pub fn bind(addr: &ListenAddr) -> Result<Listener> {
        let ctx = |e| Error::io(format!("listening on {addr}"), e);
        let l = match addr {
            ListenAddr::Unix(p) => Listener::Unix(sys::bind_unix(p).map_err(ctx)?, p.clone()),
            ListenAddr::Tcp(hp) => Listener::Tcp(TcpListener::bind(hp.as_str()).map_err(ctx)?),
        };
        match &l {
            Listener::Unix(u, _) => u.set_nonblocking(true),
            Listener::Tcp(t) => t.set_nonblocking(true),
        }
        .map_err(ctx)?;
        Ok(l)
    }

    /// The address actually bound (a TCP port 0 becomes the real port).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Unix(_, p) => ListenAddr::Unix(p.clone()),
            Listener::Tcp(t) => match t.local_addr() {
                Ok(a) => ListenAddr::Tcp(a.to_string()),
                Err(_) => ListenAddr::Tcp("?".into()),
            },
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(u, _) => Stream::Unix(u.accept()?.0),
            Listener::Tcp(t) => Stream::Tcp(t.accept()?.0),
        })
    }

    fn raw_fd(&self) -> i32 {
        match self {
            Listener::Unix(u, _) => u.as_raw_fd(),
            Listener::Tcp(t) => t.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Accepts clients until a signal arrives on `signals`, then tells every connection to stop
/// (through `export.shutdown`) and waits for them.
pub fn run(listener: &Listener, export: Arc<Export>, signals: &SignalFd) -> Result<()> {
    const T_LISTEN: u64 = 0;
    const T_SIGNAL: u64 = 1;
    let epoll = Epoll::new().map_err(|e| Error::io("creating epoll", e))?;
    for (fd, token) in [
        (listener.raw_fd(), T_LISTEN),
        (signals.as_raw_fd(), T_SIGNAL),
    ] {
        let ev = EpollEvent::new(EventSet::IN, token);
        epoll
            .ctl(ControlOperation::Add, fd, ev)
            .map_err(|e| Error::io("epoll", e))?;
    }
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = [EpollEvent::default(); sys::MAX_EVENTS];
    'outer: loop {
        let events = sys::wait_events(&epoll, &mut buf, None)
            .map_err(|e| Error::io("waiting on epoll", e))?;
        for ev in events {
            if ev.data() == T_SIGNAL {
                if let Some(sig) = signals.take() {
                    tracing::info!("signal {sig}: shutting down");
                    break 'outer;
                }
                continue;
            }
            accept_all(listener, &export, &mut conns);
        }
    }
    export.shutdown.notify();
    for c in conns {
        if c.join().is_err() {
            tracing::error!("an NBD connection thread panicked");
        }
    }
    Ok(())
}

fn accept_all(listener: &Listener, export: &Arc<Export>, conns: &mut Vec<JoinHandle<()>>) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ECONNABORTED, EMFILE and friends: skip this one, keep serving.
                tracing::warn!("accept failed: {e}");
                return;
            }
        };
        conns.retain(|c| !c.is_finished());
        let max = export.serve.max_clients;
        if conns.len() >= max {
            tracing::warn!("refusing a client: {max} connections already open");
            continue; // dropping the stream closes it
        }
        let export = export.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                if let Err(e) = connection::serve(stream, &export) {
                    tracing::warn!("nbd connection failed: {}", crate::cli::error_chain(&e));
                }
            });
        match spawned {
            Ok(h) => conns.push(h),
            Err(e) => tracing::error!("cannot start a connection thread: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:/tmp/x").unwrap(),
            ListenAddr::Unix("/tmp/x".into())
        );
        assert_eq!(
            ListenAddr::parse("tcp:127.0.0.1:10809").unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".into())
        );
        assert_eq!(
            ListenAddr::parse("tcp:[::1]:0").unwrap().to_string(),
            "tcp:[::1]:0"
        );
        for bad in [
            "",
            "unix:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "/tmp/x",
            "udp:1:2",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unix_listener_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nbd.sock");
        let l = Listener::bind(&ListenAddr::Unix(p.clone())).unwrap();
        assert!(p.exists());
        assert_eq!(l.local_addr().to_string(), format!("unix:{}", p.display()));
        drop(l);
        assert!(!p.exists());
        let t = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".into())).unwrap();
        assert!(!t.local_addr().to_string().ends_with(":0"));
    }
}
