//! Frames an agent puts in a stack that are not code, and that the
//! collector reads back: their text, defined once for both sides.
//!
//! - `[stack cut: REASON]`: the sample's user stack stopped before its
//!   outermost frame; REASON says how its walk ended (the agent's
//!   `StackEnd::name`, e.g. `no_table`). It is the frame right after the
//!   process name, so cut stacks form towers of their own in a flame graph
//!   instead of mixing with real roots. A stack without it is complete.
//! - `[woken by]`: in an off-CPU stack, what follows it is the user stack
//!   of the thread of the same process that woke the waiting one (where it
//!   released the lock, signalled, wrote), leaf first, so that a flame
//!   graph shows it upside down above the wait, as `offwaketime` does. The
//!   wait itself is the part before it.

const STACK_CUT_PREFIX: &str = "[stack cut: ";
const STACK_CUT_SUFFIX: &str = "]";

/// The marker between a wait's stack and its waker's.
pub const WOKEN_BY: &str = "[woken by]";

/// A folded stack split at its [`WOKEN_BY`] marker: the wait itself, and
/// the waker's frames (leaf first) when there are any.
pub fn split_woken_by(stack: &str) -> (&str, Option<&str>) {
    const MARKER: &str = ";[woken by]";
    match stack.find(MARKER) {
        Some(at) => (
            &stack[..at],
            Some(stack[at + MARKER.len()..].trim_start_matches(';')),
        ),
        None => (stack, None),
    }
}

/// A folded stack without its waker part: the wait itself.
pub fn waited_part(stack: &str) -> &str {
    split_woken_by(stack).0
}

/// The marker frame of a stack cut for `reason` (snake_case).
pub fn stack_cut(reason: &str) -> String {
    format!("{STACK_CUT_PREFIX}{reason}{STACK_CUT_SUFFIX}")
}

/// The reason of a [`stack_cut`] frame; `None` for any other frame.
pub fn parse_stack_cut(frame: &str) -> Option<&str> {
    frame
        .strip_prefix(STACK_CUT_PREFIX)?
        .strip_suffix(STACK_CUT_SUFFIX)
        .filter(|reason| {
            !reason.is_empty()
                && reason
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// The cut reason of a folded stack `process;frame;...` (the marker is its
/// second frame); `None` for a complete stack.
pub fn stack_cut_of_folded(stack: &str) -> Option<&str> {
    let mut frames = stack.split(';');
    frames.next()?;
    parse_stack_cut(frames.next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waker_part_is_cut_off() {
        assert_eq!(
            waited_part("app;main;lock_[k];[woken by];unlock;holder;main"),
            "app;main;lock_[k]"
        );
        assert_eq!(waited_part("app;main;sleep_[k]"), "app;main;sleep_[k]");
        assert_eq!(
            split_woken_by("app;main;lock_[k];[woken by];unlock;holder;main"),
            ("app;main;lock_[k]", Some("unlock;holder;main"))
        );
        assert_eq!(split_woken_by("app;main"), ("app;main", None));
    }

    #[test]
    fn marker_round_trips() {
        assert_eq!(stack_cut("no_table"), "[stack cut: no_table]");
        assert_eq!(parse_stack_cut(&stack_cut("bad_read")), Some("bad_read"));
        for frame in [
            "main",
            "[stack cut: ]",
            "[stack cut: no_table",
            "[stack cut: No Table]",
            "stack cut: no_table]",
            "[stack cut: no_table]_[k]",
        ] {
            assert_eq!(parse_stack_cut(frame), None, "{frame}");
        }
    }

    #[test]
    fn folded_stacks_carry_it_after_the_process() {
        assert_eq!(
            stack_cut_of_folded("app;[stack cut: no_table];f;g"),
            Some("no_table")
        );
        assert_eq!(
            stack_cut_of_folded("app;[stack cut: depth_limit]"),
            Some("depth_limit")
        );
        assert_eq!(stack_cut_of_folded("app;main;f"), None);
        assert_eq!(stack_cut_of_folded("app"), None);
        assert_eq!(
            stack_cut_of_folded("[stack cut: no_table];main"),
            None,
            "a process name is not a marker"
        );
        assert_eq!(stack_cut_of_folded("app;main;[stack cut: no_table]"), None);
    }
}
