//! Frame names as folded stacks need them.

/// Suffix of frames of JIT-compiled code named from a perf map.
pub const JIT_SUFFIX: &str = "_[j]";

/// Replaces characters that would break a folded line (`;` separates frames,
/// a newline ends the line) and trims the name.
pub fn sanitize(name: &str) -> String {
    let name = name.trim();
    if name.is_empty() {
        return "[unnamed]".into();
    }
    name.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
}
