//! External processes of the depth benchmark: `strata disk serve` and `qemu-nbd` servers on
//! unix sockets, the qcow2 chain built with qemu-img/qemu-io, and page-cache eviction.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use journal::CacheMode;

use super::fail;
use super::pattern::LayerWrites;
use crate::{Error, Result};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// qemu-io commands per invocation.
const QEMU_IO_BATCH: usize = 512;

/// The name of a cache mode as the CSV and the CLIs spell it.
pub fn cache_name(c: CacheMode) -> &'static str {
    match c {
        CacheMode::None => "none",
        CacheMode::Writeback => "writeback",
    }
}

/// A running NBD server; stopped (SIGTERM, then SIGKILL) by [`Server::stop`] or on drop.
pub struct Server {
    child: Option<Child>,
    what: String,
    socket: PathBuf,
}

impl Server {
    /// `strata disk serve DISK --listen unix:SOCKET --cache C [--checkpoint NAME]`, ready once
    /// it printed its ready line.
    pub fn strata(
        exe: &Path,
        disk: &Path,
        socket: &Path,
        cache: CacheMode,
        checkpoint: Option<&str>,
    ) -> Result<Server> {
        Server::strata_with(exe, disk, socket, cache, checkpoint, None)
    }

    /// [`Server::strata`] serving Now with a control socket at `api` (`--api`).
    pub fn strata_api(
        exe: &Path,
        disk: &Path,
        socket: &Path,
        api: &Path,
        cache: CacheMode,
    ) -> Result<Server> {
        Server::strata_with(exe, disk, socket, cache, None, Some(api))
    }

    fn strata_with(
        exe: &Path,
        disk: &Path,
        socket: &Path,
        cache: CacheMode,
        checkpoint: Option<&str>,
        api: Option<&Path>,
    ) -> Result<Server> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(exe);
        cmd.arg("disk")
            .arg("serve")
            .arg(disk)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--cache")
            .arg(cache_name(cache));
        if let Some(name) = checkpoint {
            cmd.arg("--checkpoint").arg(name);
        }
        if let Some(api) = api {
            let _ = std::fs::remove_file(api);
            cmd.arg("--api").arg(api);
        }
        let what = format!(
            "strata disk serve {} (cache {})",
            disk.display(),
            cache_name(cache)
        );
        // Measurement aid: STRATA_BENCH_SERVER_LOG=FILE appends the servers' stderr (their
        // tracing output, see STRATA_LOG) to FILE instead of keeping it for error messages.
        let stderr = match std::env::var_os("STRATA_BENCH_SERVER_LOG") {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map(Stdio::from)
                .map_err(|e| Error::io(format!("opening {}", Path::new(&path).display()), e))?,
            None => Stdio::piped(),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::io(format!("starting {what}"), e))?;
        let mut line = String::new();
        let got = match child.stdout.take() {
            Some(out) => BufReader::new(out)
                .read_line(&mut line)
                .map_err(|e| Error::io(format!("reading from {what}"), e))?,
            None => 0,
        };
        let mut server = Server {
            child: Some(child),
            what,
            socket: socket.to_path_buf(),
        };
        if got == 0 || !line.starts_with("strata: serving") {
            let detail = server.exit_output();
            return Err(fail(format!("{} did not start", server.what), detail));
        }
        Ok(server)
    }

    /// `qemu-nbd` serving `image` (qcow2): with cache none `--cache=none --aio=io_uring`,
    /// with writeback its defaults. Ready once the socket accepts a connection.
    pub fn qemu(image: &Path, socket: &Path, cache: CacheMode, read_only: bool) -> Result<Server> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--format=qcow2")
            .arg(format!("--socket={}", socket.display()))
            .arg("--persistent")
            .arg("--shared=4");
        if cache == CacheMode::None {
            cmd.arg("--cache=none").arg("--aio=io_uring");
        }
        if read_only {
            cmd.arg("--read-only");
        }
        cmd.arg(image);
        let what = format!("qemu-nbd {} (cache {})", image.display(), cache_name(cache));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("starting {what} (install qemu-utils)"), e))?;
        let mut server = Server {
            child: Some(child),
            what,
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        loop {
            if UnixStream::connect(socket).is_ok() {
                return Ok(server);
            }
            let exited = server
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited || start.elapsed() > START_TIMEOUT {
                let detail = server.exit_output();
                return Err(fail(
                    format!("{} did not start listening", server.what),
                    detail,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The unix socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills the child and returns its exit status and stderr, for an error message.
    fn exit_output(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        format!("{status}: {}", err.trim())
    }

    /// Asks the server to exit (SIGTERM: both servers flush first) and waits for it.
    pub fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        terminate(&mut child);
        let status = child
            .wait()
            .map_err(|e| Error::io(format!("waiting for {}", self.what), e))?;
        let _ = std::fs::remove_file(&self.socket);
        // Killed by our own SIGTERM or exited 0 are both a clean stop.
        if status.success() || status.code().is_none() {
            Ok(())
        } else {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            Err(fail(
                format!("{} exited with {status}", self.what),
                err.trim().to_string(),
            ))
        }
    }
}

/// Sends SIGTERM and waits up to 30 s before SIGKILL.
fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
            let _ = child.wait();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {what} (install qemu-utils)"), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(fail(
            format!("{what} failed ({})", out.status),
            format!(
                "{} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(stdout)
}

/// Checks that qemu-img, qemu-io and qemu-nbd run; returns qemu-img's version line.
pub fn check_qemu() -> Result<String> {
    let v = run_tool(
        Command::new("qemu-img").arg("--version"),
        "qemu-img --version",
    )?;
    run_tool(
        Command::new("qemu-io").arg("--version"),
        "qemu-io --version",
    )?;
    run_tool(
        Command::new("qemu-nbd").arg("--version"),
        "qemu-nbd --version",
    )?;
    Ok(v.lines().next().unwrap_or_default().to_string())
}

/// Creates an empty qcow2 overlay `path` over `backing` (raw or qcow2), replacing any file.
pub fn create_overlay(path: &Path, backing: &Path, backing_format: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(backing)
            .args(["-F", backing_format])
            .arg(path),
        "qemu-img create",
    )?;
    Ok(())
}

/// Writes one layer's blocks into the qcow2 image `path` with qemu-io.
pub fn write_layer_qcow2(path: &Path, layer: &LayerWrites) -> Result<()> {
    for chunk in layer.offsets.chunks(QEMU_IO_BATCH) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for off in chunk {
            cmd.arg("-c")
                .arg(format!("write -q -P {} {off} 4k", layer.byte));
        }
        cmd.arg(path);
        let out = run_tool(&mut cmd, "qemu-io")?;
        // qemu-io reports failed commands on its output and may still exit 0.
        if out.to_ascii_lowercase().contains("error") || out.contains("failed") {
            return Err(fail(
                format!("qemu-io on {}", path.display()),
                out.trim().to_string(),
            ));
        }
    }
    Ok(())
}

/// Builds the chain `dir/q1.qcow2 .. dir/qN.qcow2` over the raw `base`, layer i holding
/// `layers[i-1]`'s writes. Returns the image paths, oldest first.
pub fn build_qcow2_chain(
    dir: &Path,
    base: &Path,
    layers: &[LayerWrites],
    mut progress: impl FnMut(usize),
) -> Result<Vec<PathBuf>> {
    let mut images: Vec<PathBuf> = Vec::with_capacity(layers.len());
    for layer in layers {
        let path = dir.join(format!("q{}.qcow2", layer.layer));
        match images.last() {
            Some(prev) => create_overlay(&path, prev, "qcow2")?,
            None => create_overlay(&path, base, "raw")?,
        }
        write_layer_qcow2(&path, layer)?;
        images.push(path);
        progress(layer.layer);
    }
    Ok(images)
}

/// Makes the host page cache forget `paths` (files, or every file directly inside a
/// directory): dirty pages are written back first. Every target starts cold.
pub fn evict_page_cache(paths: &[&Path]) -> Result<()> {
    for p in paths {
        if p.is_dir() {
            let entries = std::fs::read_dir(p)
                .map_err(|e| Error::io(format!("listing {}", p.display()), e))?;
            let mut inner: Vec<PathBuf> = Vec::new();
            for e in entries.flatten() {
                inner.push(e.path());
            }
            let refs: Vec<&Path> = inner.iter().map(PathBuf::as_path).collect();
            evict_page_cache(&refs)?;
            continue;
        }
        let Ok(f) = File::open(p) else { continue };
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", p.display()), e))?;
        // SAFETY: posix_fadvise takes no pointers; the fd is open for the call.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            return Err(Error::io(
                format!("posix_fadvise({})", p.display()),
                std::io::Error::from_raw_os_error(r),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names() {
        assert_eq!(cache_name(CacheMode::None), "none");
        assert_eq!(cache_name(CacheMode::Writeback), "writeback");
    }

    #[test]
    fn strata_server_failure_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        // `false` prints nothing and exits 1: no ready line.
        let err = Server::strata(
            Path::new("false"),
            tmp.path(),
            &tmp.path().join("s"),
            CacheMode::None,
            None,
        );
        let msg = err
            .err()
            .map(|e| crate::cli::error_chain(&e))
            .unwrap_or_default();
        assert!(msg.contains("did not start"), "{msg}");
    }

    #[test]
    fn evicts_files_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        std::fs::write(tmp.path().join("sub/b"), b"y").unwrap();
        evict_page_cache(&[tmp.path(), &tmp.path().join("missing")]).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("sub/b")).unwrap(), b"y");
    }
}
