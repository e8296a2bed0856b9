//! Helpers for the crate's tests.

/// One of `seeds` mangled at random for tests: bytes changed, inserted,
/// removed, cut, repeated.
pub fn mangled(rng: &mut fastrand::Rng, seeds: &[&[u8]]) -> Vec<u8> {
    let inserts = [b'\r', b'\n', b':', b' ', b';', b'0', b'f', b',', 0x7f, 0xff];
    let mut bytes = seeds[rng.usize(..seeds.len())].to_vec();
    for _ in 0..rng.usize(1..5) {
        let at = rng.usize(..bytes.len().max(1)).min(bytes.len());
        match rng.u8(..5) {
            0 if at < bytes.len() => bytes[at] = rng.u8(..),
            1 => bytes.insert(at, inserts[rng.usize(..inserts.len())]),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            3 => bytes.truncate(at),
            _ => {
                let piece = bytes[at..].to_vec();
                bytes.extend_from_slice(&piece[..piece.len().min(16)]);
            }
        }
    }
    bytes
}

/// The header fields of `head` (an answer's) as they arrived; `None`
/// if it is not a whole and valid head.
pub fn raw_fields(head: &[u8]) -> Option<crate::http1::RawFields> {
    let mut buf = bytes::BytesMut::from(head);
    match crate::http1::parse_response(&mut buf, &http::Method::GET) {
        Ok(crate::http1::Answered::Complete(answer)) => match answer.head.fields {
            crate::http1::Fields::Raw(raw) => Some(raw),
            crate::http1::Fields::Map(_) => None,
        },
        _ => None,
    }
}
