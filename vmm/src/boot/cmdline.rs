//! The Linux kernel command line.

use crate::layout::{MMIO_BASE, MMIO_IRQ, MMIO_SIZE};

/// Used when the user gives no command line. `earlyprintk` shows boot messages (and the
/// banner) from `setup_arch` on, long before the real serial console registers; `reboot=k`
/// makes a reboot reach the i8042 (our way out); `panic=-1` turns a panic into a reboot;
/// `noxsave` keeps the kernel off XSAVE/XRSTOR, which the host's CPL0 emulator lacks (and
/// which masking CPUID cannot hide on that host). Linux 6.1 honours it although it also
/// reports it as "unknown" and passes it on to init.
pub const DEFAULT: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 noxsave";

/// The `virtio_mmio.device=` parameter announcing our virtio-mmio device.
pub fn virtio_mmio_param() -> String {
    format!(
        "virtio_mmio.device={}K@{MMIO_BASE:#x}:{MMIO_IRQ}",
        MMIO_SIZE >> 10
    )
}

/// Builds the command line: the user's (or [`DEFAULT`]), with the virtio-mmio device added
/// before any ` -- ` (so it stays a kernel parameter, not an init argument).
pub fn build(user: Option<&str>, with_virtio: bool) -> Result<String, String> {
    let base = user.unwrap_or(DEFAULT).trim();
    if base.bytes().any(|b| b == 0 || !(0x20..0x7f).contains(&b)) {
        return Err("the command line must be printable ASCII".into());
    }
    if !with_virtio {
        return Ok(base.to_string());
    }
    let param = virtio_mmio_param();
    if let Some(rest) = base.strip_prefix("--") {
        return Ok(format!("{param} --{rest}"));
    }
    Ok(match base.find(" -- ") {
        Some(i) => format!("{} {param}{}", &base[..i], &base[i..]),
        None if base.is_empty() => param,
        None => format!("{base} {param}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_gets_the_device() {
        assert_eq!(
            build(None, true).unwrap(),
            "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 noxsave virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(build(None, false).unwrap(), DEFAULT);
    }

    #[test]
    fn device_goes_before_init_args() {
        assert_eq!(
            build(Some("console=ttyS0 -- single"), true).unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 -- single"
        );
        assert_eq!(
            build(Some(""), true).unwrap(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            build(Some("-- x"), true).unwrap(),
            "virtio_mmio.device=4K@0xd0000000:5 -- x"
        );
    }

    #[test]
    fn rejects_control_characters() {
        assert!(build(Some("a\nb"), true).is_err());
        assert!(build(Some("a\0b"), true).is_err());
    }
}
