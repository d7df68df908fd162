//! Small, careful file helpers for the VM directory: every file read is untrusted (type checked,
//! size capped, symlinks not followed), every write is atomic (write new, fsync, rename, fsync
//! the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::{Error, Result};

/// Reads a whole regular file of at most `cap` bytes. Symlinks, FIFOs and devices are refused
/// before anything is read (the open never blocks: O_NONBLOCK, O_NOFOLLOW).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    if len > cap {
        return Err(Error::Usage(format!(
            "{} is {len} bytes, more than the {cap} accepted",
            path.display()
        )));
    }
    let mut out = Vec::with_capacity(len as usize);
    // Cap the read too: the file may grow between fstat and read.
    file.take(cap + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if out.len() as u64 > cap {
        return Err(Error::Usage(format!(
            "{} grew past the {cap} bytes accepted while being read",
            path.display()
        )));
    }
    Ok(out)
}

/// Opens `path` for reading if it is a regular file (not through a symlink).
pub fn open_regular(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Error::Usage(format!("{} is a symbolic link; refused", path.display()))
            } else {
                Error::io(format!("opening {}", path.display()), e)
            }
        })?;
    let ft = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_block_device() || ft.is_char_device() {
            "a device"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::Usage(format!(
            "{} is {what}; a regular file is needed",
            path.display()
        )));
    }
    Ok(file)
}

/// Writes `data` to `path` atomically: `path.tmp`, fsync, rename, fsync the directory. The
/// temporary file is removed when anything fails.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsyncs a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Copies a regular file of at most `cap` bytes to `to` (fsynced).
pub fn copy_capped(from: &Path, to: &Path, cap: u64) -> Result<()> {
    let mut src = open_regular(from)?;
    let len = src
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", from.display()), e))?
        .len();
    if len > cap {
        return Err(Error::Usage(format!(
            "{} is {len} bytes, more than the {cap} accepted",
            from.display()
        )));
    }
    let ctx = |e| Error::io(format!("copying {} to {}", from.display(), to.display()), e);
    let mut dst = File::create(to).map_err(ctx)?;
    let copied = std::io::copy(&mut (&mut src).take(cap), &mut dst).map_err(ctx)?;
    if copied != len {
        return Err(Error::Usage(format!(
            "{} changed size while being copied",
            from.display()
        )));
    }
    dst.sync_all().map_err(ctx)
}

/// Bytes allocated on the host by the regular files directly in `dir` (0 if it is missing).
pub fn allocated_in(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_regular_file_and_caps_reads() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_capped(&f, 10).unwrap(), b"0123456789");
        let e = read_capped(&f, 9).unwrap_err().to_string();
        assert!(e.contains("more than the 9"), "{e}");
        let link = t.path().join("l");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read_capped(&link, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = read_capped(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a device"), "{e}");
        let fifo = t.path().join("p");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path; mkfifo only reads it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_capped(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("x.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        assert!(!t.path().join("x.tmp").exists());
        let bad = t.path().join("missing-dir").join("y.json");
        assert!(write_atomic(&bad, b"z").is_err());
    }
}
