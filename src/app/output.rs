//! What commands print. `println!` and `eprintln!` panic (exit 101) when the stream is closed
//! (`sidecar check ... | head -1`); these stop printing instead, as Unix tools do, and the
//! command ends with its own exit code.

use std::fmt::Display;
use std::io::Write as _;

/// A line on stdout, unless stdout is closed.
pub(super) fn say(line: impl Display) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A line on stderr, unless stderr is closed.
pub(super) fn complain(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
