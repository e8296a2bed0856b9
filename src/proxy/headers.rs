//! Header rewriting of a correct intermediary: hop-by-hop headers and those
//! named in `Connection` removed (RFC 9110 §7.6.1), with them a
//! `Content-Length` beside `Transfer-Encoding` (RFC 9112 §6.3), the order of
//! the others kept; what the proxy sets on every request ([`Added`]); and
//! `Location` under the upstream's base mapped back to the proxy.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::UpstreamUrl;
use crate::http1::field::{X_REQUEST_ID, tokens};
use crate::http1::{Known, RawFields, WriteFields, lists};

/// Request headers that the proxy consumes itself: `Expect` (the proxy's
/// server answers `100 Continue`), the local key, and `Trailer` (the proxy
/// does not forward trailers' announcement without the trailers' framing).
const REQUEST_ONLY: [Known; 3] = [Known::Expect, Known::ProxyKey, Known::Trailer];

/// Removes hop-by-hop headers, the headers that `Connection` names, and
/// `extra`, keeping the order of the rest. With Transfer-Encoding,
/// Content-Length goes too: it is wrong, and an intermediary must remove
/// it (RFC 9112, 6.3). Costs nothing when none is present, and allocates
/// nothing when those to remove come last (as `Connection: keep-alive`
/// usually does in a response).
fn remove_hop_by_hop(headers: &mut HeaderMap, extra: &[Known]) {
    let encoded = headers.contains_key(header::TRANSFER_ENCODING);
    // `Connection` is looked up once, not once per header.
    let listed = |connection: &header::GetAll<'_, header::HeaderValue>, name: &HeaderName| {
        let name = name.as_str().as_bytes();
        is_dropped(
            Known::of(name),
            name,
            encoded,
            extra,
            connection.iter().map(header::HeaderValue::as_bytes),
        )
    };
    let mut first = None;
    let mut count = 0;
    let connection = headers.get_all(header::CONNECTION);
    for (position, name) in headers.keys().enumerate() {
        if listed(&connection, name) {
            first.get_or_insert(position);
            count += 1;
        }
    }
    let Some(first) = first else {
        return;
    };
    if first + count == headers.keys_len() {
        // Only the last names go: removing the last entry moves no other.
        for _ in 0..count {
            if let Some(last) = headers.keys().last().cloned() {
                headers.remove(&last);
            }
        }
        return;
    }
    // Rebuilt rather than removed in place: `HeaderMap::remove` swaps the last
    // header into the hole, which would reorder what the upstream sees.
    let old = std::mem::take(headers);
    headers.reserve(old.len());
    let connection = old.get_all(header::CONNECTION);
    for (name, value) in &old {
        if !listed(&connection, name) {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Hop-by-hop removal for a request, with the headers the proxy consumes.
pub fn clean_request(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers, &REQUEST_ONLY);
}

/// Hop-by-hop removal for a response.
pub fn clean_response(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers, &[]);
}

/// `clean_response` for a response whose fields are as they arrived
/// (names in any case), keeping the order of the rest.
pub(crate) fn clean_response_fields(fields: &mut RawFields) {
    clean_fields(fields, &[]);
}

/// `clean_request` for a request whose fields are as they arrived.
pub(crate) fn clean_request_fields(fields: &mut RawFields) {
    clean_fields(fields, &REQUEST_ONLY);
}

/// `remove_hop_by_hop` for fields as they arrived.
fn clean_fields(fields: &mut RawFields, extra: &[Known]) {
    let mut encoded = false;
    // Whether a Connection value names a field that is not hop-by-hop
    // anyway: only then is every field looked for in it.
    let mut listing = false;
    for (known, _, value) in fields.iter() {
        match known {
            Known::TransferEncoding => encoded = true,
            Known::Connection => {
                listing |= tokens(value).any(|token| Known::of(token) != Known::KeepAlive);
            }
            _ => {}
        }
    }
    let marked = fields.mark(|known, name, _| {
        let connection = listing.then(|| fields.values(Known::Connection));
        is_dropped(
            known,
            name,
            encoded,
            extra,
            connection.into_iter().flatten(),
        )
    });
    if marked != 0 {
        fields.remove_marked(marked);
    }
}

/// Whether a field goes with its connection instead of the message: a
/// hop-by-hop name, a Content-Length beside Transfer-Encoding (`encoded`:
/// RFC 9112, 6.3), a name that one of the `connection` values lists, or
/// one of `extra`. The one rule for header maps and for fields as they
/// arrived.
fn is_dropped<'v>(
    known: Known,
    name: &[u8],
    encoded: bool,
    extra: &[Known],
    mut connection: impl Iterator<Item = &'v [u8]>,
) -> bool {
    extra.contains(&known)
        || known.is_hop_by_hop()
        || (encoded && known == Known::ContentLength)
        || connection.any(|value| lists(value, name))
}

/// What the proxy sets on every request that it sends: the upstream's
/// Host, the token, its own User-Agent, and `TE: trailers` when the client
/// can take trailers (TE itself is hop-by-hop, so the client's is gone).
#[derive(Debug, Clone)]
pub struct Added {
    pub trailers: bool,
    pub host: HeaderValue,
    pub authorization: HeaderValue,
    pub user_agent: HeaderValue,
    /// `X-Request-Id`, when the client sent none or one that is not sane.
    pub request_id: Option<HeaderValue>,
}

impl Added {
    /// Sets them in a cleaned map: Host, Authorization and User-Agent
    /// take the place of the client's, and those that the client did not
    /// send (an h2c client sends no Host) come last, after TE.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if self.trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        headers.insert(header::HOST, self.host.clone());
        headers.insert(header::AUTHORIZATION, self.authorization.clone());
        headers.insert(header::USER_AGENT, self.user_agent.clone());
        if let Some(id) = &self.request_id {
            headers.insert(X_REQUEST_ID.name, id.clone());
        }
    }
}

/// A request's header fields as they arrived, cleaned, and what the proxy
/// sets: written out as the header map that [`to_map`](Self::to_map)
/// gives would be, without building it. Only for heads that
/// [`RawFields::is_small`] accepts.
#[derive(Debug)]
pub struct RawRequest {
    pub fields: RawFields,
    pub added: Added,
}

impl RawRequest {
    /// Each field as `name: value`, in the map's order: the client's
    /// grouped by name, the proxy's values in place of the client's, then
    /// those the client did not send, in the order `Added::apply` inserts
    /// them.
    fn for_each(&self, put: &mut impl FnMut(&[u8], &[u8])) {
        let added = &self.added;
        let mut set = [false; 4];
        for (known, name, value) in self.fields.grouped() {
            let ours = match known {
                Known::Host => Some((0, &added.host)),
                Known::Authorization => Some((1, &added.authorization)),
                Known::UserAgent => Some((2, &added.user_agent)),
                Known::RequestId => added.request_id.as_ref().map(|id| (3, id)),
                _ => None,
            };
            match ours {
                // The client's first field of the name gives the place.
                Some((at, ours)) if !set[at] => {
                    set[at] = true;
                    put(name, ours.as_bytes());
                }
                Some(_) => {}
                None => put(name, value),
            }
        }
        if added.trailers {
            put(b"te", b"trailers");
        }
        let names: [&[u8]; 4] = [b"host", b"authorization", b"user-agent", b"x-request-id"];
        let values = [
            Some(&added.host),
            Some(&added.authorization),
            Some(&added.user_agent),
            added.request_id.as_ref(),
        ];
        for ((set, name), value) in set.into_iter().zip(names).zip(values) {
            if let (false, Some(value)) = (set, value) {
                put(name, value.as_bytes());
            }
        }
    }
}

impl WriteFields for RawRequest {
    fn size_hint(&self) -> usize {
        let added = &self.added;
        self.fields.head_len()
            + added.host.len()
            + added.authorization.len()
            + added.user_agent.len()
            + added.request_id.as_ref().map_or(0, |id| id.len() + 16)
            + 64
    }

    fn for_each_field(&self, mut put: impl FnMut(&[u8], &[u8])) {
        self.for_each(&mut put);
    }

    fn to_map(&self) -> Result<HeaderMap, String> {
        let mut headers = self.fields.to_map(4)?;
        self.added.apply(&mut headers);
        Ok(headers)
    }
}

/// A request's header fields as they go upstream: a cleaned map with the
/// proxy's fields set, or the fields as they arrived and what is added.
#[derive(Debug)]
pub enum OutFields {
    Map(HeaderMap),
    Raw(RawRequest),
}

impl OutFields {
    /// Replaces the token that the request carries.
    pub fn set_authorization(&mut self, value: HeaderValue) {
        match self {
            Self::Map(map) => {
                map.insert(header::AUTHORIZATION, value);
            }
            Self::Raw(raw) => raw.added.authorization = value,
        }
    }
}

impl WriteFields for OutFields {
    fn size_hint(&self) -> usize {
        match self {
            Self::Map(map) => map.size_hint(),
            Self::Raw(raw) => raw.size_hint(),
        }
    }

    fn for_each_field(&self, put: impl FnMut(&[u8], &[u8])) {
        match self {
            Self::Map(map) => map.for_each_field(put),
            Self::Raw(raw) => raw.for_each_field(put),
        }
    }

    fn to_map(&self) -> Result<HeaderMap, String> {
        match self {
            Self::Map(map) => Ok(map.clone()),
            Self::Raw(raw) => raw.to_map(),
        }
    }
}

/// Maps a `Location` under the upstream's base to the same path on the
/// proxy, as nginx's `proxy_redirect default` does.
#[derive(Debug, Clone)]
pub struct LocationRewriter {
    /// `scheme://authority` forms that name the upstream, plus `//authority`.
    origins: Vec<String>,
    base_path: String,
}

impl LocationRewriter {
    /// For the given upstream.
    pub fn new(upstream: &UpstreamUrl) -> Self {
        let scheme = upstream.scheme.as_str();
        let host = upstream.authority.host();
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = upstream.authority.port_u16().unwrap_or(default_port);
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let mut authorities = vec![format!("{host}:{port}")];
        if port == default_port {
            authorities.push(host);
        }
        let mut origins = Vec::new();
        for authority in &authorities {
            origins.push(format!("{scheme}://{authority}"));
            origins.push(format!("//{authority}"));
        }
        Self {
            origins,
            base_path: upstream.base_path.clone(),
        }
    }

    /// The rewritten value, or `None` to leave it as it is.
    pub fn rewrite(&self, location: &str) -> Option<String> {
        let path = self
            .origins
            .iter()
            .find_map(|origin| strip_prefix_ignore_case(location, origin))
            .filter(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']));
        let path = match path {
            Some(path) => path,
            // Only a path-absolute reference is relative to the upstream's
            // origin; "a/b" and "../b" are relative to the request and stay.
            None if location.starts_with('/') && !location.starts_with("//") => {
                if self.base_path.is_empty() {
                    return None;
                }
                location
            }
            None => return None,
        };
        let rest = path.strip_prefix(self.base_path.as_str())?;
        if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
            return None;
        }
        Some(if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        })
    }
}

fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn upstream(url: &str) -> UpstreamUrl {
        let uri: http::Uri = url.parse().unwrap_or_default();
        UpstreamUrl {
            scheme: uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
            authority: uri
                .authority()
                .cloned()
                .unwrap_or_else(|| http::uri::Authority::from_static("x")),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        }
    }

    /// A map of these fields, in this order.
    fn map(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        headers
    }

    /// The map's fields, in its order.
    fn fields(headers: &HeaderMap) -> Vec<(&str, &str)> {
        headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_keeping_order() {
        let mut headers = map(&[
            ("a", "1"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "v"),
            ("b", "2"),
            ("transfer-encoding", "chunked"),
            ("a", "3"),
            ("upgrade", "websocket"),
            ("c", "4"),
            ("expect", "100-continue"),
        ]);
        clean_request(&mut headers);
        assert_eq!(
            fields(&headers),
            [("a", "1"), ("a", "3"), ("b", "2"), ("c", "4")]
        );
    }

    #[test]
    fn trailing_hop_by_hop_headers_are_removed_in_place() {
        let mut headers = map(&[
            ("server", "nginx"),
            ("content-type", "text/plain"),
            ("x-multi", "1"),
            ("x-multi", "2"),
            ("content-length", "4"),
            ("keep-alive", "timeout=5"),
            ("connection", "keep-alive"),
        ]);
        clean_response(&mut headers);
        assert_eq!(
            fields(&headers),
            [
                ("server", "nginx"),
                ("content-type", "text/plain"),
                ("x-multi", "1"),
                ("x-multi", "2"),
                ("content-length", "4"),
            ]
        );
    }

    #[test]
    fn transfer_encoding_takes_content_length_with_it() {
        let mut headers = map(&[
            ("content-length", "99"),
            ("x-a", "1"),
            ("transfer-encoding", "chunked"),
        ]);
        clean_response(&mut headers);
        assert_eq!(fields(&headers), [("x-a", "1")]);
        let mut headers = map(&[("content-length", "99"), ("x-a", "1")]);
        clean_request(&mut headers);
        assert_eq!(fields(&headers), [("content-length", "99"), ("x-a", "1")]);
    }

    /// Fields as they arrived, cleaned and in the map's order, are those of
    /// the map cleaned: for heads written by hand and thousands mangled.
    #[test]
    fn raw_fields_are_cleaned_and_ordered_as_a_map() {
        let seeds: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nContent-Type: a\r\nX-Hop: 1\r\nSet-Cookie: a\r\nKeep-Alive: t=5\r\nx-other: 1\r\nSET-COOKIE: b\r\nConnection: X-Hop, close\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nx-a: 1\r\nTransfer-Encoding: chunked\r\nX-A: 2\r\nProxy-Connection: x\r\nUpgrade: h2c\r\n\r\n",
            b"HTTP/1.1 302 Found\r\nLocation: /x\r\nconnection: keep-alive\r\nconnection: x-b\r\nx-b: 1\r\nx-c: 2\r\nx-b: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nA: 3\r\nC: 4\r\nB: 5\r\nTE: trailers\r\nTrailer: x\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        let mut compared = 0;
        for case in 0..20_000 {
            let head = if case < seeds.len() {
                seeds[case].to_vec()
            } else {
                crate::http1::testing::mangled(&mut rng, &seeds)
            };
            let Some(mut raw) = crate::http1::testing::raw_fields(&head) else {
                continue;
            };
            let Some(mut map) =
                crate::http1::testing::raw_fields(&head).and_then(|fields| fields.into_map().ok())
            else {
                continue;
            };
            clean_response_fields(&mut raw);
            clean_response(&mut map);
            let raw: Vec<(String, Vec<u8>)> = raw
                .grouped()
                .map(|(_, name, value)| {
                    (String::from_utf8_lossy(name).to_lowercase(), value.to_vec())
                })
                .collect();
            let map: Vec<(String, Vec<u8>)> = map
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                .collect();
            assert_eq!(raw, map, "{}", String::from_utf8_lossy(&head));
            compared += 1;
        }
        assert!(compared > 1_000, "only {compared} heads were whole");
    }

    #[test]
    fn untouched_headers_are_not_rebuilt() {
        let mut headers = HeaderMap::new();
        headers.append("z", HeaderValue::from_static("1"));
        headers.append("a", HeaderValue::from_static("2"));
        clean_response(&mut headers);
        let names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["z", "a"]);
    }

    #[test]
    fn location_under_the_base_is_rewritten() {
        let r = LocationRewriter::new(&upstream("https://api.example.com/v1"));
        assert_eq!(
            r.rewrite("https://api.example.com/v1/items/2?x=1")
                .as_deref(),
            Some("/items/2?x=1")
        );
        assert_eq!(
            r.rewrite("HTTPS://API.example.com:443/v1").as_deref(),
            Some("/")
        );
        assert_eq!(r.rewrite("/v1/items").as_deref(), Some("/items"));
        assert_eq!(r.rewrite("//api.example.com/v1/a").as_deref(), Some("/a"));
        assert_eq!(r.rewrite("https://api.example.com/v10/items"), None);
        assert_eq!(r.rewrite("https://api.example.com/other"), None);
        assert_eq!(r.rewrite("https://api.example.com.evil/v1/x"), None);
        assert_eq!(r.rewrite("https://other.example.com/v1/x"), None);
        assert_eq!(r.rewrite("http://api.example.com/v1/x"), None);
        assert_eq!(r.rewrite("relative/path"), None);
    }

    #[test]
    fn location_at_a_root_upstream_with_a_port() {
        let r = LocationRewriter::new(&upstream("http://127.0.0.1:8081"));
        assert_eq!(
            r.rewrite("http://127.0.0.1:8081/a?b").as_deref(),
            Some("/a?b")
        );
        assert_eq!(r.rewrite("http://127.0.0.1:8081").as_deref(), Some("/"));
        assert_eq!(r.rewrite("http://127.0.0.1/a"), None);
        assert_eq!(r.rewrite("/a"), None);
    }
}
