//! The layout of an ELF64 file from its headers: what a process loads of it
//! and where the rest (section headers, symbols, DWARF) lies, for tests that
//! cut a binary after its loaded part.

/// Where the parts of an ELF64 (little-endian) file lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The end of the last `PT_LOAD` in the file: cut there, the file still
    /// loads and runs (a running process keeps its mappings).
    pub loaded_end: u64,
    /// The executable `PT_LOAD`: file offset, address, size in the file.
    pub text: (u64, u64, u64),
    /// The file offset of the section headers (`e_shoff`).
    pub section_headers: u64,
}

impl Layout {
    /// The layout of `elf`; `None` if it is not a little-endian ELF64 file
    /// with an executable `PT_LOAD`.
    pub fn of(elf: &[u8]) -> Option<Layout> {
        const PT_LOAD: u32 = 1;
        const PF_X: u32 = 1;
        let bytes = |at: usize, n: usize| elf.get(at..at + n);
        let u16_at = |at| Some(u16::from_le_bytes(bytes(at, 2)?.try_into().ok()?) as usize);
        let u32_at = |at| Some(u32::from_le_bytes(bytes(at, 4)?.try_into().ok()?));
        let u64_at = |at| Some(u64::from_le_bytes(bytes(at, 8)?.try_into().ok()?));
        if !elf.starts_with(b"\x7fELF\x02\x01") {
            return None;
        }
        let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
        let (mut loaded_end, mut text) = (0, None);
        for ph in (0..phnum).map(|i| phoff + i * phentsize) {
            if u32_at(ph)? != PT_LOAD {
                continue;
            }
            let (offset, vaddr, filesz) = (u64_at(ph + 8)?, u64_at(ph + 0x10)?, u64_at(ph + 0x20)?);
            loaded_end = loaded_end.max(offset + filesz);
            if u32_at(ph + 4)? & PF_X != 0 {
                text = Some((offset, vaddr, filesz));
            }
        }
        Some(Layout {
            loaded_end,
            text: text?,
            section_headers: u64_at(0x28)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_this_test_binary() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let layout = Layout::of(&exe).unwrap();
        assert!(layout.loaded_end <= exe.len() as u64);
        let (offset, _, size) = layout.text;
        assert!(size > 0 && offset + size <= layout.loaded_end);
        assert!(layout.section_headers >= layout.loaded_end);
        assert_eq!(Layout::of(b"\x7fELF\x02\x01"), None);
        assert_eq!(Layout::of(b"not an elf"), None);
    }
}
