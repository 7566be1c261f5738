//! Replies: the ones the proxy writes itself, and reading the MTA's multi-line replies.

use super::{LineScan, scan_line};

/// `CODE ENHANCED TEXT\r\n`, one line.
pub fn line(code: u16, enhanced: &str, text: &str) -> Vec<u8> {
    format!("{code} {enhanced} {text}\r\n").into_bytes()
}

/// A multi-line 250 reply to EHLO: `250-NAME`, then the keywords, the last with `250 `.
pub fn ehlo(name: &str, keywords: &[&str]) -> Vec<u8> {
    let mut lines = vec![name];
    lines.extend_from_slice(keywords);
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.push_str(&format!("250{sep}{l}\r\n"));
    }
    out.into_bytes()
}

/// A complete reply at the start of `buf`: its total length and code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyScan {
    Complete {
        len: usize,
        code: u16,
    },
    NeedMore,
    /// Not an SMTP reply (no three-digit code, or a line over the limit).
    Malformed,
}

/// Finds the first complete (possibly multi-line) reply in `buf`: lines `NNN-...` up to the
/// first `NNN ...` (or a bare `NNN`).
pub fn scan_reply(buf: &[u8], max_line: usize) -> ReplyScan {
    let mut offset = 0;
    loop {
        match scan_line(&buf[offset..], max_line) {
            LineScan::NeedMore => return ReplyScan::NeedMore,
            LineScan::TooLong => return ReplyScan::Malformed,
            LineScan::Line { len, content } => {
                let line = &buf[offset..offset + content];
                let code = match line.get(..3).and_then(|c| std::str::from_utf8(c).ok()) {
                    Some(code) if code.bytes().all(|b| b.is_ascii_digit()) => {
                        code.parse::<u16>().expect("three digits")
                    }
                    _ => return ReplyScan::Malformed,
                };
                offset += len;
                match line.get(3) {
                    Some(b'-') => continue,
                    Some(b' ') | None => return ReplyScan::Complete { len: offset, code },
                    Some(_) => return ReplyScan::Malformed,
                }
            }
        }
    }
}

/// The host name an MTA greets with: the first word after `220 ` (`220 mx.example.com ESMTP`).
pub fn greeting_host(greeting: &[u8]) -> Option<String> {
    let first = greeting.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(first.get(4..)?).ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_replies_complete_at_the_last_line_whatever_the_split() {
        let reply = b"250-mx.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\nnext";
        for split in 0..reply.len() - 4 {
            assert_eq!(scan_reply(&reply[..split], 512), ReplyScan::NeedMore, "prefix {split}");
        }
        assert_eq!(scan_reply(reply, 512), ReplyScan::Complete { len: reply.len() - 4, code: 250 });
        assert_eq!(scan_reply(b"220\r\n", 512), ReplyScan::Complete { len: 5, code: 220 });
        assert_eq!(
            scan_reply(b"554 5.7.1 no\r\n", 512),
            ReplyScan::Complete { len: 14, code: 554 }
        );
        assert_eq!(scan_reply(b"HTTP/1.1 200\r\n", 512), ReplyScan::Malformed);
        assert_eq!(scan_reply(b"220x\r\n", 512), ReplyScan::Malformed);
        assert_eq!(scan_reply(&[b'2'; 600], 512), ReplyScan::Malformed);
    }

    #[test]
    fn replies_are_written_as_smtp_wants() {
        assert_eq!(line(553, "5.7.1", "go away"), b"553 5.7.1 go away\r\n");
        assert_eq!(
            ehlo("mx.example.com", &["PIPELINING", "8BITMIME"]),
            b"250-mx.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
        assert_eq!(ehlo("mx", &[]), b"250 mx\r\n");
        assert_eq!(
            greeting_host(b"220 mx.example.com ESMTP Postfix\r\n").as_deref(),
            Some("mx.example.com")
        );
        assert_eq!(
            greeting_host(b"220-mx.example.com hi\r\n220 more\r\n").as_deref(),
            Some("mx.example.com")
        );
        assert_eq!(greeting_host(b"220\r\n"), None);
    }
}
