//! Image references: `[http://]HOST:PORT/NAME:TAG` or `[http://]HOST:PORT/NAME@blake3:<hex>`.

use crate::error::{ClientError, Result};
use std::fmt;
use thaw_format::wire::valid_name;
use thaw_format::Digest;

/// Which image of a repository a reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Tag(String),
    Digest(Digest),
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Base URL of the chunk server, without a trailing slash.
    pub server: String,
    pub name: String,
    pub selector: Selector,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef> {
        let bad = || ClientError::BadRef(s.to_owned());
        let (scheme, rest) = split_scheme(s, "http").ok_or_else(bad)?;
        let (host, repo) = rest.split_once('/').ok_or_else(bad)?;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace()) {
            return Err(bad());
        }
        let (name, selector) = if let Some((name, digest)) = repo.split_once('@') {
            (name, Selector::Digest(digest.parse().map_err(|_| bad())?))
        } else {
            let (name, tag) = repo.rsplit_once(':').ok_or_else(bad)?;
            if !valid_name(tag) {
                return Err(bad());
            }
            (name, Selector::Tag(tag.to_owned()))
        };
        if !valid_name(name) {
            return Err(bad());
        }
        Ok(ImageRef {
            server: format!("{scheme}://{host}"),
            name: name.to_owned(),
            selector,
        })
    }

    /// The tag, for references that name one.
    pub fn tag(&self) -> Option<&str> {
        match &self.selector {
            Selector::Tag(t) => Some(t),
            Selector::Digest(_) => None,
        }
    }
}

/// `s`'s scheme (`http` or `https`; `default` when it names none) and the
/// rest; `None` for another scheme.
pub(crate) fn split_scheme<'a>(s: &'a str, default: &'a str) -> Option<(&'a str, &'a str)> {
    match s.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => Some((scheme, rest)),
        Some(_) => None,
        None => Some((default, s)),
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Tag(t) => write!(f, "{}/{}:{}", self.server, self.name, t),
            Selector::Digest(d) => write!(f, "{}/{}@{}", self.server, self.name, d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let r = ImageRef::parse("127.0.0.1:7070/py-env:v1.2").unwrap();
        assert_eq!(r.server, "http://127.0.0.1:7070");
        assert_eq!(r.name, "py-env");
        assert_eq!(r.tag(), Some("v1.2"));
        let d = Digest::of(b"x");
        let r = ImageRef::parse(&format!("http://h:1/img@{d}")).unwrap();
        assert_eq!(r.selector, Selector::Digest(d));
        assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn rejects_bad_refs() {
        for bad in [
            "",
            "host",
            "h:1/",
            "h:1/name",
            "h:1/../x:t",
            "h:1/a:",
            "ftp://h/a:b",
            "h:1/a@blake3:00",
            "h:1/a/b:c",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
