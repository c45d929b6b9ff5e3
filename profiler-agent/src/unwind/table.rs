//! Builds one binary's [`UnwindTable`] from its call-frame information:
//! gimli evaluates every FDE of `.eh_frame` and `.debug_frame`, each of its
//! rows becomes an [`UnwindRow`] rule the program implements, and the rows
//! are sorted, closed with `NONE` rows at gaps and merged.
//!
//! Where FDEs overlap, the later start wins from its start (an earlier FDE
//! is not resumed after a nested one ends); a `.debug_frame` FDE covering
//! any address an `.eh_frame` FDE describes is left out.
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt,
};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, Encoding,
    EndianSlice, FrameDescriptionEntry, LittleEndian, Operation, Register, RegisterRule,
    UnwindContext, UnwindOffset, UnwindSection, UnwindTableRow,
};
use object::{Architecture, CompressionFormat, Object, ObjectSection, SectionKind};
use profiler_common::unwind::{cfa, rbp, UnwindRow, MAX_TABLE_ROWS};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// x86-64 DWARF register numbers.
const RBP: Register = Register(6);
const RSP: Register = Register(7);
/// The return address column (`RIP`).
const RA: Register = Register(16);

/// Names of the x86-64 DWARF registers 0..=16, as in
/// [`cfa_rule_name`] (`reg_<name>`).
const REG_RULE_NAMES: [&str; 17] = [
    "reg_rax", "reg_rdx", "reg_rcx", "reg_rbx", "reg_rsi", "reg_rdi", "reg_rbp", "reg_rsp",
    "reg_r8", "reg_r9", "reg_r10", "reg_r11", "reg_r12", "reg_r13", "reg_r14", "reg_r15",
    "reg_rip",
];

/// One binary's unwind table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwindTable {
    /// Lowest address the CFI covers; the rows' `pc` count from it.
    pub base: u64,
    /// Sorted by `pc`, neighbours differ in more than `pc`; the last row is
    /// a `NONE` row at the end of the highest FDE.
    pub rows: Vec<UnwindRow>,
    pub stats: TableStats,
}

impl UnwindTable {
    /// The row the program applies at the binary's virtual address `vaddr`:
    /// the last row with `pc <= vaddr - base`. `None` below `base`.
    pub fn lookup(&self, vaddr: u64) -> Option<&UnwindRow> {
        let rel = vaddr.checked_sub(self.base)?;
        // Past 4 GiB only the final NONE row can apply.
        let rel = u32::try_from(rel).unwrap_or(u32::MAX);
        let after = self.rows.partition_point(|row| row.pc <= rel);
        after.checked_sub(1).map(|i| &self.rows[i])
    }
}

/// What went into a table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// FDEs the table was built from (both sections).
    pub fdes: usize,
    /// Rows gimli produced for them, before merging.
    pub cfi_rows: usize,
    /// Rows of the table (after merging, with the `NONE` rows at gaps).
    pub rows: usize,
    /// Rows of the table with the rule `UNSUPPORTED`.
    pub unsupported_rows: usize,
    /// Rows of the table whose caller's RBP is `rbp::UNKNOWN`.
    pub rbp_unknown_rows: usize,
    /// Rows of the table by CFA rule ([`cfa_rule_name`]).
    pub rows_by_rule: BTreeMap<&'static str, usize>,
    /// CFI rows (before merging) turned into `UNSUPPORTED`, by reason.
    pub unsupported: BTreeMap<Unsupported, usize>,
    pub eh_frame: SectionStats,
    pub debug_frame: SectionStats,
}

/// What one CFI section gave a table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SectionStats {
    /// The section is in the file and was read.
    pub present: bool,
    /// The section is compressed (`SHF_COMPRESSED`, zlib as Go's linker
    /// and `gcc -gz` write it) and was inflated to be read; a format other
    /// than zlib (zstd) is not read.
    pub compressed: bool,
    /// Its FDEs in the table.
    pub fdes: usize,
    /// Its FDEs left out: empty ones, and `.debug_frame` FDEs covering an
    /// address `.eh_frame` describes.
    pub skipped_fdes: usize,
}

/// Why a CFI row became `UNSUPPORTED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unsupported {
    /// The return address is neither at `CFA - 8` nor undefined (e.g. in
    /// another register, as in `setcontext`-style code).
    ReturnAddress,
    /// The CFA is a DWARF register above 16 plus an offset.
    CfaRegister,
    /// The CFA offset does not fit an `i32`.
    CfaOffset,
    /// The CFA is an expression other than the PLT's and `*(RSP|RBP + n)`.
    CfaExpression,
}

impl Unsupported {
    pub const ALL: [Unsupported; 4] = [
        Unsupported::ReturnAddress,
        Unsupported::CfaRegister,
        Unsupported::CfaOffset,
        Unsupported::CfaExpression,
    ];

    /// Stable snake_case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Unsupported::ReturnAddress => "return_address",
            Unsupported::CfaRegister => "cfa_register",
            Unsupported::CfaOffset => "cfa_offset",
            Unsupported::CfaExpression => "cfa_expression",
        }
    }
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Stable snake_case name of a [`cfa`] rule (`reg_<name>` for
/// `REG_BASE + n`).
pub fn cfa_rule_name(rule: u8) -> &'static str {
    match rule {
        cfa::NONE => "none",
        cfa::RSP => "rsp",
        cfa::RBP => "rbp",
        cfa::PLT_11 => "plt_11",
        cfa::PLT_10 => "plt_10",
        cfa::DEREF_RSP => "deref_rsp",
        cfa::DEREF_RSP_8 => "deref_rsp_plus_8",
        cfa::DEREF_RBP_8 => "deref_rbp_plus_8",
        cfa::DEREF_RBP => "deref_rbp",
        cfa::SIGNAL => "signal",
        cfa::END => "end",
        cfa::UNSUPPORTED => "unsupported",
        r => REG_RULE_NAMES
            .get(usize::from(r.wrapping_sub(cfa::REG_BASE)))
            .copied()
            .unwrap_or("invalid"),
    }
}

/// Why a binary has no table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    /// Headers or section bounds outside the bytes, e.g. a file truncated
    /// while being read.
    #[error("malformed ELF file: {0}")]
    BadElf(#[source] object::Error),
    #[error("not an x86-64 binary ({0:?}): the unwind rules name x86-64 registers")]
    NotX86_64(Architecture),
    #[error("{section} is compressed and cannot be inflated: {why}")]
    BadCompressed { section: &'static str, why: String },
    #[error("no call-frame information (no FDE in .eh_frame or .debug_frame)")]
    NoCfi,
    #[error("bad call-frame information in {section}{fde}: {source}")]
    BadCfi {
        section: &'static str,
        /// The FDE being evaluated, if the error is in one.
        fde: FdeAt,
        #[source]
        source: gimli::Error,
    },
    #[error("unwind table too large: more than {max} rows")]
    TooManyRows { max: usize },
    #[error(
        "the CFI spans {span:#x} bytes from {base:#x}: 4 GiB or more does not fit 32-bit row addresses"
    )]
    SpanTooLarge { base: u64, span: u64 },
}

/// The FDE a [`TableError::BadCfi`] is in (its first address), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdeAt(pub Option<u64>);

impl fmt::Display for FdeAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(address) => write!(f, " (FDE at {address:#x})"),
            None => Ok(()),
        }
    }
}

/// Builds the unwind table of an x86-64 ELF binary from its bytes.
pub fn build_table(elf: &[u8]) -> Result<UnwindTable, TableError> {
    build(elf, MAX_TABLE_ROWS as usize)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Source {
    EhFrame,
    DebugFrame,
}

impl Source {
    const fn name(self) -> &'static str {
        match self {
            Source::EhFrame => ".eh_frame",
            Source::DebugFrame => ".debug_frame",
        }
    }
}

/// The address range of one FDE, sorted by `start` before the rows are
/// evaluated.
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    source: Source,
    /// Index into the FDEs of `source`.
    index: usize,
}

fn build(elf: &[u8], max_rows: usize) -> Result<UnwindTable, TableError> {
    if !elf.starts_with(b"\x7fELF") {
        return Err(TableError::NotElf);
    }
    let file = object::File::parse(elf).map_err(TableError::BadElf)?;
    if file.architecture() != Architecture::X86_64 {
        return Err(TableError::NotX86_64(file.architecture()));
    }
    let mut stats = TableStats::default();
    let eh_data = cfi_section(&file, ".eh_frame", &mut stats.eh_frame)?;
    let debug_data = cfi_section(&file, ".debug_frame", &mut stats.debug_frame)?;

    let mut bases = BaseAddresses::default();
    if let Some((_, address)) = &eh_data {
        let address = *address;
        bases = bases.set_eh_frame(address);
    }
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let eh = eh_data.as_ref().map(|(data, _)| {
        let mut section = EhFrame::new(data, LittleEndian);
        section.set_address_size(8);
        section
    });
    let debug = debug_data.as_ref().map(|(data, _)| {
        let mut section = DebugFrame::new(data, LittleEndian);
        section.set_address_size(8);
        section
    });

    let mut spans = Vec::new();
    let mut eh_fdes = Vec::new();
    let mut debug_fdes = Vec::new();
    if let Some(section) = &eh {
        read_fdes(section, &bases, Source::EhFrame, &mut eh_fdes, &mut spans)?;
    }
    if let Some(section) = &debug {
        read_fdes(
            section,
            &bases,
            Source::DebugFrame,
            &mut debug_fdes,
            &mut spans,
        )?;
    }
    stats.eh_frame.skipped_fdes = eh_fdes.len() - spans_of(&spans, Source::EhFrame);
    let read_debug = spans_of(&spans, Source::DebugFrame);
    stats.debug_frame.skipped_fdes = debug_fdes.len() - read_debug;
    // Stable: FDEs with one start stay in file order, and the last wins.
    spans.sort_by_key(|span| (span.start, span.source));
    drop_shadowed_debug_fdes(&mut spans);
    stats.debug_frame.skipped_fdes += read_debug - spans_of(&spans, Source::DebugFrame);
    stats.eh_frame.fdes = spans_of(&spans, Source::EhFrame);
    stats.debug_frame.fdes = spans_of(&spans, Source::DebugFrame);
    stats.fdes = spans.len();

    let Some(first) = spans.first() else {
        return Err(TableError::NoCfi);
    };
    let base = first.start;
    let highest = spans.iter().map(|span| span.end).max().unwrap_or(base);
    let span = highest - base;
    if span > u64::from(u32::MAX) {
        return Err(TableError::SpanTooLarge { base, span });
    }

    let mut out = Builder {
        base,
        max_rows,
        rows: Vec::with_capacity(spans.len() * 4),
        cfi_rows: 0,
        unsupported: BTreeMap::new(),
    };
    let switches = go_stack_switches(&file);
    let mut ctx = UnwindContext::new();
    for (i, span) in spans.iter().enumerate() {
        let next = spans.get(i + 1).map(|next| next.start);
        // A later start wins from its start.
        let end = next.map_or(span.end, |next| next.min(span.end));
        if end > span.start && switches.contains(&span.start) {
            out.push(span.start, rule_only(cfa::END))?;
        } else if end > span.start {
            match (span.source, &eh, &debug) {
                (Source::EhFrame, Some(section), _) => emit_fde(
                    section,
                    span.source,
                    &bases,
                    &mut ctx,
                    &eh_fdes[span.index],
                    end,
                    &mut out,
                )?,
                (Source::DebugFrame, _, Some(section)) => emit_fde(
                    section,
                    span.source,
                    &bases,
                    &mut ctx,
                    &debug_fdes[span.index],
                    end,
                    &mut out,
                )?,
                _ => unreachable!("an FDE comes from a section that was read"),
            }
        }
        if next.is_none_or(|next| span.end < next) {
            out.push(span.end, rule_only(cfa::NONE))?;
        }
    }

    let rows = out.rows;
    let mut by_rule = [0usize; 256];
    for row in &rows {
        by_rule[usize::from(row.cfa_rule)] += 1;
        stats.rbp_unknown_rows += usize::from(row.rbp_rule == rbp::UNKNOWN);
    }
    stats.rows_by_rule = by_rule
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(rule, &n)| (cfa_rule_name(rule as u8), n))
        .collect();
    stats.unsupported_rows = by_rule[usize::from(cfa::UNSUPPORTED)];
    stats.cfi_rows = out.cfi_rows;
    stats.unsupported = out.unsupported;
    stats.rows = rows.len();
    Ok(UnwindTable { base, rows, stats })
}

/// Go's functions that switch to the system stack (`g0`) and call a
/// function there. Their CFI describes the goroutine's stack, so a walk
/// that reaches them from `g0` would read the return address from the
/// wrong stack: the walk ends there (`runtime.systemstack` is then the
/// outermost frame, as in a traceback of `g0`). Empty for other binaries.
fn go_stack_switches(file: &object::File) -> Vec<u64> {
    use object::ObjectSymbol;
    const SWITCHES: [&str; 4] = [
        "runtime.systemstack",
        "runtime.mcall",
        "runtime.asmcgocall",
        "runtime.morestack",
    ];
    if file.section_by_name(".go.buildinfo").is_none() {
        return Vec::new();
    }
    // Assembly functions are named with their ABI (`runtime.systemstack.abi0`).
    file.symbols()
        .filter(|sym| {
            sym.name().is_ok_and(|name| {
                SWITCHES.contains(&name)
                    || name
                        .strip_suffix(".abi0")
                        .is_some_and(|name| SWITCHES.contains(&name))
            })
        })
        .map(|sym| sym.address())
        .collect()
}

fn spans_of(spans: &[Span], source: Source) -> usize {
    spans.iter().filter(|span| span.source == source).count()
}

/// A section's bytes (inflated if it was compressed) and its address.
type SectionData<'a> = (Cow<'a, [u8]>, u64);

/// The bytes and address of a CFI section, if it is in the file with
/// contents.
fn cfi_section<'a>(
    file: &object::File<'a>,
    name: &'static str,
    stats: &mut SectionStats,
) -> Result<Option<SectionData<'a>>, TableError> {
    let Some(section) = file.section_by_name(name) else {
        return Ok(None);
    };
    if section.kind() == SectionKind::UninitializedData {
        // SHT_NOBITS: a separate debug file's copy of the section.
        return Ok(None);
    }
    let range = section
        .compressed_file_range()
        .map_err(TableError::BadElf)?;
    let data = match range.format {
        CompressionFormat::None => Cow::Borrowed(section.data().map_err(TableError::BadElf)?),
        CompressionFormat::Zlib => {
            stats.compressed = true;
            let compressed = section.compressed_data().map_err(TableError::BadElf)?;
            Cow::Owned(inflate(
                name,
                compressed.data,
                compressed.uncompressed_size,
            )?)
        }
        _ => {
            stats.compressed = true;
            return Ok(None);
        }
    };
    if data.is_empty() {
        return Ok(None);
    }
    stats.present = true;
    Ok(Some((data, section.address())))
}

/// Inflates a zlib-compressed section that says it holds `size` bytes
/// (at most [`MAX_INFLATED`]).
fn inflate(name: &'static str, data: &[u8], size: u64) -> Result<Vec<u8>, TableError> {
    use std::io::Read;
    if size > MAX_INFLATED {
        return Err(TableError::BadCompressed {
            section: name,
            why: format!("it says it holds {size} bytes, more than {MAX_INFLATED}"),
        });
    }
    let mut out = Vec::with_capacity(size as usize);
    flate2::read::ZlibDecoder::new(data)
        .take(size)
        .read_to_end(&mut out)
        .map_err(|e| TableError::BadCompressed {
            section: name,
            why: e.to_string(),
        })?;
    if out.len() as u64 != size {
        return Err(TableError::BadCompressed {
            section: name,
            why: format!("{} bytes inflated, {size} announced", out.len()),
        });
    }
    Ok(out)
}

/// The largest CFI section inflated: far above any real one (libxul's
/// `.eh_frame` is about 10 MiB).
const MAX_INFLATED: u64 = 256 << 20;

/// Parses every FDE of `section` into `fdes`, and a [`Span`] for each
/// non-empty one into `spans`.
fn read_fdes<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    source: Source,
    fdes: &mut Vec<FrameDescriptionEntry<Slice<'a>>>,
    spans: &mut Vec<Span>,
) -> Result<(), TableError>
where
    S: UnwindSection<Slice<'a>>,
{
    let bad = |source_error| TableError::BadCfi {
        section: source.name(),
        fde: FdeAt(None),
        source: source_error,
    };
    let mut entries = section.entries(bases);
    // Binaries have few CIEs and many FDEs: parse each CIE once.
    let mut cies: HashMap<usize, CommonInformationEntry<Slice<'a>>> = HashMap::new();
    while let Some(entry) = entries.next().map_err(bad)? {
        match entry {
            CieOrFde::Cie(cie) => {
                cies.insert(cie.offset(), cie);
            }
            CieOrFde::Fde(partial) => {
                let fde = partial
                    .parse(
                        |section, bases, offset| match cies.get(&UnwindOffset::into(offset)) {
                            Some(cie) => Ok(cie.clone()),
                            None => section.cie_from_offset(bases, offset),
                        },
                    )
                    .map_err(bad)?;
                let start = fde.initial_address();
                if let Some(end) = start.checked_add(fde.len()).filter(|&end| end > start) {
                    spans.push(Span {
                        start,
                        end,
                        source,
                        index: fdes.len(),
                    });
                }
                fdes.push(fde);
            }
        }
    }
    Ok(())
}

/// Drops `.debug_frame` FDEs that cover an address some `.eh_frame` FDE
/// describes (`spans` sorted by start).
fn drop_shadowed_debug_fdes(spans: &mut Vec<Span>) {
    if !spans.iter().any(|span| span.source == Source::DebugFrame) {
        return;
    }
    // The union of the .eh_frame ranges, disjoint and sorted.
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for span in spans.iter().filter(|span| span.source == Source::EhFrame) {
        match covered.last_mut() {
            Some(last) if span.start <= last.1 => last.1 = last.1.max(span.end),
            _ => covered.push((span.start, span.end)),
        }
    }
    spans.retain(|span| {
        if span.source == Source::EhFrame {
            return true;
        }
        // The last covered range starting below this FDE's end is the only
        // one that can reach into it.
        let before_end = covered.partition_point(|&(start, _)| start < span.end);
        before_end == 0 || covered[before_end - 1].1 <= span.start
    });
}

/// Rows in the making: addresses still absolute until `push`.
struct Builder {
    base: u64,
    max_rows: usize,
    rows: Vec<UnwindRow>,
    cfi_rows: usize,
    unsupported: BTreeMap<Unsupported, usize>,
}

impl Builder {
    /// Appends the rule in force from `address` (at or after the last
    /// row's): it replaces a row at the same address and is dropped when
    /// equal to the row before.
    fn push(&mut self, address: u64, mut row: UnwindRow) -> Result<(), TableError> {
        // The span check bounds every address to base + u32::MAX.
        row.pc = (address - self.base) as u32;
        if self.rows.last().is_some_and(|last| last.pc == row.pc) {
            self.rows.pop();
        }
        if self.rows.last().is_some_and(|last| same_rule(last, &row)) {
            return Ok(());
        }
        if self.rows.len() == self.max_rows {
            return Err(TableError::TooManyRows { max: self.max_rows });
        }
        self.rows.push(row);
        Ok(())
    }
}

fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    UnwindRow { pc: 0, ..*a } == UnwindRow { pc: 0, ..*b }
}

fn rule_only(cfa_rule: u8) -> UnwindRow {
    UnwindRow {
        cfa_rule,
        ..UnwindRow::default()
    }
}

/// Evaluates one FDE's rows below `end` into `out`.
fn emit_fde<'a, S>(
    section: &S,
    source: Source,
    bases: &BaseAddresses,
    ctx: &mut UnwindContext<usize>,
    fde: &FrameDescriptionEntry<Slice<'a>>,
    end: u64,
    out: &mut Builder,
) -> Result<(), TableError>
where
    S: UnwindSection<Slice<'a>>,
{
    let start = fde.initial_address();
    let bad = |error| TableError::BadCfi {
        section: source.name(),
        fde: FdeAt(Some(start)),
        source: error,
    };
    let signal = fde.is_signal_trampoline();
    let encoding = fde.cie().encoding();
    let mut rows = fde.rows(section, bases, ctx).map_err(bad)?;
    while let Some(row) = rows.next_row().map_err(bad)? {
        if row.start_address() >= end {
            break;
        }
        out.cfi_rows += 1;
        let converted = if signal {
            rule_only(cfa::SIGNAL)
        } else {
            match convert(row, section, encoding) {
                Ok(converted) => converted,
                Err(why) => {
                    *out.unsupported.entry(why).or_default() += 1;
                    rule_only(cfa::UNSUPPORTED)
                }
            }
        };
        out.push(row.start_address().max(start), converted)?;
    }
    Ok(())
}

/// The program's rule for one gimli row (outside signal frames).
fn convert<'a, S>(
    row: &UnwindTableRow<usize>,
    section: &S,
    encoding: Encoding,
) -> Result<UnwindRow, Unsupported>
where
    S: UnwindSection<Slice<'a>>,
{
    match row.register(RA) {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => return Ok(rule_only(cfa::END)),
        _ => return Err(Unsupported::ReturnAddress),
    }
    let (cfa_rule, cfa_offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let offset = i32::try_from(*offset).map_err(|_| Unsupported::CfaOffset)?;
            let rule = match *register {
                RSP => cfa::RSP,
                RBP => cfa::RBP,
                Register(n @ 0..=16) => cfa::REG_BASE + n as u8,
                Register(_) => return Err(Unsupported::CfaRegister),
            };
            (rule, offset)
        }
        CfaRule::Expression(expression) => expression
            .get(section)
            .ok()
            .and_then(|expression| cfa_expression(expression, encoding))
            .ok_or(Unsupported::CfaExpression)?,
    };
    let (rbp_rule, rbp_offset) = match row.register(RBP) {
        None | Some(RegisterRule::SameValue) => (rbp::SAME, 0),
        Some(RegisterRule::Offset(offset)) => match i16::try_from(offset) {
            Ok(offset) => (rbp::AT_CFA, offset),
            Err(_) => (rbp::UNKNOWN, 0),
        },
        Some(_) => (rbp::UNKNOWN, 0),
    };
    Ok(UnwindRow {
        pc: 0,
        cfa_offset,
        rbp_offset,
        cfa_rule,
        rbp_rule,
    })
}

/// Recognises the CFA expressions the program implements, by their
/// operations:
/// - the PLT's `breg7 8; breg16 0; lit15; and; lit11|lit10; ge; lit3; shl;
///   plus` (`CFA = RSP + 8 + ((RIP & 15) >= 11|10 ? 8 : 0)`);
/// - `breg6|breg7 n; deref` (`CFA = *(RBP|RSP + n)`), optionally followed by
///   `plus_uconst 8` (`CFA = *(RBP|RSP + n) + 8`, OpenSSL-style assembly).
fn cfa_expression(
    expression: gimli::Expression<Slice<'_>>,
    encoding: Encoding,
) -> Option<(u8, i32)> {
    let mut ops = expression.operations(encoding);
    let mut next = move || ops.next().ok();
    let Some(Operation::RegisterOffset {
        register, offset, ..
    }) = next()?
    else {
        return None;
    };
    match next()? {
        Some(Operation::Deref {
            size: 8,
            space: false,
            base_type,
        }) if base_type.0 == 0 => {
            let offset = i32::try_from(offset).ok()?;
            let plus_8 = match next()? {
                None => false,
                Some(Operation::PlusConstant { value: 8 }) => next()?.is_none(),
                Some(_) => return None,
            };
            let rule = match (register, plus_8) {
                (RSP, false) => cfa::DEREF_RSP,
                (RBP, false) => cfa::DEREF_RBP,
                (RSP, true) => cfa::DEREF_RSP_8,
                (RBP, true) => cfa::DEREF_RBP_8,
                _ => return None,
            };
            Some((rule, offset))
        }
        Some(Operation::RegisterOffset {
            register: RA,
            offset: 0,
            ..
        }) if register == RSP && offset == 8 => {
            let constant = |op: Option<Operation<Slice<'_>>>| match op {
                Some(Operation::UnsignedConstant { value }) => Some(value),
                _ => None,
            };
            if constant(next()?)? != 15 || next()? != Some(Operation::And) {
                return None;
            }
            let rule = match constant(next()?)? {
                11 => cfa::PLT_11,
                10 => cfa::PLT_10,
                _ => return None,
            };
            let tail_matches = next()? == Some(Operation::Ge)
                && constant(next()?)? == 3
                && next()? == Some(Operation::Shl)
                && next()? == Some(Operation::Plus)
                && next()?.is_none();
            tail_matches.then_some((rule, 0))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        ffi::CStr,
        path::{Path, PathBuf},
        process::Command,
    };

    use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

    use super::*;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    const LIBSTDCXX: &str = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn table_of(path: &Path) -> UnwindTable {
        build_table(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    // ---- readelf --debug-dump=frames-interp as the reference ----

    /// One FDE as readelf prints it.
    #[derive(Debug)]
    struct ReadelfFde {
        source: Source,
        start: u64,
        end: u64,
        /// Its CIE's augmentation has `S`.
        signal: bool,
        /// In readelf's order; an FDE without instructions gets its CIE's
        /// row at `start`.
        rows: Vec<ReadelfRow>,
    }

    /// One row of readelf's table: the cells of the CFA, RBP and RA
    /// columns (`None`: no such column).
    #[derive(Clone, Debug)]
    struct ReadelfRow {
        loc: u64,
        cfa: String,
        rbp: Option<String>,
        ra: Option<String>,
    }

    fn readelf_frames(path: &Path) -> String {
        // Only this file's CFI: not that of a separate debug file it links to.
        let output = Command::new("readelf")
            .args(["--debug-dump=frames-interp", "--debug-dump=no-follow-links"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running readelf ({e}): install binutils (`apt-get install binutils`); \
                     the unwind tables are checked against readelf's CFI"
                )
            });
        assert!(
            output.status.success(),
            "readelf --debug-dump=frames-interp {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("readelf prints UTF-8")
    }

    fn hex(s: &str) -> u64 {
        u64::from_str_radix(s, 16).unwrap_or_else(|e| panic!("readelf hex {s:?}: {e}"))
    }

    fn parse_readelf(text: &str) -> Vec<ReadelfFde> {
        enum Entry {
            None,
            Cie(Source, u64),
            Fde(usize),
        }
        let mut source = Source::EhFrame;
        // (section, CIE offset) -> (signal frame, its initial row)
        let mut cies: HashMap<(Source, u64), (bool, Option<ReadelfRow>)> = HashMap::new();
        let mut fdes: Vec<ReadelfFde> = Vec::new();
        let mut fde_cies = Vec::new();
        let mut entry = Entry::None;
        let mut header: Vec<String> = Vec::new();
        for line in text.lines() {
            if line.starts_with("Contents of the .eh_frame section") {
                source = Source::EhFrame;
                continue;
            }
            if line.starts_with("Contents of the .debug_frame section") {
                source = Source::DebugFrame;
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 5 && words[3] == "CIE" {
                let augmentation = words[4].trim_matches('"');
                cies.insert((source, hex(words[0])), (augmentation.contains('S'), None));
                entry = Entry::Cie(source, hex(words[0]));
                header.clear();
                continue;
            }
            if words.len() >= 6 && words[3] == "FDE" {
                let cie = hex(words[4].strip_prefix("cie=").expect("cie="));
                let (start, end) = words[5]
                    .strip_prefix("pc=")
                    .and_then(|pc| pc.split_once(".."))
                    .expect("pc=START..END");
                fde_cies.push((source, cie));
                fdes.push(ReadelfFde {
                    source,
                    start: hex(start),
                    end: hex(end),
                    signal: cies.get(&(source, cie)).expect("CIE before FDE").0,
                    rows: Vec::new(),
                });
                entry = Entry::Fde(fdes.len() - 1);
                header.clear();
                continue;
            }
            if words.first() == Some(&"LOC") {
                header = words.iter().map(|w| w.to_string()).collect();
                continue;
            }
            let is_row = words.len() >= 2
                && words[0].len() == 16
                && words[0].bytes().all(|b| b.is_ascii_hexdigit())
                && !header.is_empty();
            if !is_row {
                continue;
            }
            // A register cell is `r9 (r9)`: rejoin what the split cut.
            let mut cells: Vec<String> = Vec::new();
            for word in &words {
                match cells.last_mut() {
                    Some(last) if word.starts_with('(') => {
                        last.push(' ');
                        last.push_str(word);
                    }
                    _ => cells.push(word.to_string()),
                }
            }
            let cell = |name: &str| {
                let column = header.iter().position(|h| h == name)?;
                cells.get(column).cloned()
            };
            let row = ReadelfRow {
                loc: hex(&cells[0]),
                cfa: cells[1].clone(),
                rbp: cell("rbp"),
                ra: cell("ra"),
            };
            match entry {
                Entry::Cie(source, offset) => {
                    cies.get_mut(&(source, offset)).expect("CIE").1 = Some(row);
                }
                Entry::Fde(i) => fdes[i].rows.push(row),
                Entry::None => {}
            }
        }
        for (fde, cie) in fdes.iter_mut().zip(&fde_cies) {
            if fde.rows.is_empty() {
                let initial = cies[cie].1.clone().expect("CIE without a row");
                fde.rows.push(ReadelfRow {
                    loc: fde.start,
                    ..initial
                });
            }
        }
        fdes
    }

    /// x86-64 DWARF register numbers of readelf's names.
    fn dwarf_register(name: &str) -> Option<u8> {
        const NAMES: [&str; 17] = [
            "rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15", "rip",
        ];
        NAMES.iter().position(|&n| n == name).map(|n| n as u8)
    }

    /// Does the table's row match readelf's cells?
    fn check_row(row: &UnwindRow, cells: &ReadelfRow, signal: bool) -> Result<(), String> {
        let want = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        if signal {
            return want(row.cfa_rule == cfa::SIGNAL, "SIGNAL (signal frame)");
        }
        match cells.ra.as_deref() {
            Some("u") => return want(row.cfa_rule == cfa::END, "END (ra undefined)"),
            Some("c-8") => {}
            _ => return want(row.cfa_rule == cfa::UNSUPPORTED, "UNSUPPORTED (ra)"),
        }
        if cells.cfa == "exp" {
            want(
                matches!(
                    row.cfa_rule,
                    cfa::PLT_11
                        | cfa::PLT_10
                        | cfa::DEREF_RSP
                        | cfa::DEREF_RBP
                        | cfa::DEREF_RSP_8
                        | cfa::DEREF_RBP_8
                        | cfa::UNSUPPORTED
                ),
                "PLT, DEREF or UNSUPPORTED (CFA exp)",
            )?;
        } else {
            let split = cells
                .cfa
                .find(['+', '-'])
                .ok_or_else(|| format!("readelf CFA cell {:?}", cells.cfa))?;
            let (register, offset) = cells.cfa.split_at(split);
            let offset: i64 = offset.parse().map_err(|e| format!("CFA offset: {e}"))?;
            let expected = match (dwarf_register(register), i32::try_from(offset)) {
                (_, Err(_)) | (None, _) => (cfa::UNSUPPORTED, 0),
                (Some(7), Ok(offset)) => (cfa::RSP, offset),
                (Some(6), Ok(offset)) => (cfa::RBP, offset),
                (Some(n), Ok(offset)) => (cfa::REG_BASE + n, offset),
            };
            want(
                (row.cfa_rule, row.cfa_offset) == expected,
                &format!("CFA {}/{}", cfa_rule_name(expected.0), expected.1),
            )?;
        }
        if row.cfa_rule == cfa::UNSUPPORTED {
            return Ok(());
        }
        let expected = match cells.rbp.as_deref() {
            None | Some("u") | Some("s") => (rbp::SAME, 0),
            Some(cell) if cell.starts_with('c') => cell[1..]
                .parse::<i64>()
                .ok()
                .and_then(|n| i16::try_from(n).ok())
                .map_or((rbp::UNKNOWN, 0), |n| (rbp::AT_CFA, n)),
            Some(_) => (rbp::UNKNOWN, 0),
        };
        want(
            (row.rbp_rule, row.rbp_offset) == expected,
            &format!("rbp rule {}/{}", expected.0, expected.1),
        )
    }

    /// Builds `path`'s table and checks it against readelf: the rule at
    /// the first and last address of every readelf row, `NONE` after every
    /// FDE not followed by another, nothing below the base; returns the
    /// table and a listing of its unsupported rows.
    fn compare_with_readelf(path: &Path) -> (UnwindTable, String) {
        let table = table_of(path);
        let fdes = parse_readelf(&readelf_frames(path));
        assert!(
            !fdes.is_empty(),
            "readelf shows no FDE in {}",
            path.display()
        );

        // The FDEs the table should be built from, as `build` selects them.
        let mut spans: Vec<&ReadelfFde> = fdes.iter().filter(|f| f.end > f.start).collect();
        spans.sort_by_key(|f| (f.start, f.source));
        let eh: Vec<(u64, u64)> = spans
            .iter()
            .filter(|f| f.source == Source::EhFrame)
            .map(|f| (f.start, f.end))
            .collect();
        spans.retain(|f| {
            f.source == Source::EhFrame
                || !eh
                    .iter()
                    .any(|&(start, end)| start < f.end && f.start < end)
        });
        assert_eq!(
            table.stats.fdes,
            spans.len(),
            "{}: FDEs in the table vs readelf's",
            path.display()
        );
        assert_eq!(table.base, spans[0].start, "{}: base", path.display());
        assert_eq!(table.lookup(table.base - 1), None);

        let mut mismatches = Vec::new();
        let mut checked = 0usize;
        let check = |address: u64, cells: &ReadelfRow, fde: &ReadelfFde| {
            let (expected, row) = match table.lookup(address) {
                Some(row) => (check_row(row, cells, fde.signal).err()?, Some(*row)),
                None => ("a row".to_string(), None),
            };
            Some(format!(
                "{address:#x} in FDE {:#x}..{:#x} ({}): readelf CFA {} rbp {:?} ra {:?} \
                 wants {expected}, table has {row:?}",
                fde.start,
                fde.end,
                fde.source.name(),
                cells.cfa,
                cells.rbp,
                cells.ra
            ))
        };
        let mut gaps = 0usize;
        for (i, fde) in spans.iter().enumerate() {
            let next = spans.get(i + 1).map(|n| n.start);
            let end = next.map_or(fde.end, |n| n.min(fde.end));
            let rows: Vec<&ReadelfRow> = fde.rows.iter().filter(|r| r.loc < end).collect();
            for (j, row) in rows.iter().enumerate() {
                // readelf prints a row per advance: the last at a LOC holds.
                let Some(until) = rows[j + 1..]
                    .iter()
                    .find(|r| r.loc != row.loc)
                    .map_or(Some(end), |r| (r.loc > row.loc).then_some(r.loc))
                else {
                    continue;
                };
                if rows.get(j + 1).is_some_and(|r| r.loc == row.loc) {
                    continue;
                }
                for address in [row.loc, until - 1] {
                    checked += 1;
                    mismatches.extend(check(address, row, fde));
                }
            }
            if next.is_none_or(|n| fde.end < n) {
                gaps += 1;
                let rule = table.lookup(fde.end).map(|r| r.cfa_rule);
                if rule != Some(cfa::NONE) {
                    mismatches.push(format!(
                        "{:#x} after FDE {:#x}..{:#x}: wants NONE, table has {rule:?}",
                        fde.end, fde.start, fde.end
                    ));
                }
            }
        }
        println!(
            "{}: {checked} addresses of {} FDEs and {gaps} gaps match readelf",
            path.display(),
            spans.len()
        );
        assert!(
            mismatches.is_empty(),
            "{}: {} of {checked} addresses and {gaps} gaps differ from readelf:\n{}",
            path.display(),
            mismatches.len(),
            mismatches
                .iter()
                .take(40)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(
            table
                .rows
                .iter()
                .filter(|r| r.cfa_rule == cfa::NONE)
                .count(),
            table.stats.rows_by_rule.get("none").copied().unwrap_or(0)
        );

        let mut unsupported = String::new();
        for (i, row) in table.rows.iter().enumerate() {
            if row.cfa_rule != cfa::UNSUPPORTED {
                continue;
            }
            let address = table.base + u64::from(row.pc);
            let until = table
                .rows
                .get(i + 1)
                .map_or(address, |r| table.base + u64::from(r.pc));
            let cells = spans
                .iter()
                .filter(|f| f.start <= address && address < f.end)
                .flat_map(|f| f.rows.iter().rfind(|r| r.loc <= address))
                .last();
            unsupported.push_str(&format!(
                "  {address:#x}..{until:#x}: readelf CFA {:?} rbp {:?} ra {:?}\n",
                cells.map(|c| &c.cfa),
                cells.and_then(|c| c.rbp.as_ref()),
                cells.and_then(|c| c.ra.as_ref()),
            ));
        }
        (table, unsupported)
    }

    fn assert_few_unsupported(path: &Path, table: &UnwindTable, listing: &str, max: usize) {
        assert!(
            table.stats.unsupported_rows <= max,
            "{}: {} unsupported rows (at most {max} expected), by reason {:?}:\n{listing}",
            path.display(),
            table.stats.unsupported_rows,
            table.stats.unsupported
        );
    }

    #[test]
    fn libc_matches_readelf() {
        let path = Path::new(LIBC);
        let (table, listing) = compare_with_readelf(path);
        // 5 rows in Debian 12's libc, all code that switches to another
        // context (setcontext/longjmp style): the return address is in rdx
        // or rdi, or saved above a CFA taken from rdx.
        assert_few_unsupported(path, &table, &listing, 8);
    }

    #[test]
    fn libstdcxx_matches_readelf() {
        let path = Path::new(LIBSTDCXX);
        let (table, listing) = compare_with_readelf(path);
        assert_few_unsupported(path, &table, &listing, 0);
    }

    #[test]
    fn rust_binary_matches_readelf() {
        let path = std::env::current_exe().expect("current_exe");
        let (table, listing) = compare_with_readelf(&path);
        // ring's perlasm: `*(RSP + n) + 8` is DEREF_RSP_8; what is left is
        // its r9-indexed `*(RSP + 8 + R9 * 8) + 8` (two rows).
        assert_few_unsupported(&path, &table, &listing, 4);
    }

    // ---- targeted checks ----

    #[test]
    fn merged_table_is_smaller_than_the_cfi() {
        let table = table_of(Path::new(LIBC));
        let stats = &table.stats;
        // NONE rows close the gaps; every other row is a CFI row or a
        // merge of several.
        let none = stats.rows_by_rule.get("none").copied().unwrap_or(0);
        assert!(
            stats.rows - none < stats.cfi_rows,
            "{} rows ({none} NONE) from {} CFI rows",
            stats.rows,
            stats.cfi_rows
        );
        assert_eq!(stats.rows, table.rows.len());
        assert_eq!(stats.rows_by_rule.values().sum::<usize>(), stats.rows);
        assert!(stats.eh_frame.present && stats.eh_frame.fdes == stats.fdes);
        assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc));
        assert!(table.rows.windows(2).all(|w| !same_rule(&w[0], &w[1])));
        assert_eq!(table.rows.last().map(|r| r.cfa_rule), Some(cfa::NONE));
    }

    /// glibc's `__restore_rt` as this process uses it: `sigaction()` puts
    /// it in `sa_restorer` (it is in no symbol table of Debian's libc), and
    /// Rust's runtime installed a SIGSEGV handler through `sigaction()`.
    /// Returns the file and the address in it.
    fn restore_rt() -> (PathBuf, u64) {
        // SAFETY: a query of the current action; nothing is changed.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut action) };
        assert_eq!(rc, 0, "sigaction(SIGSEGV)");
        let restorer = action
            .sa_restorer
            .expect("the SIGSEGV handler of Rust's runtime has glibc's sa_restorer")
            as usize;
        // SAFETY: dladdr fills `info` with pointers into the loader's data.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        let found = unsafe { libc::dladdr(restorer as *const libc::c_void, &mut info) };
        assert!(
            found != 0 && !info.dli_fname.is_null(),
            "dladdr(sa_restorer)"
        );
        let file = unsafe { CStr::from_ptr(info.dli_fname) };
        let file = PathBuf::from(file.to_str().expect("UTF-8 path"));
        let bytes = read(&file);
        let elf = object::File::parse(&*bytes).expect("libc parses");
        let first_load = elf.segments().map(|s| s.address()).min().expect("segments");
        (
            file,
            (restorer - info.dli_fbase as usize) as u64 + first_load,
        )
    }

    #[test]
    fn restore_rt_is_a_signal_frame() {
        let (file, address) = restore_rt();
        assert_eq!(
            std::fs::canonicalize(&file).unwrap(),
            std::fs::canonicalize(LIBC).unwrap(),
            "sa_restorer is in {}",
            file.display()
        );
        let bytes = read(&file);
        let elf = object::File::parse(&*bytes).unwrap();
        let code = elf
            .sections()
            .find(|s| s.address() <= address && address < s.address() + s.size())
            .and_then(|s| s.data_range(address, 9).ok().flatten())
            .expect("__restore_rt's code");
        assert_eq!(
            code,
            [0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05],
            "mov $15,%rax; syscall (rt_sigreturn) at {address:#x}"
        );
        let table = build_table(&bytes).unwrap();
        // The program looks up return address - 1: the FDE starts one byte
        // before the code.
        for at in [address - 1, address, address + 8] {
            assert_eq!(
                table.lookup(at).map(|r| r.cfa_rule),
                Some(cfa::SIGNAL),
                "{at:#x} in __restore_rt ({address:#x})"
            );
        }
        assert_eq!(table.stats.rows_by_rule.get("signal"), Some(&1));
    }

    #[test]
    fn start_of_a_binary_is_the_end() {
        for path in [
            std::env::current_exe().unwrap(),
            PathBuf::from("/usr/bin/ls"),
        ] {
            let bytes = read(&path);
            let entry = object::File::parse(&*bytes).unwrap().entry();
            let table = build_table(&bytes).unwrap();
            assert_eq!(
                table.lookup(entry).map(|r| r.cfa_rule),
                Some(cfa::END),
                "_start ({entry:#x}) of {}",
                path.display()
            );
        }
    }

    #[test]
    fn libc_plt_uses_the_plt_rules() {
        let bytes = read(Path::new(LIBC));
        let elf = object::File::parse(&*bytes).unwrap();
        let plt = elf.section_by_name(".plt").expect("libc has a .plt");
        let table = build_table(&bytes).unwrap();
        // PLT0 pushes and jumps; the 16-byte entries from 16 on use the
        // expression.
        let entries = plt.address() + 16..plt.address() + plt.size();
        assert!(!entries.is_empty());
        for address in entries {
            let rule = table.lookup(address).map(|r| r.cfa_rule);
            assert!(
                matches!(rule, Some(cfa::PLT_11 | cfa::PLT_10)),
                "{address:#x} in .plt: {rule:?}"
            );
        }
    }

    /// `leaf` and `main` have CFI only in `.debug_frame` (C built without
    /// asynchronous unwind tables); `both` (assembler) in both sections.
    const MAIN_C: &str = "int leaf(int);\nint both(int);\n\
        int leaf(int x) { volatile int y = x; return y + 1; }\n\
        int main(int argc, char **argv) { (void)argv; return both(argc) + leaf(argc); }\n";
    const BOTH_S: &str = "\t.cfi_sections .eh_frame, .debug_frame\n\t.text\n\
        \t.globl both\n\t.type both, @function\nboth:\n\t.cfi_startproc\n\
        \tpushq %rbp\n\t.cfi_def_cfa_offset 16\n\t.cfi_offset %rbp, -16\n\
        \tmovq %rsp, %rbp\n\t.cfi_def_cfa_register %rbp\n\tcall leaf\n\
        \tpopq %rbp\n\t.cfi_def_cfa %rsp, 8\n\tret\n\t.cfi_endproc\n\
        \t.size both, .-both\n\t.section .note.GNU-stack,\"\",@progbits\n";

    #[test]
    fn debug_frame_adds_what_eh_frame_lacks() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (main_c, both_s) = (dir.path().join("main.c"), dir.path().join("both.s"));
        std::fs::write(&main_c, MAIN_C).unwrap();
        std::fs::write(&both_s, BOTH_S).unwrap();
        let program = dir.path().join("program");
        let status = Command::new("gcc")
            .args(["-O1", "-g", "-fno-asynchronous-unwind-tables", "-o"])
            .args([&program, &main_c, &both_s])
            .status()
            .unwrap_or_else(|e| panic!("running gcc ({e}): install gcc (`apt-get install gcc`)"));
        assert!(status.success(), "gcc failed");

        let (table, listing) = compare_with_readelf(&program);
        assert_few_unsupported(&program, &table, &listing, 0);
        let stats = &table.stats;
        assert!(stats.eh_frame.present && stats.debug_frame.present);
        assert_eq!(stats.debug_frame.fdes, 2, "leaf and main: {stats:?}");
        assert_eq!(stats.debug_frame.skipped_fdes, 1, "both: {stats:?}");

        let bytes = read(&program);
        let elf = object::File::parse(&*bytes).unwrap();
        let address = |name| elf.symbol_by_name(name).expect(name).address();
        let leaf = table.lookup(address("leaf")).copied();
        assert_eq!(
            leaf.map(|r| (r.cfa_rule, r.cfa_offset)),
            Some((cfa::RSP, 8))
        );
        let both = table.lookup(address("both") + 4).copied();
        assert_eq!(
            both.map(|r| (r.cfa_rule, r.cfa_offset, r.rbp_rule, r.rbp_offset)),
            Some((cfa::RBP, 16, rbp::AT_CFA, -16))
        );
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert!(matches!(
            build_table(b"not an elf"),
            Err(TableError::NotElf)
        ));
        assert!(matches!(build_table(b""), Err(TableError::NotElf)));

        let libc = read(Path::new(LIBC));
        // Truncated while being read: section headers or data past the end.
        for len in [4, 64, 4096, libc.len() / 2, libc.len() - 1] {
            let result = build_table(&libc[..len]);
            assert!(result.is_err(), "libc cut at {len} bytes built a table");
        }
        // Cut after its loaded segments (a library truncated in place while
        // it runs): .eh_frame is there, the section headers are not.
        let loaded = profiler_testkit::elf::Layout::of(&libc).unwrap().loaded_end as usize;
        assert!(matches!(
            build_table(&libc[..loaded]),
            Err(TableError::BadElf(_))
        ));
        let mut garbage = libc[..64].to_vec();
        let mut rng = profiler_testkit::Rng::new(7);
        garbage.extend((0..65536).map(|_| rng.next_u64() as u8));
        assert!(build_table(&garbage).is_err(), "garbage built a table");

        let mut arm = libc.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        assert!(matches!(build_table(&arm), Err(TableError::NotX86_64(_))));

        let mut no_sections = libc.clone();
        no_sections[40..48].fill(0); // e_shoff
        no_sections[60..64].fill(0); // e_shnum, e_shstrndx
        assert!(matches!(build_table(&no_sections), Err(TableError::NoCfi)));

        let too_many = build(&libc, 100);
        assert!(matches!(
            too_many,
            Err(TableError::TooManyRows { max: 100 })
        ));
    }

    #[test]
    fn cfa_expressions_by_their_operations() {
        let classify = |bytes: &[u8]| {
            let encoding = Encoding {
                address_size: 8,
                format: gimli::Format::Dwarf32,
                version: 1,
            };
            cfa_expression(
                gimli::Expression(EndianSlice::new(bytes, LittleEndian)),
                encoding,
            )
        };
        // breg7 8; breg16 0; lit15; and; lit11|lit10; ge; lit3; shl; plus
        let plt = |lit| [0x77, 8, 0x80, 0, 0x3f, 0x1a, lit, 0x2a, 0x33, 0x24, 0x22];
        assert_eq!(classify(&plt(0x3b)), Some((cfa::PLT_11, 0)));
        assert_eq!(classify(&plt(0x3a)), Some((cfa::PLT_10, 0)));
        assert_eq!(classify(&plt(0x39)), None);
        assert_eq!(classify(&plt(0x3b)[..10]), None);
        // breg7|breg6 n; deref
        assert_eq!(classify(&[0x77, 0x28, 0x06]), Some((cfa::DEREF_RSP, 40)));
        assert_eq!(classify(&[0x76, 0x78, 0x06]), Some((cfa::DEREF_RBP, -8)));
        assert_eq!(classify(&[0x70, 0x08, 0x06]), None, "breg0");
        // OpenSSL/BoringSSL's breg7 n; deref; plus_uconst 8
        assert_eq!(
            classify(&[0x77, 0x28, 0x06, 0x23, 0x08]),
            Some((cfa::DEREF_RSP_8, 40))
        );
        assert_eq!(classify(&[0x77, 0x28, 0x06, 0x23, 0x10]), None, "+16");
        assert_eq!(classify(&[0x77]), None, "truncated");
        assert_eq!(classify(&[]), None);
    }

    #[test]
    fn lookup_finds_the_last_row_at_or_below() {
        let row = |pc, cfa_rule| UnwindRow {
            pc,
            cfa_rule,
            ..UnwindRow::default()
        };
        let table = UnwindTable {
            base: 0x1000,
            rows: vec![row(0, cfa::RSP), row(0x10, cfa::RBP), row(0x20, cfa::NONE)],
            stats: TableStats::default(),
        };
        let rule = |vaddr| table.lookup(vaddr).map(|r| r.cfa_rule);
        assert_eq!(rule(0xfff), None);
        assert_eq!(rule(0x1000), Some(cfa::RSP));
        assert_eq!(rule(0x100f), Some(cfa::RSP));
        assert_eq!(rule(0x1010), Some(cfa::RBP));
        assert_eq!(rule(0x1020), Some(cfa::NONE));
        assert_eq!(rule(u64::MAX), Some(cfa::NONE));
    }

    /// Go's linker writes `.debug_frame` zlib-compressed: it is inflated,
    /// frameless assembly leaves get their `RSP + 8` row, and the functions
    /// that switch to the system stack end the walk.
    #[test]
    fn go_binary_compressed_debug_frame() {
        use object::{Object, ObjectSymbol};
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("gowork");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/workloads/gowork.go");
        let out = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(&src)
            .env("GOCACHE", dir.path().join("cache"))
            .env("GOPATH", dir.path().join("path"))
            .env("GO111MODULE", "off")
            .output()
            .expect("go is installed (cargo xtask setup)");
        assert!(out.status.success(), "{out:?}");
        let bytes = read(&bin);
        let table = table_of(&bin);
        assert!(table.stats.debug_frame.compressed, "{:?}", table.stats);
        assert!(table.stats.debug_frame.fdes > 500, "{:?}", table.stats);
        let elf = object::File::parse(&*bytes).unwrap();
        // The symbol table names assembly functions with their ABI.
        let symbol = |name: &str| {
            elf.symbols()
                .find(|s| s.name() == Ok(name))
                .unwrap_or_else(|| panic!("{name} in the symbol table"))
                .address()
        };
        let leaf = table
            .lookup(symbol("runtime.memclrNoHeapPointers"))
            .unwrap();
        assert_eq!((leaf.cfa_rule, leaf.cfa_offset), (cfa::RSP, 8));
        for switch in ["runtime.systemstack.abi0", "runtime.mcall"] {
            let row = table.lookup(symbol(switch)).unwrap();
            assert_eq!(row.cfa_rule, cfa::END, "{switch}");
        }
        let main = table.lookup(symbol("main.main") + 8).unwrap();
        assert_eq!(main.cfa_rule, cfa::RSP, "main.main past its prologue");
    }
}
