//! A message's header fields as they arrived, shared from its head: no
//! header map is built for a head that is read and written out again.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::field::{Field, FieldValues, Known, X_REQUEST_ID};
use super::{MAX_HEADERS, RAW_HEAD_LIMIT};

/// Where a header field's name and value lie in a head (start and end
/// offsets): recorded while httparse borrows the buffer, so that the values
/// can then be shared from the frozen head instead of copied.
#[derive(Debug, Clone, Copy, Default)]
pub struct Span {
    name: (u32, u32),
    value: (u32, u32),
    pub known: Known,
}

impl Span {
    /// The name's bytes in `head`, the one it was recorded in.
    fn name_in(self, head: &[u8]) -> Option<&[u8]> {
        head.get(self.name.0 as usize..self.name.1 as usize)
    }

    /// The value's bytes in `head`.
    fn value_in(self, head: &[u8]) -> Option<&[u8]> {
        head.get(self.value.0 as usize..self.value.1 as usize)
    }
}

/// Records where each of `parsed` (httparse's fields of the head that
/// fills `buf[..length]`) lies; `None` if one lies outside it. httparse
/// gives slices of the buffer, but an empty one may point anywhere.
pub fn record_spans(
    buf: &[u8],
    length: usize,
    parsed: &[httparse::Header<'_>],
    spans: &mut [Span],
) -> Option<()> {
    let base = buf.as_ptr() as usize;
    let span = |part: &[u8]| {
        if part.is_empty() {
            return Some((0, 0));
        }
        let start = (part.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(part.len())?;
        // Heads are far shorter than 4 GiB, so these fit.
        (end <= length).then_some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
    };
    for (slot, field) in spans.iter_mut().zip(parsed) {
        *slot = Span {
            name: span(field.name.as_bytes())?,
            value: span(field.value)?,
            known: Known::of(field.name.as_bytes()),
        };
    }
    Some(())
}

/// The header fields at `spans` in `head`, values shared from it, in a
/// map with room for `more` (growing a map costs more than parsing).
pub fn fields(head: &Bytes, spans: &[Span], more: usize) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(spans.len() + more);
    for span in spans {
        let name = span
            .name_in(head)
            .and_then(|name| HeaderName::from_bytes(name).ok())
            .ok_or("a header name is not valid")?;
        let value = span
            .value_in(head)
            .and_then(|value| HeaderValue::from_maybe_shared(head.slice_ref(value)).ok())
            .ok_or_else(|| format!("the value of {name} is not valid"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

// Which fields to remove can be marked in a `u128`.
const _: () = assert!(MAX_HEADERS <= 128);

/// A message's header fields as they arrived, in order, shared from its
/// head.
pub struct RawFields {
    head: Bytes,
    /// At most `MAX_HEADERS`.
    spans: Vec<Span>,
    /// An `X-Request-Id` after the others, set by
    /// [`set_request_id`](Self::set_request_id): the head is not copied.
    request_id: Option<HeaderValue>,
}

/// The name [`RawFields::set_request_id`] adds.
const REQUEST_ID: &[u8] = b"x-request-id";

impl std::fmt::Debug for RawFields {
    // Not the bytes: a request's carry its credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFields")
            .field("fields", &self.spans.len())
            .field("head_len", &self.head.len())
            .finish()
    }
}

impl RawFields {
    /// The fields at `spans` (at most `MAX_HEADERS`) in `head`.
    pub fn new(head: Bytes, spans: &[Span]) -> Self {
        Self {
            head,
            spans: spans.to_vec(),
            request_id: None,
        }
    }

    fn name(&self, span: Span) -> &[u8] {
        span.name_in(&self.head).unwrap_or_default()
    }

    fn value(&self, span: Span) -> &[u8] {
        span.value_in(&self.head).unwrap_or_default()
    }

    fn field(&self, span: &Span) -> (Known, &[u8], &[u8]) {
        (span.known, self.name(*span), self.value(*span))
    }

    /// The field that [`set_request_id`](Self::set_request_id) added.
    fn added(&self) -> Option<(Known, &[u8], &[u8])> {
        self.request_id
            .as_ref()
            .map(|id| (Known::RequestId, REQUEST_ID, id.as_bytes()))
    }

    /// Names (as they came) and values, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Known, &[u8], &[u8])> {
        self.spans
            .iter()
            .map(|span| self.field(span))
            .chain(self.added())
    }

    /// The values of the fields of a `known` name, in order.
    pub fn values(&self, known: Known) -> impl Iterator<Item = &[u8]> {
        self.spans
            .iter()
            .filter(move |span| span.known == known)
            .map(|span| self.value(*span))
            .chain(
                self.added()
                    .filter(|(k, ..)| *k == known)
                    .map(|(_, _, v)| v),
            )
    }

    /// Adds `X-Request-Id: id` after the other fields, without copying the
    /// head (the fields must not have one).
    pub fn set_request_id(&mut self, id: HeaderValue) {
        self.request_id = Some(id);
    }

    /// Removes the fields whose positions are set in `marked`, keeping the
    /// order of the rest.
    pub fn remove_marked(&mut self, marked: u128) {
        let mut at = 0;
        self.spans.retain(|_| {
            let keep = marked >> at & 1 == 0;
            at += 1;
            keep
        });
    }

    /// The positions of the fields for which `test` holds.
    pub fn mark(&self, mut test: impl FnMut(Known, &[u8], &[u8]) -> bool) -> u128 {
        self.iter()
            .enumerate()
            .filter(|(_, (known, name, value))| test(*known, name, value))
            .fold(0, |marked, (at, _)| marked | 1 << at)
    }

    /// In a header map's order, which is the order hyper's server writes:
    /// the fields of one name together, names in the order they first came.
    pub fn grouped(&self) -> Grouped<'_> {
        Grouped {
            fields: self,
            group: 0,
            next: 0,
            added: false,
        }
    }

    /// Whether the head is small enough for [`grouped`](Self::grouped),
    /// whose name comparisons grow with the square of the fields: nearly
    /// every answer's is. A larger one is read into a header map.
    pub fn is_small(&self) -> bool {
        self.head.len() <= RAW_HEAD_LIMIT
    }

    /// The length of the head the fields lie in: at least theirs.
    pub fn head_len(&self) -> usize {
        self.head.len() + self.request_id.as_ref().map_or(0, |id| id.len() + 16)
    }

    /// The fields in a header map, with room for `more`.
    pub fn to_map(&self, more: usize) -> Result<HeaderMap, String> {
        let mut map = fields(&self.head, &self.spans, more + 1)?;
        if let Some(id) = &self.request_id {
            map.append(X_REQUEST_ID.name, id.clone());
        }
        Ok(map)
    }

    /// The fields in a header map.
    pub fn into_map(self) -> Result<HeaderMap, String> {
        self.to_map(0)
    }
}

/// See [`RawFields::grouped`].
#[derive(Debug)]
pub struct Grouped<'a> {
    fields: &'a RawFields,
    /// The first field of the group being written.
    group: usize,
    /// The next field to look at for it.
    next: usize,
    /// The added field has been given.
    added: bool,
}

impl<'a> Iterator for Grouped<'a> {
    type Item = (Known, &'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let fields = self.fields;
        let spans = fields.spans.as_slice();
        // Known names are told apart by their tag; other names by length
        // first, then by bytes.
        let same = |a: &Span, b: &Span| {
            a.known == b.known
                && (a.known != Known::Other
                    || (a.name.1 - a.name.0 == b.name.1 - b.name.0
                        && fields.name(*a).eq_ignore_ascii_case(fields.name(*b))))
        };
        loop {
            let Some(leader) = spans.get(self.group) else {
                // Last, what was added (a name the fields do not have).
                if self.added {
                    return None;
                }
                self.added = true;
                return fields.added();
            };
            while let Some(span) = spans.get(self.next) {
                let at = self.next;
                self.next += 1;
                if at == self.group || same(span, leader) {
                    return Some(fields.field(span));
                }
            }
            // The next group starts at the next name not seen before.
            self.group += 1;
            while let Some(candidate) = spans.get(self.group) {
                if !spans[..self.group]
                    .iter()
                    .any(|earlier| same(earlier, candidate))
                {
                    break;
                }
                self.group += 1;
            }
            self.next = self.group;
        }
    }
}

impl FieldValues for RawFields {
    fn values_of<'a>(&'a self, field: &Field) -> impl Iterator<Item = &'a [u8]> {
        self.values(field.known)
    }

    fn tags(&self) -> impl Iterator<Item = Known> {
        self.spans
            .iter()
            .map(|span| span.known)
            .chain(self.request_id.as_ref().map(|_| Known::RequestId))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::testing::raw_fields;

    #[test]
    fn a_request_id_set_comes_last_everywhere_without_a_copy() {
        let Some(mut fields) =
            raw_fields(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nx-a: 2\r\n\r\nok")
        else {
            panic!("a head that parses");
        };
        let head = fields.head.clone();
        fields.set_request_id(HeaderValue::from_static("abc123"));
        assert!(
            fields.head.as_ptr() == head.as_ptr(),
            "the head is not copied"
        );
        let grouped: Vec<(Known, Vec<u8>, Vec<u8>)> = fields
            .grouped()
            .map(|(k, n, v)| (k, n.to_vec(), v.to_vec()))
            .collect();
        let names: Vec<&[u8]> = grouped.iter().map(|(_, n, _)| n.as_slice()).collect();
        assert_eq!(
            names,
            [&b"X-A"[..], b"x-a", b"Content-Length", b"x-request-id"]
        );
        assert_eq!(
            grouped[3],
            (
                Known::RequestId,
                b"x-request-id".to_vec(),
                b"abc123".to_vec()
            )
        );
        assert_eq!(fields.iter().count(), 4);
        assert_eq!(
            fields.values(Known::RequestId).collect::<Vec<_>>(),
            [&b"abc123"[..]]
        );
        assert_eq!(fields.tags().last(), Some(Known::RequestId));
        let map = fields.to_map(0).unwrap_or_default();
        assert_eq!(
            map.get("x-request-id").map(HeaderValue::as_bytes),
            Some(&b"abc123"[..])
        );
        assert_eq!(map.len(), 4);
    }
}
