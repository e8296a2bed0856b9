//! One walker over an error's causes, for the two questions the crate asks
//! of any error: is a cause of this type in it (a timeout, a TLS failure, an
//! invalid answer), and what does the whole chain say, on one line.

use std::error::Error;

/// An error and its causes, outermost first. `io::Error::source()` skips
/// the error it wraps (it returns that error's own source), so a wrapped
/// error is reached through `get_ref` instead: that is where rustls's
/// errors sit.
pub fn causes<'a>(
    error: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&e| match e.downcast_ref::<std::io::Error>() {
        Some(io) => io.get_ref().map(|inner| inner as &(dyn Error + 'static)),
        None => e.source(),
    })
}

/// The first cause of type `T` in `error`'s chain (`error` itself included).
pub fn find<'a, T: Error + 'static>(error: &'a (dyn Error + 'static)) -> Option<&'a T> {
    causes(error).find_map(|e| e.downcast_ref::<T>())
}

/// The chain in one line, `outer: inner: innermost`, each cause said once:
/// a cause whose text its outer error already shows is left out.
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    for cause in causes(error) {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("the innermost cause")]
    struct Inner;

    #[test]
    fn a_cause_wrapped_in_an_io_error_is_found_and_said_once() {
        let error = Outer(std::io::Error::other(Inner));
        assert!(find::<Inner>(&error).is_some());
        assert!(find::<std::fmt::Error>(&error).is_none());
        assert_eq!(chain(&error), "outer: the innermost cause");
    }
}
