//! Console hotkeys: an escape key (Ctrl-A unless `--escape` says otherwise,
//! as QEMU's `-echr`) followed by one letter. The parser only names the
//! keys; the VMM carries each out through its command path
//! (`vmm::hotkeys`), the same one the API uses.

/// What the person at the console typed, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleKey {
    /// Bytes for the guest (a doubled escape key is one literal escape).
    Guest(Vec<u8>),
    /// `x`: stop the VM.
    Quit,
    /// `s`: take a snapshot.
    Snapshot,
    /// `r`: revert to this VM's latest snapshot.
    RevertLatest,
    /// `R`: pick a snapshot to revert to from a numbered list.
    RevertPick,
    /// `l`: the snapshot tree.
    List,
    /// `p`: pause, or resume when paused.
    PauseResume,
    /// `d`: delete this VM's latest snapshot.
    DeleteLatest,
    /// `h` or `?`.
    Help,
    /// The escape key followed by a key that means nothing.
    Unknown(u8),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("--escape {0:?}: use ^X, ctrl-X (a control key), a character code below 32 (as QEMU's -echr), or none")]
pub struct EscapeKeyError(pub String);

/// The default escape key, Ctrl-A (kvmtool, QEMU).
pub const ESCAPE: u8 = 0x01;

/// Splits console input into guest bytes and hotkeys. With no escape key
/// (`--escape none`) every byte goes to the guest.
pub struct EscapeParser {
    escape: Option<u8>,
    pending_escape: bool,
}

impl Default for EscapeParser {
    fn default() -> Self {
        EscapeParser::new(Some(ESCAPE))
    }
}

impl EscapeParser {
    pub fn new(escape: Option<u8>) -> Self {
        EscapeParser {
            escape,
            pending_escape: false,
        }
    }

    pub fn feed(&mut self, input: &[u8]) -> Vec<ConsoleKey> {
        let mut keys = Vec::new();
        let mut guest = Vec::new();
        for &b in input {
            if self.pending_escape {
                self.pending_escape = false;
                if Some(b) == self.escape {
                    guest.push(b);
                    continue;
                }
                let key = match b {
                    b'x' | b'X' => ConsoleKey::Quit,
                    b's' => ConsoleKey::Snapshot,
                    b'r' => ConsoleKey::RevertLatest,
                    b'R' => ConsoleKey::RevertPick,
                    b'l' | b'L' => ConsoleKey::List,
                    b'p' | b'P' => ConsoleKey::PauseResume,
                    b'd' | b'D' => ConsoleKey::DeleteLatest,
                    b'h' | b'H' | b'?' => ConsoleKey::Help,
                    other => ConsoleKey::Unknown(other),
                };
                // Keys act in the order typed: guest bytes before a hotkey
                // reach the guest first.
                if !guest.is_empty() {
                    keys.push(ConsoleKey::Guest(std::mem::take(&mut guest)));
                }
                keys.push(key);
            } else if Some(b) == self.escape {
                self.pending_escape = true;
            } else {
                guest.push(b);
            }
        }
        if !guest.is_empty() {
            keys.push(ConsoleKey::Guest(guest));
        }
        keys
    }
}

/// Reads `--escape KEY`: `none`, `^X` / `ctrl-X` / `C-X` (a control
/// character), or a character code as QEMU's `-echr` takes it (decimal or
/// 0x hex). Printable keys are refused: they could not be typed to the
/// guest without doubling them.
pub fn parse_escape(s: &str) -> Result<Option<u8>, EscapeKeyError> {
    let bad = || EscapeKeyError(s.to_string());
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let lower = s.to_ascii_lowercase();
    let letter = ["^", "ctrl-", "ctrl+", "c-"]
        .iter()
        .find_map(|p| lower.strip_prefix(p));
    let code = match letter {
        Some(l) if l.len() == 1 => {
            let c = l.as_bytes()[0].to_ascii_uppercase();
            if !(b'@'..=b'_').contains(&c) {
                return Err(bad());
            }
            c & 0x1f
        }
        Some(_) => return Err(bad()),
        None => match lower.strip_prefix("0x") {
            Some(hex) => u8::from_str_radix(hex, 16).map_err(|_| bad())?,
            None => lower.parse::<u8>().map_err(|_| bad())?,
        },
    };
    // NUL cannot be told from a read error by people; >= 32 is printable.
    if code == 0 || code >= 32 {
        return Err(bad());
    }
    Ok(Some(code))
}

/// How people write the key: `Ctrl-A`.
pub fn escape_name(code: u8) -> String {
    format!("Ctrl-{}", (code | 0x40) as char)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keys() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b"ab"), vec![ConsoleKey::Guest(b"ab".to_vec())]);
        assert_eq!(p.feed(b"a\x01"), vec![ConsoleKey::Guest(b"a".to_vec())]);
        assert_eq!(p.feed(b"x"), vec![ConsoleKey::Quit]);
        assert_eq!(p.feed(b"\x01\x01z"), vec![ConsoleKey::Guest(vec![1, b'z'])]);
    }

    #[test]
    fn every_hotkey_and_order_with_guest_bytes() {
        let mut p = EscapeParser::default();
        assert_eq!(
            p.feed(b"a\x01sb\x01r\x01R\x01l\x01p\x01d\x01h\x01?\x01q"),
            vec![
                ConsoleKey::Guest(b"a".to_vec()),
                ConsoleKey::Snapshot,
                ConsoleKey::Guest(b"b".to_vec()),
                ConsoleKey::RevertLatest,
                ConsoleKey::RevertPick,
                ConsoleKey::List,
                ConsoleKey::PauseResume,
                ConsoleKey::DeleteLatest,
                ConsoleKey::Help,
                ConsoleKey::Help,
                ConsoleKey::Unknown(b'q'),
            ]
        );
    }

    #[test]
    fn another_escape_key_or_none() {
        let mut p = EscapeParser::new(Some(0x02));
        assert_eq!(
            p.feed(b"\x01x\x02s\x02\x02"),
            vec![
                ConsoleKey::Guest(b"\x01x".to_vec()),
                ConsoleKey::Snapshot,
                ConsoleKey::Guest(vec![2]),
            ]
        );
        let mut p = EscapeParser::new(None);
        assert_eq!(p.feed(b"\x01x"), vec![ConsoleKey::Guest(b"\x01x".to_vec())]);
    }

    #[test]
    fn escape_key_spellings() {
        assert_eq!(parse_escape("none"), Ok(None));
        assert_eq!(parse_escape("^b"), Ok(Some(2)));
        assert_eq!(parse_escape("ctrl-B"), Ok(Some(2)));
        assert_eq!(parse_escape("C-]"), Ok(Some(0x1d)));
        assert_eq!(parse_escape("20"), Ok(Some(20)));
        assert_eq!(parse_escape("0x14"), Ok(Some(20)));
        for bad in ["a", "97", "0", "^", "ctrl-ab", "^1", ""] {
            assert!(parse_escape(bad).is_err(), "{bad}");
        }
        assert_eq!(escape_name(1), "Ctrl-A");
        assert_eq!(escape_name(0x1d), "Ctrl-]");
    }
}
