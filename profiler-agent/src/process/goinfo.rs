//! Go binaries, told from the build info the Go linker writes into every
//! executable (`.go.buildinfo`), not from the process's name.
//!
//! The section starts with a 32-byte header: the magic `\xff Go buildinf:`,
//! the pointer size, and flags. Since Go 1.18 (flag bit 1) the version
//! string follows the header inline, as a uvarint length and its bytes;
//! older binaries point at it through the data segment instead, and are
//! reported as Go without a version.
use std::{fs::File, os::unix::fs::FileExt};

use object::{
    elf::FileHeader64,
    read::{
        elf::{FileHeader, SectionHeader},
        ReadCache,
    },
    Endianness,
};

const MAGIC: &[u8] = b"\xff Go buildinf:";
const HEADER: usize = 32;
const FLAG_INLINE_STRINGS: u8 = 2;
/// Header, length and the longest version string read.
const READ: usize = HEADER + 10 + 64;

/// What the build info says about a binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoBuild {
    /// `go1.22.1`; empty when the binary does not say (before Go 1.18).
    pub version: String,
}

/// The Go build info of the ELF file `file`, or `None` when it is not a Go
/// binary (or not a readable 64-bit ELF file). Reads the ELF header, the
/// section headers and their names only (not the symbol tables: this runs
/// for every new executable, and debug builds have large ones).
pub fn go_build(file: &File) -> Option<GoBuild> {
    let cache = ReadCache::new(file);
    let header = FileHeader64::<Endianness>::parse(&cache).ok()?;
    let endian = header.endian().ok()?;
    let sections = header.sections(endian, &cache).ok()?;
    let (_, section) = sections.section_by_name(endian, b".go.buildinfo")?;
    let (offset, size) = section.file_range(endian)?;
    let mut buf = vec![0u8; READ.min(usize::try_from(size).ok()?)];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(parse(&buf))
}

/// The build info at the start of `.go.buildinfo`'s bytes.
fn parse(data: &[u8]) -> GoBuild {
    let none = GoBuild {
        version: String::new(),
    };
    if !data.starts_with(MAGIC) || data.len() <= HEADER {
        return none;
    }
    if data[15] & FLAG_INLINE_STRINGS == 0 {
        return none;
    }
    let Some((len, used)) = uvarint(&data[HEADER..]) else {
        return none;
    };
    let start = HEADER + used;
    let Some(bytes) = usize::try_from(len)
        .ok()
        .and_then(|len| data.get(start..start.checked_add(len)?))
    else {
        return none;
    };
    match std::str::from_utf8(bytes) {
        Ok(v) if v.starts_with("go") || v.starts_with("devel") => GoBuild {
            version: v.to_string(),
        },
        _ => none,
    }
}

/// An unsigned LEB128 number and the bytes it took.
fn uvarint(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in data.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u8) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.push(8);
        h.push(flags);
        h.resize(HEADER, 0);
        h
    }

    #[test]
    fn inline_version_is_read() {
        let mut d = header(FLAG_INLINE_STRINGS);
        d.push(9);
        d.extend_from_slice(b"go1.22.12");
        d.extend_from_slice(b"\x00rest");
        assert_eq!(parse(&d).version, "go1.22.12");
    }

    #[test]
    fn old_layout_and_garbage_give_no_version() {
        assert_eq!(parse(&header(0)).version, "");
        let mut d = header(FLAG_INLINE_STRINGS);
        d.push(200); // longer than the data
        assert_eq!(parse(&d).version, "");
        assert_eq!(parse(b"\x7fELF not go").version, "");
    }

    #[test]
    fn a_go_binary_is_told_from_a_c_one() {
        // The test binary is Rust: no build info.
        let me = File::open("/proc/self/exe").unwrap();
        assert_eq!(go_build(&me), None);
        // Go's own tools are Go binaries.
        let out = std::process::Command::new("go")
            .args(["env", "GOROOT"])
            .output()
            .expect("go is installed (cargo xtask setup)");
        let root = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let gofmt = File::open(std::path::Path::new(&root).join("bin/gofmt")).unwrap();
        let build = go_build(&gofmt).expect("gofmt is a Go binary");
        assert!(build.version.starts_with("go1."), "{build:?}");
    }
}
