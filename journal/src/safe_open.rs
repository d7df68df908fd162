//! Opening files whose paths come from a disk directory or from the user: the file type is
//! checked before anything is read, and nothing can block on a FIFO or follow a planted
//! symlink.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{Error, Result};

/// Whether the last path component may be a symbolic link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Follow it (a user-chosen path, such as the base image).
    Follow,
    /// Refuse it (files inside a disk directory: Strata never creates links there).
    Refuse,
}

/// Opens `path` with `opts` and requires a regular file. The open itself uses O_NONBLOCK
/// (so a FIFO cannot block it), which is cleared again once the type is known.
pub fn open_regular(path: &Path, opts: &OpenOptions, links: Links) -> Result<File> {
    open_regular_flags(path, opts, links, 0)
}

/// As [`open_regular`], with extra `open(2)` flags (such as O_DIRECT).
pub fn open_regular_flags(
    path: &Path,
    opts: &OpenOptions,
    links: Links,
    extra: i32,
) -> Result<File> {
    let mut o = opts.clone();
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC | extra;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    o.custom_flags(flags);
    let f = o.open(path).map_err(|e| {
        if links == Links::Refuse && e.raw_os_error() == Some(libc::ELOOP) {
            Error::Symlink(path.to_path_buf())
        } else {
            Error::io(path, e)
        }
    })?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotRegular(path.to_path_buf()));
    }
    clear_nonblock(&f).map_err(|e| Error::io(path, e))?;
    Ok(f)
}

/// Clears O_NONBLOCK (io_uring honours it on regular files and would return EAGAIN).
fn clear_nonblock(f: &File) -> std::io::Result<()> {
    // SAFETY: F_GETFL only reads the status flags of a descriptor that `f` keeps open.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of a descriptor that `f` keeps open.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a whole file, failing as soon as more than `cap` bytes have been read (the limit is
/// enforced while reading, so a file that grows or lies about its size cannot exhaust memory).
pub fn read_capped(f: &mut File, path: &Path, cap: u64) -> Result<Vec<u8>> {
    let hint = f.metadata().map(|m| m.len()).unwrap_or(0).min(cap);
    let mut buf = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    let limit = cap.saturating_add(1);
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > cap {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            limit: cap,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ro() -> OpenOptions {
        let mut o = OpenOptions::new();
        o.read(true);
        o
    }

    #[test]
    fn refuses_fifo_device_and_symlink_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo only reads the NUL-terminated path that `c` owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            open_regular(&fifo, &ro(), Links::Follow),
            Err(Error::NotRegular(_))
        ));
        assert!(matches!(
            open_regular(Path::new("/dev/zero"), &ro(), Links::Follow),
            Err(Error::NotRegular(_))
        ));
        let file = t.path().join("f");
        std::fs::write(&file, b"hello").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            open_regular(&link, &ro(), Links::Refuse),
            Err(Error::Symlink(_))
        ));
        let mut f = open_regular(&link, &ro(), Links::Follow).unwrap();
        assert_eq!(read_capped(&mut f, &link, 5).unwrap(), b"hello");
        let mut f = open_regular(&file, &ro(), Links::Refuse).unwrap();
        assert!(matches!(
            read_capped(&mut f, &file, 4),
            Err(Error::TooLarge { limit: 4, .. })
        ));
    }
}
