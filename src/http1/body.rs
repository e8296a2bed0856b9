//! Bodies: the decoder of an answer's body as it arrives (by length,
//! chunked with extensions and trailers, or to the close), and the framing
//! of a body being written (chunk lines, the last chunk, trailers).

use std::io::Write as _;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    HOST, MAX_FORWARDS, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::MAX_HEADERS;
use super::field::put_field;

/// The longest chunk-size line (extensions included).
pub const MAX_CHUNK_LINE: usize = 4096;
/// The most bytes of chunk extensions in one body, and the largest
/// trailer section (hyper's limits too).
pub const MAX_EXTENSIONS: usize = 16 * 1024;
pub const MAX_TRAILERS: usize = 16 * 1024;

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// Where a body being read stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the chunk's data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section, after the last chunk; how many of its bytes
    /// have been searched for its end.
    Trailers(usize),
}

/// What the decoder made of the buffered bytes. Its messages say what
/// the peer did: "sent an invalid chunk size".
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is over; the bytes after it stay in the buffer.
    End,
    /// More bytes are needed.
    More,
    /// The body is broken: why.
    Invalid(String),
}

/// Decodes a body from a buffer that its reader fills.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Bytes of chunk extensions so far.
    extensions: usize,
}

impl Decoder {
    /// For a body framed so.
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(length) => State::Length(length),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        Self {
            state,
            extensions: 0,
        }
    }

    /// Whether the body has been read to its end.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Done => Some(0),
            State::Length(remaining) => Some(remaining),
            _ => None,
        }
    }

    /// The next piece of the body from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Decoded {
        loop {
            // The bytes a body or chunk still needs, taken from what has
            // been read.
            let take = |buf: &mut BytesMut, remaining: &mut u64| {
                let n = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                *remaining -= n as u64;
                buf.split_to(n).freeze()
            };
            match self.state {
                State::Done => return Decoded::End,
                State::Length(mut remaining) | State::Chunked(Chunk::Data(mut remaining))
                    if !buf.is_empty() =>
                {
                    let data = take(buf, &mut remaining);
                    self.state = match (self.state, remaining) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(remaining),
                        (_, 0) => State::Chunked(Chunk::DataEnd),
                        _ => State::Chunked(Chunk::Data(remaining)),
                    };
                    return Decoded::Data(data);
                }
                State::Close if !buf.is_empty() => return Decoded::Data(buf.split().freeze()),
                State::Chunked(Chunk::Size) if !buf.is_empty() => {
                    let starts_with_digit = buf[0].is_ascii_hexdigit();
                    match httparse::parse_chunk_size(buf) {
                        Ok(httparse::Status::Complete((used, size)))
                            if starts_with_digit && !buf[..used - 2].contains(&b'\n') =>
                        {
                            // Extensions are ignored, within a budget.
                            self.extensions += used.saturating_sub(18);
                            if self.extensions > MAX_EXTENSIONS {
                                return self.invalid(format!(
                                    "sent more than {MAX_EXTENSIONS} bytes of chunk extensions"
                                ));
                            }
                            buf.advance(used);
                            self.state = State::Chunked(if size == 0 {
                                Chunk::Trailers(0)
                            } else {
                                Chunk::Data(size)
                            });
                            continue;
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => {}
                        _ => return self.invalid("sent an invalid chunk size".into()),
                    }
                }
                State::Chunked(Chunk::DataEnd) if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return self.invalid("sent a chunk longer than its size".into());
                    }
                    buf.advance(2);
                    self.state = State::Chunked(Chunk::Size);
                    continue;
                }
                State::Chunked(Chunk::Trailers(_)) if buf.starts_with(b"\r\n") => {
                    buf.advance(2);
                    self.state = State::Done;
                    return Decoded::End;
                }
                State::Chunked(Chunk::Trailers(searched)) => {
                    // Searched from where the last read ended, not from the start.
                    let from = searched.saturating_sub(3);
                    let end = buf[from.min(buf.len())..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|at| from + at);
                    if let Some(end) = end {
                        let section = buf.split_to(end + 4);
                        return match trailers(&section) {
                            Ok(trailers) => {
                                self.state = State::Done;
                                Decoded::Trailers(trailers)
                            }
                            Err(message) => self.invalid(message),
                        };
                    }
                    if buf.len() > MAX_TRAILERS {
                        return self.invalid(format!(
                            "sent a trailer section larger than {MAX_TRAILERS} bytes"
                        ));
                    }
                    self.state = State::Chunked(Chunk::Trailers(buf.len()));
                }
                _ => {}
            }
            return Decoded::More;
        }
    }

    /// The peer closed the connection: the end of a body read to the
    /// close, else why the body is cut short.
    pub fn closed(&mut self) -> Result<(), String> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            State::Length(remaining) => Err(format!(
                "closed the connection with {remaining} bytes of the body unsent"
            )),
            State::Chunked(_) => {
                Err("closed the connection in the middle of a chunked body".to_owned())
            }
        }
    }

    fn invalid(&mut self, message: String) -> Decoded {
        self.state = State::Done;
        Decoded::Invalid(message)
    }
}

/// A trailer section (ending in an empty line) as header fields.
fn trailers(section: &[u8]) -> Result<HeaderMap, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let invalid = || "sent an invalid trailer section".to_owned();
    match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| invalid())?;
                let value = HeaderValue::from_bytes(field.value).map_err(|_| invalid())?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(invalid()),
    }
}

/// How a body being written is framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoder {
    /// So many bytes more.
    Length(u64),
    /// Chunked; trailers named in `Trailer` may follow.
    Chunked(Option<Vec<HeaderName>>),
    /// Until the connection closes.
    Close,
}

/// Writes the line that starts a chunk of `len` bytes.
pub fn chunk_line(out: &mut Vec<u8>, len: usize) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{len:X}\r\n");
}

/// The end of a chunked body: the last chunk, the trailers that may be
/// passed on (those `Trailer` announced, and not of hyper's forbidden
/// names), and the empty line.
pub fn end_chunked(out: &mut Vec<u8>, trailers: Option<(&HeaderMap, &[HeaderName])>) {
    out.extend_from_slice(b"0\r\n");
    if let Some((fields, allowed)) = trailers {
        for (name, value) in fields {
            if allowed.contains(name) && may_trail(name) {
                put_field(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields that may not be sent as trailers (hyper's list).
fn may_trail(name: &HeaderName) -> bool {
    ![
        AUTHORIZATION,
        CACHE_CONTROL,
        CONTENT_ENCODING,
        CONTENT_LENGTH,
        CONTENT_RANGE,
        CONTENT_TYPE,
        HOST,
        MAX_FORWARDS,
        SET_COOKIE,
        TRAILER,
        TRANSFER_ENCODING,
        TE,
    ]
    .contains(name)
}
