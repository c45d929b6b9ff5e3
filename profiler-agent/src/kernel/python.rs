//! Finding the CPython a process runs (see [`crate::python`]): the binary
//! that holds the interpreter, its `_PyRuntime`, and the offsets of its
//! version.
use std::{collections::HashMap, fs::File, sync::Mutex};

use crate::{
    process::{Binary, BinaryKey, Mapping},
    python::{
        from_debug_offsets, read_binary, read_memory, table, version_of, Detected, PythonBinary,
        PythonProcess, DEBUG_OFFSETS_BYTES,
    },
};

/// Binaries already read, by identity (bounded: cleared when large).
static BINARIES: Mutex<Option<HashMap<BinaryKey, Option<PythonBinary>>>> = Mutex::new(None);

fn binary_info(binary: &Binary, minor: u8) -> Option<PythonBinary> {
    let mut guard = BINARIES.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some(found) = cache.get(&binary.key) {
        return found.clone();
    }
    if cache.len() > 256 {
        cache.clear();
    }
    let info = File::open(&binary.symbol_path)
        .ok()
        .and_then(|f| read_binary(&f, minor));
    cache.insert(binary.key, info.clone());
    info
}

/// Looks for CPython in a process's executable mappings: the binary that
/// holds the interpreter (`libpython3.N.so`, or a `python3.N` executable
/// built without it).
pub fn detect(pid: u32, mappings: &[Mapping]) -> Option<Detected> {
    let mut unsupported = None;
    for mapping in mappings {
        let Some(binary) = mapping.binary.as_ref() else {
            continue;
        };
        let Some((minor, flags)) = binary
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(version_of)
        else {
            continue;
        };
        let version = format!("Python 3.{minor}{flags} ({})", binary.path.display());
        if !(10..=13).contains(&minor) {
            unsupported = Some(format!("{version}: versions 3.10 to 3.13 are read"));
            continue;
        }
        // Other object layouts than the offsets describe.
        if flags.contains('d') || flags.contains('t') {
            unsupported = Some(format!(
                "{version}: debug and free-threaded builds are not read"
            ));
            continue;
        }
        // A `python3.N` that links libpython has no interpreter of its own.
        let Some(info) = binary_info(binary, minor) else {
            unsupported.get_or_insert(format!("{version}: no _PyRuntime or PyCode_Type symbol"));
            continue;
        };
        let bias = super::unwind::mapping_bias(mapping.start, mapping.offset, &info.segments)?;
        let runtime = info.runtime_vaddr.wrapping_add(bias);
        let code_type = info.code_type_vaddr.wrapping_add(bias);
        let offsets = if minor == 13 {
            let mut bytes = vec![0u8; DEBUG_OFFSETS_BYTES];
            if !read_memory(pid, runtime, &mut bytes) {
                return None;
            }
            match from_debug_offsets(&bytes) {
                Ok(offsets) => offsets,
                Err(why) => return Some(Detected::Unsupported(format!("{version}: {why}"))),
            }
        } else {
            table(minor)?
        };
        return Some(Detected::Python(PythonProcess {
            offsets,
            runtime,
            code_type,
        }));
    }
    unsupported.map(Detected::Unsupported)
}
