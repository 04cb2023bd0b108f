//! `agent_protocol`: a byte stream from the peer (the guest agent, or a host client of a
//! machine) through both frame readers of `hearth::agent::protocol`: the incremental
//! `FrameBuffer`, fed in fuzzer-chosen pieces, and `read_message` over a reader that hands
//! out the same pieces.
//!
//! Input format:
//!
//! ```text
//! u8      n, the number of piece sizes (0: the whole stream in one piece)
//! n * u8  piece sizes, used in turn (0: an empty `extend`; a reader read of 1 byte)
//! rest    the stream
//! ```
//!
//! Checked (beyond "no panic"):
//! - after the decodable frames are taken, `FrameBuffer` holds less than one largest frame
//!   (`HEADER_LEN + MAX_PAYLOAD`);
//! - both readers decode the same messages and errors frame by frame (a malformed payload
//!   or an unknown kind costs one frame) and stop the same way (a clean end, a truncated
//!   frame, or the same error);
//! - every decoded message re-encodes (`Message::encode`, `write_message`) to a frame of at
//!   most `HEADER_LEN + MAX_PAYLOAD` bytes that both readers decode to an equal message.

use std::io::Read;

use hearth::agent::protocol::{
    read_message, write_message, FrameBuffer, Message, ProtocolError, HEADER_LEN, MAX_PAYLOAD,
};

use crate::input::Input;

/// How a reader stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// A clean end between frames.
    Clean,
    /// The stream ended inside a frame.
    Truncated,
    /// A frame error (its kind): the session would end here.
    Error(&'static str),
}

/// What one input decoded to, for tests: each frame's message or error kind (a malformed
/// payload or an unknown kind ends the frame, not the stream), and how the stream ended.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub decoded: Vec<Result<Message, &'static str>>,
    pub end: End,
}

impl Outcome {
    pub fn messages(&self) -> Vec<&Message> {
        self.decoded
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .collect()
    }
}

/// Errors after which the frame was consumed and the next one can be read.
fn recoverable(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::Malformed { .. } | ProtocolError::UnknownKind(_)
    )
}

fn error_kind(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::Io(_) => "io",
        ProtocolError::Truncated => "truncated",
        ProtocolError::TooLarge(_) => "too large",
        ProtocolError::Reserved => "reserved",
        ProtocolError::UnknownKind(_) => "unknown kind",
        ProtocolError::Malformed { .. } => "malformed",
    }
}

/// A reader that returns at most the next piece size per `read`.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl<'a> Pieces<'a> {
    fn new(data: &'a [u8], sizes: &'a [u8]) -> Self {
        Self {
            data,
            sizes,
            turn: 0,
        }
    }

    /// The next piece size; `None` means "everything".
    fn next_size(&mut self) -> Option<usize> {
        let size = self.sizes.get(self.turn % self.sizes.len().max(1)).copied();
        self.turn += 1;
        size.map(usize::from)
    }
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // A read of 0 bytes would mean end of stream: read at least one.
        let size = self.next_size().unwrap_or(usize::MAX).max(1);
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let count = usize::from(input.u8());
    let sizes = input.bytes(count);
    let stream = input.rest();

    let framed = frame_buffer(stream, sizes);
    let read = reader(stream, sizes);
    assert_eq!(
        framed.decoded, read.decoded,
        "FrameBuffer and read_message decode different frames"
    );
    assert_eq!(framed.end, read.end, "the readers stop differently");
    for msg in read.messages() {
        check_round_trip(msg);
    }
    read
}

fn frame_buffer(stream: &[u8], sizes: &[u8]) -> Outcome {
    let mut buffer = FrameBuffer::new();
    let mut decoded = Vec::new();
    let mut pieces = Pieces::new(stream, sizes);
    let mut rest = stream;
    // Only empty pieces would never end: take everything at once then.
    let all_empty = sizes.iter().all(|&s| s == 0);
    loop {
        let size = match pieces.next_size() {
            Some(size) if !all_empty => size.min(rest.len()),
            _ => rest.len(),
        };
        let (piece, tail) = rest.split_at(size);
        rest = tail;
        buffer.extend(piece);
        loop {
            match buffer.next_message() {
                Ok(Some(msg)) => decoded.push(Ok(msg)),
                Ok(None) => break,
                Err(e) if recoverable(&e) => decoded.push(Err(error_kind(&e))),
                Err(e) => {
                    return Outcome {
                        decoded,
                        end: End::Error(error_kind(&e)),
                    }
                }
            }
        }
        assert!(
            buffer.pending() < HEADER_LEN + MAX_PAYLOAD,
            "FrameBuffer holds {} bytes after taking every whole frame",
            buffer.pending()
        );
        if rest.is_empty() {
            break;
        }
    }
    let end = if buffer.pending() == 0 {
        End::Clean
    } else {
        End::Truncated
    };
    Outcome { decoded, end }
}

fn reader(stream: &[u8], sizes: &[u8]) -> Outcome {
    let mut pieces = Pieces::new(stream, sizes);
    let mut decoded = Vec::new();
    loop {
        let end = match read_message(&mut pieces) {
            Ok(Some(msg)) => {
                decoded.push(Ok(msg));
                continue;
            }
            Err(e) if recoverable(&e) => {
                decoded.push(Err(error_kind(&e)));
                continue;
            }
            Ok(None) => End::Clean,
            Err(ProtocolError::Truncated) => End::Truncated,
            Err(e) => End::Error(error_kind(&e)),
        };
        return Outcome { decoded, end };
    }
}

fn check_round_trip(msg: &Message) {
    let (kind, payload) = msg.encode();
    assert!(
        payload.len() <= MAX_PAYLOAD,
        "a decoded message of kind {kind} re-encodes to {} bytes",
        payload.len()
    );
    let mut frame = Vec::new();
    write_message(&mut frame, msg).expect("a decoded message is written again");
    assert_eq!(frame.len(), HEADER_LEN + payload.len());
    let again = read_message(&mut &frame[..])
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is a message");
    assert!(
        &again == msg,
        "a message of kind {kind} changed when re-encoded"
    );
    let mut buffer = FrameBuffer::new();
    buffer.extend(&frame);
    assert_eq!(buffer.next_message().ok().flatten().as_ref(), Some(msg));
    assert_eq!(buffer.pending(), 0);
}
