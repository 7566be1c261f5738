//! Postfix's SMTPD policy delegation protocol (SMTPD_POLICY_README), sans-IO: `name=value`
//! lines, an empty line ends a request; the answer is `action=...` and an empty line. Postfix
//! keeps a connection open and sends one request at a time on it.
//!
//! The parser owns its buffer: the I/O loop reads into [`Parser::input`] and asks
//! [`Parser::next_request`] until it says "need more". Everything is bounded: a line, the
//! attributes of one request, the bytes of one request. A line without `=`, an over-long line
//! or request, or bytes that are not text end the connection with the reason; unknown
//! attributes are ignored, as Postfix's own policy servers do.

use std::net::IpAddr;

/// Longest `name=value` line taken (Postfix's attribute values are short; a HELO is at most a
/// 1000-byte command line).
pub const MAX_LINE: usize = 2048;
/// Most attributes in one request (Postfix 3.7 sends about 30).
pub const MAX_ATTRIBUTES: usize = 128;
/// Most bytes in one request.
pub const MAX_REQUEST: usize = 32 * 1024;

/// What the judge needs of one request; the rest is ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// `request=smtpd_access_policy` (other request types are answered DUNNO).
    pub request: Option<String>,
    pub protocol_state: Option<String>,
    /// `SMTP` or `ESMTP`.
    pub protocol_name: Option<String>,
    /// The HELO/EHLO argument; absent (or empty) before the client sent one.
    pub helo_name: Option<String>,
    pub client_address: Option<IpAddr>,
    /// The client's TCP port (Postfix 3.0 and later): with the address, one SMTP session.
    pub client_port: Option<u16>,
    /// Ties the requests of one mail transaction together (Postfix sets it at MAIL FROM, so
    /// it is empty at HELO and changes with each transaction of a session).
    pub instance: Option<String>,
    /// Kept for the DNS checks.
    pub client_name: Option<String>,
    pub reverse_client_name: Option<String>,
}

/// Why a connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("line {line} is not name=value")]
    NotAttribute { line: usize },
    #[error("a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("a request of more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes,
    #[error("a request longer than {MAX_REQUEST} bytes")]
    RequestTooLong,
    #[error("line {line} is not UTF-8 text")]
    NotText { line: usize },
    #[error("client_address {value:?} is not an IP address")]
    BadAddress { value: String },
}

/// Reads requests from a byte stream.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    /// Bytes of the buffer already scanned into `current`.
    scanned: usize,
    current: Request,
    attributes: usize,
    lines: usize,
}

impl Parser {
    /// Where the I/O loop reads to (it reserves room first).
    pub fn input(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The next complete request; `Ok(None)`: read more.
    pub fn next_request(&mut self) -> Result<Option<Request>, ProtocolError> {
        loop {
            let rest = &self.buf[self.scanned..];
            let Some(lf) = rest.iter().take(MAX_LINE + 1).position(|b| *b == b'\n') else {
                if rest.len() > MAX_LINE {
                    return Err(ProtocolError::LineTooLong);
                }
                if self.buf.len() > MAX_REQUEST {
                    return Err(ProtocolError::RequestTooLong);
                }
                return Ok(None);
            };
            let end = self.scanned + lf;
            self.lines += 1;
            let line = &self.buf[self.scanned..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            self.scanned = end + 1;
            if self.scanned > MAX_REQUEST {
                return Err(ProtocolError::RequestTooLong);
            }
            if line.is_empty() {
                let request = std::mem::take(&mut self.current);
                self.buf.drain(..self.scanned);
                self.scanned = 0;
                self.attributes = 0;
                return Ok(Some(request));
            }
            let text = std::str::from_utf8(line)
                .map_err(|_| ProtocolError::NotText { line: self.lines })?;
            let (name, value) =
                text.split_once('=').ok_or(ProtocolError::NotAttribute { line: self.lines })?;
            self.attributes += 1;
            if self.attributes > MAX_ATTRIBUTES {
                return Err(ProtocolError::TooManyAttributes);
            }
            set(&mut self.current, name, value)?;
        }
    }
}

/// Keeps one attribute if the judge needs it.
fn set(request: &mut Request, name: &str, value: &str) -> Result<(), ProtocolError> {
    let slot = match name {
        "request" => &mut request.request,
        "protocol_state" => &mut request.protocol_state,
        "protocol_name" => &mut request.protocol_name,
        "helo_name" => &mut request.helo_name,
        "instance" => &mut request.instance,
        "client_name" => &mut request.client_name,
        "reverse_client_name" => &mut request.reverse_client_name,
        // Postfix sends an empty value for an unknown address (a local submission).
        "client_address" if value.is_empty() => return Ok(()),
        // A port that is not a number is as good as none: the session is then told apart by
        // address and instance.
        "client_port" => {
            request.client_port = value.parse().ok();
            return Ok(());
        }
        "client_address" => {
            let address = value
                .parse::<IpAddr>()
                .map_err(|_| ProtocolError::BadAddress { value: value.to_owned() })?;
            request.client_address = Some(address);
            return Ok(());
        }
        _ => return Ok(()),
    };
    *slot = Some(value.to_owned());
    Ok(())
}

/// An answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// No opinion: Postfix goes on with its other restrictions.
    Dunno,
    /// Refuse with this SMTP reply (`553 5.7.1 text`, an entry's own `450 text`).
    Refuse { code: u16, text: String },
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Answer::Dunno => b"action=DUNNO\n\n".to_vec(),
            Answer::Refuse { code, text } => {
                // A line break in the text would end the answer early: never sent.
                let text: String = text.chars().filter(|c| !c.is_control()).collect();
                format!("action={code} {text}\n\n").into_bytes()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\n\
        protocol_name=ESMTP\nclient_address=198.51.100.3\nclient_port=40123\nclient_name=unknown\n\
        reverse_client_name=unknown\nhelo_name=mx.example.com\nsender=a@b.example\n\
        recipient=user@example.com\ninstance=1a2b.5f3c4d.0\nsize=0\n\n";

    fn expected() -> Request {
        Request {
            request: Some("smtpd_access_policy".into()),
            protocol_state: Some("RCPT".into()),
            protocol_name: Some("ESMTP".into()),
            helo_name: Some("mx.example.com".into()),
            client_address: Some("198.51.100.3".parse().unwrap()),
            client_port: Some(40123),
            instance: Some("1a2b.5f3c4d.0".into()),
            client_name: Some("unknown".into()),
            reverse_client_name: Some("unknown".into()),
        }
    }

    #[test]
    fn a_request_is_the_same_whatever_the_split_point() {
        for split in 0..=REQUEST.len() {
            let mut parser = Parser::default();
            parser.input().extend_from_slice(&REQUEST[..split]);
            let first = parser.next_request().unwrap();
            parser.input().extend_from_slice(&REQUEST[split..]);
            let request = match first {
                Some(request) => request,
                None => parser.next_request().unwrap().expect("complete"),
            };
            assert_eq!(request, expected(), "split at {split}");
            assert_eq!(parser.next_request().unwrap(), None);
        }
    }

    #[test]
    fn requests_follow_one_another_on_a_connection() {
        let mut parser = Parser::default();
        for _ in 0..3 {
            parser.input().extend_from_slice(REQUEST);
        }
        for _ in 0..3 {
            assert_eq!(parser.next_request().unwrap(), Some(expected()));
        }
        assert_eq!(parser.next_request().unwrap(), None);
    }

    #[test]
    fn no_helo_yet_and_unknown_attributes() {
        let mut parser = Parser::default();
        parser.input().extend_from_slice(b"request=smtpd_access_policy\nfuture_thing=1\n\n");
        let request = parser.next_request().unwrap().unwrap();
        assert_eq!(request.helo_name, None);
        assert_eq!(request.request.as_deref(), Some("smtpd_access_policy"));
    }

    #[test]
    fn garbage_and_oversize_close_the_connection() {
        let cases: [(&[u8], ProtocolError); 4] = [
            (b"GET / HTTP/1.0\r\n", ProtocolError::NotAttribute { line: 1 }),
            (b"helo_name=\xff\n", ProtocolError::NotText { line: 1 }),
            (b"client_address=nonsense\n", ProtocolError::BadAddress { value: "nonsense".into() }),
            (&[b'a'; MAX_LINE + 2], ProtocolError::LineTooLong),
        ];
        for (input, error) in cases {
            let mut parser = Parser::default();
            parser.input().extend_from_slice(input);
            assert_eq!(parser.next_request(), Err(error));
        }
        let mut parser = Parser::default();
        for i in 0..=MAX_ATTRIBUTES {
            parser.input().extend_from_slice(format!("x{i}=1\n").as_bytes());
        }
        assert_eq!(parser.next_request(), Err(ProtocolError::TooManyAttributes));
        let mut parser = Parser::default();
        let line = format!("x={}\n", "v".repeat(MAX_LINE - 10));
        while parser.input().len() <= MAX_REQUEST {
            parser.input().extend_from_slice(line.as_bytes());
        }
        assert!(matches!(
            parser.next_request(),
            Err(ProtocolError::RequestTooLong | ProtocolError::TooManyAttributes)
        ));
    }

    #[test]
    fn answers_are_one_action_and_an_empty_line() {
        assert_eq!(Answer::Dunno.encode(), b"action=DUNNO\n\n");
        let refuse = Answer::Refuse { code: 553, text: "5.7.1 sorry\r\nX".into() };
        assert_eq!(refuse.encode(), b"action=553 5.7.1 sorryX\n\n");
    }
}
