//! What a process running a lazily restored VM does when the guest (or the block device,
//! writing into guest RAM) touches a page whose saved data failed its checksum.
//!
//! Such a page is never served: the fault handler poisons it (`UFFDIO_POISON`), so the access
//! raises SIGBUS (KVM forwards the poisoned access of a vCPU as SIGBUS to that thread). Left
//! alone, SIGBUS ends the process with the shell's "Bus error" and no reason. With
//! [`exit_on_damaged_access`] installed, the process instead prints the damage the restore
//! recorded (which page of which image) and exits with [`DAMAGED_EXIT_STATUS`]. For the disk
//! this is a power cut of the guest: writes it flushed are kept, later ones may be lost, and
//! the journal recovers as after any crash.
//!
//! A SIGBUS with no damage recorded is not ours: the handler restores the default action and
//! re-raises it, so genuine faults still end the process as before.

use std::sync::OnceLock;

/// Exit status of a process stopped by an access to a damaged restored page.
pub const DAMAGED_EXIT_STATUS: i32 = 3;

/// The line printed on a damaged access, made when the first damage is recorded (a signal
/// handler cannot format or allocate).
static MESSAGE: OnceLock<Box<[u8]>> = OnceLock::new();

/// Records the first damage of this process's restored memory, for the SIGBUS handler.
pub(super) fn record(reason: &str) {
    let _ = MESSAGE.set(
        format!(
            "strata: the guest touched a damaged page of restored memory (first damage \
             found: {reason}); the VM was stopped before it could use it\n"
        )
        .into_bytes()
        .into_boxed_slice(),
    );
}

/// Makes an access to a damaged restored page end the process with a clear error (see the
/// module documentation). Process-wide and idempotent; meant for a process that runs one VM.
pub fn exit_on_damaged_access() -> std::io::Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: `act` is fully initialised (zeroed, then the handler, flags and an empty
        // mask) before sigaction reads it; the handler only calls async-signal-safe functions
        // and reads a OnceLock that is either unset or holds a leaked-for-life buffer.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            // The kernel resets a forced SIGBUS to its default action in a thread that blocks
            // it: make sure this thread (and the threads it spawns after) does not.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGBUS);
            let rc = libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(rc);
            }
        }
        Ok(())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

extern "C" fn on_sigbus(sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    match MESSAGE.get() {
        Some(msg) => {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` lives for the whole
            // process (a OnceLock is never emptied).
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(DAMAGED_EXIT_STATUS);
            }
        }
        None => {
            // SAFETY: signal(2) with SIG_DFL and raise(3) are async-signal-safe; the default
            // action ends the process as if no handler had been installed.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
        }
    }
}
