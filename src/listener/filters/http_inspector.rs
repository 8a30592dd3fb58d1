//! HTTP inspector: decides from the bytes peeked off a new plaintext connection whether it speaks HTTP/1.0,
//! HTTP/1.1 or prior-knowledge HTTP/2 (h2c), as Envoy's `envoy.filters.listener.http_inspector` does, so filter
//! chains can match `application_protocols` `http/1.0`, `http/1.1` or `h2c`.
//!
//! # How this copies Envoy
//!
//! Envoy (source/extensions/filters/listener/http_inspector/http_inspector.cc, with the Balsa parser that is the
//! default since 1.39, source/common/http/http1/balsa_parser.cc and quiche's balsa_frame.cc):
//!
//! * bytes that are a prefix of the HTTP/2 connection preface wait for more; the whole preface is `h2c`. Anything
//!   else is treated as HTTP/1.
//! * a first byte of CR or LF is not HTTP; Balsa also refuses a first byte that is whitespace or a control byte.
//! * only the request line (up to the first LF) is parsed. Until an LF arrives Envoy waits; once it has peeked
//!   [`MAX_INSPECT`] bytes without one it gives up. Envoy closes the connection there (`read_error`); we answer
//!   [`HttpInspect::NotHttp`], and a caller that wants Envoy's behaviour closes when it gets `NotHttp` for a buffer of
//!   [`MAX_INSPECT`] bytes or more.
//! * the line, with trailing CRs dropped, is split like Balsa: method, target and version are the first three runs
//!   of bytes above 0x20, and the version is everything from the third run to the end of the line (so
//!   `GET / HTTP/1.1 x` has an invalid version).
//! * method: any RFC 9110 token (Envoy runs Balsa with custom methods allowed), so unknown methods are HTTP.
//! * target: http-parser's rules as Envoy's Balsa wrapper reproduces them: `/` or `*` followed by printable
//!   ASCII, or `scheme://host[path]` (CONNECT: `host[path]`) with http-parser's host characters.
//! * version: `HTTP/<digit>.<digit>`, or nothing at all (an HTTP/0.9-style `GET /`).
//! * the protocol is HTTP/1.1 when the trimmed request line ends with `HTTP/1.1`, and HTTP/1.0 for every other
//!   accepted line (including `HTTP/2.0` and an empty version), exactly as Envoy labels them.
//!
//! The inspector is stateless: the caller passes everything peeked so far and calls again with more. It never
//! panics, never allocates, and looks at each byte at most a few times.

/// Envoy's `MAX_INSPECT_SIZE`: peeked bytes beyond it are never looked at; a request line not finished within it
/// is given up on.
pub const MAX_INSPECT: usize = 64 * 1024;

/// What the first bytes of a plaintext connection say about HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpInspect {
    /// Undecided; call again with more bytes (only while fewer than [`MAX_INSPECT`] were given).
    NeedMore,
    /// ALPN `http/1.0` (Envoy's label for every accepted request line that is not HTTP/1.1).
    Http10,
    /// ALPN `http/1.1`.
    Http11,
    /// The HTTP/2 prior-knowledge preface: ALPN `h2c`.
    H2c,
    /// Not HTTP: Envoy's `http_not_found` (see the module doc for a request line longer than [`MAX_INSPECT`]).
    NotHttp,
}

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HTTP11_SUFFIX: &[u8] = b"HTTP/1.1";

/// Inspects `buf`, the bytes peeked from a new connection so far.
pub fn inspect(buf: &[u8]) -> HttpInspect {
    // Envoy never peeks past its limit, so bytes beyond it must not change the verdict.
    let view = buf.get(..MAX_INSPECT).unwrap_or(buf);
    let common = view.len().min(H2_PREFACE.len());
    if view.get(..common) == H2_PREFACE.get(..common) {
        return if common < H2_PREFACE.len() { HttpInspect::NeedMore } else { HttpInspect::H2c };
    }
    // Envoy refuses an empty first line; Balsa refuses a request that starts with whitespace or a control byte.
    if view.first().is_some_and(|&b| is_whitespace(b)) {
        return HttpInspect::NotHttp;
    }
    match view.iter().position(|&b| b == b'\n') {
        Some(lf) => request_line(view.get(..lf).unwrap_or_default()),
        None if view.len() >= MAX_INSPECT => HttpInspect::NotHttp,
        None => HttpInspect::NeedMore,
    }
}

/// Judges a complete request line (without its LF) as Envoy's Balsa-based parser does.
fn request_line(line: &[u8]) -> HttpInspect {
    let line = trim_end(line);
    let (method, rest) = next_token(line);
    let (target, rest) = next_token(rest);
    // Balsa's third part runs to the end of the (trimmed) line, whitespace included.
    let version = trim_start(rest);
    if !is_token(method) || !is_valid_target(target, method == b"CONNECT") || !is_valid_version(version) {
        return HttpInspect::NotHttp;
    }
    // Envoy asks whether the first line ends in HTTP/1.1, not whether the version is 1.1 (the two differ only
    // for an HTTP/0.9-style line whose target ends in "HTTP/1.1").
    if line.ends_with(HTTP11_SUFFIX) { HttpInspect::Http11 } else { HttpInspect::Http10 }
}

/// Balsa's whitespace: every byte up to and including the space (so CR, tab and control bytes too).
fn is_whitespace(b: u8) -> bool {
    b <= b' '
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| !is_whitespace(b)).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| !is_whitespace(b)).map_or(0, |i| i + 1);
    bytes.get(..end).unwrap_or_default()
}

/// Skips whitespace, then splits off the following run of non-whitespace bytes.
fn next_token(bytes: &[u8]) -> (&[u8], &[u8]) {
    let bytes = trim_start(bytes);
    let end = bytes.iter().position(|&b| is_whitespace(b)).unwrap_or(bytes.len());
    bytes.split_at_checked(end).unwrap_or((bytes, &[]))
}

/// RFC 9110 `token`: what Envoy accepts as a method when custom methods are allowed.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_')
                || matches!(b, b'`' | b'|' | b'~')
        })
}

/// http-parser's URL check as Envoy's Balsa wrapper (`isUrlValid`) reproduces it.
fn is_valid_target(target: &[u8], is_connect: bool) -> bool {
    // Path and query bytes: tab, form feed or printable ASCII.
    let path_byte = |b: &u8| matches!(*b, 9 | 12 | b'!'..=b'~');
    let Some((&first, after_first)) = target.split_first() else {
        return false;
    };
    if first == b'/' || first == b'*' {
        return after_first.iter().all(path_byte);
    }
    let mut rest = target;
    if !is_connect {
        // absolute-form: a scheme (a letter, then letters, digits, '+', '-', '.') followed by "://".
        if !first.is_ascii_alphabetic() {
            return false;
        }
        let scheme_len = 1 + after_first
            .iter()
            .take_while(|&&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
            .count();
        let Some(after_scheme) = target.get(scheme_len..).and_then(|r| r.strip_prefix(b"://")) else {
            return false;
        };
        rest = after_scheme;
    }
    let host_len = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    let (host, path_query) = rest.split_at_checked(host_len).unwrap_or((rest, &[]));
    let host_byte = |b: &u8| {
        b.is_ascii_alphanumeric()
            || matches!(*b, b'!' | b'$' | b'%' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'-' | b'.')
            || matches!(*b, b':' | b';' | b'=' | b'@' | b'[' | b']' | b'_' | b'~')
    };
    // http-parser's quirk: '@' may appear any number of times in the host, but never twice in a row.
    host.iter().all(host_byte) && !host.windows(2).any(|w| w == b"@@") && path_query.iter().all(path_byte)
}

/// `HTTP/<digit>.<digit>`, or empty for an HTTP/0.9-style request line.
fn is_valid_version(version: &[u8]) -> bool {
    match version {
        [] => true,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::listener::filters::test_rng::Rng;

    use HttpInspect::{H2c, Http10, Http11, NeedMore, NotHttp};

    /// Every proper prefix needs more; the whole gives `expected`, also with more bytes after it.
    fn assert_complete(bytes: &[u8], expected: HttpInspect) {
        for n in 0..bytes.len() {
            assert_eq!(inspect(&bytes[..n]), NeedMore, "{:?}", String::from_utf8_lossy(&bytes[..n]));
        }
        assert_eq!(inspect(bytes), expected, "{:?}", String::from_utf8_lossy(bytes));
        let more = [bytes, b"Host: example\r\n\r\n\x00\xff"].concat();
        assert_eq!(inspect(&more), expected);
    }

    #[test]
    fn http1_request_lines() {
        for (line, expected) in [
            ("GET / HTTP/1.1\r\n", Http11),
            ("GET /index.html?q=1&r=%20 HTTP/1.0\r\n", Http10),
            ("POST /api/v1/things HTTP/1.1\r\n", Http11),
            ("HEAD * HTTP/1.1\r\n", Http11),
            ("OPTIONS * HTTP/1.1\r\n", Http11),
            ("CONNECT example.com:443 HTTP/1.1\r\n", Http11),
            ("CONNECT [::1]:443 HTTP/1.0\r\n", Http10),
            ("GET http://example.com:8080/a/b HTTP/1.1\r\n", Http11),
            ("GET svn+ssh://user@host/repo HTTP/1.1\r\n", Http11),
            ("DELETE https://example.com?x HTTP/1.1\r\n", Http11),
            // Bare LF, extra spaces and trailing whitespace are tolerated by Balsa.
            ("GET / HTTP/1.1\n", Http11),
            ("GET  /   HTTP/1.1  \r\n", Http11),
            ("GET / HTTP/1.1\r\r\n", Http11),
            // Other versions are labelled HTTP/1.0, as Envoy does.
            ("GET / HTTP/2.0\r\n", Http10),
            ("GET / HTTP/0.9\r\n", Http10),
            ("GET /\r\n", Http10),
            ("GET /HTTP/1.1\r\n", Http11),
        ] {
            assert_complete(line.as_bytes(), expected);
        }
    }

    #[test]
    fn custom_methods_are_tokens() {
        assert_complete(b"PURGE /cache HTTP/1.1\r\n", Http11);
        assert_complete(b"FOO /x HTTP/1.1\r\n", Http11);
        assert_complete(b"get / HTTP/1.0\r\n", Http10);
        assert_complete(b"M-SEARCH * HTTP/1.1\r\n", Http11);
        assert_complete(b"X~|`^_.! / HTTP/1.1\r\n", Http11);
        for line in ["GE(T / HTTP/1.1\r\n", "G\"ET / HTTP/1.1\r\n", "GET{} / HTTP/1.1\r\n", "\u{e9}T / HTTP/1.1\r\n"] {
            assert_complete(line.as_bytes(), NotHttp);
        }
    }

    #[test]
    fn malformed_request_lines() {
        for line in [
            &b"GET\r\n"[..],
            b"GET / HTTP/1.1 extra\r\n",
            b"GET / HTTP/1\r\n",
            b"GET / HTTP/1.10\r\n",
            b"GET / HTTPS/1.1\r\n",
            b"GET / http/1.1\r\n",
            b"GET index.html HTTP/1.1\r\n",
            b"GET 1http://x/ HTTP/1.1\r\n",
            b"GET http:/x HTTP/1.1\r\n",
            b"GET http://a@@b/ HTTP/1.1\r\n",
            b"GET http://a{b}/ HTTP/1.1\r\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\n",
            b"GET /\x7f HTTP/1.1\r\n",
            b"GET /\rx HTTP/1.1\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
        ] {
            assert_complete(line, NotHttp);
        }
        // A CONNECT target needs no scheme; other methods do.
        assert_complete(b"CONNECT host:1 HTTP/1.1\r\n", Http11);
        assert_complete(b"POST host:1 HTTP/1.1\r\n", NotHttp);
    }

    #[test]
    fn leading_whitespace_or_control_bytes() {
        for bytes in [&b"\r\nGET / HTTP/1.1\r\n"[..], b"\n", b" GET / HTTP/1.1\r\n", b"\tGET", b"\x16\x03\x01", b"\0"] {
            assert_eq!(inspect(bytes), NotHttp, "{bytes:?}");
        }
    }

    #[test]
    fn h2_preface() {
        assert_complete(H2_PREFACE, H2c);
        let with_settings = [H2_PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
        assert_eq!(inspect(&with_settings), H2c);
        // Diverging from the preface makes it an HTTP/1 request line like any other.
        assert_eq!(inspect(b"PRI * HTTP/2.0\r\n\r\nXX"), Http10);
        assert_eq!(inspect(b"PRI * HTTP/1.1\r\n"), Http11);
        assert_eq!(inspect(b"PRX"), NeedMore);
    }

    #[test]
    fn binary_garbage() {
        assert_eq!(inspect(b"\x80\x81\x82\n"), NotHttp);
        assert_eq!(inspect(b"\xff\xfe garbage \x01\x02\n"), NotHttp);
        assert_eq!(inspect(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]), NotHttp);
        // Without a line feed Envoy keeps waiting, up to its limit.
        assert_eq!(inspect(b"\x80\x81\x82\x83"), NeedMore);
        let no_lf = vec![0xaa; MAX_INSPECT];
        assert_eq!(inspect(&no_lf[..MAX_INSPECT - 1]), NeedMore);
        assert_eq!(inspect(&no_lf), NotHttp);
    }

    #[test]
    fn very_long_first_line() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_INSPECT - 20, b'a');
        line.extend_from_slice(b" HTTP/1.1\r\n");
        assert!(line.len() <= MAX_INSPECT);
        assert_eq!(inspect(&line), Http11);
        assert_eq!(inspect(&line[..line.len() - 1]), NeedMore);
        // A request line that does not end within MAX_INSPECT bytes is given up on, whatever follows.
        let mut long = b"GET /".to_vec();
        long.resize(MAX_INSPECT, b'a');
        assert_eq!(inspect(&long), NotHttp);
        long.extend_from_slice(b" HTTP/1.1\r\n");
        assert_eq!(inspect(&long), NotHttp);
    }

    #[test]
    fn random_inputs_are_prefix_consistent() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        // Printable-heavy alphabets make well-formed lines likely enough to exercise every branch.
        let alphabet = b"GETPOSH /:@?*HTTP/1.01.1 \r\n\t\x00\xffazAZ09-_~";
        for i in 0..300_000 {
            let len = rng.below(48);
            let bytes: Vec<u8> = if i % 3 == 0 {
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut bytes = if i % 3 == 1 { b"GET / HTTP/1.1\r\n".to_vec() } else { Vec::new() };
                bytes.extend((0..len).map(|_| alphabet[rng.below(alphabet.len())]));
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    bytes[at] = alphabet[rng.below(alphabet.len())];
                }
                bytes
            };
            let verdict = inspect(&bytes);
            let early = inspect(&bytes[..rng.below(bytes.len() + 1)]);
            if early != NeedMore {
                assert_eq!(early, verdict, "{bytes:?}");
            }
        }
    }
}
