//! Human durations for TTLs and timeouts: `30s`, `10m`, `1h`, `2d`, `1w`, and sums such as
//! `1h30m`. A bare number is refused (seconds or minutes? nobody should have to guess).

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration: give a number with a unit, for example 30s, 10m, 1h or 2d")]
    Empty,
    #[error(
        "duration {input:?} has a number without a unit: write it as {input}s, {input}m, {input}h or {input}d"
    )]
    MissingUnit { input: String },
    #[error("duration {input:?} has unknown unit {unit:?}: use s, m, h, d or w (for example 10m)")]
    UnknownUnit { input: String, unit: String },
    #[error("duration {input:?} is not of the form 30s, 10m, 1h, 2d or 1h30m")]
    Malformed { input: String },
    #[error("duration {input:?} is too long")]
    Overflow { input: String },
}

/// Parses `30s`, `10m`, `1h`, `2d`, `1w`, `1h30m`. Whitespace around the whole is ignored.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DurationError::MissingUnit { input: text.to_owned() });
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed { input: text.to_owned() });
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Overflow { input: text.to_owned() })?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let seconds = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            "" => return Err(DurationError::Malformed { input: text.to_owned() }),
            other => {
                return Err(DurationError::UnknownUnit {
                    input: text.to_owned(),
                    unit: other.to_owned(),
                });
            }
        };
        total = number
            .checked_mul(seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| DurationError::Overflow { input: text.to_owned() })?;
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way `parse` reads it, largest units first: `1h30m`, `45s`, `2d3h`.
/// Sub-second remainders are rounded up so that a live ban never shows as `0s`.
pub fn format(duration: Duration) -> String {
    let mut secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_units() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse(" 5s "), Ok(Duration::from_secs(5)));
    }

    #[test]
    fn parses_sums() {
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("1d2h3m4s"), Ok(Duration::from_secs(93_784)));
    }

    #[test]
    fn refuses_bad_input_with_the_reason() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert!(matches!(parse("30"), Err(DurationError::MissingUnit { .. })));
        assert!(matches!(parse("3y"), Err(DurationError::UnknownUnit { unit, .. }) if unit == "y"));
        assert!(matches!(parse("h"), Err(DurationError::Malformed { .. })));
        assert!(matches!(parse("1h30"), Err(DurationError::Malformed { .. })));
        assert!(matches!(parse("-1h"), Err(DurationError::Malformed { .. })));
        assert!(matches!(parse("99999999999999999999s"), Err(DurationError::Overflow { .. })));
        assert!(matches!(parse("9999999999999999w"), Err(DurationError::Overflow { .. })));
        let message = parse("30").unwrap_err().to_string();
        assert!(message.contains("30s"), "{message}");
    }

    #[test]
    fn formats_round_trip() {
        for text in ["45s", "1h30m", "2d3h", "1d2h3m4s", "10m"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(format(Duration::from_millis(1)), "1s");
        assert_eq!(format(Duration::ZERO), "0s");
    }
}
