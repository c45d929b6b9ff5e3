//! The new-pid announcer: a background thread that reads the `NEW_PIDS`
//! ring buffer and snapshots each new process into the [`ProcessCache`] at
//! its first sample (before it can exit and take its maps with it), and
//! forwards the program's aya-log records to the agent's log; and the
//! unwind loader, a second thread that loads each announced process's
//! mappings and unwind tables into the program's maps. Building a table
//! takes milliseconds, so it never delays the next snapshot.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::mpsc,
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

/// How often the idle loader looks at the stop flag.
const LOADER_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// The running announcer and loader threads; [`Announcer::stop`] (or
/// dropping it) ends them within the announcer's 100 ms poll and the
/// table being built.
pub(super) struct Announcer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    loader: Option<JoinHandle<()>>,
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
        let (to_loader, requests) = mpsc::channel::<NewPid>();
        let loader = {
            let processes = processes.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("unwind-loader".into())
                .spawn(move || {
                    // The stop flag ends the loop without waiting for the
                    // queued loads: sampling has stopped.
                    while !stop.load(Ordering::Relaxed) {
                        let event = match requests.recv_timeout(LOADER_POLL) {
                            Ok(event) => event,
                            Err(mpsc::RecvTimeoutError::Timeout) => continue,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        };
                        load_tables(event.tgid, &processes, &unwind);
                        if event.reason == announce::REFRESH {
                            lock(&unwind).refreshed(event.tgid);
                        }
                    }
                })
                .map_err(|e| Error::io("starting the unwind loader thread", e))?
        };
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pid-announcer".into())
                .spawn(move || announce_loop(ring, logger, processes, to_loader, stop))
                .map_err(|e| Error::io("starting the pid announcer thread", e))?
        };
        Ok(Self {
            stop,
            handle: Some(handle),
            loader: Some(loader),
        })
    }

    /// Stops the threads and waits for them.
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        // The loader sees the stop flag within its poll.
        if let Some(loader) = self.loader.take() {
            let _ = loader.join();
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Snapshots process `pid` and loads its mappings (and the tables of
/// binaries seen for the first time) into the program's maps.
pub(super) fn load_process(pid: u32, processes: &Mutex<ProcessCache>, unwind: &Mutex<UnwindMaps>) {
    if lock(processes).observe(pid) {
        load_tables(pid, processes, unwind);
    }
}

/// Loads the mappings of a snapshotted process (and the tables of binaries
/// seen for the first time) into the program's maps.
fn load_tables(pid: u32, processes: &Mutex<ProcessCache>, unwind: &Mutex<UnwindMaps>) {
    let (mappings, pid_dir) = {
        let cache = lock(processes);
        let Some(mappings) = cache.mappings(pid) else {
            return;
        };
        (mappings.to_vec(), cache.pid_dir(pid))
    };
    // A process already gone (named from its process events) is never
    // sampled again.
    if !pid_dir.exists() {
        return;
    }
    lock(unwind).load_process(pid, &mappings, &pid_dir);
    load_python(pid, &mappings, processes, unwind);
}

/// Tells the program (and the symbolizer) how to read the Python frames of
/// process `pid`, if it runs a CPython the agent reads.
fn load_python(
    pid: u32,
    mappings: &[crate::process::Mapping],
    processes: &Mutex<ProcessCache>,
    unwind: &Mutex<UnwindMaps>,
) {
    use super::python::detect;
    use crate::python::{log_unsupported_once, Detected};
    match detect(pid, mappings) {
        Some(Detected::Python(python))
            if lock(unwind).set_python(pid, Some(python.kernel_view())) =>
        {
            lock(processes).set_python(pid, Some(python));
        }
        Some(Detected::Python(_)) => {
            log_unsupported_once(&format!(
                "more than {} Python processes",
                profiler_common::python::MAX_PYTHON_PROCESSES
            ));
        }
        Some(Detected::Unsupported(what)) => {
            log_unsupported_once(&what);
        }
        None => {}
    }
}

fn announce_loop(
    mut ring: RingBuf<MapData>,
    mut logger: Option<Logger>,
    processes: Arc<Mutex<ProcessCache>>,
    to_loader: mpsc::Sender<NewPid>,
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
                let seen = if event.reason == announce::EXEC {
                    lock(&processes).observe_at_exec(event.tgid)
                } else {
                    lock(&processes).observe(event.tgid)
                };
                if seen {
                    let _ = to_loader.send(event);
                }
            }
        }
        if let Some(logger) = &mut logger {
            logger.flush();
        }
    }
}
