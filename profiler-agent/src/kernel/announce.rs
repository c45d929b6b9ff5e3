//! The new-pid announcer: a background thread that reads the `NEW_PIDS`
//! ring buffer and snapshots each new process into the [`ProcessCache`] at
//! its first sample (before it can exit and take its maps with it), loads
//! its mappings and unwind tables into the program's maps, and forwards the
//! program's aya-log records to the agent's log.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use profiler_common::{announce, NewPid};

use super::unwind::UnwindMaps;
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
        unwind: Arc<Mutex<UnwindMaps>>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pid-announcer".into())
                .spawn(move || announce_loop(ring, logger, processes, unwind, stop))
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

/// Snapshots process `pid` and loads its mappings (and the tables of
/// binaries seen for the first time) into the program's maps.
pub(super) fn load_process(pid: u32, processes: &Mutex<ProcessCache>, unwind: &Mutex<UnwindMaps>) {
    let snapshot = {
        let mut cache = processes.lock().unwrap_or_else(|e| e.into_inner());
        if !cache.observe(pid) {
            return;
        }
        let mappings = cache.mappings(pid).map(<[_]>::to_vec).unwrap_or_default();
        (mappings, cache.pid_dir(pid))
    };
    unwind
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .load_process(pid, &snapshot.0, &snapshot.1);
}

fn announce_loop(
    mut ring: RingBuf<MapData>,
    mut logger: Option<Logger>,
    processes: Arc<Mutex<ProcessCache>>,
    unwind: Arc<Mutex<UnwindMaps>>,
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
                load_process(event.tgid, &processes, &unwind);
                if event.reason == announce::REFRESH {
                    unwind
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .refreshed(event.tgid);
                }
            }
        }
        if let Some(logger) = &mut logger {
            logger.flush();
        }
    }
}
