//! JSON Lines, Nexmark's interchange format (`dirigo gen` writes it, the file source
//! reads it): one event object per line. Writing reuses one buffer. `EventReader`
//! reads a `BufRead` line by line through the same parser as the file source
//! (`parse::parse_event`), reusing one line buffer; it is for tests and tools that
//! read a file back in one thread. Errors name the 1-based line number and what
//! was wrong.

use std::fmt;
use std::io::{self, BufRead, Write};

use super::event::Event;

/// Appends `event` as one JSON line (with its trailing `'\n'`) to `out`.
pub fn write_json_line(event: &Event, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail, and an Event has only integers and strings,
    // whose serialization cannot fail either; the match keeps that explicit.
    match serde_json::to_writer(&mut *out, event) {
        Ok(()) => out.push(b'\n'),
        Err(e) => unreachable!("serializing an Event into memory failed: {e}"),
    }
}

/// Writes events as JSON Lines to `W`, one `write` call per event (wrap files and
/// sockets in a `BufWriter`).
pub struct EventWriter<W: Write> {
    inner: W,
    line: Vec<u8>,
}

impl<W: Write> EventWriter<W> {
    pub fn new(inner: W) -> Self {
        EventWriter {
            inner,
            line: Vec::with_capacity(1024),
        }
    }

    pub fn write(&mut self, event: &Event) -> io::Result<()> {
        self.line.clear();
        write_json_line(event, &mut self.line);
        self.inner.write_all(&self.line)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// What went wrong on a line.
#[derive(Debug)]
pub enum ParseErrorKind {
    /// Reading failed; the reader stops after reporting it.
    Io(io::Error),
    /// The line is not a valid event: bad JSON, a wrong type, an unknown `"type"`, a
    /// missing or unexpected field, an out-of-range number...
    Invalid { message: String },
}

/// An error reading JSON Lines: `line 17: missing field `price``.
#[derive(Debug)]
pub struct ParseError {
    /// 1-based line number.
    pub line: u64,
    pub kind: ParseErrorKind,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ParseErrorKind::Io(e) => write!(f, "line {}: read error: {e}", self.line),
            ParseErrorKind::Invalid { message, .. } => write!(f, "line {}: {message}", self.line),
        }
    }
}

impl std::error::Error for ParseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ParseErrorKind::Io(e) => Some(e),
            ParseErrorKind::Invalid { .. } => None,
        }
    }
}

/// Reads events from JSON Lines. Blank lines (anywhere, e.g. at the end) are ignored.
/// Yields `Err` for a malformed line and goes on with the next one, unless
/// `skip_malformed` is set, in which case such lines are counted ([`Self::skipped`])
/// and passed over. After an I/O error, the iterator ends.
pub struct EventReader<R: BufRead> {
    reader: R,
    interner: crate::parse::Interner,
    line: Vec<u8>,
    line_number: u64,
    skip_malformed: bool,
    skipped: u64,
    failed: bool,
}

impl<R: BufRead> EventReader<R> {
    pub fn new(reader: R) -> Self {
        EventReader {
            reader,
            interner: crate::parse::Interner::default(),
            line: Vec::with_capacity(1024),
            line_number: 0,
            skip_malformed: false,
            skipped: 0,
            failed: false,
        }
    }

    /// Skip (and count) malformed lines instead of yielding errors for them.
    pub fn skip_malformed(mut self, skip: bool) -> Self {
        self.skip_malformed = skip;
        self
    }

    /// Malformed lines skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// 1-based number of the last line read (0 before the first).
    pub fn line_number(&self) -> u64 {
        self.line_number
    }
}

impl<R: BufRead> Iterator for EventReader<R> {
    type Item = Result<Event, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            self.line.clear();
            match self.reader.read_until(b'\n', &mut self.line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(ParseError {
                        line: self.line_number + 1,
                        kind: ParseErrorKind::Io(e),
                    }));
                }
            }
            self.line_number += 1;
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match crate::parse::parse_event(&mut self.interner, line) {
                Ok(event) => return Some(Ok(event)),
                Err(_) if self.skip_malformed => self.skipped += 1,
                Err(message) => {
                    let kind = ParseErrorKind::Invalid { message };
                    let line = self.line_number;
                    return Some(Err(ParseError { line, kind }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{Generator, GeneratorConfig};

    #[test]
    fn nexmark_json_round_trip() {
        for (seed, rate) in [(0, 10_000_000), (7, 1000), (99, 1)] {
            let g = Generator::new(GeneratorConfig {
                seed,
                rate: dirigo_engine::dataflow::RateSchedule::constant(rate),
                ..GeneratorConfig::default()
            })
            .unwrap();
            let mut events = Vec::new();
            g.fill(0..20_000, &mut events);
            let mut writer = EventWriter::new(Vec::new());
            for e in &events {
                writer.write(e).unwrap();
            }
            let text = writer.into_inner();
            assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), events.len());
            let back: Vec<Event> = EventReader::new(&text[..]).map(Result::unwrap).collect();
            assert_eq!(back, events);
        }
    }

    #[test]
    fn nexmark_json_line_sizes_are_about_as_documented() {
        let g = Generator::new(GeneratorConfig::default()).unwrap();
        let mut events = Vec::new();
        g.fill(0..50_000, &mut events);
        let mut sums = std::collections::HashMap::<&str, (usize, usize)>::new();
        let mut line = Vec::new();
        for e in &events {
            line.clear();
            write_json_line(e, &mut line);
            let s = sums.entry(e.kind_name()).or_default();
            s.0 += line.len();
            s.1 += 1;
        }
        for (kind, (bytes, n)) in sums {
            println!("nexmark json: average {kind} line {} bytes", bytes / n);
        }
    }

    const BID: &str = r#"{"type":"bid","auction":1000,"bidder":1001,"price":5,"channel":"Apple","url":"u","date_time":1,"extra":""}"#;

    #[test]
    fn nexmark_json_malformed_lines_name_line_and_problem() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"type":"bid","auction":1000,"bidder":10"#,
                "EOF while parsing",
            ),
            (
                r#"{"type":"bid","auction":1000,"bidder":1001,"price":"5","channel":"Apple","url":"u","date_time":1,"extra":""}"#,
                "invalid type: string \"5\", expected u64",
            ),
            (
                r#"{"type":"sale","auction":1000}"#,
                "unknown type `sale`, expected one of `person`, `auction`, `bid`",
            ),
            (
                r#"{"type":"bid","auction":1000,"bidder":1001,"channel":"Apple","url":"u","date_time":1,"extra":""}"#,
                "missing field `price`",
            ),
            (
                r#"{"type":"person","id":-3,"name":"n","email_address":"e","credit_card":"c","city":"c","state":"OR","date_time":1,"extra":""}"#,
                "invalid value: integer `-3`, expected u64",
            ),
            (r#"{"auction":1000}"#, "missing field `type`"),
            (r#"{"type":"bid","colour":"red"}"#, "unknown field `colour`"),
            (r#"[1,2]"#, "invalid type"),
            (&format!("{BID} x"), "trailing characters"),
            (
                r#"{"type":"bid","type":"bid","auction":1000}"#,
                "duplicate field `type`",
            ),
        ];
        for (bad, want) in cases {
            // Line 1 is good, line 2 is blank, line 3 is the bad one, line 4 good.
            let input = format!("{BID}\n\n{bad}\n{BID}\n\n");
            let results: Vec<_> = EventReader::new(input.as_bytes()).collect();
            assert_eq!(results.len(), 3, "{bad}");
            assert!(results[0].is_ok() && results[2].is_ok());
            let err = results[1].as_ref().unwrap_err();
            assert_eq!(err.line, 3);
            let shown = err.to_string();
            assert!(shown.starts_with("line 3: "), "{shown}");
            assert!(
                shown.contains(want),
                "{bad}\n  gave: {shown}\n  want: {want}"
            );

            let mut reader = EventReader::new(input.as_bytes()).skip_malformed(true);
            assert_eq!(reader.by_ref().map(Result::unwrap).count(), 2);
            assert_eq!(reader.skipped(), 1);
        }
    }

    #[test]
    fn nexmark_json_io_error_ends_reading() {
        struct Failing;
        impl io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let results: Vec<_> = EventReader::new(io::BufReader::new(Failing)).collect();
        assert_eq!(results.len(), 1);
        let err = results[0].as_ref().unwrap_err();
        assert_eq!(err.to_string(), "line 1: read error: disk on fire");
        assert!(std::error::Error::source(err).is_some());
    }

    #[test]
    fn nexmark_json_accepts_crlf_and_escapes() {
        let line = r#"{"type":"bid","auction":1000,"bidder":1001,"price":5,"channel":"A\"pple\u00e9","url":"u","date_time":-1,"extra":""}"#;
        let input = format!("{line}\r\n");
        let events: Vec<Event> = EventReader::new(input.as_bytes())
            .map(Result::unwrap)
            .collect();
        match &events[..] {
            [Event::Bid(b)] => {
                assert_eq!(b.channel, "A\"pple\u{e9}");
                assert_eq!(b.date_time, -1);
            }
            other => panic!("{other:?}"),
        }
    }
}
