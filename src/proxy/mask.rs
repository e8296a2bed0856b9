//! Masking the token where the upstream echoes it (`proxy.mask_token_in`):
//! in JSON, every `token` field and every string holding the token; in
//! anything else, every copy of its bytes. Paths are compared normalised.

use bytes::Bytes;

/// What replaces the token where the upstream echoes it.
const TOKEN_MASK: &str = "[masked]";

/// `body` with the token masked: in JSON, every `token` field and every
/// string holding the token become `"[masked]"`; in anything else, every
/// copy of the token's bytes.
pub fn mask(body: &Bytes, secret: &str) -> Bytes {
    if secret.is_empty() {
        return body.clone();
    }
    let masked_json = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut json) => {
            let changed = mask_json(&mut json, secret);
            changed.then(|| serde_json::to_vec(&json).ok()).flatten()
        }
        Err(_) => None,
    };
    let body = masked_json.map_or_else(|| body.clone(), Bytes::from);
    // Whatever the JSON walk did not reach (a key, a non-JSON body): bytes.
    replace_bytes(&body, secret.as_bytes())
}

fn replace_bytes(body: &Bytes, secret: &[u8]) -> Bytes {
    if !body.windows(secret.len()).any(|w| w == secret) {
        return body.clone();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = &body[..];
    while let Some(at) = rest.windows(secret.len()).position(|w| w == secret) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(TOKEN_MASK.as_bytes());
        rest = &rest[at + secret.len()..];
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// Masks in place; whether anything changed.
fn mask_json(value: &mut serde_json::Value, secret: &str) -> bool {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut changed = false;
            for (key, item) in map.iter_mut() {
                if key.eq_ignore_ascii_case("token") && item.is_string() {
                    *item = Value::String(TOKEN_MASK.to_owned());
                    changed = true;
                } else {
                    changed |= mask_json(item, secret);
                }
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, item| mask_json(item, secret) | changed),
        Value::String(text) if text.contains(secret) => {
            *text = text.replace(secret, TOKEN_MASK);
            true
        }
        _ => false,
    }
}

/// A path as compared with `proxy.mask_token_in`: percent-escapes decoded,
/// repeated slashes collapsed, ASCII lower-cased and a trailing slash
/// dropped, so `/api//status`, `/api/%73tatus`, `/API/Status` and
/// `/api/status/` all match (servers that route them alike would echo the
/// token for each).
pub fn normalize_path(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            )
        {
            decoded.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let mut out = Vec::with_capacity(decoded.len());
    for byte in decoded {
        if byte == b'/' && out.last() == Some(&b'/') {
            continue;
        }
        out.push(byte.to_ascii_lowercase());
    }
    if out.len() > 1 && out.last() == Some(&b'/') {
        out.pop();
    }
    out
}
