//! TLS inspector: decides from the bytes peeked off a new connection whether it starts with a TLS ClientHello, and if
//! so extracts the SNI host name and the ALPN list that filter chain matching needs (Envoy's
//! `envoy.filters.listener.tls_inspector`).
//!
//! # How this copies Envoy
//!
//! Envoy (source/extensions/filters/listener/tls_inspector/tls_inspector.cc) feeds the peeked bytes to a BoringSSL
//! server handshake and stops it from the SNI callback, which BoringSSL runs only after it has accepted the
//! ClientHello. The verdicts map as follows:
//!
//! * `SSL_ERROR_WANT_READ` below the size limit → [`TlsInspect::NeedMore`]; at the limit (64 KiB by default,
//!   `TLS_MAX_CLIENT_HELLO`) Envoy counts `client_hello_too_large` and closes → [`TlsInspect::TooLarge`]. We answer
//!   `TooLarge` as soon as the next record the hello needs ends past the limit, since Envoy (which never peeks past
//!   it) could only end up there.
//! * any BoringSSL parse error before the callback ran → `tls_not_found`: the connection goes on as `raw_buffer`
//!   (unless `close_connection_on_client_hello_parsing_errors`, the caller's business) → [`TlsInspect::NotTls`].
//!   A malformed hello is therefore *not* a rejection of the connection, just "not TLS".
//! * the callback ran → transport `tls` with SNI and ALPN → [`TlsInspect::Tls`].
//!
//! The BoringSSL checks that run before that callback, and that we reproduce (ssl/s3_both.cc, tls_record.cc,
//! handshake_server.cc `do_read_client_hello`, extensions.cc `ssl_client_hello_init`):
//!
//! * record layer: content type 22, major version 3, length at most 16384 (+320 bytes of allowed ciphertext
//!   overhead, checked before the body arrives), at most 32 consecutive empty records; the ClientHello may span
//!   records; a handshake message longer than 16384 bytes is refused as soon as its header is seen; bytes of
//!   another handshake message after the ClientHello in the same record are refused; an SSLv2-compatible
//!   ("V2ClientHello") first record is accepted like BoringSSL does (no SNI, no ALPN);
//! * ClientHello body: version, 32-byte random, session id of at most 32 bytes, a non-empty even cipher suite list,
//!   a non-empty compression list, then either nothing or exactly one well-formed extension block without
//!   duplicate types and without trailing bytes;
//! * server_name: exactly one `host_name` entry of 1..=255 bytes without NUL, else not TLS;
//! * version negotiation within TLS 1.0..=1.3 (Envoy's configured range) from supported_versions, or from the legacy
//!   version when that extension is absent; a null compression method must be offered, and it must be the only one
//!   when TLS 1.3 is negotiated.
//!
//! ALPN follows Envoy's own `onALPN`: a malformed list is ignored (the hello is still TLS, with no ALPN) and left for
//! the real TLS stack to reject.
//!
//! Known differences, all on inputs no real client sends: non-handshake records are "not TLS" as soon as their header
//! is seen (BoringSSL skips up to 4 warning alerts and closes on `close_notify`); the contents of extensions other
//! than server_name, ALPN and supported_versions are not validated (BoringSSL rejects e.g. a malformed
//! supported_groups before the callback, so Envoy would say `tls_not_found` where we say TLS); encrypted
//! ClientHello is not looked at.
//!
//! The parser is stateless: the caller passes everything peeked so far and calls again with more. It never panics,
//! allocates only for a hello split over several records (bounded by the 16 KiB message limit) and for the results.

/// Envoy's default and largest `max_client_hello_size` (`TLS_MAX_CLIENT_HELLO`): peeked bytes beyond it are never
/// looked at, and a hello that does not fit is [`TlsInspect::TooLarge`].
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// What the first bytes of a connection say about TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsInspect {
    /// The bytes so far are a valid beginning of a ClientHello; call again with more.
    NeedMore,
    /// Not a (valid) TLS ClientHello: Envoy's `tls_not_found`, the connection continues as `raw_buffer`.
    NotTls,
    /// A ClientHello was accepted: transport protocol `tls`.
    Tls(ClientHello),
    /// The ClientHello does not fit in [`MAX_CLIENT_HELLO`] bytes: Envoy's `client_hello_too_large`, close.
    TooLarge,
}

/// What filter chain matching uses from a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI `host_name`, lower-cased (server_names match case-insensitively); bytes that are not UTF-8 become
    /// U+FFFD, which no configured name can match.
    pub server_name: Option<String>,
    /// ALPN protocol names in the client's order (application_protocols walks them in that order).
    pub alpn: Vec<String>,
}

const RECORD_HEADER_LEN: usize = 5;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const RECORD_MAJOR_VERSION: u8 = 3;
/// SSL3_RT_MAX_PLAIN_LENGTH: the largest record body once "decrypted" (the null cipher of a first flight).
const MAX_PLAINTEXT_LEN: usize = 16_384;
/// SSL3_RT_MAX_ENCRYPTED_LENGTH: BoringSSL refuses a longer record from its header alone.
const MAX_RECORD_LEN: usize = MAX_PLAINTEXT_LEN + 320;
/// BoringSSL's `kMaxEmptyRecords`.
const MAX_EMPTY_RECORDS: u32 = 32;
const HANDSHAKE_HEADER_LEN: usize = 4;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// BoringSSL's `kMaxMessageLen` for a server that does not ask for client certificates (Envoy's inspector).
const MAX_HANDSHAKE_MESSAGE_LEN: usize = 16_384;
/// BoringSSL refuses a V2ClientHello longer than this.
const MAX_V2_CLIENT_HELLO_LEN: usize = 4096;
const MAX_SESSION_ID_LEN: usize = 32;
const RANDOM_LEN: usize = 32;
/// TLSEXT_MAXLEN_host_name.
const MAX_HOST_NAME_LEN: usize = 255;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const SNI_HOST_NAME: u8 = 0;

const TLS1_0: u16 = 0x0301;
const TLS1_1: u16 = 0x0302;
const TLS1_2: u16 = 0x0303;
const TLS1_3: u16 = 0x0304;
/// Envoy's configured range, in BoringSSL's order of preference.
const SERVER_VERSIONS: [u16; 4] = [TLS1_3, TLS1_2, TLS1_1, TLS1_0];

/// Looks for a TLS ClientHello at the start of `buf`, the bytes peeked from a new connection so far.
pub fn inspect(buf: &[u8]) -> TlsInspect {
    // Envoy never peeks past its limit, so bytes beyond it must not change the verdict.
    let view = buf.get(..MAX_CLIENT_HELLO).unwrap_or(buf);
    match read_client_hello(view) {
        Step::Need(end) if end > MAX_CLIENT_HELLO => TlsInspect::TooLarge,
        Step::Need(_) => TlsInspect::NeedMore,
        Step::Reject => TlsInspect::NotTls,
        Step::Done(hello) => TlsInspect::Tls(hello),
    }
}

/// The outcome of one parsing stage.
enum Step {
    /// The buffer must reach this length (always more than it has) before anything more can be said.
    Need(usize),
    Reject,
    Done(ClientHello),
}

/// Walks the record layer, reassembling the first handshake message, and judges it once complete.
fn read_client_hello(buf: &[u8]) -> Step {
    if let Some(step) = v2_client_hello(buf) {
        return step;
    }
    let mut handshake = Reassembly::Empty;
    let mut offset = 0;
    let mut empty_records = 0;
    loop {
        if let Some((msg_type, msg_len)) = handshake.message_header() {
            let end = HANDSHAKE_HEADER_LEN + msg_len;
            if let Some(message) = handshake.bytes().get(..end) {
                // BoringSSL refuses handshake bytes beyond the ClientHello ("excess handshake data").
                if handshake.bytes().len() > end || msg_type != HANDSHAKE_CLIENT_HELLO {
                    return Step::Reject;
                }
                return client_hello(message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default());
            }
            // Refused before waiting for the rest, as BoringSSL checks the size before reading another record.
            if msg_len > MAX_HANDSHAKE_MESSAGE_LEN {
                return Step::Reject;
            }
        }
        let header = buf.get(offset..).unwrap_or_default();
        // Judge the header bytes as they arrive: plaintext protocols are told apart on their first two bytes.
        if header.first().is_some_and(|&t| t != CONTENT_TYPE_HANDSHAKE)
            || header.get(1).is_some_and(|&major| major != RECORD_MAJOR_VERSION)
        {
            return Step::Reject;
        }
        let [_, _, _, len_hi, len_lo, ..] = *header else {
            return Step::Need(offset + RECORD_HEADER_LEN);
        };
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len > MAX_RECORD_LEN {
            return Step::Reject;
        }
        let end = offset + RECORD_HEADER_LEN + len;
        let Some(body) = buf.get(offset + RECORD_HEADER_LEN..end) else {
            return Step::Need(end);
        };
        if len > MAX_PLAINTEXT_LEN {
            return Step::Reject;
        }
        if body.is_empty() {
            empty_records += 1;
            if empty_records > MAX_EMPTY_RECORDS {
                return Step::Reject;
            }
        } else {
            empty_records = 0;
        }
        handshake.push(body);
        offset = end;
    }
}

/// BoringSSL still accepts an SSLv2-format ClientHello as the first record and turns it into a TLS one without
/// extensions. Returns None when the first record is not one (or cannot be one), leaving it to the record layer.
fn v2_client_hello(buf: &[u8]) -> Option<Step> {
    let &first = buf.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    // BoringSSL decides after five bytes; a record whose type byte has the high bit set is never a handshake, so
    // anything that is not a V2ClientHello is refused (by the record layer's type check).
    let maybe_v2 = buf.get(2).is_none_or(|&b| b == HANDSHAKE_CLIENT_HELLO)
        && buf.get(3).is_none_or(|&b| b == RECORD_MAJOR_VERSION);
    if !maybe_v2 {
        return Some(Step::Reject);
    }
    if buf.len() < RECORD_HEADER_LEN {
        return Some(Step::Need(RECORD_HEADER_LEN));
    }
    let len = usize::from(u16::from_be_bytes([first & 0x7f, *buf.get(1)?]));
    // Shorter than the five bytes already read is refused too.
    if !(RECORD_HEADER_LEN - 2..=MAX_V2_CLIENT_HELLO_LEN).contains(&len) {
        return Some(Step::Reject);
    }
    let Some(message) = buf.get(2..2 + len) else {
        return Some(Step::Need(2 + len));
    };
    Some(parse_v2_client_hello(message).map_or(Step::Reject, Step::Done))
}

fn parse_v2_client_hello(message: &[u8]) -> Option<ClientHello> {
    let mut r = Reader::new(message);
    r.u8()?;
    let version = r.u16()?;
    let cipher_specs_len = usize::from(r.u16()?);
    let session_id_len = usize::from(r.u16()?);
    let challenge_len = usize::from(r.u16()?);
    let cipher_specs = r.bytes(cipher_specs_len)?;
    r.bytes(session_id_len)?;
    r.bytes(challenge_len)?;
    if !r.is_empty() || cipher_specs.len() % 3 != 0 {
        return None;
    }
    // Only 3-byte specs with a zero first byte map to TLS cipher suites; the converted hello needs at least one.
    if !cipher_specs.chunks_exact(3).any(|spec| spec.first() == Some(&0)) {
        return None;
    }
    // The converted hello offers only the null compression method and no extensions.
    accept(version, &[0], &[])
}

/// Parses a ClientHello body (after the 4-byte handshake header) as SSL_parse_client_hello does, then applies the
/// checks BoringSSL makes before the SNI callback.
fn client_hello(body: &[u8]) -> Step {
    parse_client_hello(body).map_or(Step::Reject, Step::Done)
}

fn parse_client_hello(body: &[u8]) -> Option<ClientHello> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16()?;
    r.bytes(RANDOM_LEN)?;
    if r.u8_prefixed()?.len() > MAX_SESSION_ID_LEN {
        return None;
    }
    let cipher_suites = r.u16_prefixed()?;
    if cipher_suites.len() < 2 || cipher_suites.len() % 2 != 0 {
        return None;
    }
    let compression = r.u8_prefixed()?;
    if compression.is_empty() {
        return None;
    }
    // A hello may end after the compression methods (no extensions at all).
    let extensions = if r.is_empty() { &[][..] } else { r.u16_prefixed()? };
    if !r.is_empty() || !extensions_well_formed(extensions) {
        return None;
    }
    accept(legacy_version, compression, extensions)
}

/// The checks between a parsed hello and BoringSSL's SNI callback; None means Envoy's `tls_not_found`.
fn accept(legacy_version: u16, compression: &[u8], extensions: &[u8]) -> Option<ClientHello> {
    let server_name = match find_extension(extensions, EXT_SERVER_NAME) {
        Some(data) => Some(parse_server_name(data)?),
        None => None,
    };
    let alpn = find_extension(extensions, EXT_ALPN).and_then(parse_alpn).unwrap_or_default();
    let version = negotiate_version(legacy_version, find_extension(extensions, EXT_SUPPORTED_VERSIONS))?;
    if !compression.contains(&0) || (version >= TLS1_3 && compression.len() != 1) {
        return None;
    }
    Some(ClientHello { server_name, alpn })
}

/// Every extension has a complete header and body, and no type appears twice.
fn extensions_well_formed(extensions: &[u8]) -> bool {
    // One bit per possible type: constant memory and linear time however many extensions an attacker sends.
    let mut seen = [0u64; 1024];
    let mut r = Reader::new(extensions);
    while !r.is_empty() {
        let (Some(ext_type), Some(_)) = (r.u16(), r.u16_prefixed()) else {
            return false;
        };
        let (word, bit) = (usize::from(ext_type >> 6), 1u64 << (ext_type & 63));
        let Some(slot) = seen.get_mut(word) else {
            return false;
        };
        if *slot & bit != 0 {
            return false;
        }
        *slot |= bit;
    }
    true
}

/// The body of the first extension of `wanted` type, in a block already known to be well formed.
fn find_extension(extensions: &[u8], wanted: u16) -> Option<&[u8]> {
    let mut r = Reader::new(extensions);
    while !r.is_empty() {
        let ext_type = r.u16()?;
        let data = r.u16_prefixed()?;
        if ext_type == wanted {
            return Some(data);
        }
    }
    None
}

/// BoringSSL's `extract_sni`: exactly one host_name entry, 1..=255 bytes, no NUL; anything else fails the hello.
fn parse_server_name(data: &[u8]) -> Option<String> {
    let mut r = Reader::new(data);
    let mut list = Reader::new(r.u16_prefixed()?);
    let name_type = list.u8()?;
    let host = list.u16_prefixed()?;
    if !list.is_empty() || !r.is_empty() {
        return None;
    }
    if name_type != SNI_HOST_NAME || host.is_empty() || host.len() > MAX_HOST_NAME_LEN || host.contains(&0) {
        return None;
    }
    Some(String::from_utf8_lossy(host).to_ascii_lowercase())
}

/// Envoy's `onALPN`: None (no ALPN, but still TLS) unless the list is complete and every name is non-empty.
fn parse_alpn(data: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader::new(data);
    let list = r.u16_prefixed()?;
    if !r.is_empty() || list.len() < 2 {
        return None;
    }
    let mut names = Reader::new(list);
    let mut protocols = Vec::new();
    while !names.is_empty() {
        let name = names.u8_prefixed()?;
        if name.is_empty() {
            return None;
        }
        protocols.push(String::from_utf8_lossy(name).into_owned());
    }
    Some(protocols)
}

/// BoringSSL's `negotiate_version` for a server allowing TLS 1.0..=1.3: the client's supported_versions list, or
/// one derived from the legacy version field, must share a version with the server.
fn negotiate_version(legacy_version: u16, supported_versions: Option<&[u8]>) -> Option<u16> {
    // What BoringSSL substitutes for a missing supported_versions extension, newest first.
    const LEGACY: [u8; 6] = [3, 3, 3, 2, 3, 1];
    let versions = match supported_versions {
        Some(data) => {
            let mut r = Reader::new(data);
            let versions = r.u8_prefixed()?;
            if !r.is_empty() || versions.is_empty() {
                return None;
            }
            versions
        }
        None => {
            let count = match legacy_version {
                v if v >= TLS1_2 => 3,
                v if v >= TLS1_1 => 2,
                v if v >= TLS1_0 => 1,
                _ => 0,
            };
            LEGACY.get(LEGACY.len() - 2 * count..).unwrap_or_default()
        }
    };
    // Server preference order; a trailing odd byte in the client's list fails the scan, as BoringSSL's CBS walk does.
    for server in SERVER_VERSIONS {
        let mut r = Reader::new(versions);
        while !r.is_empty() {
            if r.u16()? == server {
                return Some(server);
            }
        }
    }
    None
}

/// The handshake bytes gathered from consecutive records; borrowed while they come from a single record (the usual
/// case), copied once a message spans records.
enum Reassembly<'a> {
    Empty,
    One(&'a [u8]),
    Many(Vec<u8>),
}

impl<'a> Reassembly<'a> {
    fn push(&mut self, body: &'a [u8]) {
        if body.is_empty() {
            return;
        }
        *self = match std::mem::replace(self, Reassembly::Empty) {
            Reassembly::Empty => Reassembly::One(body),
            Reassembly::One(first) => {
                let mut joined = Vec::with_capacity(first.len() + body.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(body);
                Reassembly::Many(joined)
            }
            Reassembly::Many(mut joined) => {
                joined.extend_from_slice(body);
                Reassembly::Many(joined)
            }
        };
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Reassembly::Empty => &[],
            Reassembly::One(bytes) => bytes,
            Reassembly::Many(bytes) => bytes,
        }
    }

    /// Type and body length of the first handshake message, once its 4-byte header is in.
    fn message_header(&self) -> Option<(u8, usize)> {
        let [msg_type, a, b, c, ..] = *self.bytes() else {
            return None;
        };
        Some((msg_type, usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)))
    }
}

/// A bounds-checked big-endian reader over a byte slice: every read is an Option, None once the bytes run out.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        let &[hi, lo] = self.bytes(2)? else {
            return None;
        };
        Some(u16::from_be_bytes([hi, lo]))
    }

    fn u8_prefixed(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.bytes(usize::from(len))
    }

    fn u16_prefixed(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.bytes(usize::from(len))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::listener::filters::test_rng::Rng;

    // Real ClientHellos from OpenSSL 3.0, made with Python's ssl module over a memory BIO (no network). The first
    // offers TLS 1.3 (and 1.2) with SNI "Example.COM" and ALPN h2, http/1.1; the second is capped at TLS 1.2 and has
    // SNI "api.internal.test" and no ALPN.
    const OPENSSL_TLS13_HELLO: &str = concat!(
        "1603010200010001fc03032afdd36d434fb2f91896d9bf04284acccd764443a0809b0dff81d0ff9e682c792024802d5f51bc",
        "cb987b5802592778c5bdcfe93899dfbb15afddf774560e8a0f0d0024130213031301c02cc030c02bc02fcca9cca8c024c028",
        "c023c027009f009e006b006700ff0100018f00000010000e00000b4578616d706c652e434f4d000b000403000102000a0016",
        "0014001d0017001e0019001801000101010201030104002300000010000e000c02683208687474702f312e31001600000017",
        "0000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b",
        "00050403040303002d00020101003300260024001d0020945a216daad0b9bf6ee7c551bd2fc8a3bca8f7098794b5cc882735",
        "b95002fd17001500d00000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000",
    );
    const OPENSSL_TLS12_HELLO: &str = concat!(
        "16030100b7010000b30303c4adebaada0ed43ed3cfa49bc8e241f915171632324efeedd3fb311b9f5e867100001ec02cc030",
        "c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100006c0000001600140000116170692e696e7465726e61",
        "6c2e74657374000b000403000102000a000c000a001d0017001e00190018002300000016000000170000000d002a00280403",
        "05030603080708080809080a080b080408050806040105010601030303010302040205020602",
    );

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn tls(sni: Option<&str>, alpn: &[&str]) -> TlsInspect {
        TlsInspect::Tls(ClientHello {
            server_name: sni.map(str::to_string),
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn u8_prefixed(data: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from(data.len()).unwrap()];
        out.extend_from_slice(data);
        out
    }

    fn u16_prefixed(data: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(data.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    fn sni_ext(host: &[u8]) -> Vec<u8> {
        let mut entry = vec![SNI_HOST_NAME];
        entry.extend(u16_prefixed(host));
        u16_prefixed(&entry)
    }

    fn alpn_ext(names: &[&str]) -> Vec<u8> {
        let list: Vec<u8> = names.iter().flat_map(|n| u8_prefixed(n.as_bytes())).collect();
        u16_prefixed(&list)
    }

    fn versions_ext(versions: &[u16]) -> Vec<u8> {
        u8_prefixed(&versions.iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>())
    }

    fn handshake(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let mut message = vec![msg_type];
        message.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        message.extend_from_slice(body);
        message
    }

    fn record(content_type: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, 3, 1];
        out.extend(u16_prefixed(body));
        out
    }

    /// Frames `message` as handshake records of the given sizes (the last size repeats).
    fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let (mut out, mut rest, mut i) = (Vec::new(), message, 0);
        while !rest.is_empty() {
            let n = sizes[i.min(sizes.len() - 1)].min(rest.len()).min(MAX_PLAINTEXT_LEN);
            out.extend(record(CONTENT_TYPE_HANDSHAKE, &rest[..n]));
            rest = &rest[n..];
            i += 1;
        }
        out
    }

    /// A ClientHello body under construction.
    #[derive(Clone)]
    struct Hello {
        version: u16,
        session_id: Vec<u8>,
        ciphers: Vec<u8>,
        compression: Vec<u8>,
        extensions: Option<Vec<u8>>,
        trailing: Vec<u8>,
    }

    impl Hello {
        fn tls12() -> Self {
            Hello {
                version: TLS1_2,
                session_id: vec![7; 32],
                ciphers: vec![0xc0, 0x2f, 0x00, 0x9c],
                compression: vec![0],
                extensions: Some(Vec::new()),
                trailing: Vec::new(),
            }
        }

        fn tls13() -> Self {
            let hello = Hello { ciphers: vec![0x13, 0x01, 0x13, 0x02], ..Self::tls12() };
            hello.ext(EXT_SUPPORTED_VERSIONS, &versions_ext(&[0x0a0a, TLS1_3, TLS1_2]))
        }

        fn ext(mut self, ext_type: u16, data: &[u8]) -> Self {
            let block = self.extensions.get_or_insert_with(Vec::new);
            block.extend(ext_type.to_be_bytes());
            block.extend(u16_prefixed(data));
            self
        }

        fn sni(self, host: &str) -> Self {
            self.ext(EXT_SERVER_NAME, &sni_ext(host.as_bytes()))
        }

        fn alpn(self, names: &[&str]) -> Self {
            self.ext(EXT_ALPN, &alpn_ext(names))
        }

        fn body(&self) -> Vec<u8> {
            let mut body = self.version.to_be_bytes().to_vec();
            body.extend([0x5a; RANDOM_LEN]);
            body.extend(u8_prefixed(&self.session_id));
            body.extend(u16_prefixed(&self.ciphers));
            body.extend(u8_prefixed(&self.compression));
            if let Some(extensions) = &self.extensions {
                body.extend(u16_prefixed(extensions));
            }
            body.extend(&self.trailing);
            body
        }

        fn message(&self) -> Vec<u8> {
            handshake(HANDSHAKE_CLIENT_HELLO, &self.body())
        }

        fn bytes(&self) -> Vec<u8> {
            records(&self.message(), &[MAX_PLAINTEXT_LEN])
        }

        fn inspect(&self) -> TlsInspect {
            inspect(&self.bytes())
        }
    }

    /// Every proper prefix needs more; the whole gives `expected`, also when application data follows.
    fn assert_complete(bytes: &[u8], expected: &TlsInspect) {
        // Every prefix of small inputs; an even sample plus the last one of large ones (each call is linear).
        let step = (bytes.len() / 2048).max(1);
        for n in (0..bytes.len()).step_by(step).chain(bytes.len().checked_sub(1)) {
            assert_eq!(inspect(&bytes[..n]), TlsInspect::NeedMore, "prefix of {n} of {} bytes", bytes.len());
        }
        assert_eq!(&inspect(bytes), expected);
        let mut more = bytes.to_vec();
        more.extend(record(23, b"early application data"));
        assert_eq!(&inspect(&more), expected);
    }

    #[test]
    fn openssl_tls13_hello() {
        let bytes = hex(OPENSSL_TLS13_HELLO);
        assert_complete(&bytes, &tls(Some("example.com"), &["h2", "http/1.1"]));
    }

    #[test]
    fn openssl_tls12_hello() {
        let bytes = hex(OPENSSL_TLS12_HELLO);
        assert_complete(&bytes, &tls(Some("api.internal.test"), &[]));
    }

    #[test]
    fn hello_split_across_two_records_at_every_byte() {
        let message = hex(OPENSSL_TLS13_HELLO)[RECORD_HEADER_LEN..].to_vec();
        let expected = tls(Some("example.com"), &["h2", "http/1.1"]);
        for cut in 1..message.len() {
            assert_complete(&records(&message, &[cut, usize::MAX]), &expected);
        }
    }

    #[test]
    fn hello_in_one_byte_records() {
        let message = Hello::tls13().sni("a.example").alpn(&["h2"]).message();
        assert_complete(&records(&message, &[1]), &tls(Some("a.example"), &["h2"]));
    }

    #[test]
    fn built_tls12_and_tls13_hellos() {
        let expected = tls(Some("svc.ns.svc.cluster.local"), &["istio-peer-exchange", "istio", "h2"]);
        for hello in [Hello::tls12(), Hello::tls13()] {
            let hello = hello.sni("svc.ns.svc.cluster.local").alpn(&["istio-peer-exchange", "istio", "h2"]);
            assert_complete(&hello.bytes(), &expected);
        }
        assert_eq!(Hello::tls12().inspect(), tls(None, &[]));
        assert_eq!(Hello::tls13().alpn(&["http/1.1"]).inspect(), tls(None, &["http/1.1"]));
    }

    #[test]
    fn server_name_is_lower_cased() {
        assert_eq!(Hello::tls13().sni("WWW.Example.ORG").inspect(), tls(Some("www.example.org"), &[]));
        // Not UTF-8: kept as TLS, with a name no configured server_names entry can match.
        let hello = Hello::tls13().ext(EXT_SERVER_NAME, &sni_ext(b"caf\xe9.example"));
        assert_eq!(hello.inspect(), tls(Some("caf\u{fffd}.example"), &[]));
    }

    #[test]
    fn many_extensions_in_any_order() {
        let mut hello = Hello::tls13();
        for i in 0..16u16 {
            hello = hello.ext(0x0a0a + 0x1010 * i, &[]);
        }
        for i in 0..40u16 {
            hello = hello.ext(1000 + i, &vec![i as u8; usize::from(i) * 7]);
        }
        let hello = hello.alpn(&["h2", "http/1.1"]).ext(21, &[0; 300]).sni("late.example").ext(0xff01, &[0]);
        assert_complete(&hello.bytes(), &tls(Some("late.example"), &["h2", "http/1.1"]));
    }

    #[test]
    fn malformed_alpn_is_tls_without_alpn() {
        let mut trailing = alpn_ext(&["h2"]);
        trailing.push(0);
        let cases: [Vec<u8>; 5] =
            [alpn_ext(&["h2", ""]), u16_prefixed(&[]), u16_prefixed(&[0]), trailing, u16_prefixed(&[5, b'h', b'2'])];
        for data in cases {
            let hello = Hello::tls13().sni("a.b").ext(EXT_ALPN, &data);
            assert_eq!(hello.inspect(), tls(Some("a.b"), &[]), "{data:?}");
        }
    }

    #[test]
    fn malformed_server_name_is_not_tls() {
        let two_entries = {
            let mut entries = vec![SNI_HOST_NAME];
            entries.extend(u16_prefixed(b"a.example"));
            entries.push(SNI_HOST_NAME);
            entries.extend(u16_prefixed(b"b.example"));
            u16_prefixed(&entries)
        };
        let mut trailing = sni_ext(b"a.example");
        trailing.push(0);
        let other_type = u16_prefixed(&[[1u8].as_slice(), &u16_prefixed(b"a.example")].concat());
        let cases: [Vec<u8>; 7] = [
            sni_ext(b""),
            sni_ext(b"a\0b"),
            sni_ext(&[b'a'; 256]),
            two_entries,
            trailing,
            other_type,
            u16_prefixed(&[SNI_HOST_NAME, 0, 20, b'a']),
        ];
        for data in cases {
            assert_eq!(Hello::tls13().ext(EXT_SERVER_NAME, &data).inspect(), TlsInspect::NotTls, "{data:?}");
        }
        let longest = "a".repeat(MAX_HOST_NAME_LEN);
        assert_eq!(Hello::tls13().sni(&longest).inspect(), tls(Some(&longest), &[]));
    }

    #[test]
    fn duplicate_or_truncated_extensions_are_not_tls() {
        assert_eq!(Hello::tls13().ext(1000, &[]).ext(1000, &[1]).inspect(), TlsInspect::NotTls);
        assert_eq!(Hello::tls13().alpn(&["h2"]).alpn(&["h2"]).inspect(), TlsInspect::NotTls);
        let mut truncated = Hello::tls13();
        truncated.extensions.as_mut().unwrap().extend([0, 5, 0, 9, 1]);
        assert_eq!(truncated.inspect(), TlsInspect::NotTls);
        let mut half_header = Hello::tls13();
        half_header.extensions.as_mut().unwrap().push(7);
        assert_eq!(half_header.inspect(), TlsInspect::NotTls);
    }

    #[test]
    fn version_negotiation() {
        let legacy = |version| Hello { version, ..Hello::tls12() };
        assert_eq!(legacy(TLS1_0).inspect(), tls(None, &[]));
        assert_eq!(legacy(0x0305).inspect(), tls(None, &[]));
        assert_eq!(legacy(0x0300).inspect(), TlsInspect::NotTls);
        assert_eq!(legacy(0x0200).inspect(), TlsInspect::NotTls);
        let supported = |data: Vec<u8>| Hello::tls12().ext(EXT_SUPPORTED_VERSIONS, &data).inspect();
        assert_eq!(supported(versions_ext(&[0x0a0a, TLS1_3])), tls(None, &[]));
        assert_eq!(supported(versions_ext(&[0x7f1c, 0x0a0a])), TlsInspect::NotTls);
        assert_eq!(supported(versions_ext(&[0x0300])), TlsInspect::NotTls);
        assert_eq!(supported(u8_prefixed(&[])), TlsInspect::NotTls);
        assert_eq!(supported(u8_prefixed(&[3, 4, 9])), tls(None, &[]));
        assert_eq!(supported(u8_prefixed(&[3, 3, 9])), TlsInspect::NotTls);
        assert_eq!(supported([versions_ext(&[TLS1_3]), vec![0]].concat()), TlsInspect::NotTls);
    }

    #[test]
    fn compression_methods() {
        assert_eq!(Hello { compression: vec![1, 0], ..Hello::tls12() }.inspect(), tls(None, &[]));
        assert_eq!(Hello { compression: vec![1], ..Hello::tls12() }.inspect(), TlsInspect::NotTls);
        assert_eq!(Hello { compression: vec![], ..Hello::tls12() }.inspect(), TlsInspect::NotTls);
        assert_eq!(Hello { compression: vec![0, 1], ..Hello::tls13() }.inspect(), TlsInspect::NotTls);
    }

    #[test]
    fn body_fields() {
        assert_eq!(Hello { session_id: vec![1; 33], ..Hello::tls12() }.inspect(), TlsInspect::NotTls);
        assert_eq!(Hello { session_id: vec![], ..Hello::tls12() }.inspect(), tls(None, &[]));
        assert_eq!(Hello { ciphers: vec![0, 0x2f, 0], ..Hello::tls12() }.inspect(), TlsInspect::NotTls);
        assert_eq!(Hello { ciphers: vec![], ..Hello::tls12() }.inspect(), TlsInspect::NotTls);
        // No extension block at all is a valid (old-style) hello.
        assert_eq!(Hello { extensions: None, ..Hello::tls12() }.inspect(), tls(None, &[]));
        assert_eq!(Hello { trailing: vec![0], ..Hello::tls12() }.inspect(), TlsInspect::NotTls);
        assert_eq!(Hello { extensions: None, trailing: vec![0], ..Hello::tls12() }.inspect(), TlsInspect::NotTls);
        let mut short = Hello::tls12().body();
        short.truncate(20);
        assert_eq!(inspect(&record(22, &handshake(1, &short))), TlsInspect::NotTls);
    }

    #[test]
    fn handshake_framing() {
        let message = Hello::tls13().sni("x.example").message();
        // Another handshake message behind the ClientHello in the same record is refused...
        let excess = [message.clone(), handshake(16, &[0; 8])].concat();
        assert_eq!(inspect(&record(22, &excess)), TlsInspect::NotTls);
        // ...but not in a later record, which is never read.
        let later = [record(22, &message), record(22, &handshake(16, &[0; 8]))].concat();
        assert_eq!(inspect(&later), tls(Some("x.example"), &[]));
        // The first message must be a ClientHello.
        assert_eq!(inspect(&record(22, &handshake(2, &Hello::tls12().body()))), TlsInspect::NotTls);
        // A declared message larger than BoringSSL's 16 KiB limit is refused once its header is in.
        let huge = [vec![HANDSHAKE_CLIENT_HELLO, 0, 0x40, 0x01], vec![3; 96]].concat();
        assert_eq!(inspect(&record(22, &huge)[..50]), TlsInspect::NeedMore);
        assert_eq!(inspect(&record(22, &huge)), TlsInspect::NotTls);
    }

    #[test]
    fn plaintext_and_garbage_are_not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"G",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\x16\x02",
            b"\x16\x04\x01\x00\x05",
            b"\x17\x03\x03\x00\x05hello",
            b"\x15\x03\x03\x00\x02\x02\x28",
            b"\x00\x00\x00\x00\x00\x00",
            b"\x80\x10\x02",
            b"\xff\xff\xff\xff\xff",
        ] {
            assert_eq!(inspect(bytes), TlsInspect::NotTls, "{bytes:?}");
        }
        for bytes in [&b""[..], b"\x16", b"\x16\x03", b"\x16\x03\x03\x00", b"\x16\x03\x03\x00\x10", b"\x80"] {
            assert_eq!(inspect(bytes), TlsInspect::NeedMore, "{bytes:?}");
        }
    }

    #[test]
    fn record_limits() {
        let oversized = |len: usize| {
            let mut bytes = vec![22, 3, 1];
            bytes.extend(u16::try_from(len).unwrap().to_be_bytes());
            bytes.extend(handshake(HANDSHAKE_CLIENT_HELLO, &vec![0; len - HANDSHAKE_HEADER_LEN]));
            bytes
        };
        // Too long for plaintext, yet short enough that BoringSSL reads the body before refusing it.
        let plain = oversized(MAX_PLAINTEXT_LEN + 1);
        assert_eq!(inspect(&plain[..100]), TlsInspect::NeedMore);
        assert_eq!(inspect(&plain), TlsInspect::NotTls);
        // Past the ciphertext limit, refused from the header alone.
        assert_eq!(inspect(&oversized(MAX_RECORD_LEN + 1)[..5]), TlsInspect::NotTls);
        // Empty records are skipped, up to BoringSSL's limit.
        let hello = Hello::tls13().sni("e.example").bytes();
        let empties = |n: usize| [record(22, &[]).repeat(n), hello.clone()].concat();
        assert_complete(&empties(32), &tls(Some("e.example"), &[]));
        assert_eq!(inspect(&empties(33)), TlsInspect::NotTls);
    }

    #[test]
    fn hello_beyond_the_limit_is_too_large() {
        let message = Hello::tls13().sni("big.example").ext(21, &[0; 12_000]).message();
        // In 3-byte records the hello takes ~32 KiB: fine.
        assert_complete(&records(&message, &[3]), &tls(Some("big.example"), &[]));
        // In 1-byte records it takes ~72 KiB: too large, decided once a needed record ends past the limit.
        let bytes = records(&message, &[1]);
        assert!(bytes.len() > MAX_CLIENT_HELLO);
        let lengths: Vec<usize> = (0..=bytes.len()).collect();
        let first_too_large = lengths.partition_point(|&n| inspect(&bytes[..n]) == TlsInspect::NeedMore);
        assert!(first_too_large > MAX_CLIENT_HELLO - 6 && first_too_large <= MAX_CLIENT_HELLO);
        for n in [0, 1000, 60_000, first_too_large - 1] {
            assert_eq!(inspect(&bytes[..n]), TlsInspect::NeedMore);
        }
        for n in [first_too_large, MAX_CLIENT_HELLO, MAX_CLIENT_HELLO + 1, bytes.len()] {
            assert_eq!(inspect(&bytes[..n]), TlsInspect::TooLarge);
        }
    }

    fn v2_hello(version: u16, specs: &[[u8; 3]]) -> Vec<u8> {
        let challenge = [9u8; 16];
        let specs: Vec<u8> = specs.concat();
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend(version.to_be_bytes());
        message.extend(u16::try_from(specs.len()).unwrap().to_be_bytes());
        message.extend(0u16.to_be_bytes());
        message.extend(u16::try_from(challenge.len()).unwrap().to_be_bytes());
        message.extend(specs);
        message.extend(challenge);
        let len = u16::try_from(message.len()).unwrap() | 0x8000;
        [len.to_be_bytes().to_vec(), message].concat()
    }

    #[test]
    fn sslv2_compatible_hello() {
        assert_complete(&v2_hello(TLS1_2, &[[0, 0, 0x2f], [7, 0, 0xc0]]), &tls(None, &[]));
        assert_eq!(inspect(&v2_hello(0x0300, &[[0, 0, 0x2f]])), TlsInspect::NotTls);
        assert_eq!(inspect(&v2_hello(TLS1_0, &[[7, 0, 0xc0]])), TlsInspect::NotTls);
        let mut bad_specs = v2_hello(TLS1_0, &[[0, 0, 0x2f]]);
        bad_specs[6] += 1;
        bad_specs[1] += 1;
        bad_specs.push(0);
        assert_eq!(inspect(&bad_specs), TlsInspect::NotTls);
        assert_eq!(inspect(&[0x90, 0x01, 1, 3, 1]), TlsInspect::NotTls);
        assert_eq!(inspect(&[0x80, 0x02, 1, 3, 1]), TlsInspect::NotTls);
    }

    /// A verdict once given must not change when more bytes arrive.
    fn assert_prefix_consistent(bytes: &[u8], cut: usize) {
        let early = inspect(&bytes[..cut.min(bytes.len())]);
        if early != TlsInspect::NeedMore {
            assert_eq!(early, inspect(bytes), "{bytes:?} cut at {cut}");
        }
    }

    #[test]
    fn random_and_mutated_inputs() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            hex(OPENSSL_TLS13_HELLO),
            hex(OPENSSL_TLS12_HELLO),
            records(&Hello::tls13().sni("m.example").alpn(&["a", "bc"]).message(), &[7]),
            v2_hello(TLS1_1, &[[0, 0, 4]]),
        ];
        for i in 0..300_000 {
            let bytes = match i % 4 {
                0 => {
                    let len = rng.below(64);
                    rng.bytes(len)
                }
                1 => {
                    let len = rng.below(300);
                    [vec![22, 3, rng.below(4) as u8, 0, rng.below(256) as u8], rng.bytes(len)].concat()
                }
                _ => {
                    let mut bytes = seeds[rng.below(seeds.len())].clone();
                    for _ in 0..=rng.below(4) {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                    bytes.truncate(rng.below(bytes.len() + 1));
                    bytes
                }
            };
            let verdict = inspect(&bytes);
            assert_ne!(verdict, TlsInspect::TooLarge, "{bytes:?}");
            let cut = rng.below(bytes.len() + 1);
            assert_prefix_consistent(&bytes, cut);
        }
    }

    #[test]
    fn every_truncation_of_mutated_hellos_is_consistent() {
        let mut rng = Rng(42);
        let seed = hex(OPENSSL_TLS13_HELLO);
        for _ in 0..200 {
            let mut bytes = seed.clone();
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 << rng.below(8);
            for cut in 0..=bytes.len() {
                assert_prefix_consistent(&bytes, cut);
            }
        }
    }
}
