//! Reading the files a user names (kernel, initrd): only regular files, never more than the
//! guest could hold. A device (`/dev/zero`), a FIFO or a directory is refused before any
//! read, and a file larger than the limit is refused from its size, so a bad path can neither
//! block `strata run` nor exhaust the host's memory.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::{Error, Result};

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::ReadFile {
        path: path.into(),
        source,
    }
}

/// What a non-regular file is, for the error message.
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (following symlinks) if it is a regular file. The open does not block on a
/// FIFO, and the type is checked on the opened descriptor, so it cannot change in between.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err(path))?;
    let meta = file.metadata().map_err(read_err(path))?;
    if !meta.file_type().is_file() {
        return Err(Error::Config(format!(
            "{what} {} is {}, not a regular file",
            path.display(),
            kind_of(meta.file_type())
        )));
    }
    Ok(file)
}

/// The size of an opened file, refused when it is more than `limit` bytes.
pub fn checked_len(file: &File, path: &Path, what: &str, limit: u64) -> Result<u64> {
    let len = file.metadata().map_err(read_err(path))?.len();
    if len > limit {
        return Err(Error::Config(format!(
            "{what} {} is {len} bytes, more than the guest's {limit} bytes of memory",
            path.display()
        )));
    }
    Ok(len)
}

/// Reads all of the regular file `path`, refusing one of more than `limit` bytes (also when
/// it grows while being read).
pub fn read_regular(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>> {
    let file = open_regular(path, what)?;
    let len = checked_len(&file, path, what, limit)?;
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(read_err(path))?;
    if data.len() as u64 > limit {
        return Err(Error::Config(format!(
            "{what} {} grew past the guest's {limit} bytes of memory while being read",
            path.display()
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_directories_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, kind) in [
            (Path::new("/dev/zero"), "a character device"),
            (fifo.as_path(), "a FIFO"),
            (dir.path(), "a directory"),
        ] {
            let e = read_regular(path, "initrd", 1 << 30)
                .unwrap_err()
                .to_string();
            assert!(e.contains(kind) && e.contains("not a regular file"), "{e}");
        }
        // A symlink to a regular file is fine.
        let real = dir.path().join("real");
        std::fs::write(&real, b"abc").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(read_regular(&link, "initrd", 3).unwrap(), b"abc");
    }

    #[test]
    fn files_larger_than_the_limit_are_refused_from_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        // Sparse: refusing it must not read it.
        File::create(&p).unwrap().set_len(1 << 40).unwrap();
        let e = read_regular(&p, "initrd", 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1099511627776 bytes") && e.contains("67108864"),
            "{e}"
        );
        std::fs::write(&p, [1u8; 10]).unwrap();
        assert_eq!(read_regular(&p, "initrd", 10).unwrap().len(), 10);
        assert!(read_regular(&p, "initrd", 9).is_err());
    }
}
