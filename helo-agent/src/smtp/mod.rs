//! Sans-IO SMTP: finding command lines in a byte buffer, parsing commands, and writing replies.
//! No tokio here: the proxy feeds bytes in and writes what comes out, and tests split input at
//! every byte.
//!
//! The proxy parses only what it must: client command lines (to judge every HELO/EHLO, to
//! answer a rejected session itself, and to see where a passed session becomes opaque), and the
//! MTA's replies to them. Never message content or TLS: from DATA's 354, BDAT or STARTTLS's 220
//! on, bytes are relayed untouched.

pub mod reply;

/// RFC 5321 4.5.3.1.4 allows 512 octets per command line; extensions (long EHLO arguments,
/// MAIL parameters) push real clients past it, so we take up to 1000 (the text line limit)
/// before answering 500. This bounds the lines the proxy answers itself: before a HELO passed,
/// and in a rejected session.
pub const MAX_COMMAND_LINE: usize = 1000;

/// The longest line a passed session may send, terminator included: RFC 4954's 12288 octets
/// for an AUTH command with its initial response and for each SASL response, which is the
/// longest line SMTP knows. Once a HELO passed, the proxy only relays lines and watches a
/// few verbs: the MTA applies its own limits (Postfix takes command lines up to its
/// `line_length_limit`, 2048 by default, and SASL responses up to `smtpd_sasl_response_limit`,
/// 12288), so the proxy must refuse nothing the MTA would take.
pub const MAX_RELAYED_LINE: usize = 12288 + 2;

/// The result of looking for one line at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineScan {
    /// A line of `len` bytes including its terminator (CRLF, or a bare LF as Postfix accepts);
    /// `content` bytes before the terminator.
    Line { len: usize, content: usize },
    /// No terminator yet: read more.
    NeedMore,
    /// More than `max` bytes without a terminator.
    TooLong,
}

/// Finds the first line in `buf`.
pub fn scan_line(buf: &[u8], max: usize) -> LineScan {
    match buf.iter().take(max).position(|b| *b == b'\n') {
        Some(lf) => {
            let content = if lf > 0 && buf[lf - 1] == b'\r' { lf - 1 } else { lf };
            LineScan::Line { len: lf + 1, content }
        }
        None if buf.len() >= max => LineScan::TooLong,
        None => LineScan::NeedMore,
    }
}

/// A client command, as far as the proxy cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmtpCommand {
    Helo(String),
    Ehlo(String),
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    StartTls,
    Auth,
    Vrfy,
    Help,
    /// Any other verb (upper-cased), or an empty line.
    Other(String),
}

/// The chunk size of a `BDAT` command line (without its terminator) as Postfix parses it:
/// `BDAT <digits> [LAST]`, nothing else (RFC 3030). `None`: malformed, and Postfix hangs up
/// (`521 5.5.4 Syntax: BDAT count [LAST]`).
pub fn bdat_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split([' ', '\t']).filter(|w| !w.is_empty());
    let (verb, size) = (words.next()?, words.next()?);
    let last = words.next();
    if !verb.eq_ignore_ascii_case("BDAT")
        || words.next().is_some()
        || last.is_some_and(|l| !l.eq_ignore_ascii_case("LAST"))
        || size.is_empty()
        || !size.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    size.parse().ok()
}

impl SmtpCommand {
    /// Parses one command line (without its terminator). Verbs are case-insensitive; the HELO
    /// argument is what follows the verb and its spaces, lossily decoded (invalid UTF-8 becomes
    /// U+FFFD, which the rules then see as a character no host name has).
    pub fn parse(line: &[u8]) -> SmtpCommand {
        let verb_end = line.iter().position(|b| *b == b' ' || *b == b'\t').unwrap_or(line.len());
        let verb = String::from_utf8_lossy(&line[..verb_end]).to_ascii_uppercase();
        let argument = || {
            let rest = &line[verb_end..];
            let start = rest.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[start..]).trim_end().to_owned()
        };
        match verb.as_str() {
            "HELO" => SmtpCommand::Helo(argument()),
            "EHLO" => SmtpCommand::Ehlo(argument()),
            "MAIL" => SmtpCommand::Mail,
            "RCPT" => SmtpCommand::Rcpt,
            "DATA" => SmtpCommand::Data,
            "BDAT" => SmtpCommand::Bdat,
            "RSET" => SmtpCommand::Rset,
            "NOOP" => SmtpCommand::Noop,
            "QUIT" => SmtpCommand::Quit,
            "STARTTLS" => SmtpCommand::StartTls,
            "AUTH" => SmtpCommand::Auth,
            "VRFY" | "EXPN" => SmtpCommand::Vrfy,
            "HELP" => SmtpCommand::Help,
            _ => SmtpCommand::Other(verb),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` split at `split`, and collects the lines a reader would see.
    fn lines_split_at(input: &[u8], split: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        for chunk in [&input[..split], &input[split..]] {
            buf.extend_from_slice(chunk);
            while let LineScan::Line { len, content } = scan_line(&buf, MAX_COMMAND_LINE) {
                lines.push(buf[..content].to_vec());
                buf.drain(..len);
            }
        }
        (lines, buf)
    }

    #[test]
    fn lines_are_the_same_whatever_the_split_point() {
        let input = b"EHLO a.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\nDATA\r\npartial";
        let expected: Vec<Vec<u8>> = vec![
            b"EHLO a.example".to_vec(),
            b"MAIL FROM:<a@b>".to_vec(),
            b"RCPT TO:<c@d>".to_vec(),
            b"DATA".to_vec(),
        ];
        for split in 0..=input.len() {
            let (lines, rest) = lines_split_at(input, split);
            assert_eq!(lines, expected, "split at {split}");
            assert_eq!(rest, b"partial", "split at {split}");
        }
    }

    #[test]
    fn smuggling_shapes_are_not_lines_of_their_own() {
        // A bare CR is content, not a terminator; `\n.\r\n` is a bare-LF line then ".".
        assert_eq!(scan_line(b"NOOP\rQUIT\r\n", 100), LineScan::Line { len: 11, content: 9 });
        assert_eq!(scan_line(b"\r.\r\n", 100), LineScan::Line { len: 4, content: 2 });
        assert_eq!(scan_line(b"\n.\r\n", 100), LineScan::Line { len: 1, content: 0 });
        assert_eq!(scan_line(b"\r\n", 100), LineScan::Line { len: 2, content: 0 });
        assert_eq!(scan_line(b"\r", 100), LineScan::NeedMore);
    }

    #[test]
    fn over_long_lines_are_refused_at_the_limit() {
        let long = vec![b'a'; MAX_COMMAND_LINE];
        assert_eq!(scan_line(&long, MAX_COMMAND_LINE), LineScan::TooLong);
        assert_eq!(scan_line(&long[..MAX_COMMAND_LINE - 1], MAX_COMMAND_LINE), LineScan::NeedMore);
        let mut fits = vec![b'a'; MAX_COMMAND_LINE - 2];
        fits.extend_from_slice(b"\r\n");
        assert_eq!(
            scan_line(&fits, MAX_COMMAND_LINE),
            LineScan::Line { len: MAX_COMMAND_LINE, content: MAX_COMMAND_LINE - 2 }
        );
        let mut past = vec![b'a'; MAX_COMMAND_LINE];
        past.extend_from_slice(b"\r\n");
        assert_eq!(scan_line(&past, MAX_COMMAND_LINE), LineScan::TooLong);
    }

    #[test]
    fn bdat_sizes_parse_as_postfix_parses_them() {
        assert_eq!(bdat_size(b"BDAT 5"), Some(5));
        assert_eq!(bdat_size(b"bdat 0 last"), Some(0));
        assert_eq!(bdat_size(b"BDAT  1048576\tLAST"), Some(1_048_576));
        for bad in
            [&b"BDAT"[..], b"BDAT x", b"BDAT -1", b"BDAT +5", b"BDAT 5 FIRST", b"BDAT 5 LAST x"]
        {
            assert_eq!(bdat_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(bdat_size(b"BDAT 99999999999999999999999"), None, "past u64");
    }

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(
            SmtpCommand::parse(b"EHLO mail.example.com"),
            SmtpCommand::Ehlo("mail.example.com".into())
        );
        assert_eq!(
            SmtpCommand::parse(b"helo   Mail.Example.com  "),
            SmtpCommand::Helo("Mail.Example.com".into())
        );
        assert_eq!(
            SmtpCommand::parse(b"HeLo\t[192.0.2.1]"),
            SmtpCommand::Helo("[192.0.2.1]".into())
        );
        assert_eq!(SmtpCommand::parse(b"HELO"), SmtpCommand::Helo(String::new()));
        assert_eq!(SmtpCommand::parse(b"mail FROM:<a@b>"), SmtpCommand::Mail);
        assert_eq!(SmtpCommand::parse(b"RCPT TO:<x@y>"), SmtpCommand::Rcpt);
        assert_eq!(SmtpCommand::parse(b"StartTLS"), SmtpCommand::StartTls);
        assert_eq!(SmtpCommand::parse(b"EXPN list"), SmtpCommand::Vrfy);
        assert_eq!(SmtpCommand::parse(b""), SmtpCommand::Other(String::new()));
        assert_eq!(SmtpCommand::parse(b"GET / HTTP/1.1"), SmtpCommand::Other("GET".into()));
        assert_eq!(
            SmtpCommand::parse(b"HELO bad\xffname"),
            SmtpCommand::Helo("bad\u{fffd}name".into())
        );
    }
}
