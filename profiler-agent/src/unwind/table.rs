//! Builds one binary's [`UnwindTable`] from its call-frame information:
//! gimli evaluates every FDE of `.eh_frame` and `.debug_frame`, each of its
//! rows becomes an [`UnwindRow`] rule the program implements, and the rows
//! are sorted, closed with `NONE` rows at gaps and merged.
//!
//! Where FDEs overlap, the later start wins from its start (an earlier FDE
//! is not resumed after a nested one ends); a `.debug_frame` FDE covering
//! any address an `.eh_frame` FDE describes is left out.
use std::{
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
    /// The section is compressed (`SHF_COMPRESSED`) and was not read.
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
    if let Some((_, address)) = eh_data {
        bases = bases.set_eh_frame(address);
    }
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let eh = eh_data.map(|(data, _)| {
        let mut section = EhFrame::new(data, LittleEndian);
        section.set_address_size(8);
        section
    });
    let debug = debug_data.map(|(data, _)| {
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
    let mut ctx = UnwindContext::new();
    for (i, span) in spans.iter().enumerate() {
        let next = spans.get(i + 1).map(|next| next.start);
        // A later start wins from its start.
        let end = next.map_or(span.end, |next| next.min(span.end));
        if end > span.start {
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

fn spans_of(spans: &[Span], source: Source) -> usize {
    spans.iter().filter(|span| span.source == source).count()
}

/// The bytes and address of a CFI section, if it is in the file with
/// contents.
fn cfi_section<'a>(
    file: &object::File<'a>,
    name: &str,
    stats: &mut SectionStats,
) -> Result<Option<(&'a [u8], u64)>, TableError> {
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
    if range.format != CompressionFormat::None {
        stats.compressed = true;
        return Ok(None);
    }
    let data = section.data().map_err(TableError::BadElf)?;
    if data.is_empty() {
        return Ok(None);
    }
    stats.present = true;
    Ok(Some((data, section.address())))
}

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
/// - `breg6|breg7 n; deref` (`CFA = *(RBP|RSP + n)`).
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
            let rule = match register {
                RSP => cfa::DEREF_RSP,
                RBP => cfa::DEREF_RBP,
                _ => return None,
            };
            let offset = i32::try_from(offset).ok()?;
            next()?.is_none().then_some((rule, offset))
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
