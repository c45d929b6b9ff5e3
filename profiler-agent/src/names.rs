//! Frame names as folded stacks need them.

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
