//! Mapped binaries that shrink under the agent never take it down.
//!
//! blazesym reads binaries through `mmap`. When a mapped file is truncated
//! or rewritten in place (a package upgrade, a deploy copying over a
//! library), touching a page past the new end raises `SIGBUS`, which would
//! kill the agent. [`install`] sets a handler that maps a page of zeros over
//! the faulting page and counts the fault; the read then completes (with
//! zeros) and the code that was reading checks [`faults`] around its call
//! and discards what it read (see `symbolize.rs`). Unwind tables are built
//! from bytes read with `read(2)`, never mapped, so they cannot fault.
//!
//! Only `BUS_ADRERR` faults (an address past the end of a mapped file) are
//! handled; any other `SIGBUS` gets the default action.
use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Once,
};

static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// `BUS_ADRERR` (`<asm-generic/siginfo.h>`): nonexistent physical address.
const BUS_ADRERR: i32 = 2;

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is valid.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "cannot install the SIGBUS handler: a binary truncated while read could stop the agent"
                );
            }
        }
    });
}

/// Mapped-file faults absorbed so far.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::SeqCst)
}

/// A mapped file shrank while it was read: what was read may be zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedFileFault;

/// Runs `f`; [`MappedFileFault`] when a mapped file faulted meanwhile (the
/// caller discards what `f` read).
pub fn checked<T>(f: impl FnOnce() -> T) -> Result<T, MappedFileFault> {
    let before = faults();
    let value = f();
    if faults() == before {
        Ok(value)
    } else {
        Err(MappedFileFault)
    }
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // Only async-signal-safe work: atomics and raw system calls.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == BUS_ADRERR && addr != 0 {
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let start = addr & !(page - 1);
        // SAFETY: replaces one page of a file mapping that faulted (its file
        // does not back it past its end) with zeros; nothing else lives at that page.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
    // Not a fault we can absorb: the default action (the faulting access
    // runs again and the process stops with SIGBUS, as without a handler).
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Write, os::fd::AsRawFd};

    /// A file mapped, then truncated: reading past its new end faults, and
    /// the handler turns that into zeros and a counted fault.
    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_counted() {
        install();
        let mut file = tempfile::tempfile().unwrap();
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        file.write_all(&vec![7u8; page * 4]).unwrap();
        // SAFETY: a fresh shared read-only mapping of our own temp file.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page * 4,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let bytes = map as *const u8;
        // SAFETY: within the mapping, backed by the file.
        assert_eq!(unsafe { std::ptr::read_volatile(bytes) }, 7);
        file.set_len(page as u64).unwrap();
        // SAFETY: within the mapping; past the file's end now, so it faults.
        let read = checked(|| unsafe { std::ptr::read_volatile(bytes.add(page * 2)) });
        assert_eq!(read, Err(MappedFileFault), "the fault is reported");
        // SAFETY: the page is mapped (zeros) now.
        assert_eq!(unsafe { std::ptr::read_volatile(bytes.add(page * 2)) }, 0);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(map, page * 4) };
    }
}
