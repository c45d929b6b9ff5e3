//! The new-pid announcer: a background thread that reads the `NEW_PIDS`
//! ring buffer and snapshots each new process into the [`ProcessCache`] at
//! its first sample (before it can exit and take its maps with it), and
//! forwards the program's aya-log records to the agent's log.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use profiler_common::NewPid;

use crate::{process::ProcessCache, Error, Result};

pub(super) type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The running announcer thread; [`Announcer::stop`] (or dropping it) ends
/// it within its 100 ms poll.
pub(super) struct Announcer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Announcer {
    /// Starts the thread.
    pub(super) fn spawn(
        ring: RingBuf<MapData>,
        logger: Option<Logger>,
        processes: Arc<Mutex<ProcessCache>>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pid-announcer".into())
                .spawn(move || announce_loop(ring, logger, processes, stop))
                .map_err(|e| Error::io("starting the pid announcer thread", e))?
        };
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn announce_loop(
    mut ring: RingBuf<MapData>,
    mut logger: Option<Logger>,
    processes: Arc<Mutex<ProcessCache>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = vec![libc::pollfd {
            fd: ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(logger) = &logger {
            fds.push(libc::pollfd {
                fd: logger.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<NewPid>() {
                // SAFETY: the program writes a NewPid; read unaligned.
                let event: NewPid = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                processes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .observe(event.tgid);
            }
        }
        if let Some(logger) = &mut logger {
            logger.flush();
        }
    }
}
