//! The parallel JSON Lines file source: one byte range of the file per source
//! partition, read by `storage::read` on a thread of its own, parsed here by
//! `parse` (sonic-rs into a flat struct), never blocking the shard it runs on.
//!
//! # Split
//!
//! [`FileSplit::plan`] takes the file's length once; partition `p` of `n` owns
//! the lines that *start* in `[len * p / n, len * (p + 1) / n)`. A line starts at
//! byte 0 or right after a `'\n'`, so partition `p > 0` reads from one byte
//! before its start and skips through the first `'\n'` it sees; it stops at the
//! first line that starts at or past its end, reading on past the end to finish
//! the line it is in. Every line is read by exactly one partition, whatever the
//! split points. Empty lines (also `"\r"` alone) are passed over; a `"\r\n"` end
//! and a last line without one are fine.
//!
//! # Line numbers and time
//!
//! A partition counts the line ends it consumes; the line ends before its first
//! byte are counted only if an error needs an absolute line number (by a
//! `storage::read::count_newlines` thread; the source answers `Pending` until
//! then). A partition's watermark is the latest `date_time` it has read. Events
//! must come in time order (as `dirigo gen` writes them): an event earlier than
//! the watermark, one more than `max_time_jump_ms` ahead of it, or a time outside
//! ±2^53 ms (`parse::TIME_ABS_MAX_MS`) is bad input, like a malformed line or one
//! longer than `max_line_bytes` (which is never buffered whole). Bad input fails
//! the source with the path and line, or, with `skip_malformed`, is counted and
//! passed over.
//!
//! # Replay
//!
//! A partition resumes by byte offset ([`Source::position`], [`Source::seek`]):
//! the position is the start of the line after the last one whose events were
//! all handed out, with what the checks carry from line to line (the line count
//! since `read_from`, the watermark, whether the first lines have settled, the
//! skipped count). Lines held back (a range's first lines, not yet settled) are
//! not behind the position: a resumed source reads them again, and counts again
//! any line it skipped among them. At the end of the range the position says
//! so; after a failure it holds the error, which a resumed source reports again.
//! The format is [`Position`]'s.
//!
//! # Bounds
//!
//! Per partition: `read.buffers x read.buffer_bytes` of read buffers (the reader
//! thread reads at most that far ahead), one carried line of at most
//! `max_line_bytes`, and the interner (bounded process-wide).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use dirigo_engine::dataflow::{Source, SourceBatch};
use dirigo_storage::read::{self, Chunk, RangeReader, ReadConfig};

use crate::parse::{parse_event, Interner, TIME_ABS_MAX_MS};
use crate::Event;

/// How a file source reads and what it accepts.
#[derive(Clone, Copy, Debug)]
pub struct FileOptions {
    /// Skip (and count) bad lines instead of failing.
    pub skip_malformed: bool,
    /// Longest line accepted, in bytes without its line end.
    pub max_line_bytes: usize,
    /// How far an event's `date_time` may be ahead of the partition's watermark.
    pub max_time_jump_ms: i64,
    /// Read buffers per partition.
    pub read: ReadConfig,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            skip_malformed: false,
            max_line_bytes: 1 << 20,
            max_time_jump_ms: 24 * 3600 * 1000,
            read: ReadConfig::default(),
        }
    }
}

/// A file planned once and split into one byte range per partition.
#[derive(Clone, Debug)]
pub struct FileSplit {
    path: Arc<PathBuf>,
    len: u64,
    partitions: u32,
    options: FileOptions,
}

impl FileSplit {
    /// Takes the file's length now; the file must not shrink while it is read.
    pub fn plan(path: &Path, partitions: u32, options: FileOptions) -> Result<FileSplit, String> {
        assert!(partitions >= 1, "a file split needs a partition");
        Ok(FileSplit {
            path: Arc::new(path.to_path_buf()),
            len: read::file_len(path)?,
            partitions,
            options,
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Bytes of the file, as planned.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// Partition `p` owns the lines that start in this range.
    pub fn range(&self, partition: u32) -> Range<u64> {
        let at = |p: u32| (self.len as u128 * p as u128 / self.partitions as u128) as u64;
        at(partition)..at(partition + 1)
    }

    /// The source of one partition. Failing to start the reader thread shows up
    /// as the source's `Failed`.
    pub fn open(&self, partition: u32) -> FileSource {
        assert!(
            partition < self.partitions,
            "partition {partition} of {}",
            self.partitions
        );
        let range = self.range(partition);
        let read_from = range.start.saturating_sub(1);
        let mut source = FileSource {
            path: self.path.clone(),
            range: range.clone(),
            read_from,
            file_len: self.len,
            options: self.options,
            reader: None,
            chunk: None,
            carry: Vec::new(),
            carry_start: 0,
            skip_to_line_end: range.start > 0,
            lines_consumed: 0,
            resume: Resume {
                offset: read_from,
                skip_to_line_end: range.start > 0,
                lines_consumed: 0,
                watermark_ms: i64::MIN,
                anchored: false,
                skipped: 0,
            },
            state: State::Reading,
            parse: LineState {
                interner: Interner::default(),
                watermark_ms: i64::MIN,
                skipped: 0,
                skip_malformed: self.options.skip_malformed,
                max_time_jump_ms: self.options.max_time_jump_ms,
                held: Vec::new(),
                anchored: false,
            },
        };
        if range.is_empty() {
            source.state = State::Done;
            return source;
        }
        source.start_reader(read_from);
        source
    }
}

/// One partition of a JSON Lines file (see the module header).
pub struct FileSource {
    path: Arc<PathBuf>,
    range: Range<u64>,
    /// Where the partition's reading starts (line numbers count from here).
    read_from: u64,
    /// The file's length, as planned: the reader reads on to it (the last line
    /// of a range may end past the range).
    file_len: u64,
    options: FileOptions,
    reader: Option<RangeReader>,
    /// The chunk being parsed: its offset, buffer, valid length and position.
    chunk: Option<OpenChunk>,
    /// The start of a line that continues in the next chunk.
    carry: Vec<u8>,
    carry_start: u64,
    /// Discarding bytes through the next `'\n'`: the partial line before a
    /// partition's first line, or the rest of a skipped over-long line.
    skip_to_line_end: bool,
    /// Line ends consumed since `read_from`.
    lines_consumed: u64,
    /// Where a resumed source would start: what `position` saves while reading.
    resume: Resume,
    state: State,
    parse: LineState,
}

/// A point a source can resume reading at, with the state the line checks had
/// there: the end of a line whose events (if any) were all handed out, with no
/// events held (or a partition's start).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Resume {
    /// A line start, or with `skip_to_line_end` the byte before a partition's
    /// first line (the partial line before it is skipped).
    offset: u64,
    skip_to_line_end: bool,
    lines_consumed: u64,
    watermark_ms: i64,
    anchored: bool,
    skipped: u64,
}

struct OpenChunk {
    offset: u64,
    bytes: Vec<u8>,
    len: usize,
    pos: usize,
}

enum State {
    Reading,
    Done,
    /// An error waits for the count of line ends before `read_from`.
    Counting {
        line_in_range: u64,
        message: String,
        count: Receiver<Result<u64, String>>,
    },
    Failed(String),
    /// `Failed` was returned once; it is returned again if asked.
    Reported(String),
}

struct LineState {
    interner: Interner,
    watermark_ms: i64,
    skipped: u64,
    skip_malformed: bool,
    max_time_jump_ms: i64,
    /// A partition's first events, held until they vouch for each other: the
    /// first line of a range has no earlier line to be checked against, so an
    /// outlier there (a time days ahead) would otherwise pass and then make every
    /// good line after it look wrong. At most 3: `(event, line in range)`.
    held: Vec<(Event, u64)>,
    /// The first events are settled; every later one is checked against the
    /// watermark.
    anchored: bool,
}

impl FileSource {
    /// Plans `path` for `partitions` and opens `partition`.
    pub fn open(
        path: &Path,
        partition: u32,
        partitions: u32,
        options: FileOptions,
    ) -> Result<FileSource, String> {
        Ok(FileSplit::plan(path, partitions, options)?.open(partition))
    }

    /// Starts the reader thread at `offset`; failing to shows up as `Failed`.
    fn start_reader(&mut self, offset: u64) {
        match RangeReader::spawn(&self.path, offset..self.file_len, self.options.read) {
            Ok(reader) => self.reader = Some(reader),
            Err(e) => self.state = State::Failed(e),
        }
    }

    /// The line that ends just before `offset` is done with. A resumed source
    /// may start at `offset` unless events are held (they were not handed out:
    /// it must read them again, from the mark before the first of them).
    fn mark_resume(&mut self, offset: u64) {
        if !self.parse.held.is_empty() {
            return;
        }
        self.resume = Resume {
            offset,
            skip_to_line_end: false,
            lines_consumed: self.lines_consumed,
            watermark_ms: self.parse.watermark_ms,
            anchored: self.parse.anchored,
            skipped: self.parse.skipped,
        };
    }

    /// Set once this partition's reader thread has exited (`None`: it had none).
    pub fn reader_stopped(&self) -> Option<Arc<AtomicBool>> {
        self.reader.as_ref().map(RangeReader::stopped)
    }

    fn stop_reading(&mut self) {
        self.reader = None;
        self.chunk = None;
        self.carry = Vec::new();
    }

    /// Fail now (partition 0 knows its line numbers) or once the line ends
    /// before this range are counted.
    fn fail_at(&mut self, line_in_range: u64, message: String) {
        self.stop_reading();
        self.state = if self.read_from == 0 {
            State::Failed(self.line_message(0, line_in_range, &message))
        } else {
            State::Counting {
                line_in_range,
                message,
                count: read::count_newlines(&self.path, self.read_from),
            }
        };
    }

    fn line_message(&self, lines_before: u64, line_in_range: u64, message: &str) -> String {
        format!(
            "{}: line {}: {message}",
            self.path.display(),
            lines_before + line_in_range + 1
        )
    }

    /// Parses lines from the chunks at hand until `out` has `max_records` more,
    /// the input ends, or no chunk is ready. (Up to 2 more: the line that settles
    /// a range's first events hands out all 3 at once.)
    fn fill(&mut self, max_records: usize, out: &mut Vec<Event>) {
        let target = out.len() + max_records;
        while out.len() < target && matches!(self.state, State::Reading) {
            let Some(chunk) = self.chunk.as_mut() else {
                if !self.next_chunk(out) {
                    return;
                }
                continue;
            };
            let rest = &chunk.bytes[chunk.pos..chunk.len];
            if rest.is_empty() {
                let done = self.chunk.take().expect("a chunk");
                if let Some(reader) = self.reader.as_mut() {
                    reader.recycle(done.bytes);
                }
                continue;
            }
            let newline = memchr::memchr(b'\n', rest);
            if self.skip_to_line_end {
                match newline {
                    Some(i) => {
                        chunk.pos += i + 1;
                        let next_line = chunk.offset + chunk.pos as u64;
                        self.lines_consumed += 1;
                        self.skip_to_line_end = false;
                        self.mark_resume(next_line);
                    }
                    None => chunk.pos = chunk.len,
                }
                continue;
            }
            let line_start = if self.carry.is_empty() {
                chunk.offset + chunk.pos as u64
            } else {
                self.carry_start
            };
            if line_start >= self.range.end {
                self.stop_reading();
                self.state = State::Done;
                if let Err((line, message)) = self.parse.settle(true, out) {
                    self.fail_at(line, message);
                }
                return;
            }
            let line_in_range = self.lines_consumed;
            let max = self.options.max_line_bytes;
            let Some(i) = newline else {
                // The line goes on in the next chunk: carry it, within the bound
                // (one byte more: it may be the `\r` of a CRLF, not the line's).
                if self.carry.len() + rest.len() > max.saturating_add(1) {
                    self.carry.clear();
                    chunk.pos = chunk.len;
                    self.too_long(line_in_range, out);
                } else {
                    if self.carry.is_empty() {
                        self.carry_start = line_start;
                    }
                    self.carry.extend_from_slice(rest);
                    chunk.pos = chunk.len;
                }
                continue;
            };
            chunk.pos += i + 1;
            let next_line = chunk.offset + chunk.pos as u64;
            self.lines_consumed += 1;
            let line = if self.carry.is_empty() {
                &rest[..i]
            } else {
                self.carry.extend_from_slice(&rest[..i]);
                &self.carry[..]
            };
            let result = if strip_cr(line).len() > max {
                self.parse.refuse(line_in_range, too_long_message(max), out)
            } else {
                self.parse.line(line, line_in_range, out)
            };
            self.carry.clear();
            match result {
                Ok(()) => self.mark_resume(next_line),
                Err((line, message)) => self.fail_at(line, message),
            }
        }
    }

    /// Takes the next chunk from the reader; false if none is ready or the
    /// input has ended (the state says which).
    fn next_chunk(&mut self, out: &mut Vec<Event>) -> bool {
        let Some(reader) = self.reader.as_mut() else {
            self.state = State::Done;
            if let Err((line, message)) = self.parse.settle(true, out) {
                self.fail_at(line, message);
            }
            return false;
        };
        match reader.try_next() {
            None => false,
            Some(Chunk::Data { offset, bytes, len }) => {
                self.chunk = Some(OpenChunk {
                    offset,
                    bytes,
                    len,
                    pos: 0,
                });
                true
            }
            Some(Chunk::End) => {
                self.end_of_file(out);
                false
            }
            Some(Chunk::Failed(message)) => {
                // What was read before the failure is handed out, as before a
                // bad line; the read error is what the source reports.
                let _ = self.parse.settle(true, out);
                self.stop_reading();
                self.state = State::Failed(message);
                false
            }
        }
    }

    /// The file ended: a last line without a line end is still a line.
    fn end_of_file(&mut self, out: &mut Vec<Event>) {
        let carry = std::mem::take(&mut self.carry);
        self.stop_reading();
        self.state = State::Done;
        let mut result = Ok(());
        if !carry.is_empty() && !self.skip_to_line_end {
            // It started in range: it was checked before it was carried.
            let max = self.options.max_line_bytes;
            let line = self.lines_consumed;
            result = if strip_cr(&carry).len() > max {
                self.parse.refuse(line, too_long_message(max), out)
            } else {
                self.parse.line(&carry, line, out)
            };
        }
        let result = result.and_then(|()| self.parse.settle(true, out));
        if let Err((line, message)) = result {
            self.fail_at(line, message);
        }
    }

    fn too_long(&mut self, line_in_range: u64, out: &mut Vec<Event>) {
        self.skip_to_line_end = true;
        let message = too_long_message(self.options.max_line_bytes);
        if let Err((line, message)) = self.parse.refuse(line_in_range, message, out) {
            self.fail_at(line, message);
        }
    }
}

/// A line without its `'\r'` (a CRLF line end is not part of the line).
fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn too_long_message(max: usize) -> String {
    format!("the line is longer than max_line_bytes ({max} bytes)")
}

/// A bad line, as `(line in range, what is wrong)`.
type BadLine = (u64, String);

impl LineState {
    /// Parses one line (its `'\n'` removed) and checks its time; the first
    /// events of the range wait in `held` until they are settled.
    fn line(
        &mut self,
        line: &[u8],
        line_in_range: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), BadLine> {
        let line = strip_cr(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let event = match parse_event(&mut self.interner, line) {
            Ok(event) => event,
            Err(message) => return self.refuse(line_in_range, message, out),
        };
        if self.anchored {
            return self.accept(event, line_in_range, out);
        }
        self.held.push((event, line_in_range));
        self.settle(false, out)
    }

    /// A bad line: counted under `skip_malformed`, else the error to fail with,
    /// after the held events of earlier lines are handed out (what came before
    /// a bad line is processed; the first held check that fails is the error).
    fn refuse(
        &mut self,
        line_in_range: u64,
        message: String,
        out: &mut Vec<Event>,
    ) -> Result<(), BadLine> {
        if self.skip_malformed {
            self.skipped += 1;
            return Ok(());
        }
        if let Some(bad) = self.ambiguous() {
            return Err(bad);
        }
        let held = std::mem::take(&mut self.held);
        for (event, line) in held.into_iter().filter(|(_, line)| *line < line_in_range) {
            self.accept(event, line, out)?;
        }
        Err((line_in_range, message))
    }

    /// Two held first lines that disagree, and no third to tell which is wrong:
    /// the error names both (the first's line), and neither is handed out.
    fn ambiguous(&mut self) -> Option<BadLine> {
        let [(first, first_line), (second, _)] = &self.held[..] else {
            return None;
        };
        let apart = first.date_time().abs_diff(second.date_time());
        if apart <= self.max_time_jump_ms.max(0) as u64 {
            return None;
        }
        let message = format!(
            "date_time {} and {} on the next line are more than max_time_jump_ms \
             ({} ms) apart, and no later line tells which is wrong",
            first.date_time(),
            second.date_time(),
            self.max_time_jump_ms
        );
        let line = *first_line;
        self.held.clear();
        Some((line, message))
    }

    /// Checks `event` against the watermark (in order, not too far ahead), then
    /// hands it out.
    fn accept(
        &mut self,
        event: Event,
        line_in_range: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), BadLine> {
        let time_ms = event.date_time();
        if self.watermark_ms != i64::MIN {
            if time_ms < self.watermark_ms {
                let message = format!(
                    "date_time {time_ms} is earlier than {} on an earlier line; \
                     the file source needs events in time order",
                    self.watermark_ms
                );
                return self.refuse(line_in_range, message, out);
            }
            if time_ms - self.watermark_ms > self.max_time_jump_ms {
                let message = format!(
                    "date_time {time_ms} is more than max_time_jump_ms ({} ms) ahead of {} on an earlier line",
                    self.max_time_jump_ms, self.watermark_ms
                );
                return self.refuse(line_in_range, message, out);
            }
        }
        self.watermark_ms = time_ms;
        out.push(event);
        Ok(())
    }

    /// Settles the held first events once they tell which of them is right
    /// (or, `at_end`, with what there is): two that agree (within
    /// `max_time_jump_ms`) anchor the range; if the first two disagree, a third
    /// decides, and a first line that only disagrees is the bad one. Then the
    /// held events go through the usual checks, in order.
    fn settle(&mut self, at_end: bool, out: &mut Vec<Event>) -> Result<(), BadLine> {
        let jump_ms = self.max_time_jump_ms.max(0) as u64;
        let agree = |a: &Event, b: &Event| a.date_time().abs_diff(b.date_time()) <= jump_ms;
        let held = &self.held;
        match held.len() {
            0 => return Ok(()),
            1 | 2 if !at_end && (held.len() == 1 || !agree(&held[0].0, &held[1].0)) => {
                return Ok(())
            }
            3 if agree(&held[1].0, &held[2].0) && !agree(&held[0].0, &held[2].0) => {
                let (first, line) = self.held.remove(0);
                self.anchored = true;
                let message = format!(
                    "date_time {} is more than max_time_jump_ms ({} ms) away from the lines after it",
                    first.date_time(),
                    self.max_time_jump_ms
                );
                if let Err(bad) = self.refuse(line, message, out) {
                    self.held.clear();
                    return Err(bad);
                }
            }
            2 if at_end && !self.skip_malformed => {
                if let Some(bad) = self.ambiguous() {
                    self.anchored = true;
                    return Err(bad);
                }
            }
            _ => {}
        }
        self.anchored = true;
        for (event, line) in std::mem::take(&mut self.held) {
            self.accept(event, line, out)?;
        }
        Ok(())
    }
}

impl Source<Event> for FileSource {
    fn next_batch(&mut self, max_records: usize, out: &mut Vec<Event>) -> SourceBatch {
        let before = out.len();
        self.fill(max_records, out);
        let produced = out.len() > before;
        let state = std::mem::replace(&mut self.state, State::Done);
        let (state, batch) = self.answer(state, produced);
        self.state = state;
        batch
    }

    fn skipped_records(&self) -> u64 {
        self.parse.skipped
    }

    fn position(&self) -> Option<Vec<u8>> {
        let at = match &self.state {
            State::Reading => At::Reading(self.resume),
            State::Done => At::Done,
            State::Counting {
                line_in_range,
                message,
                ..
            } => At::Counting(*line_in_range, message.clone()),
            State::Failed(text) | State::Reported(text) => At::Failed(text.clone()),
        };
        let skipped = match at {
            At::Reading(resume) => resume.skipped,
            _ => self.parse.skipped,
        };
        let position = Position {
            range: self.range.clone(),
            skipped,
            at,
        };
        Some(position.encode())
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), String> {
        let path = self.path.display();
        let position =
            Position::decode(position).map_err(|e| format!("{path}: file position: {e}"))?;
        if position.range != self.range {
            return Err(format!(
                "{path}: file position: saved for the lines that start in bytes {:?}, \
                 but this partition's are in {:?} (another partition, or the file changed)",
                position.range, self.range
            ));
        }
        if let At::Reading(resume) = position.at {
            if resume.offset < self.read_from || resume.offset > self.file_len {
                return Err(format!(
                    "{path}: file position: offset {} is outside bytes {}..{} this partition reads",
                    resume.offset, self.read_from, self.file_len
                ));
            }
            if resume.lines_consumed > resume.offset - self.read_from {
                return Err(format!(
                    "{path}: file position: {} line ends cannot come in the {} bytes from {} to offset {}",
                    resume.lines_consumed,
                    resume.offset - self.read_from,
                    self.read_from,
                    resume.offset
                ));
            }
            let watermark_ms = resume.watermark_ms;
            if watermark_ms != i64::MIN && watermark_ms.unsigned_abs() > TIME_ABS_MAX_MS as u64 {
                return Err(format!(
                    "{path}: file position: watermark {watermark_ms} is no event's time"
                ));
            }
        }
        if let At::Counting(line_in_range, _) = position.at {
            if line_in_range > self.file_len - self.read_from {
                return Err(format!(
                    "{path}: file position: line {line_in_range} of the range cannot be in the {} bytes from {}",
                    self.file_len - self.read_from,
                    self.read_from
                ));
            }
        }
        // Drops the reader `open` started (its read-ahead is lost, once).
        self.stop_reading();
        self.parse.held.clear();
        self.parse.skipped = position.skipped;
        match position.at {
            At::Reading(resume) => {
                self.resume = resume;
                self.skip_to_line_end = resume.skip_to_line_end;
                self.lines_consumed = resume.lines_consumed;
                self.parse.watermark_ms = resume.watermark_ms;
                self.parse.anchored = resume.anchored;
                self.state = State::Reading;
                self.start_reader(resume.offset);
            }
            At::Done => self.state = State::Done,
            At::Counting(line_in_range, message) => self.fail_at(line_in_range, message),
            At::Failed(text) => self.state = State::Failed(text),
        }
        Ok(())
    }
}

/// A file source's position, as [`Source::position`] saves it.
///
/// Version 1, little-endian: the version (u8), the kind (u8), the range's
/// start and end (u64 each: a position fits only the partition that saved it),
/// the skipped count (u64), then by kind:
/// - 0, reading: the offset to read from, the line ends from `read_from` to it
///   (u64 each), the watermark (i64), flags (u8: 1 skip to the first line end,
///   2 the first lines have settled). 51 bytes.
/// - 1, done: nothing more. 26 bytes.
/// - 2, failed at a line whose absolute number is still to be counted: the line
///   in range (u64), the message (UTF-8, the rest).
/// - 3, failed: the error (UTF-8, the rest).
#[derive(Debug, PartialEq)]
struct Position {
    range: Range<u64>,
    skipped: u64,
    at: At,
}

#[derive(Debug, PartialEq)]
enum At {
    Reading(Resume),
    Done,
    Counting(u64, String),
    Failed(String),
}

const POSITION_VERSION: u8 = 1;
/// Version, kind, range, skipped.
const POSITION_HEAD_BYTES: usize = 1 + 1 + 8 + 8 + 8;
const POSITION_READING_BYTES: usize = POSITION_HEAD_BYTES + 8 + 8 + 8 + 1;
const SKIP_TO_LINE_END: u8 = 1;
const ANCHORED: u8 = 2;

impl Position {
    fn encode(&self) -> Vec<u8> {
        let kind = match self.at {
            At::Reading(_) => 0,
            At::Done => 1,
            At::Counting(..) => 2,
            At::Failed(_) => 3,
        };
        let mut bytes = Vec::with_capacity(POSITION_READING_BYTES);
        bytes.extend_from_slice(&[POSITION_VERSION, kind]);
        for field in [self.range.start, self.range.end, self.skipped] {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        match &self.at {
            At::Reading(resume) => {
                bytes.extend_from_slice(&resume.offset.to_le_bytes());
                bytes.extend_from_slice(&resume.lines_consumed.to_le_bytes());
                bytes.extend_from_slice(&resume.watermark_ms.to_le_bytes());
                let flags = if resume.skip_to_line_end {
                    SKIP_TO_LINE_END
                } else {
                    0
                } | if resume.anchored { ANCHORED } else { 0 };
                bytes.push(flags);
            }
            At::Done => {}
            At::Counting(line_in_range, message) => {
                bytes.extend_from_slice(&line_in_range.to_le_bytes());
                bytes.extend_from_slice(message.as_bytes());
            }
            At::Failed(text) => bytes.extend_from_slice(text.as_bytes()),
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Position, String> {
        if bytes.len() < POSITION_HEAD_BYTES {
            return Err(format!(
                "{} bytes, expected at least {POSITION_HEAD_BYTES} bytes",
                bytes.len()
            ));
        }
        if bytes[0] != POSITION_VERSION {
            return Err(format!(
                "version {}, expected version {POSITION_VERSION}",
                bytes[0]
            ));
        }
        // At 2 and 10 the range, at 18 the skipped count, at 26 the kind's fields
        // (lengths are checked before a field is read).
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let exactly = |kind: &str, want: usize| {
            if bytes.len() == want {
                Ok(())
            } else {
                Err(format!(
                    "{} bytes for a {kind} position, expected {want} bytes",
                    bytes.len()
                ))
            }
        };
        let text = |at: usize| {
            String::from_utf8(bytes[at..].to_vec())
                .map_err(|e| format!("the error at byte {at} is not UTF-8: {e}"))
        };
        let at = match bytes[1] {
            0 => {
                exactly("reading", POSITION_READING_BYTES)?;
                let flags = bytes[POSITION_READING_BYTES - 1];
                if flags & !(SKIP_TO_LINE_END | ANCHORED) != 0 {
                    return Err(format!("flags {flags:#04x}, expected only bits 0x03"));
                }
                At::Reading(Resume {
                    offset: u64_at(26),
                    lines_consumed: u64_at(34),
                    watermark_ms: u64_at(42) as i64,
                    skip_to_line_end: flags & SKIP_TO_LINE_END != 0,
                    anchored: flags & ANCHORED != 0,
                    skipped: u64_at(18),
                })
            }
            1 => {
                exactly("done", POSITION_HEAD_BYTES)?;
                At::Done
            }
            2 => {
                if bytes.len() < POSITION_HEAD_BYTES + 8 {
                    return Err(format!(
                        "{} bytes for a failed-at-a-line position, expected at least {} bytes",
                        bytes.len(),
                        POSITION_HEAD_BYTES + 8
                    ));
                }
                At::Counting(u64_at(26), text(34)?)
            }
            3 => At::Failed(text(26)?),
            kind => return Err(format!("kind {kind}, expected 0 to 3")),
        };
        let (start, end) = (u64_at(2), u64_at(10));
        if start > end {
            return Err(format!("range {start}..{end} is backwards"));
        }
        Ok(Position {
            range: start..end,
            skipped: u64_at(18),
            at,
        })
    }
}

impl FileSource {
    /// What to answer in `state`, and the state after.
    fn answer(&self, state: State, produced: bool) -> (State, SourceBatch) {
        let failed = |text: String| (State::Reported(text.clone()), SourceBatch::Failed(text));
        match state {
            State::Reading if produced => {
                let watermark_ms = self.parse.watermark_ms;
                (State::Reading, SourceBatch::More { watermark_ms })
            }
            State::Reading => (State::Reading, SourceBatch::Pending),
            State::Done => (State::Done, SourceBatch::Done),
            State::Counting {
                line_in_range,
                message,
                count,
            } => match count.try_recv() {
                Ok(Ok(lines_before)) => {
                    failed(self.line_message(lines_before, line_in_range, &message))
                }
                Ok(Err(e)) => failed(format!(
                    "{}: {message} (its line number is unknown: {e})",
                    self.path.display()
                )),
                Err(TryRecvError::Empty) => (
                    State::Counting {
                        line_in_range,
                        message,
                        count,
                    },
                    SourceBatch::Pending,
                ),
                Err(TryRecvError::Disconnected) => {
                    failed(format!("{}: {message}", self.path.display()))
                }
            },
            State::Failed(text) | State::Reported(text) => failed(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use crate::json::write_json_line;
    use crate::Bid;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dirigo-file-{}-{name}", std::process::id()))
    }

    /// Runs one partition to its end: its events and its error, if any.
    fn drain(mut source: FileSource, max_records: usize) -> (Vec<Event>, Option<String>, u64) {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "the source made no progress");
            match source.next_batch(max_records, &mut out) {
                SourceBatch::More { watermark_ms } => {
                    assert_eq!(watermark_ms, out.last().map_or(i64::MIN, Event::date_time))
                }
                SourceBatch::Pending => std::thread::yield_now(),
                SourceBatch::Done => return (out, None, source.skipped_records()),
                SourceBatch::Failed(e) => return (out, Some(e), source.skipped_records()),
            }
        }
    }

    fn bid_line(t: i64, extra_len: usize) -> Vec<u8> {
        let mut line = Vec::new();
        write_json_line(
            &Event::Bid(Bid {
                auction: 1000 + t as u64,
                bidder: 7,
                price: 5,
                channel: "Apple".into(),
                url: "https://x/y".into(),
                date_time: t,
                extra: "e".repeat(extra_len).into(),
            }),
            &mut line,
        );
        line.pop();
        line
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// What a plain line-by-line reader makes of a file: per line (1-based
    /// number, start offset), the event or `None` for a bad line.
    struct Reference {
        lines: Vec<(u64, u64, Option<Event>)>,
    }

    fn random_file(rng: &mut Rng, max_line_bytes: usize) -> (Vec<u8>, Reference) {
        let mut bytes = Vec::new();
        let mut lines = Vec::new();
        let mut t = 1_000;
        let count = rng.below(30);
        for number in 1..=count {
            let start = bytes.len() as u64;
            match rng.below(8) {
                0 => {} // an empty line
                1 => {
                    bytes.extend_from_slice(b"{\"type\":\"bid\"}");
                    lines.push((number, start, None));
                }
                2 => {
                    bytes.extend_from_slice(&bid_line(t, max_line_bytes));
                    lines.push((number, start, None));
                }
                3 => bytes.extend_from_slice(b"  \r"),
                _ => {
                    t += rng.below(3) as i64;
                    let line = bid_line(t, rng.below(40) as usize);
                    bytes.extend_from_slice(&line);
                    let event = crate::parse::parse_event(&mut Interner::default(), &line).unwrap();
                    lines.push((number, start, Some(event)));
                }
            }
            let last = number == count;
            if !(last && rng.below(2) == 0) {
                bytes.extend_from_slice(if rng.below(2) == 0 { b"\r\n" } else { b"\n" });
            }
        }
        (bytes, Reference { lines })
    }

    #[test]
    fn file_split_reads_every_line_once_whatever_the_split_points() {
        let path = temp_path("split");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..100 {
            let max_line_bytes = 160;
            let (bytes, reference) = random_file(&mut rng, max_line_bytes);
            std::fs::write(&path, &bytes).unwrap();
            let read = ReadConfig {
                buffer_bytes: 1 + rng.below(64) as usize,
                buffers: 1 + rng.below(3) as usize,
            };
            for partitions in 1..=8 {
                for skip_malformed in [false, true] {
                    let options = FileOptions {
                        skip_malformed,
                        max_line_bytes,
                        read,
                        ..FileOptions::default()
                    };
                    let split = FileSplit::plan(&path, partitions, options).unwrap();
                    let mut all = Vec::new();
                    let mut skipped = 0;
                    for p in 0..partitions {
                        let range = split.range(p);
                        let owned: Vec<_> = reference
                            .lines
                            .iter()
                            .filter(|(_, start, _)| range.contains(start))
                            .collect();
                        let max_records = 1 + rng.below(5) as usize;
                        let (events, error, skips) = drain(split.open(p), max_records);
                        let first_bad = owned.iter().position(|(_, _, e)| e.is_none());
                        let want: Vec<Event> = owned
                            .iter()
                            .take(if skip_malformed {
                                owned.len()
                            } else {
                                first_bad.unwrap_or(owned.len())
                            })
                            .filter_map(|(_, _, e)| e.clone())
                            .collect();
                        let context = format!("case {case}, {partitions} partitions, p {p}, skip {skip_malformed}, {read:?}, {error:?} {:?}", String::from_utf8_lossy(&bytes));
                        assert_eq!(events, want, "{context}");
                        match (skip_malformed, first_bad) {
                            (false, Some(i)) => {
                                let error = error.unwrap_or_else(|| panic!("{context}: no error"));
                                let want = format!("{}: line {}: ", path.display(), owned[i].0);
                                assert!(
                                    error.starts_with(&want),
                                    "{context}: {error}, want {want}"
                                );
                            }
                            _ => assert_eq!(error, None, "{context}"),
                        }
                        if skip_malformed {
                            skipped += skips;
                        }
                        all.extend(events);
                    }
                    if skip_malformed {
                        let bad = reference.lines.iter().filter(|l| l.2.is_none()).count();
                        assert_eq!(skipped, bad as u64, "case {case}, {partitions} partitions");
                        let good: Vec<Event> =
                            reference.lines.iter().filter_map(|l| l.2.clone()).collect();
                        assert_eq!(all, good, "case {case}, {partitions} partitions");
                    }
                }
            }
        }
        std::fs::remove_file(path).unwrap();
    }

    /// `(lines, skip_malformed) -> wanted error text`, one file per case.
    fn check_times(lines: &[Vec<u8>], want: &str) {
        let path = temp_path(&format!("times-{}", want.len()));
        std::fs::write(&path, lines.join(&b'\n')).unwrap();
        let options = FileOptions::default();
        let (_, error, _) = drain(FileSource::open(&path, 0, 1, options).unwrap(), 100);
        let error = error.expect("an error");
        assert!(error.contains(want), "{error}");
        let options = FileOptions {
            skip_malformed: true,
            ..options
        };
        let (events, error, skipped) = drain(FileSource::open(&path, 0, 1, options).unwrap(), 100);
        assert_eq!((events.len(), error, skipped), (lines.len() - 1, None, 1));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn file_source_rejects_times_out_of_range_order_or_reach() {
        let day = 24 * 3600 * 1000;
        check_times(
            &[bid_line(5, 0), bid_line(i64::MAX, 0), bid_line(6, 0)],
            "line 2: date_time 9223372036854775807 is out of range",
        );
        check_times(
            &[bid_line(5, 0), bid_line(4, 0), bid_line(6, 0)],
            "line 2: date_time 4 is earlier than 5",
        );
        check_times(
            &[bid_line(5, 0), bid_line(6 + day, 0), bid_line(6, 0)],
            "line 2: date_time 86400006 is more than max_time_jump_ms",
        );
    }

    #[test]
    fn file_source_error_lines_are_absolute_in_later_partitions() {
        let path = temp_path("later");
        let mut lines: Vec<Vec<u8>> = (0..1000).map(|t| bid_line(t, 10)).collect();
        lines[900] = b"not json".to_vec();
        std::fs::write(&path, lines.join(&b'\n')).unwrap();
        let split = FileSplit::plan(&path, 4, FileOptions::default()).unwrap();
        let (_, error, _) = drain(split.open(3), 64);
        let error = error.expect("an error");
        assert!(
            error.starts_with(&format!("{}: line 901: ", path.display())),
            "{error}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn file_source_reader_thread_stops_when_the_source_is_dropped() {
        let path = temp_path("drop");
        let lines: Vec<Vec<u8>> = (0..20_000).map(|t| bid_line(t, 10)).collect();
        std::fs::write(&path, lines.join(&b'\n')).unwrap();
        let options = FileOptions {
            read: ReadConfig {
                buffer_bytes: 4096,
                buffers: 2,
            },
            ..FileOptions::default()
        };
        let mut source = FileSource::open(&path, 0, 1, options).unwrap();
        let stopped = source.reader_stopped().expect("a reader");
        let mut out = Vec::new();
        while out.is_empty() {
            let _ = source.next_batch(10, &mut out);
        }
        assert!(!stopped.load(std::sync::atomic::Ordering::Acquire));
        drop(source);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stopped.load(std::sync::atomic::Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the reader thread still runs");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::fs::remove_file(path).unwrap();
    }

    /// An outlier time among the first lines of a range is the line blamed (or
    /// skipped), not the good lines after it: the first lines wait until they
    /// vouch for each other. Cases: the bad line first, second, or alone.
    #[test]
    fn an_outlier_first_line_is_blamed_not_the_good_lines_after_it() {
        ambiguous_first_lines_are_named_together();
        let day_ms = 86_400_000;
        let path = temp_path("outlier");
        // (times of the lines, the bad line's number if any)
        let cases: &[(&[i64], Option<u64>)] = &[
            (&[10 * day_ms, 1_000, 1_001, 1_002], Some(1)),
            (&[1_000, 10 * day_ms, 1_001, 1_002], Some(2)),
            (&[1_000, 1_001, 10 * day_ms, 1_002], Some(3)),
            (&[10 * day_ms], None),
        ];
        for (times, bad) in cases {
            let mut bytes = Vec::new();
            for &t in *times {
                bytes.extend_from_slice(&bid_line(t, 3));
                bytes.push(b'\n');
            }
            std::fs::write(&path, &bytes).unwrap();
            let good: Vec<i64> = times
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i as u64 + 1) != *bad)
                .map(|(_, &t)| t)
                .collect();
            for skip_malformed in [false, true] {
                let options = FileOptions {
                    skip_malformed,
                    ..FileOptions::default()
                };
                let source = FileSplit::plan(&path, 1, options).unwrap().open(0);
                let (events, error, skipped) = drain(source, 2);
                let read: Vec<i64> = events.iter().map(Event::date_time).collect();
                let context = format!("{times:?}, skip {skip_malformed}: {error:?}");
                match (bad, skip_malformed) {
                    (Some(line), false) => {
                        let error = error.unwrap_or_else(|| panic!("{context}: no error"));
                        assert!(error.contains(&format!(": line {line}: ")), "{context}");
                        let before: Vec<i64> = times[..*line as usize - 1].to_vec();
                        assert_eq!(read, before, "{context}: the lines before it are read");
                    }
                    (Some(_), true) => {
                        assert_eq!((error, skipped), (None, 1), "{context}");
                        assert_eq!(read, good, "{context}");
                    }
                    (None, _) => {
                        assert_eq!((error, skipped), (None, 0), "{context}");
                        assert_eq!(read, good, "{context}");
                    }
                }
            }
        }
        std::fs::remove_file(path).unwrap();
    }

    /// Two first lines that disagree with no third: without skipping, the error
    /// names the first and says the next disagrees, and neither is read; with
    /// skipping, the first anchors the range and the second is skipped.
    fn ambiguous_first_lines_are_named_together() {
        let path = temp_path("ambiguous");
        let two_days_ms = 2 * 86_400_000;
        for tail in [&b""[..], &b"not json\n"[..]] {
            let mut bytes = bid_line(1_000, 3);
            bytes.push(b'\n');
            bytes.extend_from_slice(&bid_line(1_000 + two_days_ms, 3));
            bytes.push(b'\n');
            bytes.extend_from_slice(tail);
            std::fs::write(&path, &bytes).unwrap();
            let strict = FileSplit::plan(&path, 1, FileOptions::default()).unwrap();
            let (events, error, _) = drain(strict.open(0), 4);
            let error = error.expect("an error");
            assert!(
                error.contains(": line 1: ") && error.contains("on the next line"),
                "{error}"
            );
            assert!(events.is_empty(), "{events:?}");
            let options = FileOptions {
                skip_malformed: true,
                ..FileOptions::default()
            };
            let lenient = FileSplit::plan(&path, 1, options).unwrap();
            let (events, error, skipped) = drain(lenient.open(0), 4);
            assert_eq!(error, None);
            assert_eq!(skipped, 1 + !tail.is_empty() as u64);
            let read: Vec<i64> = events.iter().map(Event::date_time).collect();
            assert_eq!(read, vec![1_000]);
        }
        std::fs::remove_file(path).unwrap();
    }

    /// `max_line_bytes` counts the line without its line end, `\r\n` or `\n`.
    #[test]
    fn a_line_of_exactly_max_line_bytes_is_accepted_with_either_line_end() {
        let path = temp_path("crlf-max");
        let line = bid_line(1_000, 20);
        for (end, max, accepted) in [
            (&b"\n"[..], line.len(), true),
            (&b"\r\n"[..], line.len(), true),
            (&b"\r\n"[..], line.len() - 1, false),
        ] {
            let mut bytes = line.clone();
            bytes.extend_from_slice(end);
            std::fs::write(&path, &bytes).unwrap();
            // Read buffers of every size up to the line's, so that a chunk
            // boundary falls everywhere, also between the `\r` and the `\n`.
            for buffer_bytes in (1..=bytes.len() + 1).step_by(7).chain([bytes.len() - 1]) {
                let options = FileOptions {
                    max_line_bytes: max,
                    read: ReadConfig {
                        buffer_bytes,
                        buffers: 2,
                    },
                    ..FileOptions::default()
                };
                let source = FileSplit::plan(&path, 1, options).unwrap().open(0);
                let (events, error, _) = drain(source, 4);
                let context = format!("{end:?} max {max} buffers of {buffer_bytes}: {error:?}");
                assert_eq!(events.len() == 1, accepted, "{context}");
                assert_eq!(error.is_none(), accepted, "{context}");
            }
        }
        std::fs::remove_file(path).unwrap();
    }

    /// A file of up to 40 lines of every kind a range meets: good events, empty and
    /// whitespace lines, malformed JSON, over-long lines, events earlier than
    /// the line before or days ahead of it (also among a range's first lines,
    /// where they are held), CRLF ends and a last line without one.
    fn bumpy_file(rng: &mut Rng, max_line_bytes: usize) -> Vec<u8> {
        let day_ms = 86_400_000;
        let mut bytes = Vec::new();
        let mut t = 1_000_000;
        let count = rng.below(40);
        for number in 1..=count {
            match rng.below(16) {
                0 => {}
                1 => bytes.extend_from_slice(b"  \r"),
                2 => bytes.extend_from_slice(b"{\"type\":\"bid\"}"),
                3 => bytes.extend_from_slice(&bid_line(t, max_line_bytes)),
                4 => bytes.extend_from_slice(&bid_line(t - 1 - rng.below(100) as i64, 3)),
                5 => bytes.extend_from_slice(&bid_line(t + 2 * day_ms, 3)),
                _ => {
                    t += rng.below(3) as i64;
                    bytes.extend_from_slice(&bid_line(t, rng.below(40) as usize));
                }
            }
            if !(number == count && rng.below(2) == 0) {
                bytes.extend_from_slice(if rng.below(2) == 0 { b"\r\n" } else { b"\n" });
            }
        }
        bytes
    }

    /// Read buffers mostly shorter than a line (lines are carried from chunk to
    /// chunk), a few of a byte or two, some longer than a line.
    fn small_buffer(rng: &mut Rng) -> usize {
        match rng.below(8) {
            0 => 1 + rng.below(2) as usize,
            1 | 2 => 150 + rng.below(300) as usize,
            _ => 8 + rng.below(120) as usize,
        }
    }

    /// A fresh source of `partition` resumed at `position`; its position is
    /// the one it was given until it reads.
    fn resumed(split: &FileSplit, partition: u32, position: &[u8]) -> FileSource {
        let mut source = split.open(partition);
        source.seek(position).unwrap();
        assert_eq!(source.position().as_deref(), Some(position));
        source
    }

    /// For cuts before the first batch, after every batch that handed out
    /// events, at the end and after random other calls (so also while a line is
    /// carried between chunks, an over-long one skipped, or first lines held):
    /// the events up to the cut, then those of a fresh source sought to the
    /// cut's position, are exactly the uninterrupted partition's, with the same
    /// error (same text, absolute line numbers in later partitions) and the same
    /// skipped count.
    #[test]
    fn file_source_resumes_exactly_at_every_cut() {
        let path = temp_path("resume");
        let mut rng = Rng(0x5851_f42d_4c95_7f2d);
        for case in 0..12 {
            let max_line_bytes = 160;
            let bytes = bumpy_file(&mut rng, max_line_bytes);
            std::fs::write(&path, &bytes).unwrap();
            let configs = [(1, true), (1, false), (2, true), (3, false), (4, true)];
            for (partitions, skip_malformed) in configs {
                let options = FileOptions {
                    skip_malformed,
                    max_line_bytes,
                    max_time_jump_ms: 86_400_000,
                    read: ReadConfig {
                        buffer_bytes: 8 + rng.below(400) as usize,
                        buffers: 1 + rng.below(2) as usize,
                    },
                };
                let split = FileSplit::plan(&path, partitions, options).unwrap();
                for p in 0..partitions {
                    let max_records = 1 + rng.below(3) as usize;
                    // One uninterrupted run, its position taken after every call
                    // as `(events handed out by then, error if it failed, position)`.
                    let mut source = split.open(p);
                    let mut cuts = vec![(0, None, source.position().unwrap())];
                    // Samples of the other calls: those while first lines are
                    // held, and the rest (with small buffers there are many).
                    let mut others = [(Vec::new(), 0), (Vec::new(), 0)];
                    let mut out = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let (want_error, want_skipped) = loop {
                        assert!(Instant::now() < deadline, "no progress");
                        let before = out.len();
                        let batch = source.next_batch(max_records, &mut out);
                        let error = match &batch {
                            SourceBatch::Failed(e) => Some(e.clone()),
                            _ => None,
                        };
                        let ended = matches!(batch, SourceBatch::Done | SourceBatch::Failed(_));
                        if let SourceBatch::More { watermark_ms } = batch {
                            assert_eq!(watermark_ms, out.last().unwrap().date_time());
                        }
                        let cut = (out.len(), error.clone(), source.position().unwrap());
                        if out.len() > before || ended {
                            cuts.push(cut);
                        } else {
                            let (sample, seen) = &mut others[source.parse.held.is_empty() as usize];
                            *seen += 1;
                            if sample.len() < 3 {
                                sample.push(cut);
                            } else if let Some(slot) = sample.get_mut(rng.below(*seen) as usize) {
                                *slot = cut;
                            }
                        }
                        if ended {
                            break (error, source.skipped_records());
                        }
                    };
                    let [(held, _), (rest, _)] = others;
                    for (events, error, position) in cuts.into_iter().chain(held).chain(rest) {
                        let context = format!(
                            "case {case}, {partitions} partitions, p {p}, skip {skip_malformed}, \
                             {:?}, cut at {events} events {error:?}, {position:?}: {:?}",
                            options.read,
                            String::from_utf8_lossy(&bytes)
                        );
                        let (rest, rest_error, skipped) =
                            drain(resumed(&split, p, &position), max_records);
                        assert_eq!(
                            out[..events]
                                .iter()
                                .chain(&rest)
                                .cloned()
                                .collect::<Vec<_>>(),
                            out,
                            "{context}"
                        );
                        assert_eq!(rest_error, want_error, "{context}");
                        assert_eq!(skipped, want_skipped, "{context}");
                    }
                }
            }
        }
        std::fs::remove_file(path).unwrap();
    }

    /// A source replaced by a resumed one after every batch with events (and at
    /// random calls that moved its position) still reads its partition exactly:
    /// positions of resumed sources resume too.
    #[test]
    fn file_source_resumed_again_and_again_reads_its_partition_exactly() {
        let path = temp_path("again");
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for case in 0..10 {
            let bytes = bumpy_file(&mut rng, 120);
            std::fs::write(&path, &bytes).unwrap();
            for (partitions, skip_malformed) in [(1, true), (3, true), (2, false)] {
                let options = FileOptions {
                    skip_malformed,
                    max_line_bytes: 120,
                    read: ReadConfig {
                        buffer_bytes: small_buffer(&mut rng),
                        buffers: 1,
                    },
                    ..FileOptions::default()
                };
                let split = FileSplit::plan(&path, partitions, options).unwrap();
                for p in 0..partitions {
                    let max_records = 1 + rng.below(3) as usize;
                    let (want, want_error, want_skipped) = drain(split.open(p), max_records);
                    // Replaced after every batch with events, and after some of
                    // the others that moved the position (a line takes many
                    // calls with small buffers: replaced at each, none would end).
                    let every = 2 + rng.below(3);
                    let mut source = split.open(p);
                    let mut resumed_at = source.position().unwrap();
                    let mut out = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let error = loop {
                        assert!(Instant::now() < deadline, "no progress");
                        let before = out.len();
                        match source.next_batch(max_records, &mut out) {
                            SourceBatch::Done => break None,
                            SourceBatch::Failed(e) => break Some(e),
                            _ => {
                                let position = source.position().unwrap();
                                let moved = position != resumed_at && rng.below(every) == 0;
                                if out.len() > before || moved {
                                    source = resumed(&split, p, &position);
                                    resumed_at = position;
                                }
                            }
                        }
                    };
                    let context = format!(
                        "case {case}, {partitions} partitions, p {p}, skip {skip_malformed}"
                    );
                    assert_eq!(out, want, "{context}");
                    assert_eq!(error, want_error, "{context}");
                    assert_eq!(source.skipped_records(), want_skipped, "{context}");
                }
            }
        }
        std::fs::remove_file(path).unwrap();
    }

    /// A range's first lines are held until they vouch for each other: while
    /// none was handed out, the position stays at the range's start (counting
    /// no line skipped among them), whatever was read.
    #[test]
    fn held_first_lines_are_not_behind_the_position() {
        let path = temp_path("held");
        let day_ms = 86_400_000;
        let mut bytes = Vec::new();
        for line in [
            bid_line(10 * day_ms, 3),
            b"not json".to_vec(),
            bid_line(1_000, 3),
            bid_line(1_001, 3),
            bid_line(1_002, 3),
        ] {
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
        }
        std::fs::write(&path, &bytes).unwrap();
        // One-byte reads, so that calls find no chunk ready while lines are held
        // (tried again in the unlikely case that the reader kept up every time).
        let options = FileOptions {
            skip_malformed: true,
            read: ReadConfig {
                buffer_bytes: 1,
                buffers: 1,
            },
            ..FileOptions::default()
        };
        let split = FileSplit::plan(&path, 1, options).unwrap();
        let mut held_seen = false;
        for _ in 0..20 {
            let mut source = split.open(0);
            let start = source.position().unwrap();
            let mut out = Vec::new();
            while !matches!(source.next_batch(1, &mut out), SourceBatch::Done) {
                if out.is_empty() && !source.parse.held.is_empty() {
                    held_seen = true;
                    assert_eq!(source.position().unwrap(), start);
                }
            }
            let read: Vec<i64> = out.iter().map(Event::date_time).collect();
            assert_eq!(
                (read, source.skipped_records()),
                (vec![1_000, 1_001, 1_002], 2)
            );
            if held_seen {
                break;
            }
        }
        assert!(held_seen, "no call found lines held");
        std::fs::remove_file(path).unwrap();
    }

    /// Positions that do not decode, or are another partition's or another
    /// file's, are refused with the path and what is wrong; none panics.
    #[test]
    fn file_source_refuses_positions_that_do_not_fit() {
        let path = temp_path("refuse");
        let lines: Vec<Vec<u8>> = (0..50).map(|t| bid_line(t, 10)).collect();
        std::fs::write(&path, lines.join(&b'\n')).unwrap();
        let split = FileSplit::plan(&path, 2, FileOptions::default()).unwrap();
        let mut source = split.open(1);
        let mut out = Vec::new();
        while out.len() < 3 {
            let _ = source.next_batch(3, &mut out);
        }
        let position = source.position().unwrap();
        assert_eq!(position.len(), POSITION_READING_BYTES);
        let refused = |bytes: &[u8], partition: u32, want: &str| {
            let error = split.open(partition).seek(bytes).unwrap_err();
            let prefix = format!("{}: file position: ", path.display());
            assert!(
                error.starts_with(&prefix) && error.contains(want),
                "{error}"
            );
        };
        refused(&position[..20], 1, "20 bytes, expected at least 26 bytes");
        refused(
            &position[..50],
            1,
            "50 bytes for a reading position, expected 51 bytes",
        );
        let changed = |at: usize, value: &[u8]| {
            let mut bytes = position.clone();
            bytes[at..at + value.len()].copy_from_slice(value);
            bytes
        };
        refused(&changed(0, &[9]), 1, "version 9, expected version 1");
        refused(&changed(1, &[4]), 1, "kind 4, expected 0 to 3");
        refused(
            &changed(1, &[1]),
            1,
            "51 bytes for a done position, expected 26 bytes",
        );
        refused(&changed(50, &[4]), 1, "flags 0x04");
        refused(&position, 0, "but this partition's are in");
        refused(
            &changed(26, &0u64.to_le_bytes()),
            1,
            "offset 0 is outside bytes",
        );
        refused(&changed(26, &u64::MAX.to_le_bytes()), 1, "is outside bytes");
        refused(
            &changed(34, &u64::MAX.to_le_bytes()),
            1,
            "line ends cannot come in the",
        );
        refused(&changed(10, &0u64.to_le_bytes()), 1, "is backwards");
        let mut failed = position[..26].to_vec();
        failed[1] = 3;
        failed.push(0xff);
        refused(&failed, 1, "is not UTF-8");
        failed[1] = 2;
        refused(&failed, 1, "expected at least 34 bytes");
        // Any bytes: an error or a source, never a panic.
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        for _ in 0..1000 {
            let mut bytes = position.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = rng.below(256) as u8;
            }
            bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize + 20);
            let mut source = split.open(1);
            if source.seek(&bytes).is_ok() {
                let _ = drain(source, 4);
            }
        }
        std::fs::remove_file(path).unwrap();
    }
}
