//! An eBPF array map written a slice at a time: one `BPF_MAP_UPDATE_BATCH`
//! system call for a whole slice (a process's mappings, a binary's unwind
//! rows) instead of one call per element, which cost the agent one system
//! call per mapping of every new process on a busy host. aya has no batch
//! operations; the attribute layout comes from its generated kernel
//! bindings (`aya-obj`). Kernels without batch updates on arrays (before
//! 5.6) get one update per element, as before.
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use aya::{
    maps::{Array, Map, MapData, MapError},
    Pod,
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Elements per batch call.
const BATCH: usize = 16 * 1024;

/// An array map and a descriptor of it for batch updates.
pub struct BatchArray<V: Pod> {
    map: Array<MapData, V>,
    fd: OwnedFd,
    /// Cleared when the kernel refuses batch updates: per element from then on.
    batch: bool,
}

impl<V: Pod> BatchArray<V> {
    /// Opens the array map `map` (as taken from the loaded object).
    pub fn new(map: Map) -> Result<Self, MapError> {
        let fd = match &map {
            Map::Array(data) => data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                })
            })?,
            _ => return Err(MapError::InvalidMapType { map_type: 0 }),
        };
        Ok(Self {
            map: Array::try_from(map)?,
            fd,
            batch: true,
        })
    }

    /// Entries in the array.
    pub fn len(&self) -> u32 {
        self.map.len()
    }

    /// Writes `values` at indices `first`, `first + 1`, ...
    pub fn write(&mut self, first: u32, values: &[V]) -> std::io::Result<()> {
        let end = u32::try_from(values.len())
            .ok()
            .and_then(|n| first.checked_add(n))
            .filter(|&end| end <= self.len())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        if values.is_empty() {
            return Ok(());
        }
        if self.batch {
            // In chunks: the keys array stays small for a large table.
            let written = values.chunks(BATCH).enumerate().try_for_each(|(i, chunk)| {
                let start = first + (i * BATCH) as u32;
                let keys: Vec<u32> = (start..start + chunk.len() as u32).collect();
                update_batch(&self.fd, &keys, chunk)
            });
            match written {
                Ok(()) => return Ok(()),
                // No batch operations on arrays in this kernel.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
                    tracing::debug!("no batch updates of array maps ({e}): one update per element");
                    self.batch = false;
                }
                Err(e) => return Err(e),
            }
        }
        for (index, value) in (first..end).zip(values) {
            self.map.set(index, value, 0).map_err(|e| match e {
                MapError::SyscallError(e) => e.io_error,
                other => std::io::Error::other(other),
            })?;
        }
        Ok(())
    }
}

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] = values[i]`; the kernel copies each
/// value with the map's value size, `size_of::<V>()`.
fn update_batch<V: Pod>(fd: &OwnedFd, keys: &[u32], values: &[V]) -> std::io::Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    // SAFETY: an all-zero bpf_attr is valid (unused fields must be zero).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.map_fd = fd.as_raw_fd() as u32;
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = keys.len() as u32;
    // SAFETY: `attr` is a valid BPF_MAP_UPDATE_BATCH attribute whose keys
    // and values point at `count` elements each, alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
